"""The Zodiac FX model (lab/zodiac) alone: a test-side controller built with os-ken's encoder (not the
model's) drives it over TCP; then the real ``pisnoop controller`` pushes its zodiacfx table and ``where()``
answers where packets go. Root-free."""

from __future__ import annotations

import socket
import struct
import time
import types

import pytest
import yaml
from os_ken.ofproto import ofproto_parser
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from lab.procs import free_port
from lab.zodiac import ZodiacSwitch, ZodiacTable, wire
from tests.ctlutil import ControllerProcess

FAST = 0.05          # tick: the firmware's 500 ms timer, ten times faster
DP = types.SimpleNamespace(ofproto=ofp, ofproto_parser=parser, id=None)


def enc(msg, xid: int = 0) -> bytes:
    msg.xid = None
    if xid:
        msg.set_xid(xid)
    msg.serialize()
    return bytes(msg.buf)


class Speaker:
    """A listening socket that plays the controller, one connection at a time."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.lsock.settimeout(10)
        self.addr = self.lsock.getsockname()
        self.conn = None
        self.buf = b""
        self.xid = 100

    def accept(self, handshake: bool = True):
        self.conn, _ = self.lsock.accept()
        self.conn.settimeout(5)
        self.buf = b""
        hello = self.recv()
        assert (hello.version, hello.msg_type, hello.xid) == (4, ofp.OFPT_HELLO, 1)
        if handshake:
            self.send(parser.OFPHello(DP))
            feats = self.request(parser.OFPFeaturesRequest(DP))
            return feats
        return hello

    def send(self, *msgs) -> list[int]:
        data, xids = b"", []
        for m in msgs:
            self.xid += 1
            xids.append(self.xid)
            data += enc(m, self.xid)
        self.conn.sendall(data)
        return xids

    def recv(self, timeout: float = 5.0):
        self.conn.settimeout(timeout)
        while len(self.buf) < 8 or len(self.buf) < struct.unpack_from("!H", self.buf, 2)[0]:
            d = self.conn.recv(65536)
            if not d:
                raise EOFError("switch closed")
            self.buf += d
        n = struct.unpack_from("!H", self.buf, 2)[0]
        raw, self.buf = self.buf[:n], self.buf[n:]
        version, mtype, length, xid = struct.unpack_from("!BBHI", raw)
        msg = ofproto_parser.msg(DP, version, mtype, length, xid, raw)
        msg.raw = raw
        return msg

    def request(self, msg, timeout: float = 5.0):
        xid = self.send(msg)[0]
        while True:
            r = self.recv(timeout)
            if r.xid == xid:
                return r

    def until_barrier(self, timeout: float = 5.0) -> list:
        """Send a barrier; return what came before its reply."""
        xid = self.send(parser.OFPBarrierRequest(DP))[0]
        got = []
        while True:
            r = self.recv(timeout)
            if r.msg_type == ofp.OFPT_BARRIER_REPLY and r.xid == xid:
                return got
            got.append(r)

    def push(self, msgs, limit: int = 1136) -> tuple[list[int], list]:
        """Send ``msgs`` paced as the Zodiac needs: chunks of at most ``limit`` bytes, each closed by a barrier
        whose reply is awaited; return the xids and every message that came back."""
        xids, got, chunk, size = [], [], [], 16
        for m in list(msgs) + [None]:
            n = len(enc(m)) if m is not None else 0
            if chunk and (m is None or size + n > limit):
                xids += self.send(*chunk)
                got += self.until_barrier()
                chunk, size = [], 16
            if m is not None:
                chunk.append(m)
                size += n
        return xids, got

    def close(self):
        for s in (self.conn, self.lsock):
            if s:
                s.close()


@pytest.fixture
def rig():
    sp = Speaker()
    sw = ZodiacSwitch(sp.addr, tick=FAST).start()
    yield sp, sw
    sw.stop()
    sp.close()


def flow(table=0, priority=100, cookie=0, match=None, actions=None, inst=None, command=ofp.OFPFC_ADD, **kw):
    if inst is None:
        inst = [] if actions is None else [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)]
    kw.setdefault("out_port", ofp.OFPP_ANY)
    kw.setdefault("out_group", ofp.OFPG_ANY)
    return parser.OFPFlowMod(DP, cookie=cookie, table_id=table, command=command, priority=priority,
                             match=match or parser.OFPMatch(), instructions=inst, **kw)


def out(*ports):
    return [parser.OFPActionOutput(p) for p in ports]


def meter(mid, bands=1, flags=ofp.OFPMF_PKTPS, command=ofp.OFPMC_ADD):
    return parser.OFPMeterMod(DP, command=command, flags=flags, meter_id=mid,
                              bands=[parser.OFPMeterBandDrop(rate=100 * (i + 1)) for i in range(bands)])


def errors(msgs):
    return [(m.type, m.code) for m in msgs if m.msg_type == ofp.OFPT_ERROR]


def test_handshake_answers_as_the_firmware(rig):
    sp, sw = rig
    feats = sp.accept()
    assert feats.msg_type == ofp.OFPT_FEATURES_REPLY
    assert (feats.n_buffers, feats.n_tables, feats.auxiliary_id) == (0, 10, 0)
    assert feats.capabilities == ofp.OFPC_FLOW_STATS | ofp.OFPC_TABLE_STATS | ofp.OFPC_PORT_STATS | \
        ofp.OFPC_GROUP_STATS
    assert feats.datapath_id == 0x70B3D56CD888
    ports = sp.request(parser.OFPPortDescStatsRequest(DP, 0))
    assert [p.port_no for p in ports.body] == [1, 2, 3]          # port 4 is the native (management) port
    assert [p.name for p in ports.body] == [b"eth0", b"eth1", b"eth2"]
    mf = sp.request(parser.OFPMeterFeaturesStatsRequest(DP, 0)).body[0]
    assert (mf.max_meter, mf.max_bands, mf.capabilities) == (8, 3, ofp.OFPMF_KBPS | ofp.OFPMF_PKTPS)
    assert mf.band_types == (1 << ofp.OFPMBT_DROP) | (1 << ofp.OFPMBT_DSCP_REMARK)
    echo = sp.request(parser.OFPEchoRequest(DP, data=b"ping"))
    assert (echo.msg_type, echo.data) == (ofp.OFPT_ECHO_REPLY, b"ping")
    desc = sp.request(parser.OFPDescStatsRequest(DP, 0)).body
    assert (desc.mfr_desc, desc.sw_desc) == (b"Northbound Networks", b"0.86")
    # meter stats: answered for all meters, an unknown meter is an error (12, 3)
    sp.send(meter(1))
    ms = sp.request(parser.OFPMeterStatsRequest(DP, 0, ofp.OFPM_ALL))
    assert ms.msg_type == ofp.OFPT_MULTIPART_REPLY and [m.meter_id for m in ms.body] == [1]
    bad = sp.request(parser.OFPMeterStatsRequest(DP, 0, 7))
    assert (bad.msg_type, bad.type, bad.code) == (ofp.OFPT_ERROR, 12, 3)
    assert sp.until_barrier() == []
    assert sw.counters()["connects"] == 1


def test_add_replaces_same_table_priority_match_and_modify_is_ignored(rig):
    sp, sw = rig
    sp.accept()
    m = parser.OFPMatch(in_port=1)
    sp.send(flow(match=m, actions=out(3), cookie=1), flow(match=m, actions=out(2), cookie=2),
            flow(match=m, priority=200, actions=out(3), cookie=3),
            flow(match=m, actions=out(1), cookie=9, command=ofp.OFPFC_MODIFY))
    assert errors(sp.until_barrier()) == []
    got = sorted((f.priority, f.cookie, f.instructions) for f in sw.flows())
    assert got == [(100, 2, (("apply", (("output", 2),)),)), (200, 3, (("apply", (("output", 3),)),))]


def test_delete_by_cookie_mask_with_the_firmwares_precedence_slip(rig):
    sp, sw = rig
    sp.accept()
    cookies = [0x0100000000000001, 0x0100000000000002, 0x0200000000000001]
    sp.send(*[flow(priority=10 + i, cookie=c, match=parser.OFPMatch(in_port=1)) for i, c in enumerate(cookies)])
    sp.send(flow(command=ofp.OFPFC_DELETE_STRICT, priority=11, cookie=cookies[1], cookie_mask=2 ** 64 - 1,
                 match=parser.OFPMatch(in_port=1)))
    sp.until_barrier()
    assert sorted(f.cookie for f in sw.flows()) == [cookies[0], cookies[2]]
    # a mask with bit 56 set keeps flows whose *whole* cookie differs from cookie & mask
    sp.send(flow(command=ofp.OFPFC_DELETE, table=ofp.OFPTT_ALL, cookie=0x0100000000000000,
                 cookie_mask=0xFF00000000000000))
    sp.until_barrier()
    assert sorted(f.cookie for f in sw.flows()) == [cookies[0], cookies[2]]
    # an out_port filter matches nothing
    sp.send(flow(command=ofp.OFPFC_DELETE, table=ofp.OFPTT_ALL, out_port=3))
    sp.until_barrier()
    assert len(sw.flows()) == 2
    # a mask without bit 56 filters nothing: every flow goes
    sp.send(flow(command=ofp.OFPFC_DELETE, table=ofp.OFPTT_ALL, cookie=0x5, cookie_mask=0xFFFF))
    sp.until_barrier()
    assert sw.flows() == []


def test_481st_flow_refused_and_the_block_pool_refuses_earlier(rig):
    sp, sw = rig
    sp.accept()
    # empty match, no instructions: one 56-byte block each, so the 480-flow limit is what refuses
    assert errors(sp.push(flow(priority=p) for p in range(480))[1]) == []
    xid = sp.send(flow(priority=1000))[0]
    got = sp.until_barrier()
    assert errors(got) == [(ofp.OFPET_FLOW_MOD_FAILED, ofp.OFPFMFC_TABLE_FULL)] and got[0].xid == xid
    assert len(sw.flows()) == 480
    # even a replacement of an existing flow is refused at 480
    assert errors([sp.request(flow(priority=5))]) == [(5, 1)]
    sp.send(flow(command=ofp.OFPFC_DELETE, table=ofp.OFPTT_ALL))
    sp.until_barrier()
    # a 56-byte flow_mod, a 14-byte match (eth_type, ipv4_src), 24 bytes of instructions (apply output), smallest
    # free block first, bags 16x128 24x256 56x256 72x256 96x128: 56/16/24 for 128 flows, 56/24/24 for 64, 56/56/56
    # for 21, one 56/72/72, 72/72/72 for 84, one 72/72/96, 96/96/96 for 42: 341 flows, the 342nd finds no block
    ip = [f"10.1.{p // 250}.{p % 250}" for p in range(400)]
    xids, got = sp.push(flow(priority=p, match=parser.OFPMatch(eth_type=0x0800, ipv4_src=ip[p]), actions=out(3))
                        for p in range(400))
    errs = [m for m in got if m.msg_type == ofp.OFPT_ERROR]
    assert len(errs) == 400 - 341 and xids.index(errs[0].xid) == 341 and len(sw.flows()) == 341
    assert {(e.type, e.code) for e in errs} == {(5, 1)}
    # instructions over 96 bytes never fit: TABLE_FULL at once
    sp.send(flow(command=ofp.OFPFC_DELETE, table=ofp.OFPTT_ALL))
    assert errors([sp.request(flow(actions=out(1, 2, 3, 1, 2, 3)))]) == [(5, 1)]


def test_meters_ninth_and_four_bands_refused_burst_accepted_silently(rig):
    sp, sw = rig
    sp.accept()
    assert errors(sp.push(meter(i) for i in range(1, 9))[1]) == []
    assert errors([sp.request(meter(9))]) == [(ofp.OFPET_METER_MOD_FAILED, ofp.OFPMMFC_OUT_OF_METERS)]
    sp.send(parser.OFPMeterMod(DP, command=ofp.OFPMC_DELETE, meter_id=8))
    assert errors([sp.request(meter(1))]) == [(12, ofp.OFPMMFC_METER_EXISTS)]
    assert errors([sp.request(meter(20, bands=4))]) == [(12, ofp.OFPMMFC_OUT_OF_BANDS)]
    assert errors([sp.request(meter(21, command=ofp.OFPMC_MODIFY))]) == [(12, ofp.OFPMMFC_UNKNOWN_METER)]
    # the firmware stores the flags unchecked: BURST|STATS is not refused (only meter features omit them)
    sp.send(meter(20, flags=ofp.OFPMF_KBPS | ofp.OFPMF_BURST | ofp.OFPMF_STATS))
    assert errors(sp.until_barrier()) == []
    assert sw.meters()[20][0] == ofp.OFPMF_KBPS | ofp.OFPMF_BURST | ofp.OFPMF_STATS
    assert sorted(sw.meters()) == [1, 2, 3, 4, 5, 6, 7, 20]


def test_flow_stats_paged_15_per_reply_for_200_flows_filters_ignored(rig):
    sp, sw = rig
    sp.accept()
    assert errors(sp.push(flow(priority=p, cookie=p, match=parser.OFPMatch(in_port=1), actions=out(3))
                          for p in range(200))[1]) == []
    xid = sp.send(parser.OFPFlowStatsRequest(DP, table_id=1, cookie=7, cookie_mask=2 ** 64 - 1))[0]
    pages = []
    while not pages or pages[-1].flags & ofp.OFPMPF_REPLY_MORE:
        r = sp.recv()
        assert r.xid == xid
        pages.append(r)
    assert [len(p.body) for p in pages] == [15] * 13 + [5]
    assert sorted(s.cookie for p in pages for s in p.body) == list(range(200))
    assert all(s.instructions[0].actions[0].port == 3 for p in pages for s in p.body)


def test_wipe_on_disconnect_and_connect_fin_and_rst(rig):
    sp, sw = rig
    sp.accept()
    sp.send(flow(actions=out(3)), meter(1))
    sp.until_barrier()
    assert len(sw.flows()) == 1 and sw.meters()
    sp.conn.close()                                  # controller closes: the switch wipes, never sends a FIN back
    assert sw.wait(lambda s: s.disconnects == 1)
    assert sw.flows() == [] and sw.meters() == {}
    sp.accept()
    assert sw.counters()["half_open"] == 1
    sp.send(flow(actions=out(3)))
    sp.until_barrier()
    t0 = time.monotonic()
    sw.drop("rst", reconnect=0)
    with pytest.raises((ConnectionResetError, EOFError)):
        sp.recv()
    sp.accept()
    assert time.monotonic() - t0 < 1.0 and sw.flows() == []
    sw.drop("fin")                                   # the firmware's own pause: 4 ticks
    t0 = time.monotonic()
    sp.accept()
    assert time.monotonic() - t0 >= 3 * FAST
    c = sw.counters()
    assert (c["connects"], c["disconnects"]) == (4, 3)


def test_burst_over_the_buffer_is_lost_paced_is_not_and_the_heartbeat_drops_the_link(rig):
    sp, sw = rig
    sp.accept()
    mods = [flow(priority=p, match=parser.OFPMatch(eth_type=0x0800, ipv4_src=f"10.0.0.{p}"), actions=out(2, 3))
            for p in range(1, 21)]
    one = len(enc(mods[0], 1))
    per = sw.rx_buffer // (one + 16)                 # flow-mods per paced chunk, room for the barrier
    for i in range(0, 20, per):
        sp.send(*mods[i:i + per])
        sp.until_barrier()
    c = sw.counters()
    assert len(sw.flows()) == 20 and c["overflows"] == 0 and c["max_burst"] <= sw.rx_buffer
    sp.send(flow(command=ofp.OFPFC_DELETE, table=ofp.OFPTT_ALL))
    sp.until_barrier()
    # all 20 in one write, then a barrier: what passes the 1,136 bytes is lost, the barrier with it
    sp.send(*mods, parser.OFPBarrierRequest(DP))
    assert 20 * one > sw.rx_buffer
    assert sw.wait(lambda s: s.counters()["overflows"] > 0, 2)
    assert 0 < len(sw.flows()) <= sw.rx_buffer // one
    # the barrier is never answered; the speaker stays silent: echo requests, then a close after 12 silent ticks
    seen = []
    with pytest.raises(EOFError):
        while True:
            seen.append(sp.recv(timeout=3).msg_type)
    assert seen and set(seen) == {ofp.OFPT_ECHO_REQUEST}
    assert sw.wait(lambda s: s.disconnects == 1, 3)
    c = sw.counters()
    assert c["echo_requests_sent"] >= 1 and c["max_burst"] > sw.rx_buffer and c["lost_bytes"] > 0
    assert sw.disconnect_reasons == ["no heartbeat"]
    sp.accept()
    assert sw.flows() == []


def test_no_features_request_closes_at_the_first_echo_time(rig):
    sp, sw = rig
    sp.accept(handshake=False)
    sp.send(parser.OFPHello(DP))
    assert sw.wait(lambda s: s.disconnects == 1, 2)
    assert sw.disconnect_reasons == ["handshake failed (no features request)"]


def test_timeouts_one_flow_per_check_and_flow_removed():
    t = ZodiacTable()

    def fm(**kw):
        return wire.decode_flow_mod(enc(flow(**kw), 9))
    t.flow_mod(fm(priority=1, idle_timeout=3, flags=ofp.OFPFF_SEND_FLOW_REM), now=10)
    t.flow_mod(fm(priority=2, hard_timeout=5), now=10)
    t.flow_mod(fm(priority=3, idle_timeout=3, match=parser.OFPMatch(in_port=2)), now=10)
    assert t.where(1, count=True, now=12).flows == ((0, 2, 0),)   # a hit on priority 2 only
    assert t.expire(12) == []
    out = t.expire(13)                                  # priority 1 and 3 are idle: one per check
    assert [(o.kind, o.flow.priority, o.reason) for o in out] == [("flow_removed", 1, ofp.OFPRR_IDLE_TIMEOUT)]
    assert sorted(f.priority for f in t.flows) == [2, 3]
    assert t.expire(13) == [] and [f.priority for f in t.flows] == [2]   # no SEND_FLOW_REM: removed silently
    assert t.expire(14) == [] and len(t.flows) == 1
    assert t.expire(15) == [] and t.flows == []          # the hard timeout counts from the add, not the hit


def controller_config(tmp_path, store_config, port):
    path, _db = store_config
    cfg = yaml.safe_load(path.read_text())
    cfg["switch"] = {"target": "zodiacfx", "datapath_id": 0x70B3D56CD888,
                     "ports": {"inside": 1, "mirror": 2, "upstream": 3, "management": 4},
                     "controller": {"listen_host": "127.0.0.1", "listen_port": port}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_where_for_the_table_the_real_controller_pushes(tmp_path, store_config):
    port = free_port()
    cfg = controller_config(tmp_path, store_config, port)
    va = types.SimpleNamespace(run_dir=tmp_path, config_path=cfg)
    with ControllerProcess(va) as ctl, ZodiacSwitch(("127.0.0.1", port), tick=0.5) as sw:
        assert sw.wait(lambda s: len(s.flows()) > 0 and s.counters()["by_type"].get(wire.BARRIER_REQUEST), 30), \
            ctl.log[-2000:]
        time.sleep(0.5)
        inside = dict(eth_src="02:00:00:00:00:0a", eth_dst="02:00:00:00:00:01", eth_type=0x0800,
                      ipv4_src="10.0.0.10", ipv4_dst="10.0.0.1", ip_proto=6, tcp_src=40000, tcp_dst=5222)
        back = dict(eth_src="02:00:00:00:00:01", eth_dst="02:00:00:00:00:0a", eth_type=0x0800,
                    ipv4_src="10.0.0.1", ipv4_dst="10.0.0.10", ip_proto=6, tcp_src=5222, tcp_dst=40000)
        w = sw.where(1, **inside)
        assert sorted(w.ports) == [2, 3] and w.meters == (1,), (w, sw.flows())   # XMPP passes the rate meter
        w = sw.where(1, over_rate=True, **inside)
        assert w.ports == (2,) and w.dropped_by == "meter"        # over the rate: mirrored, not forwarded
        w = sw.where(3, **back)
        assert sorted(w.ports) == [1, 2], (w, sw.flows())
        for f in sw.flows():
            for kind, body in f.instructions:
                if kind in ("apply", "write"):
                    assert ("output", 4) not in body, f
        assert sw.where(4, **inside).ports == ()
        c = sw.counters()
        assert c["errors_sent"] == 0 and c["overflows"] == 0 and c["max_burst"] <= sw.rx_buffer, (c, sw.errors)
