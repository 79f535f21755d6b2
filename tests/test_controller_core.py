"""The pure controller core: plans, flowspace checks, target profiles, modules (no switch)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from argparse import Namespace

import pytest

from appliance import config as config_mod
from appliance import flagdoc
from static_controller import command, modules, targets
from static_controller.config_view import View
from static_controller.core import Core
from static_controller.flowspace import Flowspace, Rel, Slice, classify, conflict
from static_controller.messages import (
    Band,
    Barrier,
    BarrierReply,
    Error,
    Flags,
    Flow,
    FlowStat,
    FlowStats,
    FlowStatsRequest,
    Meter,
    MeterConfig,
    MeterConfigRequest,
    MeterStats,
    MeterStatsRequest,
    PacketIn,
    PacketOut,
    Tick,
    flow,
)
from static_controller.modules.base import COOKIE_MASK, Module, cookie_base

NOW = 1_800_000_000.0


def cfg(**over) -> config_mod.Config:
    return config_mod.from_dict(over, "<test>")


def connected(core: Core, existing=()) -> list:
    """Connect and answer the meter inventory: the pushed messages."""
    req = core.connect(1, NOW)
    assert isinstance(req[0], MeterConfigRequest)
    return core.handle(MeterConfig(req[0].xid, tuple(existing)), NOW)


def flows_of(msgs, command="add"):
    return [m for m in msgs if isinstance(m, Flow) and m.command == command]


# --- flowspace ---------------------------------------------------------------


def test_classify_relations():
    assert classify({"in_port": 1}, {"in_port": 1}) is Rel.EQUAL
    assert classify({"in_port": 1, "tcp_dst": 5222}, {"in_port": 1}) is Rel.SUBSET
    assert classify({}, {"in_port": 1}) is Rel.SUPERSET
    assert classify({"in_port": 1}, {"tcp_dst": 5222}) is Rel.INTERSECT
    assert classify({"in_port": 1}, {"in_port": 3}) is Rel.NONE
    assert classify({"ipv4_src": "10.0.0.5"}, {"ipv4_src": "10.0.0.0/24"}) is Rel.SUBSET
    assert classify({"ipv4_src": ("10.0.0.0", "255.255.0.0")}, {"ipv4_src": "10.0.0.0/24"}) is Rel.SUPERSET
    assert classify({"ipv4_src": "10.0.1.5"}, {"ipv4_src": "10.0.0.0/24"}) is Rel.NONE


def test_conflict_rules():
    wide = flow(1, 200, {"in_port": 1, "tcp_dst": 5222}, 0)
    narrow = flow(1, 300, {"in_port": 1, "tcp_dst": 5222, "ipv4_src": "10.0.0.5"}, 0)
    assert conflict(narrow, wide) is None                      # a higher-priority exception is fine
    assert "shadow it" in conflict(flow(1, 250, {"in_port": 1}, 0), wide)
    assert "shadowed by" in conflict(flow(1, 100, {"in_port": 1, "tcp_dst": 5222}, 0), wide)
    assert "same priority" in conflict(flow(1, 200, {"tcp_dst": 5222}, 0), wide)
    assert conflict(flow(2, 250, {}, 0), wide) is None         # other table


# --- the plan -------------------------------------------------------------------


def test_default_plan_copies_in_table0_and_meters_in_table1():
    core = Core(cfg())
    msgs = connected(core)
    assert isinstance(msgs[-1], Barrier)
    meters = {m.meter_id: m for m in msgs if isinstance(m, Meter)}
    assert meters[1] == Meter(1, "pktps", (Band(1000, 0),), "add") and meters[2].bands == (Band(10, 0),)
    fl = flows_of(msgs)
    t0 = [f for f in fl if f.table == 0]
    assert {dict(f.match)["in_port"] for f in t0} == {1, 3}
    assert all(f.actions == (("output", 2),) and f.goto == 1 for f in t0)
    xmpp = [f for f in fl if f.table == 1 and f.meter == 1]
    assert {(dict(f.match)["eth_type"], dict(f.match)["tcp_dst"]) for f in xmpp} == {(0x0800, 5222), (0x86DD, 5222)}
    assert len(xmpp) == 2 and all(f.goto == 2 for f in xmpp)
    patch = {dict(f.match)["in_port"]: f.actions for f in fl if f.table == 2}
    assert patch == {1: (("output", 3),), 3: (("output", 1),)}
    assert not core.refused


def test_mirror_filter_copies_only_matching_frames_but_forwards_all():
    core = Core(cfg(mirror={"filter": {"ip_proto": "tcp", "l4_port": 5222}}))
    t0 = [f for f in flows_of(connected(core)) if f.table == 0]
    copies = [f for f in t0 if f.actions]
    assert {(dict(f.match)["in_port"], dict(f.match).get("tcp_src"), dict(f.match).get("tcp_dst")) for f in copies} == \
        {(1, 5222, None), (1, None, 5222), (3, 5222, None), (3, None, 5222)}
    passes = [f for f in t0 if not f.actions]
    assert {f.match for f in passes} == {(("in_port", 1),), (("in_port", 3),)} and all(f.goto == 1 for f in passes)


def test_meters_modify_or_add_from_inventory():
    core = Core(cfg())
    same = (1, "pktps", (Band(1000, 0),))
    other = (2, "pktps", (Band(99, 0),))
    meters = [m for m in connected(core, [same, other]) if isinstance(m, Meter)]
    assert meters == [Meter(2, "pktps", (Band(10, 0),), "modify")]     # meter 1 already right: untouched
    # a METER_EXISTS answer to an ADD turns into a MODIFY, never an error left standing
    assert core.handle(switch_error(5, 12, 1, meter_id=1), NOW) == [Meter(1, "pktps", (Band(1000, 0),), "modify")]
    # a MODIFY of a meter the switch lost: OVS 3.1 answers (12, 3) UNKNOWN_METER (docs/ARCHITECTURE.md, OVS)
    assert core.handle(switch_error(6, 12, 3, meter_id=2), NOW) == [Meter(2, "pktps", (Band(10, 0),), "add")]
    # (12, 7) is BAD_BURST: a burst the switch refuses is not cured by an ADD
    assert core.handle(switch_error(7, 12, 7, meter_id=2), NOW) == []


def switch_error(xid, type_, code, **kw) -> Error:
    """An error as the glue decodes it: named from os-ken's ofproto constants."""
    from static_controller import glue
    return Error(xid, type_, code, name=glue.ERROR_NAMES[(type_, code)], request="meter_mod" if type_ == 12 else None,
                 **kw)


def test_error_names_come_from_the_openflow_13_constants():
    from os_ken.ofproto import ofproto_v1_3 as ofp

    from static_controller import glue
    assert glue.ERROR_NAMES[(ofp.OFPET_METER_MOD_FAILED, ofp.OFPMMFC_UNKNOWN_METER)] == "OFPMMFC_UNKNOWN_METER"
    assert glue.ERROR_NAMES[(12, 3)] == "OFPMMFC_UNKNOWN_METER" and glue.ERROR_NAMES[(12, 7)] == "OFPMMFC_BAD_BURST"
    assert glue.ERROR_NAMES[(1, 2)] == "OFPBRC_BAD_MULTIPART" and glue.ERROR_NAMES[(5, 1)] == "OFPFMFC_TABLE_FULL"


# --- targets ---------------------------------------------------------------------


class ManyMeters(Module):
    name, module_id = "many", 9

    def __init__(self, view, n):
        self.n = n
        super().__init__(view)

    def declare(self):
        return Flowspace(self.cookie, COOKIE_MASK, (), meters_owned=frozenset(range(10, 10 + self.n)))

    def start(self, now):
        return [Meter(10 + i, "pktps", (Band(100),)) for i in range(self.n)]


ZODIAC = {"switch": {"target": "zodiacfx", "ports": {"management": 4}}}


def test_zodiacfx_refuses_nine_meters_ovs_takes_them():
    zc = Core(cfg(**ZODIAC))
    zc.modules.append(ManyMeters(zc.view, 7))          # 2 of ours + 7 = 9
    with pytest.raises(targets.PlanRefused, match="needs 9 meters; zodiacfx holds at most 8"):
        zc.plan()
    oc = Core(cfg())
    oc.modules.append(ManyMeters(oc.view, 7))
    assert len([m for m in oc.plan() if isinstance(m, Meter)]) == 9
    zc.modules[-1] = ManyMeters(zc.view, 6)            # 8 fit
    zc.plan()


def test_zodiacfx_limits_bands_burst_ports_tables():
    z = targets.ZODIACFX
    assert "at most 3" in z.meter_problem(Meter(1, "pktps", tuple(Band(10 * i) for i in range(1, 5))))
    assert "BURST" in z.meter_problem(Meter(1, "kbps", (Band(100, 10),)))
    assert "management port" in z.flow_problem(flow(0, 1, {"in_port": 4}, 0))
    assert "data ports" in z.flow_problem(flow(0, 1, {"in_port": 1}, 0, actions=(("output", 7),)))
    assert "tables 0 to 9" in z.flow_problem(flow(10, 1, {}, 0))
    assert targets.OVS.flow_problem(flow(10, 1, {"in_port": 7}, 0)) is None


def test_zodiacfx_plan_fits():
    core = Core(cfg(**ZODIAC, flowstats_ids={"enabled": True}))
    assert core.plan()


def test_cli_exits_2_when_the_target_cannot_hold_the_plan(tmp_path, monkeypatch, capsys):
    path = tmp_path / "z.yaml"
    path.write_text("switch: {target: zodiacfx, ports: {management: 4}}\n")
    monkeypatch.setitem(targets.PROFILES, "zodiacfx", targets.Profile(
        "zodiacfx", max_flows=480, max_meters=1, max_bands=3, max_tables=10, units=frozenset({"pktps", "kbps"}),
        burst=False, data_ports=frozenset({1, 2, 3}), management_port=4))
    assert command.cmd_controller(Namespace(config=str(path), check=True, log_level="INFO")) == 2
    err = capsys.readouterr().err
    assert ("zodiacfx target cannot hold this plan: the plan needs 2 meters" in err and "\n" == err[-1]
            and err.count("\n") == 1)


# --- flowspace enforcement at run time ---------------------------------------------


class Rogue(Module):
    """Declares one slice in table 1 but tries to write elsewhere or over others."""

    name, module_id = "rogue", 8
    subscriptions = frozenset({"tick"})

    def declare(self):
        return Flowspace(self.cookie, COOKIE_MASK, (Slice.of(1, 400, 499, {"in_port": 1}),))

    def handle(self, event):
        c = self.cookie
        return [
            flow(0, 450, {"in_port": 1}, c, actions=(("output", 3),)),                 # wrong table
            flow(1, 450, {"in_port": 1, "tcp_dst": 80}, cookie_base(2)),             # someone else's cookie
            flow(1, 450, {"in_port": 1, "eth_type": 0x0800, "ip_proto": 6, "tcp_dst": 5222}, c),  # shadows ratelimit
            flow(1, 450, {"in_port": 1, "eth_type": 0x0800, "ip_proto": 17, "udp_dst": 53}, c),   # fine: disjoint
        ]


def test_flows_outside_the_declaration_or_shadowing_are_refused_and_counted():
    core = Core(cfg())
    core.modules.append(Rogue(core.view))
    connected(core)
    out = core.handle(Tick(NOW), NOW)
    sent = flows_of(out)
    assert [dict(f.match).get("udp_dst") for f in sent] == [53]
    assert core.refused[("rogue", "outside")] == 2
    assert core.refused[("rogue", "overlap")] == 1


# --- the module contract ------------------------------------------------------------


def test_handle_returns_only_the_module_own_messages():
    core = Core(cfg(flowstats_ids={"enabled": True, "poll_interval": 1}, switch={"forwarding": "l2switch"}))
    connected(core)
    mods = {m.name: m for m in core.modules}
    enforce, ids, l2 = mods["enforce"], mods["flowstats_ids"], mods["l2switch"]
    bans = enforce.handle(Flags((flag("a", "10.0.0.11"),), True, NOW))
    assert [dict(f.match)["ipv4_src"] for f in bans] == ["10.0.0.11"] and enforce.flowspace.outside(bans[0]) is None
    assert enforce.handle(Tick(NOW + 1)) == []                     # nothing changed: nothing to send
    poll = ids.handle(Tick(NOW + 2))
    assert poll == [FlowStatsRequest(poll[0].xid, table=1, cookie=ids.cookie, cookie_mask=COOKIE_MASK)]
    frame = tcp_frame(src_mac=b"\x02\0\0\0\0\x0a")
    assert l2.handle(PacketIn(l2.cookie, 2, 1, frame)) == [PacketOut(1, (("output", 3),), frame)]


class Stamp(Module):
    """On every tick one flow in a table of its own (table = module id)."""

    subscriptions = frozenset({"tick"})

    def declare(self):
        return Flowspace(self.cookie, COOKIE_MASK, (Slice.of(self.module_id, 0, 9),))

    def handle(self, event):
        return [flow(self.module_id, 5, {"in_port": 1}, self.cookie)]


class StampA(Stamp):
    name, module_id = "stamp_a", 6


class StampB(Stamp):
    name, module_id = "stamp_b", 7


@pytest.mark.parametrize("order", [(StampA, StampB), (StampB, StampA)])
def test_subscribed_modules_outputs_are_merged_in_module_order(order):
    core = Core(cfg())
    core.modules += [cls(core.view) for cls in order]
    connected(core)
    sent = flows_of(core.handle(Tick(NOW), NOW))
    assert [(f.table, f.cookie) for f in sent] == [(cls.module_id, cookie_base(cls.module_id)) for cls in order]
    assert core.pushed_by_module["stamp_a"] == core.pushed_by_module["stamp_b"] == 1 and not core.refused


class Thief(Module):
    """Writes inside ratelimit's slice under ratelimit's cookie, and sends a frame to the management port."""

    name, module_id = "thief", 7
    subscriptions = frozenset({"tick"})

    def declare(self):
        return Flowspace(self.cookie, COOKIE_MASK, ())

    def handle(self, event):
        # a valid ratelimit flow (an exception above its XMPP meter flow): only the emitter makes it wrong
        return [flow(1, 240, {**self.view.xmpp_match(), "ipv4_src": "10.0.0.11"}, cookie_base(2), goto=2),
                PacketOut(1, (("output", 4),), b"x")]


def test_another_module_cookie_is_refused_and_counted_against_the_emitter():
    core = Core(cfg(**ZODIAC))
    core.modules.append(Thief(core.view))
    connected(core)
    before = dict(core.pushed_by_module)
    out = core.handle(Tick(NOW), NOW)
    assert not [m for m in out if isinstance(m, (Flow, PacketOut))]
    assert core.refused == {("thief", "outside"): 1, ("thief", "target"): 1}
    assert core.pushed_by_module == before                 # nothing counted to ratelimit, whose cookie it used
    assert [f.priority for m, f, _exp in core.installed.values() if m.name == "ratelimit"] == [200]


def test_module_request_xids_come_from_the_core_allocator():
    given = iter(range(500, 600))
    built = {m.name: m for m in modules.build(View(cfg(flowstats_ids={"enabled": True})), lambda: next(given))}
    assert [m.xid for m in built["flowstats_ids"].handle(Tick(NOW))] == [500]
    core = Core(cfg(flowstats_ids={"enabled": True, "poll_interval": 1}))
    ids = [m for m in core.modules if m.name == "flowstats_ids"][0]
    req = core.connect(1, NOW)[0]
    barrier = core.handle(MeterConfig(req.xid, ()), NOW)[-1]
    core.handle(BarrierReply(barrier.xid), NOW)
    core.handle(Flags((), True, NOW), NOW)                 # enforce ready: this tick also reads the table back
    tick = [m for m in core.handle(Tick(NOW + 2), NOW + 2) if isinstance(m, (FlowStatsRequest, MeterStatsRequest))]
    assert [type(m).__name__ for m in tick] == ["FlowStatsRequest", "FlowStatsRequest", "MeterStatsRequest"]
    assert tick[0].cookie == ids.cookie and core.owners[tick[0].xid] is ids
    assert tick[1].cookie_mask == 0 and core.owners[tick[1].xid] == "core:reconcile"
    # one counter for the core's requests and the module's, in the order they were asked for
    assert [req.xid, barrier.xid] + [m.xid for m in tick] == list(range(req.xid, req.xid + 5))


# --- enforce ------------------------------------------------------------------------


def flag(fid, ip, port=None, action="drop", status="flagged", left=120, server_port=5222):
    """A flag as the analyser writes it, banning for ``left`` seconds from NOW."""
    doc = flagdoc.build(client_ip=ip, client_port=port, server_ports=[server_port], classifier="test", reason="test",
                        action=action, evidence={}, offence=1, ban_seconds=left, sensor="test",
                        flagged_at=dt.datetime.fromtimestamp(NOW, dt.timezone.utc))
    return {**doc, "_id": fid, "status": status}


def test_enforce_installs_drop_and_limit_flows_and_removes_released():
    core = Core(cfg())
    connected(core)
    out = core.handle(Flags((flag("a", "10.0.0.11", 40000), flag("b", "10.0.0.12", action="limit")), True, NOW), NOW)
    by_ip = {dict(f.match)["ipv4_src"]: f for f in flows_of(out)}
    a, b = by_ip["10.0.0.11"], by_ip["10.0.0.12"]
    assert dict(a.match)["tcp_src"] == 40000 and a.actions == () and a.meter is None and a.goto is None
    assert a.hard_timeout == 120 and a.priority > 249 and a.send_flow_removed
    assert "tcp_src" not in dict(b.match) and b.meter == 2 and b.goto == 2
    # same documents again: nothing to do
    assert flows_of(core.handle(Flags((flag("a", "10.0.0.11", 40000),), False, NOW + 1), NOW + 1)) == []
    out = core.handle(Flags((flag("a", "10.0.0.11", 40000, status="released"),), False, NOW + 2), NOW + 2)
    assert [(f.command, dict(f.match)["ipv4_src"]) for f in out] == [("delete_strict", "10.0.0.11")]
    assert not core.refused


def test_enforce_reconnect_pushes_remaining_ban_and_ignores_bad_flags():
    core = Core(cfg())
    connected(core)
    core.handle(Flags((flag("a", "10.0.0.11", left=100), {"_id": "bad", "status": "flagged", "client_ip": "nope"},
                       flag("other", "10.0.0.13", server_port=5269)), True, NOW), NOW)
    enforce = [m for m in core.modules if m.name == "enforce"][0]
    assert enforce.counters()["flags_bad"] == 1
    assert not core.refused          # a server port other than XMPP's is enforced too (it was refused before)
    req = core.connect(1, NOW + 40)
    pushed = core.handle(MeterConfig(req[0].xid, ()), NOW + 40)
    ban = [f for f in flows_of(pushed) if dict(f.match).get("ipv4_src") == "10.0.0.11"]
    assert len(ban) == 1 and ban[0].hard_timeout == 60


# --- flowstats_ids and l2switch -----------------------------------------------------


def tcp_frame(src_ip="10.0.0.11", sport=40000, dport=5222, src_mac=b"\x02\0\0\0\0\x11", dst_mac=b"\x02\0\0\0\0\x01"):
    import socket
    import struct
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton(src_ip),
                     socket.inet_aton("10.0.0.1"))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x02, 1024, 0, 0)
    return dst_mac + src_mac + b"\x08\x00" + ip + tcp


def test_flowstats_ids_allows_then_drops_a_fast_client():
    core = Core(cfg(flowstats_ids={"enabled": True, "threshold_ppm": 100, "poll_interval": 10}))
    pushed = flows_of(connected(core))
    assert not [f for f in pushed if f.meter == 1 and f.table == 1 and f.priority == 200]   # ratelimit yields the slice
    to_ctl = [f for f in pushed if f.priority == 150]
    assert to_ctl and to_ctl[0].actions[0][1] == 0xFFFFFFFD
    ids_cookie = to_ctl[0].cookie
    out = core.handle(PacketIn(ids_cookie, 1, 1, tcp_frame()), NOW)
    allow = flows_of(out)[0]
    assert allow.priority == 160 and allow.meter == 1 and allow.idle_timeout == 60 and allow.hard_timeout == 300
    assert isinstance(out[-1], PacketOut) and out[-1].actions == (("output", 3),)
    req = [m for m in core.handle(Tick(NOW + 11), NOW + 11) if isinstance(m, FlowStatsRequest)]
    assert req and req[0].cookie == ids_cookie and req[0].cookie_mask == COOKIE_MASK
    slow = FlowStat(1, 160, allow.match, allow.cookie, packets=10, bytes=600, duration=10.0)
    assert flows_of(core.handle(FlowStats(req[0].xid, (slow,)), NOW + 11)) == []
    req = [m for m in core.handle(Tick(NOW + 22), NOW + 22) if isinstance(m, FlowStatsRequest)]
    fast = FlowStat(1, 160, allow.match, allow.cookie, packets=10 + 200, bytes=0, duration=20.0)
    drop = flows_of(core.handle(FlowStats(req[0].xid, (fast,)), NOW + 22))
    assert len(drop) == 1 and drop[0].priority == 190 and drop[0].actions == () and drop[0].hard_timeout == 300


def test_l2switch_floods_without_the_mirror_port_then_learns():
    core = Core(cfg(switch={"forwarding": "l2switch"}))
    pushed = flows_of(connected(core))
    assert not [f for f in pushed if f.table == 2 and f.priority == 10]       # no static patch
    miss = [f for f in pushed if f.table == 2 and f.priority == 0][0]
    a, b = b"\x02\0\0\0\0\x0a", b"\x02\0\0\0\0\x01"
    out = core.handle(PacketIn(miss.cookie, 2, 1, tcp_frame(src_mac=a, dst_mac=b)), NOW)
    assert out == [PacketOut(1, (("output", 3),), tcp_frame(src_mac=a, dst_mac=b))]
    out = core.handle(PacketIn(miss.cookie, 2, 3, tcp_frame(src_mac=b, dst_mac=a)), NOW)
    learned = flows_of(out)
    assert learned and dict(learned[0].match) == {"in_port": 3, "eth_dst": "02:00:00:00:00:0a"}
    assert learned[0].actions == (("output", 1),) and out[-1].actions == (("output", 1),)


def test_flowstats_ids_counts_packets_in_a_sliding_minute():
    core = Core(cfg(flowstats_ids={"enabled": True, "threshold_ppm": 100, "poll_interval": 1}))
    pushed = flows_of(connected(core))
    ids_cookie = [f for f in pushed if f.priority == 150][0].cookie
    allow = flows_of(core.handle(PacketIn(ids_cookie, 1, 1, tcp_frame(sport=40001)), NOW))[0]
    t = NOW
    for age, packets in ((1.0, 8), (30.0, 90), (90.0, 180), (150.0, 270)):   # ~90 packets a minute: never over
        t = NOW + age + 1
        req = [m for m in core.handle(Tick(t), t) if isinstance(m, FlowStatsRequest)][0]
        assert flows_of(core.handle(FlowStats(req.xid, (FlowStat(1, 160, allow.match, allow.cookie, packets, 0, age),)),
                                    t)) == []
    t += 2
    req = [m for m in core.handle(Tick(t), t) if isinstance(m, FlowStatsRequest)][0]
    burst = FlowStat(1, 160, allow.match, allow.cookie, 270 + 101, 0, 152.0)      # 191 since the 90 s sample
    assert len(flows_of(core.handle(FlowStats(req.xid, (burst,)), t))) == 1


def test_zodiacfx_refuses_flows_past_480_and_counts_them():
    core = Core(cfg(**ZODIAC))
    core.profile = dataclasses.replace(core.profile, pool=None)   # the flow count alone (the pool: test_enforce)
    static = len(flows_of(connected(core)))
    docs = tuple(flag(f"f{i}", f"10.0.{i // 250}.{1 + i % 250}") for i in range(480))
    out = core.handle(Flags(docs, True, NOW), NOW)
    assert len(flows_of(out)) == 480 - static
    assert core.refused[("enforce", "capacity")] == static and len(core.installed) == 480


def test_cli_busy_listen_port_is_one_line_and_exit_2(tmp_path):
    import socket

    from tests.conftest import pisnoop
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = tmp_path / "busy.yaml"
        path.write_text(f"switch: {{controller: {{listen_port: {port}}}}}\nmetrics: {{enabled: false}}\n")
        res = pisnoop("--config", str(path), "controller", timeout=60)
    assert res.returncode == 2
    assert res.stderr == f"pisnoop: cannot listen on 127.0.0.1:{port} (switch.controller): Address already in use\n"


def test_the_core_and_modules_do_not_import_os_ken_or_pymongo():
    import subprocess
    import sys
    code = ("import sys, static_controller.core, static_controller.modules, static_controller.targets; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('os_ken', 'ryu', 'pymongo', 'socketserver')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(command.__file__).rsplit("/static_controller/", 1)[0]).stdout.strip()
    assert out == "[]"


def test_a_switch_without_meter_config_stats_still_gets_the_full_set():
    core = Core(cfg(**ZODIAC))
    req = core.connect(1, NOW)[0]
    out = core.handle(Error(req.xid, 1, 2), NOW)            # BAD_REQUEST / BAD_MULTIPART
    assert [m.command for m in out if isinstance(m, Meter)] == ["add", "add"]
    assert len(flows_of(out)) == 6 and isinstance(out[-1], Barrier)


def test_mirror_disabled_still_forwards_and_copies_nothing():
    fl = flows_of(connected(Core(cfg(mirror={"enabled": False}))))
    assert not [f for f in fl if ("output", 2) in f.actions]
    assert sorted(dict(f.match)["in_port"] for f in fl if f.table == 0 and f.goto == 1) == [1, 3]


# --- connections: every connect starts afresh, nothing moves while the switch is away -----------


def pushed(core: Core, now=NOW, existing=()) -> list:
    """Connect, answer the meter inventory and the push barrier: the pushed messages."""
    req = core.connect(1, now)[0]
    out = core.handle(MeterConfig(req.xid, tuple(existing)), now)
    core.handle(BarrierReply(out[-1].xid), now)
    return out


def test_connect_forgets_what_the_last_connection_knew():
    core = Core(cfg())
    pushed(core)
    poll = [m for m in core.handle(Tick(NOW + 1), NOW + 1) if isinstance(m, MeterStatsRequest)]
    assert len(poll) == 1 and core.owners[poll[0].xid] == "core:meter_stats"
    core.handle(MeterStats(poll[0].xid, ((1, 10, (4,)), (2, 3, (1,)))), NOW + 1)
    assert core.meter_drops == {1: 4, 2: 1} and set(core.meters) == {1, 2}
    stale = [m for m in core.handle(Tick(NOW + 7), NOW + 7) if isinstance(m, MeterStatsRequest)][0]
    core.disconnect("closed by the switch")
    assert core.counters["disconnects"] == 1 and core.disconnect_reasons == {"closed by the switch": 1}
    assert not core.installed and not core.meters and not core.meter_drops and not core.owners
    req = core.connect(1, NOW + 8)[0]
    assert core.owners == {req.xid: "core:meters"}
    # an answer to the old connection's request changes nothing; the new one polls after its own push only
    core.handle(MeterStats(stale.xid, ((1, 99, (99,)),)), NOW + 8)
    assert core.meter_drops == {} and core.handle(Tick(NOW + 9), NOW + 9) == []
    out = core.handle(MeterConfig(req.xid, ()), NOW + 9)
    assert [m.command for m in out if isinstance(m, Meter)] == ["add", "add"]      # the switch lost its meters
    assert not [m for m in core.handle(Tick(NOW + 9.2), NOW + 9.2) if isinstance(m, MeterStatsRequest)]
    core.handle(BarrierReply(out[-1].xid), NOW + 9.3)
    assert [m for m in core.handle(Tick(NOW + 9.4), NOW + 9.4) if isinstance(m, MeterStatsRequest)]


def test_nothing_is_sent_or_counted_while_the_switch_is_away_and_the_ban_comes_back_with_its_time_left():
    core = Core(cfg(flowstats_ids={"enabled": True, "poll_interval": 1}))
    ids = [m for m in core.modules if m.name == "flowstats_ids"][0]
    pushed(core)
    core.handle(Flags((), True, NOW), NOW)
    core.disconnect("connection reset by peer")
    polls, sent = ids.stats["polls"], core.counters["flows_pushed"]
    for t in range(1, 30):
        assert core.handle(Tick(NOW + t), NOW + t) == []
    assert core.handle(Flags((flag("a", "10.0.0.11", left=100),), False, NOW + 30), NOW + 30) == []
    assert ids.stats["polls"] == polls and core.counters["flows_pushed"] == sent and not core.installed
    req = core.connect(1, NOW + 40)[0]
    assert core.handle(Tick(NOW + 41), NOW + 41) == []             # connected, but the push is not out yet
    assert ids.stats["polls"] == polls
    out = core.handle(MeterConfig(req.xid, ()), NOW + 42)
    ban = [f for f in flows_of(out) if dict(f.match).get("ipv4_src") == "10.0.0.11"]
    assert len(ban) == 1 and ban[0].hard_timeout == 58
    assert core.counters["flows_pushed"] == sent + len(flows_of(out))


def test_a_new_connection_while_the_old_one_looks_alive_counts_a_disconnect():
    core = Core(cfg())
    pushed(core)
    core.connect(1, NOW + 1)
    assert core.counters["connects"] == 2 and core.disconnect_reasons == {"replaced by a new connection": 1}
    core.disconnect("x")
    core.disconnect("x")                                           # the end of a connection is counted once
    assert core.counters["disconnects"] == 2


# --- the meter-stats poll ----------------------------------------------------------------------------


def test_meter_stats_poll_pages_and_stops_for_good_on_a_refusal(caplog):
    core = Core(cfg())
    pushed(core)
    req = [m for m in core.handle(Tick(NOW + 1), NOW + 1) if isinstance(m, MeterStatsRequest)][0]
    assert not [m for m in core.handle(Tick(NOW + 7), NOW + 7) if isinstance(m, MeterStatsRequest)]  # one at a time
    core.handle(MeterStats(req.xid, ((1, 10, (4,)),), more=True), NOW + 7)
    assert core.meter_drops == {} and core.owners[req.xid] == "core:meter_stats"
    core.handle(MeterStats(req.xid, ((2, 10, (6,)),)), NOW + 7)
    assert core.meter_drops == {1: 4, 2: 6} and req.xid not in core.owners
    req = [m for m in core.handle(Tick(NOW + 13), NOW + 13) if isinstance(m, MeterStatsRequest)][0]
    caplog.clear()
    core.handle(switch_error(req.xid, 1, 2), NOW + 13)              # BAD_MULTIPART, matched by its xid
    for t in range(14, 120):
        assert not [m for m in core.handle(Tick(NOW + t), NOW + t) if isinstance(m, MeterStatsRequest)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "OFPBRC_BAD_MULTIPART" in lines[0] and "not polled" in lines[0]
    assert core.counters["meter_stats_refused"] == 1


def test_no_meter_stats_poll_where_the_target_has_none():
    core = Core(cfg(**ZODIAC))
    pushed(core)
    assert not [m for t in range(1, 30) for m in core.handle(Tick(NOW + t), NOW + t)
                if isinstance(m, MeterStatsRequest)]


# --- routing ----------------------------------------------------------------------------------------


class TableReader(Module):
    """Reads the whole table (cookie mask 0) on every tick: the replies are its own, not the core's."""

    name, module_id = "reader", 7
    subscriptions = frozenset({"tick", "flow_stats"})

    def __init__(self, view, next_xid):
        self.next_xid, self.seen = next_xid, []
        super().__init__(view)

    def declare(self):
        return Flowspace(self.cookie, COOKIE_MASK, ())

    def handle(self, event):
        if isinstance(event, Tick):
            return [FlowStatsRequest(self.next_xid())]
        self.seen.append(event)
        return []


def test_a_module_flow_stats_request_with_cookie_mask_0_comes_back_to_the_module():
    core = Core(cfg())
    reader = TableReader(core.view, core.next_xid)
    core.modules.append(reader)
    pushed(core)
    req = [m for m in core.handle(Tick(NOW + 1), NOW + 1) if isinstance(m, FlowStatsRequest)][0]
    assert core.owners[req.xid] is reader
    foreign = FlowStat(1, 999, (("in_port", 1),), 0x99 << 56, 0, 0, 1.0)
    assert core.handle(FlowStats(req.xid, (foreign,)), NOW + 1) == []   # not a reconcile: nothing deleted
    assert reader.seen and core.counters["stale_removed"] == 0


# --- pacing ------------------------------------------------------------------------------------------


def wire_len():
    from os_ken.ofproto import ofproto_v1_3
    from os_ken.ofproto.ofproto_protocol import ProtocolDesc

    from static_controller import glue
    dp = ProtocolDesc(ofproto_v1_3.OFP_VERSION)
    return lambda m: glue.encoded_len(dp, m)


def drain(pacer, first: list) -> list[list]:
    """Chunks as the switch would see them: the next one after each closing barrier's reply."""
    chunks = [first]
    while chunks[-1]:
        chunks.append(pacer.reply(chunks[-1][-1].xid))
    return chunks[:-1]


def test_a_15_ban_update_and_the_push_go_to_the_zodiac_in_chunks_under_its_window():
    from static_controller.pacer import Pacer
    size = wire_len()
    core = Core(cfg(**ZODIAC))
    bans = tuple(flag(f"f{i}", f"10.0.0.{i + 1}") for i in range(15))
    core.handle(Flags(bans, True, NOW), NOW)
    req = core.connect(1, NOW)[0]
    push = core.handle(MeterConfig(req.xid, ()), NOW)
    assert sum(map(size, push)) == 1920                         # what went out in one write before
    pacer = Pacer(core.profile.window_bytes, size, core.next_xid)
    chunks = drain(pacer, pacer.send(push))
    assert len(chunks) >= 2 and all(sum(map(size, c)) <= 1024 for c in chunks)
    assert all(isinstance(c[-1], Barrier) for c in chunks)
    unpaced = [m for m in push if not isinstance(m, Barrier)]
    assert [m for c in chunks for m in c if not isinstance(m, Barrier)] == unpaced
    assert pacer.held == 0 and pacer.largest <= 1024
    # an update while a chunk is in flight waits for it
    first = pacer.send([flows_of(push)[0]])
    assert len(first) == 2 and pacer.send([flows_of(push)[1]]) == [] and pacer.held == 1
    assert pacer.reply(12345) == [] and pacer.reply(first[-1].xid)[0] == flows_of(push)[1]


def test_ovs_keeps_its_fast_path():
    from static_controller.pacer import Pacer
    core = Core(cfg())
    push = connected(core)
    pacer = Pacer(core.profile.window_bytes, wire_len(), core.next_xid)
    assert pacer.send(push) == push and pacer.send(push) == push and pacer.chunks == 0


def test_a_table_full_answer_uninstalls_the_flow_and_counts_it_refused():
    core = Core(cfg(**ZODIAC))
    pushed(core)
    bans = flows_of(core.handle(Flags((flag("a", "10.0.0.11"), flag("b", "10.0.0.12")), True, NOW), NOW))
    before = len(core.installed)
    err = Error(77, 5, 1, cookie=bans[1].cookie, request="flow_mod", name="OFPFMFC_TABLE_FULL")
    assert core.handle(err, NOW) == []
    assert len(core.installed) == before - 1 and bans[1].key not in core.installed and bans[0].key in core.installed
    assert core.refused[("enforce", "capacity")] == 1 and core.snapshot()["refused_enforce_capacity"] == 1


def test_the_switch_table_shows_installed_flows_by_module_with_their_polled_counters():
    from static_controller.core import FLOW_POLL_SECONDS
    core = Core(cfg())
    out = pushed(core)
    table = core.switch_table()
    assert len(table["flows"]) == len(flows_of(out)) and table["counters_at"] is None
    assert {f["module"] for f in table["flows"]} == {"mirror", "ratelimit"}
    assert all(f["packets"] is None for f in table["flows"]), "no counter before the first poll"
    assert [(m["meter_id"], m["module"]) for m in table["meters"]] == [(1, "ratelimit"), (2, "ratelimit")]
    early = [m for m in core.handle(Tick(NOW + 1), NOW + 1) if isinstance(m, FlowStatsRequest)]
    assert "core:flow_counters" not in [core.owners[m.xid] for m in early], "the counters wait their interval"
    for m in early:
        core.handle(FlowStats(m.xid, ()), NOW + 1)
    t = NOW + FLOW_POLL_SECONDS + 0.1
    poll = [m for m in core.handle(Tick(t), t) if isinstance(m, FlowStatsRequest)]
    assert [core.owners[m.xid] for m in poll] == ["core:flow_counters"]
    first = flows_of(out)[0]
    other = flow(0, 1, {"in_port": 9}, 0x99)           # on the switch but not ours: not in the table
    rows = (FlowStat(first.table, first.priority, first.match, first.cookie, 42, 4200, 3.0),
            FlowStat(other.table, other.priority, other.match, other.cookie, 7, 700, 3.0))
    assert core.handle(FlowStats(poll[0].xid, rows[:1], more=True), t) == []
    assert core.switch_table()["counters_at"] is None, "a counter set is taken whole, not page by page"
    core.handle(FlowStats(poll[0].xid, rows[1:]), t)
    table = core.switch_table()
    assert table["counters_at"] == t and len(table["flows"]) == len(flows_of(out))
    counted = [f for f in table["flows"] if f["packets"] is not None]
    assert [(f["table"], f["priority"], f["packets"], f["bytes"]) for f in counted] == \
        [(first.table, first.priority, 42, 4200)]
    assert not [m for m in core.handle(Tick(t + 1), t + 1) if isinstance(m, FlowStatsRequest)]
    core.disconnect("closed by the switch")
    assert core.switch_table() == {"flows": [], "meters": [], "counters_at": None}
