"""The static controller on the real virtual appliance (OVS userspace datapath, embedded store).

Each test runs ``pisnoop controller`` as a subprocess against its own
appliance, sends traffic between the namespaces and reads the switch back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import struct
import sys
import time
import urllib.request

import pytest

from appliance import config as config_mod
from appliance import flagdoc, store
from lab.virtual import VirtualAppliance
from static_controller.modules.enforce import P_DROP, P_LIMIT
from tests.conftest import assert_gone
from tests.ctlutil import (
    ControllerProcess,
    connected,
    flows_matching,
    start_echo_server,
    table_snapshot,
    tcp_client,
    wait_for,
)
from tests.netutil import Listener, icmp_echo

UP, IN = "10.0.0.1", "10.0.0.10"
CLIENT_B = "10.0.0.11"


@contextlib.contextmanager
def appliance(**over):
    va = VirtualAppliance(config_mod.from_dict(over, "<test>"))
    with va:
        yield va
    assert_gone(va)


def ipv4(frames):
    return [f for f in frames if len(f) >= 34 and struct.unpack_from("!H", f, 12)[0] == 0x0800]


def tcp_to(frames, port):
    out = []
    for f in ipv4(frames):
        if f[23] == 6:
            ihl = (f[14] & 0x0F) * 4
            if struct.unpack_from("!H", f, 14 + ihl + 2)[0] == port:
                out.append(f)
    return out


def metrics(va) -> str:
    url = f"http://127.0.0.1:{va.config.metrics.controller_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)"
    m = re.search(pat, text)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("end", ["fin", "rst", "controller"])
def test_a_connection_end_is_an_event_at_once_and_leaves_no_thread_or_socket(end):
    """os-ken 4.2's native hub cannot kill the send thread: ``ryu_api.Datapath`` makes the end complete."""
    import socket
    import threading

    from static_controller import ryu_api
    listener = socket.create_server(("127.0.0.1", 0))
    switch = socket.create_connection(listener.getsockname())
    sock, _ = listener.accept()
    listener.close()
    before = {t.ident for t in threading.enumerate()}
    dp = ryu_api.Datapath(sock, ("127.0.0.1", 1))
    serve = threading.Thread(target=dp.serve, daemon=True)
    serve.start()
    assert switch.recv(8)[1] == 0                                  # the controller's HELLO
    if end == "rst":
        switch.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if end == "controller":
        dp.close("replaced by a new connection")
    else:
        switch.close()
    serve.join(2.0)
    try:
        assert not serve.is_alive(), "serve() still blocked: its send thread was never woken"
        assert {t.ident for t in threading.enumerate()} == before
        assert dp.state == ryu_api.DEAD_DISPATCHER and sock.fileno() == -1
        assert dp.end_reason == {"fin": "closed by the switch", "rst": "connection reset by peer",
                                 "controller": "replaced by a new connection"}[end]
    finally:
        switch.close()


def test_forwards_and_mirrors_every_frame_both_ways_with_metrics_and_status():
    with appliance() as va, ControllerProcess(va) as ctl:
        ctl.wait_pushed()
        assert wait_for(lambda: connected(va))
        mirror = Listener(va.hosts["mirror"].netns, "mirror0")
        at_in = Listener(va.hosts["inside"].netns, "eth0")
        at_up = Listener(va.hosts["upstream"].netns, "eth0")
        try:
            assert va.ping("inside", UP, count=5)
            server = start_echo_server(va, 7000)
            try:
                res = tcp_client(va, IN, 7000, n=20)
            finally:
                server.kill()
                server.wait()
            assert res["ok"] == 20, res
            mirrored = ipv4(mirror.drain())
            delivered = ipv4(at_in.drain()) + ipv4(at_up.drain())
        finally:
            for lis in (mirror, at_in, at_up):
                lis.close()
        assert len(icmp_echo(mirrored, 8)) == 5 and len(icmp_echo(mirrored, 0)) == 5
        assert tcp_to(mirrored, 7000) and [f for f in mirrored if f[23] == 6 and f not in tcp_to(mirrored, 7000)]
        # every IPv4 frame that crossed the bridge, in both directions, was copied once
        assert sorted(mirrored) == sorted(delivered)
        text = metrics(va)
        assert metric(text, "pisnoop_controller_of_messages_total", direction="sent", type="OFPFlowMod") >= 6
        assert metric(text, "pisnoop_controller_flows_pushed_total", module="mirror") == 5
        assert metric(text, "pisnoop_controller_connected") == 1
        db = store.database(va.config.mongodb)
        try:
            doc = wait_for(lambda: db[store.STATUS].find_one({"_id": f"controller:{va.config.snooper.sensor}"}), 15)
        finally:
            db.client.close()
        assert doc and doc["connected"] and doc["counters"]["pushes"] == 1 and "rss_bytes" in doc["health"]


def send_syn_burst(va, n: int, dport: int = 5222) -> None:
    """``n`` TCP SYN frames inside -> upstream, paced to ~500/s (well under what the userspace bridge forwards)."""
    mac_up = va.exec("upstream", ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    script = r"""
import socket, struct, sys, time
n, dport, dst_mac = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3].replace(":", ""))
src_mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(("eth0", 0))
for i in range(n):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, i, 0, 64, 6, 0, socket.inet_aton("10.0.0.10"),
                     socket.inet_aton("10.0.0.1"))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    tcp = struct.pack("!HHIIBBHHH", 20000 + i, dport, i, 0, 0x50, 0x02, 1024, 0, 0)
    s.send(dst_mac + src_mac + b"\x08\x00" + ip + tcp)
    time.sleep(0.002)
"""
    va.exec("inside", [sys.executable, "-c", script, str(n), str(dport), mac_up])


def test_xmpp_burst_is_cut_to_the_meter_rate_but_fully_mirrored():
    with appliance(xmpp={"meter": {"rate": 50, "unit": "pktps"}}) as va, ControllerProcess(va) as ctl:
        ctl.wait_pushed()
        mirror = Listener(va.hosts["mirror"].netns, "mirror0")
        at_up = Listener(va.hosts["upstream"].netns, "eth0")
        try:
            send_syn_burst(va, 400)
            seen = tcp_to(mirror.drain(), 5222)
            passed = tcp_to(at_up.drain(), 5222)
        finally:
            mirror.close()
            at_up.close()
        assert len(seen) == 400, "the mirror must see every frame, also the metered ones"
        assert 0 < len(passed) <= 200, f"{len(passed)} of 400 passed a 50 pktps meter"
        stats = va.ofctl("meter-stats")
        drops = int(re.search(r"meter:1 .*?0: packet_count:(\d+)", stats, re.S).group(1))
        assert drops == 400 - len(passed)
        # the controller polls the same counter into its metrics
        assert wait_for(lambda: metric(metrics(va), "pisnoop_controller_meter_band_drops_total", meter="1") == drops,
                        15)


def flag_doc(ip, port=None, action="drop", seconds=120):
    return flagdoc.build(client_ip=ip, client_port=port, server_ports=[5222], classifier="test", reason="test flood",
                         action=action, evidence={}, offence=1, ban_seconds=seconds, sensor="test",
                         scope="fleet", flagged_at=dt.datetime.now(dt.timezone.utc))


def release(db, fid) -> None:
    """As ``flags release`` does it: the whole document replaced (a ``$set`` date becomes a string on nx-27017)."""
    doc = db[store.FLAGS].find_one({"_id": fid})
    db[store.FLAGS].replace_one({"_id": fid}, flagdoc.ended(doc, flagdoc.RELEASED, dt.datetime.now(dt.timezone.utc)))


@pytest.mark.parametrize("action", ["drop", "limit"])
def test_a_flag_cuts_client_a_within_2s_client_b_keeps_working_release_restores(action):
    with appliance(xmpp={"penalty_meter": {"rate": 1, "unit": "pktps"}}) as va, ControllerProcess(va) as ctl:
        ctl.wait_pushed()
        va.exec("inside", ["ip", "addr", "add", f"{CLIENT_B}/24", "dev", "eth0"])
        server = start_echo_server(va, 5222)
        db = store.database(va.config.mongodb)
        try:
            assert tcp_client(va, IN, 5222)["ok"] == 1 and tcp_client(va, CLIENT_B, 5222)["ok"] == 1
            t0 = time.monotonic()
            fid = db[store.FLAGS].insert_one(flag_doc(IN, action=action)).inserted_id
            prio = f"priority={P_DROP if action == 'drop' else P_LIMIT}"
            assert wait_for(lambda: flows_matching(va, f"nw_src={IN}", prio), 2.0), "no ban flow within 2 s"
            assert time.monotonic() - t0 <= 2.0
            ban = flows_matching(va, f"nw_src={IN}")[0]
            assert "hard_timeout=12" in ban and ("actions=drop" in ban if action == "drop" else "meter:2" in ban)
            a = tcp_client(va, IN, 5222, n=40)
            assert a["ok"] < 40, f"client A was not cut: {a}"
            b = tcp_client(va, CLIENT_B, 5222, n=40)
            assert b["ok"] == 40, b
            release(db, fid)
            assert wait_for(lambda: not flows_matching(va, f"nw_src={IN}"), 5.0), "ban flow not removed on release"
            assert tcp_client(va, IN, 5222, n=10)["ok"] == 10
        finally:
            db.client.close()
            server.kill()
            server.wait()


def test_kill_keeps_forwarding_restart_leaves_an_identical_table():
    with appliance() as va:
        ctl = ControllerProcess(va).start()
        try:
            ctl.wait_pushed()
            time.sleep(1.0)                          # let the first read-back (stale-flow removal) pass
            before = table_snapshot(va)
            pinger = va.popen("inside", ["ping", "-n", "-q", "-c", "25", "-i", "0.2", UP])
            time.sleep(1.0)
            ctl.kill(hard=True)                      # SIGKILL while traffic flows
            mirror = Listener(va.hosts["mirror"].netns, "mirror0")
            try:
                assert va.ping("inside", UP, count=3)
                seen = icmp_echo(mirror.drain(), 8)
            finally:
                mirror.close()
            assert len(seen) >= 3, "mirroring stopped with the controller"
            assert pinger.wait(30) == 0, "pings were lost while the controller died"
            assert table_snapshot(va) == before
            ctl = ControllerProcess(va).start()
            ctl.wait_pushed()
            time.sleep(1.0)
            after = table_snapshot(va)
        finally:
            ctl.kill(hard=False)
        assert after == before
        assert len(before[0]) == 7 and len(before[1]) >= 2      # 5 mirror/patch flows, XMPP meter for v4 and v6


def test_store_outage_logged_once_and_connect_still_pushes():
    with appliance() as va:
        with ControllerProcess(va) as ctl:
            ctl.wait_pushed()
            va.store.stop()
            ctl.wait_log("store unreachable", timeout=20)
            time.sleep(3 * va.config.enforce.poll_interval + va.config.mongodb.timeout_ms / 1000)
            assert ctl.log.count("store unreachable") == 1
            assert va.ping("inside", UP, count=2)
            assert metric(metrics(va), "pisnoop_controller_store_outages_total") == 1
        # a controller that starts while the store is down still pushes the whole set at once
        ctl2 = ControllerProcess(va).start()
        try:
            ms = ctl2.wait_pushed()
            assert ms < va.config.mongodb.timeout_ms, "the push waited for the store"
            assert len(table_snapshot(va)[0]) == 7      # the static set: mirror/patch 5, XMPP meter v4 and v6
            ctl2.wait_log("store unreachable", timeout=20)
            va.store.start()
            ctl2.wait_log("store reachable again", timeout=30)
            db = store.database(va.config.mongodb)
            try:
                db[store.FLAGS].insert_one(flag_doc(IN))
            finally:
                db.client.close()
            assert wait_for(lambda: flows_matching(va, f"nw_src={IN}", "actions=drop"), 10), "no ban after the outage"
        finally:
            ctl2.kill(hard=False)


def test_flowstats_ids_drops_the_fast_client_only():
    with appliance(flowstats_ids={"enabled": True, "threshold_ppm": 100, "poll_interval": 1.0}) as va, \
            ControllerProcess(va) as ctl:
        ctl.wait_pushed()
        va.exec("inside", ["ip", "addr", "add", f"{CLIENT_B}/24", "dev", "eth0"])
        server = start_echo_server(va, 5222)
        try:
            assert flows_matching(va, "priority=150", "CONTROLLER")
            slow = tcp_client(va, CLIENT_B, 5222, n=3, gap=0.3, sport=41000)
            assert slow["ok"] == 3, slow
            assert flows_matching(va, f"nw_src={CLIENT_B}", "tp_src=41000", "priority=160")
            fast = tcp_client(va, IN, 5222, n=400, sport=42000, timeout=90)
            assert fast["ok"] > 0, fast                 # got through the packet-in path at first
            drop = wait_for(lambda: flows_matching(va, f"nw_src={IN}", "tp_src=42000", "priority=190"), 10)
            assert drop and "actions=drop" in drop[0]
            assert not flows_matching(va, f"nw_src={CLIENT_B}", "priority=190")
            again = tcp_client(va, CLIENT_B, 5222, n=2, sport=41001)
            assert again["ok"] == 2, again
        finally:
            server.kill()
            server.wait()


def test_l2switch_learns_and_still_mirrors_each_frame_once():
    with appliance(switch={"forwarding": "l2switch"}) as va, ControllerProcess(va) as ctl:
        ctl.wait_pushed()
        assert not flows_matching(va, "table=2", "priority=10")
        mirror = Listener(va.hosts["mirror"].netns, "mirror0")
        try:
            assert va.ping("inside", UP, count=4)
            seen = mirror.drain()
        finally:
            mirror.close()
        assert len(icmp_echo(seen, 8)) == 4 and len(icmp_echo(seen, 0)) == 4
        learned = flows_matching(va, "table=2", "priority=100", "dl_dst=")
        assert len(learned) >= 2, va.ofctl("dump-flows")
        assert all("idle_timeout=60" in f for f in learned)


def test_systemd_ready_watchdog_stopping_and_foreign_datapath_ignored(tmp_path):
    import socket
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    got: list[str] = []

    def read_until(text, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and text not in got:
            try:
                got.extend(sock.recv(4096).decode().split("\n"))
            except socket.timeout:
                pass
        return text in got

    try:
        with appliance() as va:
            data = config_mod.to_dict(va.config)
            data["switch"]["datapath_id"] = 2                  # the bridge is datapath 1
            other = tmp_path / "other-dpid.yaml"
            other.write_text(config_mod.dump(config_mod.from_dict(data)))
            ctl = ControllerProcess(va, config_path=other,
                                    env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}).start()
            try:
                assert read_until("READY=1")
                assert read_until("WATCHDOG=1")
                ctl.wait_log("ignoring datapath 0000000000000001", timeout=30)
                assert not flows_matching(va, "cookie=0x1")     # the bridge (dpid 1) is not ours: nothing pushed
                ctl.proc.send_signal(15)
                assert ctl.proc.wait(10) == 0
                assert read_until("STOPPING=1")
            finally:
                ctl.kill(hard=False)
    finally:
        sock.close()


def test_a_ban_released_while_the_controller_was_down_is_removed_on_restart():
    with appliance() as va:
        db = store.database(va.config.mongodb)
        ctl = ControllerProcess(va).start()
        try:
            ctl.wait_pushed()
            fid = db[store.FLAGS].insert_one(flag_doc(IN, port=45000)).inserted_id
            assert wait_for(lambda: flows_matching(va, f"nw_src={IN}", "tp_src=45000"), 5)
            ctl.kill(hard=True)
            release(db, fid)
            assert flows_matching(va, f"nw_src={IN}", "tp_src=45000"), \
                "the switch keeps the ban while no controller runs"
            ctl = ControllerProcess(va).start()
            ctl.wait_pushed()
            assert wait_for(lambda: not flows_matching(va, f"nw_src={IN}"), 10), "stale ban survived the restart"
            assert len(table_snapshot(va)[0]) == 7      # the static set: mirror/patch 5, XMPP meter v4 and v6
        finally:
            ctl.kill(hard=False)
            db.client.close()


def test_ovs_answers_a_modify_of_a_missing_meter_with_unknown_meter_and_the_core_re_adds_it(va):
    """What OVS 3.1 really sends (docs/ARCHITECTURE.md, "Facts: Open vSwitch"): (12, 3), not (12, 7)."""
    import socket

    from static_controller import glue
    from static_controller.core import Core
    from static_controller.messages import Error, Meter
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(va.run_dir / "ovs" / f"{va.bridge}.mgmt"))
    sock.settimeout(5)
    got: dict[int, tuple] = {}
    try:
        sock.sendall(struct.pack("!BBHI", 4, 0, 8, 1))                                   # HELLO, OpenFlow 1.3
        band = struct.pack("!HHII4x", 1, 16, 10, 0)                                      # drop band, 10 pktps
        for xid, command in ((2, 1), (3, 0), (4, 0)):                                    # MODIFY missing, ADD, ADD
            sock.sendall(struct.pack("!BBHIHHI", 4, 29, 32, xid, command, 2, 5) + band)
        sock.sendall(struct.pack("!BBHI", 4, 20, 8, 9))                                  # barrier
        buf = b""
        while 9 not in got:
            while len(buf) < 8 or len(buf) < struct.unpack_from("!H", buf, 2)[0]:
                buf += sock.recv(4096)
            _v, kind, length, xid = struct.unpack_from("!BBHI", buf)
            got[xid] = (kind,) + (struct.unpack_from("!HH", buf, 8) if kind == 1 else ())
            buf = buf[length:]
    finally:
        sock.close()
    assert got[2] == (1, 12, 3) and got[4] == (1, 12, 1) and 3 not in got and got[9] == (21,)
    assert glue.ERROR_NAMES[got[2][1:]] == "OFPMMFC_UNKNOWN_METER"
    core = Core(va.config)
    req = core.connect(1, 0.0)[0]
    from static_controller.messages import MeterConfig
    core.handle(MeterConfig(req.xid, ((1, "pktps", (1,)),)), 0.0)                        # "meter 1 exists": MODIFY
    err = Error(99, 12, 3, meter_id=1, request="meter_mod", name=glue.ERROR_NAMES[(12, 3)])
    assert [m.command for m in core.handle(err, 0.0) if isinstance(m, Meter)] == ["add"]


class Tap:
    """A Listener read by a thread of its own, so a long run does not overflow its socket buffer."""

    def __init__(self, ns: str, ifname: str):
        import threading
        self.lis = Listener(ns, ifname)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.lis.drain(quiet=0.3, limit=0.5)

    def close(self) -> list[bytes]:
        self.stop.set()
        self.thread.join(5)
        frames = self.lis.drain()
        self.lis.close()
        return frames


def test_50_abrupt_reconnects_with_traffic_flowing_leave_the_table_threads_and_sockets_as_they_were():
    """Half the connections are cut within ~100 ms of the switch's features reply, half after a whole push.

    Each cut is a RST (``ss -K``) followed by a new controller target string for the same relay, so OVS
    opens a fresh connection at once: after a short-lived connection its rconn otherwise backs off 2, 4,
    then 8 s whatever max_backoff says."""
    import signal
    import subprocess

    from tests.ctlutil import established, kill_connections, settled_usage
    with appliance() as va, ControllerProcess(va) as ctl:
        port = va.config.switch.controller.listen_port
        ctl.wait_pushed()
        time.sleep(1.0)                                   # the first read-back (stale-flow removal) passes
        before = table_snapshot(va)
        usage = settled_usage(ctl.proc.pid)
        mirror = Tap(va.hosts["mirror"].netns, "mirror0")
        pinger = va.popen("inside", ["ping", "-n", "-q", "-i", "0.1", UP], stdout=subprocess.PIPE, text=True)
        try:
            targets = ['"tcp:127.0.0.1"', '"tcp:127.0.0.1:6653"']     # one endpoint, two spellings
            def pushed_since_connect(n: int) -> bool:
                """The n-th connection's push is in the log (after its "connected from" line)."""
                return "full set pushed" in ctl.log.split("connected from", n)[-1]

            for i in range(50):
                ctl.wait_log("connected from", count=i + 1, timeout=15)
                if i % 2:
                    assert wait_for(lambda: pushed_since_connect(i + 1), 10), f"no push after connect {i + 1}"
                    time.sleep(0.5)
                assert kill_connections(port) == 1
                va.vsctl("set", "controller", va.bridge, f"target={targets[i % 2]}")
            ctl.wait_log("connected from", count=51, timeout=15)
            assert wait_for(lambda: established(port) == 1 and ctl.pushes() >= 26, 10)
            time.sleep(1.5)
        finally:
            pinger.send_signal(signal.SIGINT)
            summary = pinger.communicate(timeout=10)[0]
            seen = icmp_echo(mirror.close(), 8)
        sent, got = (int(n) for n in re.search(r"(\d+) packets transmitted, (\d+) received", summary).groups())
        assert sent > 100 and got == sent, f"forwarding stopped while the controller reconnected: {summary}"
        assert len(seen) == sent, "the mirror missed frames while the controller reconnected"
        assert table_snapshot(va) == before
        assert settled_usage(ctl.proc.pid, want=usage) == usage, "threads or sockets grew with the reconnects"
        log = ctl.log
        assert log.count("connected from") == 51 and log.count(") after ") == 50
        assert "it keeps its flows (secure fail mode)" in log and "connection reset by peer" in log
        text = metrics(va)
        assert metric(text, "pisnoop_controller_connects_total") == 51
        assert sum(float(v) for v in re.findall(r'pisnoop_controller_disconnects_total\{reason="[^"]*"\} (\S+)',
                                                text)) == 50
