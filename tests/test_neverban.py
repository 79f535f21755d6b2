"""appliance/neverban.py: what the never-ban list exempts, and from which entry."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess

import pytest

from appliance import config, neverban
from appliance.neverban import BadEntry, NeverBan

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


def net(text):
    return ipaddress.ip_network(text)


def test_overlap_either_way_exempts_and_names_the_entry():
    cfg = config.from_dict({"enforce": {"never_ban": ["10.0.0.0/24", "fd00:1::5"]}})
    nb = NeverBan.of(cfg, stored=[neverban.entry_doc("192.168.9.9", "admin", NOW)], servers=["10.9.9.9"],
                     own=["10.8.8.8"])
    assert nb.exempts(net("10.0.0.7/32")) == "10.0.0.0/24 (enforce.never_ban)"
    assert nb.exempts(net("10.0.0.0/16")) == "10.0.0.0/24 (enforce.never_ban)"    # a wider ban holds the entry
    assert nb.exempts(net("fd00:1::/64")) == "fd00:1::5 (enforce.never_ban)"
    assert nb.exempts(net("192.168.9.9/32")) == "192.168.9.9 (flags allow: admin)"
    assert nb.exempts(net("10.9.9.9/32")) == "10.9.9.9 (an XMPP server seen answering)"
    assert nb.exempts(net("10.8.8.8/32")) == "10.8.8.8 (this appliance)"
    assert nb.exempts(net("fd00:2::/64")) is None and nb.exempts(net("10.0.1.0/24")) is None
    assert nb.exempts(None, ["10.0.1.1", "fd00:1::5"]) == "fd00:1::5 (enforce.never_ban)"   # a MAC's addresses
    assert nb.exempts(None, []) is None


def test_servers_and_own_addresses_only_where_enabled():
    cfg = config.from_dict({"enforce": {"never_ban_servers": False, "never_ban_self": False}})
    nb = NeverBan.of(cfg, servers=["10.9.9.9"], own=["10.8.8.8"])
    assert nb.entries == () and nb.exempts(net("10.9.9.9/32")) is None


def test_a_bad_stored_entry_is_skipped_and_a_bad_argument_refused():
    nb = NeverBan.of(config.Config(), stored=[{"_id": "10.0.0.1/24"}, {"_id": None}, {"_id": "10.0.0.1"}])
    assert [e.describe() for e in nb.entries] == ["10.0.0.1 (flags allow)"]
    for bad in ("10.0.0.1/24", "host", ""):
        with pytest.raises(BadEntry, match="never-ban entry"):
            neverban.entry_doc(bad, "", NOW)


def test_own_addresses_leave_out_loopback_and_link_local():
    own = neverban.own_addresses(config.Config())
    for a in own:
        ip = ipaddress.ip_address(a)
        assert not (ip.is_loopback or ip.is_link_local)


def test_own_addresses_go_on_without_getifaddrs(monkeypatch, caplog):
    """Under a unit whose RestrictAddressFamilies lacks AF_NETLINK getifaddrs fails (EAFNOSUPPORT): the service
    must still start, with the controller's listen address and one warning."""
    import psutil

    def refused():
        raise OSError(97, "Address family not supported by protocol")

    monkeypatch.setattr(psutil, "net_if_addrs", refused)
    cfg = config.from_dict({"switch": {"controller": {"listen_host": "192.0.2.10"}}})
    assert neverban.own_addresses(cfg) == ["192.0.2.10"]
    assert [r.levelname for r in caplog.records if "cannot read this machine's addresses" in r.getMessage()] == \
        ["WARNING"]


def test_own_addresses_are_read_again_and_a_change_is_logged(caplog):
    """An address this machine gains (a DHCP lease, a temporary IPv6 address) is among its own at the next
    read, and gone once it is lost; each change is logged with what came and went. Off: nothing is read."""
    import logging

    from tests.netutil import address_of_this_machine
    caplog.set_level(logging.INFO, logger="pisnoop.neverban")
    cfg = config.Config()
    reader = neverban.OwnAddresses()
    v4, v6 = "198.51.100.77", "2001:db8:77::77"
    first = reader.current(cfg)
    assert v4 not in first and v6 not in first and reader.current(cfg) == first
    assert not [r for r in caplog.records if "addresses changed" in r.getMessage()]
    with address_of_this_machine(v4) as link:
        subprocess.run(["ip", "addr", "add", f"{v6}/128", "dev", link, "nodad"], check=True)
        gained = reader.current(cfg)
        assert set(gained) - set(first) == {v4, v6}
    assert reader.current(cfg) == first
    said = [r.getMessage() for r in caplog.records if "addresses changed" in r.getMessage()]
    assert said == [f"this machine's addresses changed (never_ban_self): +{v4} +{v6}",
                    f"this machine's addresses changed (never_ban_self): -{v4} -{v6}"], said
    assert neverban.OwnAddresses().current(config.from_dict({"enforce": {"never_ban_self": False}})) == ()


def test_local_entries_exempt_at_their_sensor_only_and_old_entries_everywhere(embedded_store):
    """In the store: a fleet entry (and one stored before scopes) applies at every sensor, a local one at its own;
    the same network may be local to two sensors (its _id is NETWORK@SENSOR)."""
    from appliance import store
    db = store.database(config.from_dict({"mongodb": {"uri": embedded_store.uri, "database": "nb_scope"}}).mongodb)
    try:
        now = dt.datetime.now(dt.timezone.utc)
        coll = db[store.NEVER_BAN]
        coll.insert_many([neverban.entry_doc("10.0.0.1", "fleet", now), {"_id": "10.0.0.2/32", "reason": "old"},
                          neverban.entry_doc("10.0.0.3", "a only", now, "a"),
                          neverban.entry_doc("10.0.0.3", "b only", now, "b")])
        seen = {s: sorted(neverban.parse_entry(d).describe() for d in coll.find(neverban.applies_to(s)))
                for s in ("a", "b", "c")}
        assert seen == {"a": ["10.0.0.1 (flags allow: fleet)", "10.0.0.2 (flags allow: old)",
                              "10.0.0.3 (flags allow on a only: a only)"],
                        "b": ["10.0.0.1 (flags allow: fleet)", "10.0.0.2 (flags allow: old)",
                              "10.0.0.3 (flags allow on b only: b only)"],
                        "c": ["10.0.0.1 (flags allow: fleet)", "10.0.0.2 (flags allow: old)"]}
        net = ipaddress.ip_network("10.0.0.3")
        assert NeverBan([neverban.parse_entry(d) for d in coll.find(neverban.applies_to("c"))]).exempts(net) is None
    finally:
        db.client.drop_database("nb_scope")
        db.client.close()
