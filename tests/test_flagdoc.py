"""appliance/flagdoc.py: the one shape of a flag, as the analyser writes it and the controller and commands read it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import uuid

import pytest

from analyser.classifiers import Verdict
from analyser.flags import FlagBook, MemoryFlags, MongoFlags
from appliance import config, flagdoc, store
from appliance.errors import BadInput
from appliance.flagdoc import BadClient, BadFlag, parse_client
from lab import procs
from static_controller.config_view import View
from static_controller.modules.enforce import ban_matches

AT = dt.datetime(2026, 11, 21, 7, 0, 0, 250_000, tzinfo=dt.timezone.utc)   # whole ms: BSON keeps it exactly


def good(**changes) -> dict:
    doc = flagdoc.build(client_ip="10.0.0.10", client_port=40000, server_ports=[5222], classifier="xmpp_abuse",
                        reason="600 packets in 60 s", action="limit", evidence={"count": 600}, offence=2,
                        ban_seconds=600, flagged_at=AT, sensor="pi1")
    return {**doc, **changes}


def test_build_then_parse_gives_back_every_field():
    doc = good()
    f = flagdoc.parse(doc)
    assert (f.status, f.client_ip, f.client_port, f.server_ports) == ("flagged", "10.0.0.10", 40000, (5222,))
    assert (f.protocol, f.direction, f.origin, f.client_mac, f.exempt_reason) == ("tcp", "outbound", "analyser",
                                                                                   None, None)
    assert (f.scope, f.subject, str(f.client_net)) == ("connection", "10.0.0.10:40000", "10.0.0.10/32")
    assert (f.action, f.classifier, f.reason) == ("limit", "xmpp_abuse", "600 packets in 60 s")
    assert (f.offence, f.ban_seconds, f.sensor) == (2, 600, "pi1")
    assert f.flagged_at == f.updated_at == AT and f.expires_at == AT + dt.timedelta(seconds=600)
    assert f.evidence == {"count": 600} and f.released_at is None and f.id is None
    assert set(doc) == {flagdoc.CLIENT_IP, flagdoc.CLIENT_MAC, flagdoc.CLIENT_PORT, flagdoc.PROTOCOL,
                        flagdoc.SERVER_PORTS, flagdoc.DIRECTION, flagdoc.CLASSIFIER, flagdoc.REASON, flagdoc.ACTION,
                        flagdoc.EVIDENCE, flagdoc.OFFENCE, flagdoc.BAN_SECONDS, flagdoc.FLAGGED_AT,
                        flagdoc.EXPIRES_AT, flagdoc.UPDATED_AT, flagdoc.STATUS, flagdoc.SENSOR, flagdoc.ORIGIN,
                        flagdoc.SCOPE}
    assert doc[flagdoc.SCOPE] == f.reach == "local"


def test_scope_local_or_fleet_and_an_old_document_reads_as_local():
    """Local: only the raising sensor's controller enforces it; fleet: every sensor's; missing: local (the store
    filter ``applies_to`` says the same by itself: a document without scope never equals fleet)."""
    local, fleet = flagdoc.parse(good()), flagdoc.parse(good(scope="fleet"))
    assert (local.applies_to("pi1"), local.applies_to("pi2")) == (True, False)
    assert (fleet.reach, fleet.applies_to("pi1"), fleet.applies_to("pi2")) == ("fleet", True, True)
    old = flagdoc.parse({k: v for k, v in good().items() if k != flagdoc.SCOPE})
    assert (old.reach, old.applies_to("pi1"), old.applies_to("pi2")) == ("local", True, False)
    with pytest.raises(BadFlag, match="^scope 'global': expected one of local, fleet"):
        flagdoc.parse(good(scope="global"))
    with pytest.raises(BadFlag, match="^scope"):
        flagdoc.build(**{**{k: v for k, v in good().items() if k in (
            "client_ip", "server_ports", "classifier", "reason", "action", "evidence", "offence", "ban_seconds",
            "flagged_at", "sensor")}, "scope": "everywhere"})
    assert flagdoc.applies_to("pi2") == {"$or": [{"sensor": "pi2"}, {"scope": "fleet"}]}


def test_a_document_written_before_server_ports_parses_as_tcp_outbound_from_the_analyser():
    old = {k: v for k, v in good().items() if k not in (flagdoc.SERVER_PORTS, flagdoc.PROTOCOL, flagdoc.DIRECTION,
                                                       flagdoc.ORIGIN, flagdoc.CLIENT_MAC)}
    f = flagdoc.parse({**old, "server_port": 5223})
    assert (f.server_ports, f.protocol, f.direction, f.origin, f.client_mac) == ((5223,), "tcp", "outbound",
                                                                                 "analyser", None)
    with pytest.raises(BadFlag, match="^server_port None"):
        flagdoc.parse(old)


def test_subjects_a_prefix_a_host_by_mac_and_udp_inbound():
    args = dict(server_ports=[5223, 5222], classifier="c", reason="r", action="drop", evidence={}, offence=1,
                ban_seconds=60, flagged_at=AT, sensor="pi1")
    net = flagdoc.parse(flagdoc.build(client_ip="FD00:1::/64", **args))
    assert (net.scope, net.client_ip, net.subject, net.server_ports) == ("prefix", "fd00:1::/64", "fd00:1::/64",
                                                                        (5222, 5223))
    host = flagdoc.parse(flagdoc.build(client_mac="02:AA:00:00:00:01", **args))
    assert (host.scope, host.client_ip, host.client_net, host.subject) == ("host", None, None, "02:aa:00:00:00:01")
    udp = flagdoc.parse(flagdoc.build(client_ip="10.0.0.9/32", protocol="udp", direction="inbound", origin="manual",
                                      **args))
    assert (udp.scope, udp.client_ip, udp.protocol, udp.direction, udp.origin) == ("address", "10.0.0.9", "udp",
                                                                                   "inbound", "manual")
    exempt = flagdoc.parse(flagdoc.build(client_ip="10.0.0.9", exempt_reason="enforce.never_ban 10.0.0.0/24", **args))
    assert (exempt.status, exempt.exempt_reason) == ("exempt", "enforce.never_ban 10.0.0.0/24")


@pytest.mark.parametrize("changes,field", [
    ({"client_ip": "10.0.0.0/24", "client_port": 40000}, "client_port"),        # a port narrows one address
    ({"client_ip": "10.0.0.1/24"}, "client_ip"),                               # host bits after the length
    ({"client_ip": "10.0.0.0/8", "client_port": None}, "client_ip"),           # wider than a /16
    ({"client_ip": "::/0", "client_port": None}, "client_ip"),
    ({"client_mac": "02:00:00:00:00:01"}, "client_ip"),                         # two subjects
    ({"client_ip": None, "client_mac": "02:00:00:00:00:01"}, "client_port"),   # a port on a MAC subject
    ({"client_ip": None, "client_mac": "02-00-00-00-00-01", "client_port": None}, "client_mac"),
    ({"client_ip": None, "client_mac": "02:00:00:00:00:01", "client_port": None, "direction": "inbound"},
     "direction"),
    ({"protocol": "icmp"}, "protocol"), ({"direction": "up"}, "direction"), ({"origin": "ids"}, "origin"),
    ({"server_ports": []}, "server_ports"), ({"server_ports": [5222, 5222]}, "server_ports"),
    ({"server_ports": list(range(1, 10))}, "server_ports"), ({"server_ports": 5222}, "server_ports"),
    ({"status": "exempt"}, "exempt_reason"),
])
def test_subject_and_scope_rules_are_refused_by_name(changes, field):
    with pytest.raises(BadFlag, match=f"^{field} "):
        flagdoc.parse(good(**changes))


def test_whole_ip_ipv6_and_naive_dates():
    f = flagdoc.parse(good(client_port=None, client_ip="FD00::0010", expires_at=dt.datetime(2026, 11, 21, 7, 10)))
    assert f.client_port is None and f.client_ip == "fd00::10"
    assert f.expires_at == dt.datetime(2026, 11, 21, 7, 10, tzinfo=dt.timezone.utc)   # pymongo's naive UTC


@pytest.mark.parametrize("name,value", [
    ("status", "active"), ("status", None),
    ("client_ip", "nope"), ("client_ip", 167772170), ("client_ip", None), ("client_ip", "10.0.0.300"),
    ("client_port", 0), ("client_port", 65536), ("client_port", "40000"), ("client_port", True),
    ("server_ports", None), ("server_ports", [0]), ("server_ports", [5222.0]),
    ("action", "block"),
    ("flagged_at", "2026-11-21T07:00:00Z"), ("expires_at", None), ("updated_at", "2026-11-21 07:00:00"),
    ("released_at", 0),
    ("classifier", ""), ("classifier", None), ("reason", None), ("sensor", 1), ("evidence", [1]),
    ("offence", 0), ("offence", True), ("ban_seconds", "600"),
])
def test_every_malformed_field_is_refused_by_name(name, value):
    with pytest.raises(BadFlag) as exc:
        flagdoc.parse(good(**{name: value}))
    line = str(exc.value)
    assert line.startswith(f"{name} ") and "expected" in line and "\n" not in line
    assert isinstance(exc.value, BadInput)


@pytest.mark.parametrize("name", ["status", "client_ip", "action", "classifier", "reason", "evidence",
                                  "offence", "ban_seconds", "flagged_at", "expires_at", "updated_at", "sensor"])
def test_a_missing_field_is_refused_by_name(name):
    doc = good()
    del doc[name]
    with pytest.raises(BadFlag, match=f"^{name} None"):
        flagdoc.parse(doc)


def test_action_default_only_when_asked_for():
    doc = good()
    del doc["action"]
    assert flagdoc.parse(doc, "drop").action == "drop"
    assert flagdoc.parse(good(), "drop").action == "limit"
    with pytest.raises(BadFlag, match="^action"):
        flagdoc.parse(doc, "bogus")


@pytest.mark.parametrize("name,value", [("client_ip", "host"), ("ban_seconds", 0), ("ban_seconds", 1.5),
                                        ("flagged_at", "now"), ("action", None), ("server_ports", None)])
def test_build_refuses_a_bad_argument_by_name(name, value):
    args = dict(client_ip="10.0.0.10", client_port=None, server_ports=[5222], classifier="c", reason="r",
                action="drop", evidence={}, offence=1, ban_seconds=60, flagged_at=AT, sensor="")
    flagdoc.build(**args)
    with pytest.raises(BadFlag, match=f"^{name} "):
        flagdoc.build(**{**args, name: value})


def test_ended_flags():
    later = AT + dt.timedelta(seconds=5)
    released = flagdoc.parse(flagdoc.ended(good(), flagdoc.RELEASED, later))
    assert (released.status, released.updated_at, released.released_at) == ("released", later, later)
    expired = flagdoc.parse(flagdoc.ended(good(), flagdoc.EXPIRED, later))
    assert (expired.status, expired.updated_at, expired.released_at) == ("expired", later, None)
    with pytest.raises(ValueError):
        flagdoc.ended(good(), flagdoc.FLAGGED, later)


# --- one contract: what the analyser writes is what the controller enforces -------------------------

CFG = config.Config()


def test_the_analysers_flag_parses_in_enforce():
    book = FlagBook(CFG, MemoryFlags(), "pi1")
    classifier = types.SimpleNamespace(name="xmpp_abuse", action=None)
    doc = book.offer(Verdict("too fast", "10.0.0.10", 40000, 5222, {"count": 101}), classifier, AT)
    f = flagdoc.parse({**doc, "_id": "f1"}, CFG.enforce.action)
    assert [dict(m) for m in ban_matches(View(CFG), f)] == [
        {"in_port": 1, "eth_type": 0x0800, "ip_proto": 6, "tcp_dst": 5222, "ipv4_src": "10.0.0.10", "tcp_src": 40000}]
    assert f.expires_at == AT + dt.timedelta(seconds=CFG.enforce.ban_seconds)
    whole_ip = book.offer(Verdict("too fast", "10.0.0.11", None, 5222), classifier, AT)
    assert "tcp_src" not in ban_matches(View(CFG), flagdoc.parse(whole_ip, "drop"))[0]


def test_enforce_bans_the_ipv6_clients_that_the_document_allows():
    f = flagdoc.parse({**good(client_ip="fd00::10"), "_id": "v6"}, "drop")
    assert [m["ipv6_src"] for m in ban_matches(View(CFG), f)] == ["fd00::10"]


def test_a_verdict_that_makes_no_valid_flag_is_counted_not_written():
    backend = MemoryFlags()
    book = FlagBook(CFG, backend)
    classifier = types.SimpleNamespace(name="custom", action=None)
    assert book.offer(Verdict("odd", "10.0.0.10", 40000, 5222, action="block"), classifier, AT) is None
    assert book.offer(Verdict("odd", "10.0.0.10", 40000, None), classifier, AT) is None
    assert (book.refused, book.raised, backend.docs) == (2, 0, [])


# --- through the store ------------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path):
    es = procs.EmbeddedStore(tmp_path / "store").start()
    cfg = config.from_dict({"mongodb": {"uri": es.uri, "database": "t" + uuid.uuid4().hex[:8]}})
    database = store.database(cfg.mongodb)   # tz_aware, as every pisnoop client
    try:
        yield database
    finally:
        database.client.close()
        es.stop()


def test_a_flag_stored_and_read_back_parses_the_same(db):
    doc = good()
    db[store.FLAGS].insert_one(doc)     # adds _id to doc
    stored = db[store.FLAGS].find_one({"_id": doc["_id"]})
    assert stored[flagdoc.EXPIRES_AT].tzinfo is not None
    assert flagdoc.parse(stored) == flagdoc.parse(doc)
    assert MongoFlags(db).release("10.0.0.10", 40000, AT + dt.timedelta(seconds=1)) == 1
    released = flagdoc.parse(db[store.FLAGS].find_one({"_id": doc["_id"]}))
    assert dataclasses.replace(released, status="flagged", updated_at=AT, released_at=None) == flagdoc.parse(doc)
    assert released.released_at == released.updated_at == AT + dt.timedelta(seconds=1)


def test_the_releases_a_sensor_forgives_are_its_own_and_the_fleets_by_address_prefix_and_mac(db):
    """``MongoFlags.released_since`` gives the releases of the flags this sensor enforces (not another
    sensor's local flag, nor an older release, nor an active flag); ``Releases`` forgives a packet of the
    released address (any connection of it), of an address inside the released prefix and from the released
    MAC, when captured before that release, and nothing else; a stored document that is no flag forgives
    nothing and is counted."""
    from analyser.flags import Releases

    def ns(d):
        return (d - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1) * 1000
    r1, r2, r3 = (AT + dt.timedelta(seconds=k) for k in (10, 20, 30))
    docs = [good(), good(client_ip="2001:db8:7::", client_port=None, server_ports=[5222]),
            good(client_ip=None, client_mac="02:00:00:00:00:aa", client_port=None),
            good(client_ip="10.0.0.20", sensor="other"), good(client_ip="10.0.0.21", sensor="other", scope="fleet"),
            good(client_ip="10.0.0.22"), good(client_ip="10.0.0.23")]
    docs[1]["client_ip"] = "2001:db8:7::/48"
    for d in docs:
        db[store.FLAGS].insert_one(d)
    mongo = MongoFlags(db, "pi1")
    for d, at in zip(docs, (r1, r2, r3, r1, r2, AT - dt.timedelta(days=2))):
        assert MongoFlags(db).release_where({"_id": d["_id"]}, at)
    got = mongo.released_since(AT)
    assert sorted(str(d["client_ip"] or d["client_mac"]) for d in got) == [
        "02:00:00:00:00:aa", "10.0.0.10", "10.0.0.21", "2001:db8:7::/48"]
    rel = Releases(got + [{"status": "released", "client_ip": "not an address"}])
    assert rel.unreadable == 1 and rel.newest_ns == ns(r3)
    mac = bytes.fromhex("0200000000aa")
    before = ns(r1) - 1
    assert rel.forgives("10.0.0.10", None, before) and not rel.forgives("10.0.0.10", None, ns(r1))
    assert rel.forgives("10.0.0.21", b"\x02" * 6, ns(r2) - 1)           # the fleet's flag, released
    assert rel.forgives("2001:db8:7:ffff::5", None, ns(r2) - 1) and not rel.forgives("2001:db8:8::5", None, 0)
    assert rel.forgives("10.9.9.9", mac, ns(r3) - 1) and not rel.forgives("10.9.9.9", b"\x02" * 6, 0)
    assert not rel.forgives("10.0.0.20", None, 0) and not rel.forgives("10.0.0.22", None, 0)  # other's; old
    assert not rel.forgives("10.0.0.23", None, 0)                          # still active: not released
    assert rel.prefix_ns("2001:db8:7::/48") == ns(r2) and rel.prefix_ns("2001:db8:7::/64") == 0
    assert Releases(got) == Releases(list(reversed(got))) != Releases()


# --- the client argument of `flags release` --------------------------------------------------------

def test_client_argument():
    assert parse_client("10.0.0.10") == ("10.0.0.10", None)
    assert parse_client("10.0.0.10:5222") == ("10.0.0.10", 5222)
    assert parse_client("[fd00::1]:40000") == ("fd00::1", 40000)
    assert parse_client("fd00::1") == ("fd00::1", None)
    for bad in ("host", "10.0.0.10:0", "10.0.0.10:x", "[fd00::1]:99999"):
        with pytest.raises(BadClient):
            parse_client(bad)
    assert issubclass(BadClient, BadInput)


def test_subject_argument_of_the_flags_commands():
    assert flagdoc.parse_subject("10.0.0.10:5222") == ("10.0.0.10", None, 5222)
    assert flagdoc.parse_subject("FD00:1::/64") == ("fd00:1::/64", None, None)
    assert flagdoc.parse_subject("02-AA-00-00-00-01") == (None, "02:aa:00:00:00:01", None)
    for bad in ("10.0.0.1/24", "10.0.0.0/8", "fd00::/16", "host", "02:aa:00:00:00"):
        with pytest.raises(BadClient):
            flagdoc.parse_subject(bad)


@pytest.mark.parametrize("ip,port", [("10.0.0.10", None), ("10.0.0.10", 5222), ("fd00::1", 40000), ("fd00::1", None)])
def test_client_text_reads_back(ip, port):
    assert parse_client(flagdoc.client_text(ip, port)) == (ip, port)
