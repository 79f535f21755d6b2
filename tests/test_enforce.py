"""Enforcement on the pure core: dual stack, every flag enforceable, cookies, never-ban, Zodiac FX limits."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import socket
import struct

import pytest

from appliance import config as config_mod
from appliance import flagdoc, neverban
from static_controller import packet, targets
from static_controller.core import Core
from static_controller.messages import (
    ETH_IPV4,
    ETH_IPV6,
    Flags,
    Flow,
    FlowRemoved,
    FlowStat,
    FlowStats,
    FlowStatsRequest,
    MeterConfig,
    PacketIn,
    Tick,
)
from static_controller.modules.enforce import P_DROP, P_LIMIT, ban_cookie, decode_cookie

NOW = 1_800_000_000.0
ZODIAC = {"switch": {"target": "zodiacfx", "ports": {"management": 4}}}
V4, V6 = ETH_IPV4, ETH_IPV6


def cfg(**over) -> config_mod.Config:
    return config_mod.from_dict(over, "<test>")


def connected(core: Core) -> list:
    req = core.connect(1, NOW)
    return core.handle(MeterConfig(req[0].xid, ()), NOW)


def adds(msgs, table=None):
    return [m for m in msgs if isinstance(m, Flow) and m.command == "add" and (table is None or m.table == table)]


def deletes(msgs):
    return [m for m in msgs if isinstance(m, Flow) and m.command == "delete_strict"]


def flag(fid, left=120, status=None, **kw):
    """A flag banning for ``left`` seconds from NOW; ``kw`` are ``flagdoc.build``'s subject/scope arguments."""
    args = dict(server_ports=[5222], classifier="test", reason="test", action="drop", evidence={}, offence=1,
                ban_seconds=left, sensor="test", flagged_at=dt.datetime.fromtimestamp(NOW, dt.timezone.utc))
    doc = flagdoc.build(**{**args, **kw})
    return {**doc, "_id": fid, **({"status": status} if status else {})}


def enforce_of(core):
    return [m for m in core.modules if m.name == "enforce"][0]


def ban(core, *docs, never_ban=None, own=()):
    return core.handle(Flags(tuple(docs), True, NOW, never_ban=never_ban, own=own), NOW)


# --- the switch's own flows, both families, every XMPP port ---------------------------------------


def test_xmpp_meter_covers_both_families_and_every_server_port():
    core = Core(cfg(xmpp={"server_ports": [5222, 5223, 5280]}))
    metered = [dict(f.match) for f in adds(connected(core), 1) if f.meter == 1]
    assert sorted((m["eth_type"], m["tcp_dst"]) for m in metered) == \
        [(V4, 5222), (V4, 5223), (V4, 5280), (V6, 5222), (V6, 5223), (V6, 5280)]
    assert all(m["in_port"] == 1 and m["ip_proto"] == 6 for m in metered)
    assert not core.refused


def test_mirror_filter_and_flowstats_ids_cover_ipv6():
    core = Core(cfg(mirror={"filter": {"ip_proto": "udp", "l4_port": 53}}, flowstats_ids={"enabled": True},
                    xmpp={"server_ports": [5222, 5223]}))
    pushed = connected(core)
    copies = [dict(f.match) for f in adds(pushed, 0) if f.actions]
    assert sorted((m["in_port"], m["eth_type"], m.get("udp_src", 0), m.get("udp_dst", 0)) for m in copies) == sorted(
        (p, et, s, d) for p in (1, 3) for et in (V4, V6) for s, d in ((53, 0), (0, 53)))
    to_ctl = [dict(f.match) for f in adds(pushed, 1) if f.priority == 150]
    assert sorted((m["eth_type"], m["tcp_dst"]) for m in to_ctl) == [(V4, 5222), (V4, 5223), (V6, 5222), (V6, 5223)]
    ids = [m for m in core.modules if m.name == "flowstats_ids"][0]
    out = core.handle(PacketIn(ids.cookie, 1, 1, tcp6_frame("fd00::10", 40000, 5223)), NOW)
    allow = adds(out)[0]
    assert dict(allow.match) == {"in_port": 1, "eth_type": V6, "ip_proto": 6, "tcp_dst": 5223,
                                 "ipv6_src": "fd00::10", "tcp_src": 40000}
    assert allow.meter == 1 and not core.refused
    # the poll reads it back under the same key: a fast IPv6 client is dropped like an IPv4 one
    req = [m for m in core.handle(Tick(NOW + 11), NOW + 11) if isinstance(m, FlowStatsRequest)][0]
    fast = FlowStat(1, 160, allow.match, allow.cookie, packets=500, bytes=0, duration=30.0)
    drop = adds(core.handle(FlowStats(req.xid, (fast,)), NOW + 11))
    assert [(d.priority, dict(d.match)["ipv6_src"]) for d in drop] == [(190, "fd00::10")]


def tcp6_frame(src: str, sport: int, dport: int) -> bytes:
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 20, 6, 64, socket.inet_pton(socket.AF_INET6, src),
                      socket.inet_pton(socket.AF_INET6, "fd00::1"))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x02, 1024, 0, 0)
    return b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x10" + b"\x86\xdd" + ip6 + tcp


def test_packet_parse_reads_ipv6_tcp():
    h = packet.parse(tcp6_frame("fd00::10", 40000, 5222))
    assert (h.ipv6_src, h.ipv6_dst, h.ip_src, h.ip_proto, h.tcp_src, h.tcp_dst) == \
        ("fd00::10", "fd00::1", "fd00::10", 6, 40000, 5222)


def test_packet_parse_reads_tcp_behind_extension_headers_and_two_vlan_tags():
    """What OVS matches as TCP to the XMPP port is TCP here too: a client cannot hide behind a hop-by-hop header
    or a QinQ tag from the per-connection monitor."""
    plain = tcp6_frame("fd00::10", 40000, 5222)
    eth, ip6, tcp = plain[:14], bytearray(plain[14:54]), plain[54:]
    ip6[6] = 0                                           # next header: hop-by-hop options, 8 bytes, then TCP
    struct.pack_into("!H", ip6, 4, 28)
    hidden = eth + bytes(ip6) + bytes([6, 0, 1, 4, 0, 0, 0, 0]) + tcp
    qinq = plain[:12] + b"\x88\xa8\x00\x05\x81\x00\x00\x07" + plain[12:]
    for frame in (hidden, qinq):
        h = packet.parse(frame)
        assert (h.eth_type, h.ipv6_src, h.ip_proto, h.tcp_src, h.tcp_dst) == (V6, "fd00::10", 6, 40000, 5222)
    later = eth + bytes(ip6[:6]) + b"\x2c" + bytes(ip6[7:]) + bytes([6, 0, 0, 8, 0, 0, 0, 1]) + tcp
    h = packet.parse(later)                              # a later fragment: no TCP header, so no ports
    assert (h.ip_proto, h.tcp_src, h.tcp_dst) == (6, None, None)
    assert packet.parse(b"\x00" * 13) is None
    assert packet.parse(eth + b"\x60") == packet.Headers("02:00:00:00:00:10", "02:00:00:00:00:01", V6)


# --- the flow shapes of every scope ------------------------------------------------------------------

XMPP4 = {"in_port": 1, "eth_type": V4, "ip_proto": 6, "tcp_dst": 5222}
XMPP6 = {**XMPP4, "eth_type": V6}


@pytest.mark.parametrize("subject,expected", [
    (dict(client_ip="10.0.0.10"), [{**XMPP4, "ipv4_src": "10.0.0.10"}]),
    (dict(client_ip="10.0.0.10", client_port=40000), [{**XMPP4, "ipv4_src": "10.0.0.10", "tcp_src": 40000}]),
    (dict(client_ip="10.0.1.0/24"), [{**XMPP4, "ipv4_src": ("10.0.1.0", "255.255.255.0")}]),
    (dict(client_ip="fd00::10"), [{**XMPP6, "ipv6_src": "fd00::10"}]),
    (dict(client_ip="FD00:0::10", client_port=40000), [{**XMPP6, "ipv6_src": "fd00::10", "tcp_src": 40000}]),
    (dict(client_ip="fd00:0:0:7::/64"), [{**XMPP6, "ipv6_src": ("fd00:0:0:7::", "ffff:ffff:ffff:ffff::")}]),
    (dict(client_mac="02:00:00:00:00:AA"), [{**XMPP4, "eth_src": "02:00:00:00:00:aa"},
                                           {**XMPP6, "eth_src": "02:00:00:00:00:aa"}]),
    (dict(client_ip="10.0.0.10", protocol="udp", server_ports=[53, 3478]),
     [{"in_port": 1, "eth_type": V4, "ip_proto": 17, "udp_dst": p, "ipv4_src": "10.0.0.10"} for p in (53, 3478)]),
    (dict(client_ip="fd00::10", client_port=9999, protocol="udp", server_ports=[443]),
     [{"in_port": 1, "eth_type": V6, "ip_proto": 17, "udp_dst": 443, "ipv6_src": "fd00::10", "udp_src": 9999}]),
    (dict(client_ip="10.0.0.1", direction="inbound", server_ports=[22, 8080]),
     [{"in_port": 3, "eth_type": V4, "ip_proto": 6, "tcp_dst": p, "ipv4_src": "10.0.0.1"} for p in (22, 8080)]),
    (dict(client_ip="2001:db8::/48", direction="inbound"),
     [{**XMPP6, "in_port": 3, "ipv6_src": ("2001:db8::", "ffff:ffff:ffff::")}]),
])
def test_every_scope_gives_its_flows_above_ratelimit_and_nothing_is_refused(subject, expected):
    core = Core(cfg())
    connected(core)
    out = ban(core, flag("f", **subject))
    got = adds(out)
    assert sorted((dict(f.match) for f in got), key=repr) == sorted(expected, key=repr)
    assert all(f.table == 1 and f.priority == P_DROP and f.actions == () and f.meter is None and f.goto is None
               and f.hard_timeout == 120 and f.send_flow_removed for f in got)
    assert not core.refused and enforce_of(core).counters()["flags_active"] == 1
    # the mirror's copies (table 0, before any drop) stand: a banned client is still mirrored
    copies = [f for mod, f, _exp in core.installed.values() if f.table == 0 and ("output", 2) in f.actions]
    assert len(copies) == 2 and {mod.name for mod, f, _exp in core.installed.values() if f.table == 0} == {"mirror"}


def test_limit_sits_below_drop_and_uses_the_penalty_meter():
    core = Core(cfg())
    connected(core)
    out = ban(core, flag("wide", client_ip="fd00::/64", action="limit"), flag("one", client_ip="fd00::10"))
    by_prio = {f.priority: f for f in adds(out)}
    assert set(by_prio) == {P_LIMIT, P_DROP} and P_LIMIT < P_DROP
    assert by_prio[P_LIMIT].meter == 2 and by_prio[P_LIMIT].goto == 2 and by_prio[P_DROP].meter is None
    assert not core.refused


def test_exempt_released_and_expired_flags_install_nothing():
    core = Core(cfg())
    connected(core)
    docs = (flag("e", client_ip="10.0.0.10", exempt_reason="10.0.0.10 (enforce.never_ban)"),
            flag("r", client_ip="10.0.0.11", status="released"), flag("x", client_ip="10.0.0.12", status="expired"),
            flag("old", client_ip="10.0.0.13", left=1))
    assert adds(core.handle(Flags(docs, True, NOW + 5), NOW + 5)) == []
    assert enforce_of(core).counters()["flags_active"] == 0


def test_a_released_prefix_ban_is_deleted_with_its_exact_match_and_cookie():
    core = Core(cfg(xmpp={"server_ports": [5222, 5223]}))
    connected(core)
    installed = adds(ban(core, flag("p", client_ip="fd00::/64", server_ports=[5222, 5223])))
    assert len(installed) == 2
    out = core.handle(Flags((flag("p", client_ip="fd00::/64", server_ports=[5222, 5223], status="released"),),
                            False, NOW + 3), NOW + 3)
    assert sorted((f.match, f.cookie) for f in deletes(out)) == sorted((f.match, f.cookie) for f in installed)


def test_a_ban_read_back_from_the_switch_is_the_flow_that_was_sent():
    """The reconcile step deletes what it does not recognise: a masked IPv6 or MAC match must decode equal."""
    from os_ken.ofproto import ofproto_v1_3_parser as parser

    from static_controller import glue
    core = Core(cfg())
    connected(core)
    sent = adds(ban(core, flag("p", client_ip="fd00::/64"), flag("m", client_mac="02:00:00:00:00:aa"),
                    flag("q", client_ip="10.9.0.0/16", client_port=None)))
    assert len(sent) == 4
    for f in sent:
        buf = bytearray()
        parser.OFPMatch(**dict(f.match)).serialize(buf, 0)
        assert glue.match_of(parser.OFPMatch.parser(bytes(buf), 0)) == f.match
    removed = core.handle(FlowRemoved(sent[0].cookie, 1, sent[0].priority, sent[0].match, "delete"), NOW)
    assert removed == [] and sent[0].match not in {fl.match for fl, _f, _e in enforce_of(core).installed.values()}


# --- the cookie -------------------------------------------------------------------------------------


def test_the_ban_cookie_names_its_module_and_subject():
    core = Core(cfg())
    e = enforce_of(core)
    subjects = [dict(client_ip="10.0.0.10"), dict(client_ip="10.0.0.10", client_port=40000),
                dict(client_ip="10.0.1.0/24"), dict(client_mac="02:00:00:00:00:aa"), dict(client_ip="fd00::10"),
                dict(client_ip="fd00::11"), dict(client_ip="fd00::10", client_port=40000), dict(client_ip="fd00::/64")]
    cookies = [ban_cookie(e.cookie, flagdoc.parse(flag(str(i), **s))) for i, s in enumerate(subjects)]
    assert len(set(cookies)) == len(cookies)
    assert all(c >> 56 == 3 and core.owner_of_cookie(c) is e for c in cookies)
    assert [decode_cookie(c) for c in cookies[:4]] == ["10.0.0.10", "10.0.0.10:40000", "10.0.1.0/24",
                                                       "02:00:00:00:00:aa"]
    assert all(decode_cookie(c).startswith("ipv6 #") for c in cookies[4:])


# --- the never-ban list in the controller ----------------------------------------------------------------


def test_never_ban_config_and_collection_refuse_flags_counted_and_logged_once(caplog):
    core = Core(cfg(enforce={"never_ban": ["10.0.0.0/29"]}))
    connected(core)
    caplog.set_level(logging.WARNING, "pisnoop.controller.enforce")
    stored = (neverban.entry_doc("fd00::1", "the XMPP server", dt.datetime.now(dt.timezone.utc)),)
    out = ban(core, flag("admin", client_ip="10.0.0.5"), flag("server", client_ip="fd00::1", client_port=5222),
              flag("wide", client_ip="fd00::/64"), flag("mac", client_mac="02:00:00:00:00:aa",
                                                       evidence={"addresses": ["10.0.0.3", "fd00::99"]}),
              flag("other", client_ip="10.0.0.10"), never_ban=stored)
    assert [dict(f.match)["ipv4_src"] for f in adds(out)] == ["10.0.0.10"]
    e = enforce_of(core)
    assert e.counters()["flags_exempt"] == 4
    for t in (1, 2, 3):
        core.handle(Tick(NOW + t), NOW + t)
    assert e.counters()["flags_exempt"] == 4
    assert len([r for r in caplog.records if "never-ban" in r.getMessage()]) == 4


def test_an_entry_added_later_lifts_an_installed_ban_and_removing_it_restores():
    core = Core(cfg())
    connected(core)
    installed = adds(ban(core, flag("a", client_ip="fd00::10")))
    assert len(installed) == 1
    entry = neverban.entry_doc("fd00::/64", "lab", dt.datetime.now(dt.timezone.utc))
    out = core.handle(Flags((), False, NOW + 1, never_ban=(entry,)), NOW + 1)
    assert [f.match for f in deletes(out)] == [installed[0].match]
    out = core.handle(Flags((), False, NOW + 2, never_ban=()), NOW + 2)
    assert [f.match for f in adds(out)] == [installed[0].match] and adds(out)[0].hard_timeout == 118
    # an unchanged list (None) keeps what is known
    assert adds(core.handle(Flags((), False, NOW + 3), NOW + 3)) == []


def test_own_addresses_are_never_banned_unless_switched_off():
    for on, expected in ((True, 0), (False, 1)):
        core = Core(cfg(enforce={"never_ban_self": on}))
        connected(core)
        assert len(adds(ban(core, flag("me", client_ip="10.0.0.2"), never_ban=(), own=("10.0.0.2",)))) == expected


# --- the Zodiac FX: IPv4 only, 480 flows --------------------------------------------------------------------


def test_zodiacfx_plan_is_ipv4_only_and_ipv6_flags_are_counted_unenforceable(caplog):
    core = Core(cfg(**ZODIAC, mirror={"filter": {"ip_proto": "tcp", "l4_port": 5222}}))
    pushed = connected(core)
    assert not core.refused
    assert {dict(f.match)["eth_type"] for f in adds(pushed, 1) if f.meter == 1} == {V4}
    copies6 = [dict(f.match) for f in adds(pushed, 0) if f.actions and dict(f.match).get("eth_type") == V6]
    assert sorted(m["in_port"] for m in copies6) == [1, 3] and all(len(m) == 2 for m in copies6)  # all IPv6 copied
    caplog.set_level(logging.WARNING, "pisnoop.controller.enforce")
    out = ban(core, flag("v6", client_ip="fd00::10"), flag("mac", client_mac="02:00:00:00:00:aa"),
              flag("v4", client_ip="10.0.0.10"))
    assert sorted((dict(f.match)["eth_type"], dict(f.match).get("eth_src", "")) for f in adds(out)) == \
        [(V4, ""), (V4, "02:00:00:00:00:aa")]
    assert enforce_of(core).counters()["flags_unenforceable"] == 2 and not core.refused
    core.handle(Tick(NOW + 1), NOW + 1)
    assert len([r for r in caplog.records if "not enforced on zodiacfx" in r.getMessage()]) == 2


def test_zodiacfx_flow_count_fits_473_two_port_ban_flows_and_refuses_the_rest_by_capacity():
    core = Core(cfg(**ZODIAC, xmpp={"server_ports": [5222, 5223]}))
    core.profile = dataclasses.replace(core.profile, pool=None)   # the 480-flow count alone; the pool: below
    static = len(adds(connected(core)))
    assert static == 7                      # 2 mirror copies, 1 policy default, 2 patches, 2 XMPP meter flows
    docs = tuple(flag(f"f{i}", client_ip=f"10.1.{i // 250}.{1 + i % 250}", server_ports=[5222, 5223])
                 for i in range(240))
    out = ban(core, *docs)
    assert len(adds(out)) == 480 - static == 473
    assert core.refused[("enforce", "capacity")] == 2 * 240 - 473 and len(core.installed) == 480


def test_a_flag_wins_over_the_flowstats_ids_allow_flow_of_the_same_client_and_nothing_else_is_shadowed():
    """A ban is wider than flowstats_ids' per-connection allow flow and higher: it may hide it (on purpose);
    a ban is still refused where it would hide another module's flow (ratelimit's band is below, not shadowed)."""
    from tests.test_controller_core import tcp_frame

    core = Core(cfg(flowstats_ids={"enabled": True}))
    pushed = adds(connected(core))
    ids_cookie = [f for f in pushed if f.priority == 150][0].cookie
    allow = adds(core.handle(PacketIn(ids_cookie, 1, 1, tcp_frame("10.0.0.11")), NOW))
    assert len(allow) == 1 and allow[0].priority == 160
    bans = adds(core.handle(Flags((flag("f1", client_ip="10.0.0.11"),), True, NOW), NOW))
    assert [(b.priority, dict(b.match)["ipv4_src"]) for b in bans] == [(P_DROP, "10.0.0.11")]
    assert core.refused == {} or all(kind != "overlap" for (_m, kind) in core.refused)


def test_zodiacfx_block_pool_fits_314_address_bans_and_refuses_the_315th_before_sending():
    """Each drop ban takes two blocks of 56 bytes or more (its flow_mod; a 33-byte match; no instructions) of
    the 640 such blocks; the static set (6 flows, 2 one-band meters) takes 12 of them: (640 - 12) / 2 = 314.
    tests/test_zodiac_controller.py checks the same number against the model of the firmware."""
    core = Core(cfg(**ZODIAC))
    assert len(adds(connected(core))) == 6
    docs = [flag(f"f{i}", client_ip=f"10.1.{i // 250}.{1 + i % 250}") for i in range(315)]
    out = ban(core, *docs)
    assert len(adds(out)) == 314 and core.refused[("enforce", "capacity")] == 1 and len(core.installed) == 320
    with pytest.raises(targets.PlanRefused, match="blocks of 56 bytes or more; zodiacfx's pool has 640"):
        core.profile.validate([f for _m, f, _e in core.installed.values()] + adds(out)[:1], core.meters.values())


def test_a_ban_refused_for_room_is_pushed_again_once_another_ends_not_on_every_poll():
    core = Core(cfg(**ZODIAC))
    core.profile = dataclasses.replace(core.profile, pool=None)
    static = len(adds(connected(core)))
    docs = [flag(f"f{i}", client_ip=f"10.1.{i // 250}.{1 + i % 250}", left=600) for i in range(480 - static + 1)]
    out = ban(core, *docs)
    assert len(adds(out)) == 480 - static and core.refused[("enforce", "capacity")] == 1
    enforce = [m for m in core.modules if m.name == "enforce"][0]
    assert enforce.counters()["bans_refused"] == 1
    assert adds(core.handle(Tick(NOW + 1), NOW + 1)) == []                 # no retry storm on every poll
    released = {**docs[0], "status": "released"}
    out = core.handle(Flags((released,), False, NOW + 2), NOW + 2)
    assert len(deletes(out)) == 1 and adds(out) == []                     # room, but not yet the retry time
    out = core.handle(Tick(NOW + 40), NOW + 40)
    assert [dict(f.match)["ipv4_src"] for f in adds(out)] == [docs[-1]["client_ip"]]
    assert len(core.installed) == 480 and core.refused[("enforce", "capacity")] == 1
