"""The snooper on the real virtual appliance: real OVS mirror, real ring, real store.

One appliance serves the whole module (each test uses its own sensor name,
so their frames never mix); mirror flows are installed with ovs-ofctl
exactly as the controller installs them (1<->3 forwarded, copied to 2).
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from appliance import indexes, netns, store

from .conftest import pisnoop
from .snooperutil import (
    BridgeLoss,
    Paced,
    SnooperProcess,
    mac_of,
    marked_frame,
    mirrored_appliance,
    multiset,
    raw_socket,
    spool_files,
    stored_frames,
    udp_frame,
    wait_stored,
    with_tag,
    write_config,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, OVS)")


@pytest.fixture(scope="module")
def app():
    with mirrored_appliance() as appliance:
        yield appliance


@pytest.fixture
def snooper(app, tmp_path):
    """Start ``pisnoop snooper`` with per-test settings: ``proc = snooper(dedupe_window=1.0)``."""
    started = []

    def start(env=None, **overrides) -> SnooperProcess:
        sensor = "t" + secrets.token_hex(4)
        overrides.setdefault("spool_dir", str(tmp_path / "spool"))
        overrides.setdefault("status_interval", 0.5)
        cfg = write_config(app, tmp_path / "snooper.yaml", sensor=sensor, **overrides)
        proc = SnooperProcess(tmp_path / "snooper.yaml", cfg, app.db, tmp_path / "snooper.log", env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _endpoints(app):
    inside, upstream = app.hosts["inside"], app.hosts["upstream"]
    mac_in, mac_up = mac_of(inside.netns, inside.ifname), mac_of(upstream.netns, upstream.ifname)
    return (raw_socket(inside.netns, inside.ifname), mac_in), (raw_socket(upstream.netns, upstream.ifname), mac_up)


def assert_once(got, sent, bridge_lost: int) -> None:
    """Each sent frame stored exactly once, except frames the bridge lost before mirroring (counted by OVS)."""
    stored, wanted = multiset(got), multiset(sent)
    assert max(stored.values(), default=1) == 1, "a frame was stored twice"
    assert not stored - wanted, "stored frames that were never sent"
    assert len(got) == len(sent) - bridge_lost, f"stored {len(got)} of {len(sent)}; the bridge lost {bridge_lost}"


def test_every_frame_both_ways_stored_exactly_once(app, snooper, tmp_path):
    proc = snooper()
    sensor = proc.cfg.snooper.sensor
    tag = secrets.token_bytes(6)
    (s_in, mac_in), (s_up, mac_up) = _endpoints(app)
    bridge = BridgeLoss(app)
    sent = []
    pace = Paced(1000)
    for rnd in range(3):
        out = [marked_frame(mac_up, mac_in, tag, rnd * 10_000 + i, pad=i % 200) for i in range(1000)]
        back = [marked_frame(mac_in, mac_up, tag, 500_000 + rnd * 10_000 + i, pad=(i * 7) % 300) for i in range(1000)]
        pace.send(s_in, out)
        pace.send(s_up, back)
        sent += out + back
    udp_5222 = [udp_frame(mac_up, mac_in, "10.0.0.10", "10.0.0.1", 40000 + i, 5222, tag) for i in range(20)]
    udp_other = [udp_frame(mac_up, mac_in, "10.0.0.10", "10.0.0.1", 40000 + i, 6000, tag) for i in range(20)]
    pace.send(s_in, udp_5222 + udp_other)
    s_in.close(), s_up.close()
    got = wait_stored(app.db, sensor, tag, len(sent))
    time.sleep(1)
    lost = bridge.lost()
    got = with_tag(stored_frames(app.db, sensor), tag)
    assert_once(got, sent, lost)
    stamps = [f.ts_ns for f in stored_frames(app.db, sensor)]
    assert stamps == sorted(stamps), "capture timestamps go backwards in store order"
    assert all(f.wire_len == len(f.data) for f in got)
    m = proc.cfg.metrics
    text = urllib.request.urlopen(f"http://{m.listen_host}:{m.snooper_port}/metrics", timeout=10).read().decode()
    captured = [ln for ln in text.splitlines() if ln.startswith(f'pisnoop_snooper_captured_total{{sensor="{sensor}"}}')]
    assert captured and float(captured[0].split()[-1]) >= len(sent) - bridge.lost()
    assert f'pisnoop_snooper_spool_frames{{sensor="{sensor}"}} 0.0' in text
    assert proc.stop() == 0
    final = proc.status()
    c = final["counters"]
    assert c["captured"] == bridge.mirrored(), "the snooper missed frames the mirror port sent"
    assert c["stored"] >= len(sent) - lost and c["kernel_dropped"] == 0 and c["dropped_parse"] == 0
    assert final["unaccounted"] == 0 and final["spool_frames"] == 0
    assert c["stored"] == sum(d["n"] for d in app.db[store.FRAMES].find({"sensor": sensor}, {"n": 1}))
    # every frames document has what readers rely on
    doc = app.db[store.FRAMES].find_one({"sensor": sensor})
    assert {"_id", "run", "seq", "n", "first_ns", "last_ns", "t0", "t1", "ins", "data"} <= set(doc)
    keys = {tuple(ix["key"]) for ix in app.db[store.FRAMES].list_indexes()}
    declared = {tuple(k for k, _ in s.keys) for s in indexes.INDEXES if s.collection == store.FRAMES}
    assert keys == {("_id",)} | declared

    # export-pcap: tcpdump reads the same number of frames; import-pcap round-trips byte for byte
    pcap = tmp_path / "out.pcap"
    first, last = min(f.ts_ns for f in got), max(f.ts_ns for f in got)
    # to the microsecond, like pcap: imported frames carry pcap's us timestamps
    since, until = f"{first // 10**9}.{first % 10**9 // 1000:06d}", f"{last // 10**9 + 1}.{last % 10**9:09d}"
    env = {"PISNOOP_CONFIG": str(app.config_path)}
    res = pisnoop("export-pcap", "--since", since, "--until", until,
                  "--sensor", sensor, "-o", str(pcap), env=env)
    assert res.returncode == 0, res.stderr
    in_store = len([f for f in stored_frames(app.db, sensor) if first <= f.ts_ns <= last + 10**9])
    assert res.stderr.startswith(f"{in_store} frames")
    td = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True)
    assert td.returncode == 0, td.stderr
    assert len([ln for ln in td.stdout.splitlines() if ln[:1].isdigit()]) == in_store  # (hex dumps start with a tab)
    sensor2 = sensor + "i"
    res = pisnoop("import-pcap", str(pcap), "--sensor", sensor2, env=env)
    assert res.returncode == 0 and f"stored {in_store}," in res.stdout, res.stdout + res.stderr
    again = tmp_path / "again.pcap"
    res = pisnoop("export-pcap", "--since", since, "--until", until,
                  "--sensor", sensor2, "-o", str(again), env=env)
    assert res.returncode == 0, res.stderr
    assert again.read_bytes() == pcap.read_bytes()
    # --host / --port: exactly the UDP frames to or from 10.0.0.10 port 5222
    res = pisnoop("export-pcap", "--since", since, "--sensor", sensor, "--host", "10.0.0.10",
                  "--port", "5222", "-o", str(tmp_path / "xmpp.pcap"), env=env)
    assert res.returncode == 0 and res.stderr.startswith(f"{len(udp_5222)} frames"), res.stderr


def test_duplicates_within_window_dropped_after_window_kept(app, snooper):
    proc = snooper(dedupe_window=1.0)
    sensor = proc.cfg.snooper.sensor
    tag = secrets.token_bytes(6)
    (s_in, mac_in), (s_up, mac_up) = _endpoints(app)
    frames = [marked_frame(mac_up, mac_in, tag, i, pad=40) for i in range(50)]
    bridge = BridgeLoss(app)
    for f in frames:          # each frame three times within a few ms: stored once
        s_in.send(f)
        s_in.send(f)
        s_in.send(f)
    got = wait_stored(app.db, sensor, tag, len(frames))
    time.sleep(1.5)           # no late extra copies
    got = with_tag(stored_frames(app.db, sensor), tag)
    assert multiset(got) == multiset(frames)
    lost = bridge.lost()  # a copy the bridge dropped is one duplicate fewer
    proc.wait_status(lambda d: d["counters"]["duplicates"] >= 100 - lost, 10)
    time.sleep(1)
    assert proc.status()["counters"]["duplicates"] == 100 - lost  # (noise on this wire is unique frames)
    time.sleep(2.5)           # past the window: the same frames are stored again
    bridge = BridgeLoss(app)
    for f in frames:
        s_in.send(f)
        time.sleep(0.001)
    s_in.close(), s_up.close()
    got = wait_stored(app.db, sensor, tag, 2 * len(frames))
    time.sleep(1)
    got = with_tag(stored_frames(app.db, sensor), tag)
    lost_again = bridge.lost()
    assert len(got) == 2 * len(frames) - lost_again and not multiset(got) - multiset(frames + frames)
    assert proc.stop() == 0
    assert proc.status()["counters"]["duplicates"] == 100 - lost


class Traffic:
    """Marked frames from the inside host at a modest rate, remembered for the comparison."""

    def __init__(self, app):
        (self.sock, self.mac), _ = _endpoints(app)
        self.tag = secrets.token_bytes(6)
        self.sent: list[bytes] = []

    def send_for(self, seconds: float, rate: int = 400) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            n = len(self.sent)
            batch = [marked_frame(self.mac, self.mac, self.tag, n + i, pad=64) for i in range(rate // 10)]
            Paced(rate).send(self.sock, batch)
            self.sent.extend(batch)


def test_store_outage_loses_and_duplicates_nothing(app, snooper):
    proc = snooper()
    sensor = proc.cfg.snooper.sensor
    traffic = Traffic(app)
    send_for, sent, tag = traffic.send_for, traffic.sent, traffic.tag
    bridge = BridgeLoss(app)

    send_for(2)
    app.store.stop()
    t_down = time.monotonic()
    send_for(30)
    assert spool_files(proc.cfg), "nothing was spooled while the store was down"
    app.store.start()                         # same port, same data directory (teardown finds it by run dir)
    send_for(3)
    traffic.sock.close()
    assert time.monotonic() - t_down >= 30
    wait_stored(app.db, sensor, tag, len(sent) - bridge.lost(), timeout=120)
    time.sleep(1)
    assert_once(with_tag(stored_frames(app.db, sensor), tag), sent, bridge.lost())
    assert proc.stop() == 0
    assert spool_files(proc.cfg) == []
    final = proc.status()
    c = final["counters"]
    assert c["spooled"] > 0 and c["replayed"] == c["spooled"] and c["dropped_spool_full"] == 0
    assert final["unaccounted"] == 0 and final["spool_frames"] == 0


def test_hung_store_waited_out_then_caught_up(app, snooper):
    """A store that hangs (SIGSTOP) past the client's socket timeout: batches spool, nothing lost or doubled.

    The insert in flight when it hangs is executed after SIGCONT although the client gave up on it;
    its retry from the spool then meets its own _id (DuplicateKeyError) and counts as stored once.
    """
    proc = snooper()
    sensor = proc.cfg.snooper.sensor
    traffic = Traffic(app)
    bridge = BridgeLoss(app)
    traffic.send_for(2)
    os.kill(app.store.pid, signal.SIGSTOP)
    try:
        traffic.send_for(14)              # longer than the 10 s socket timeout
    finally:
        os.kill(app.store.pid, signal.SIGCONT)
    traffic.send_for(2)
    traffic.sock.close()
    wait_stored(app.db, sensor, traffic.tag, len(traffic.sent) - bridge.lost(), timeout=120)
    time.sleep(1)
    assert_once(with_tag(stored_frames(app.db, sensor), traffic.tag), traffic.sent, bridge.lost())
    assert proc.stop() == 0
    final = proc.status()
    c = final["counters"]
    assert c["store_errors"] >= 1 and c["spooled"] > 0 and c["replayed"] == c["spooled"]
    assert final["unaccounted"] == 0 and final["spool_frames"] == 0 and spool_files(proc.cfg) == []


def test_hundred_thousand_malformed_frames_all_stored_raw(app, snooper):
    """Random, truncated and oversized (jumbo) frames, injected on the mirror wire itself.

    "Truncated" frames are cut inside their IPv4/TCP headers (the kernel refuses to send anything
    shorter than an Ethernet header, so nothing shorter can reach a mirror port).
    """
    peer = f"{app.prefix}-p{app.hosts['mirror'].ofport}"   # the switch's end of the mirror veth
    mirror = app.hosts["mirror"]
    netns.run(["ip", "link", "set", peer, "mtu", "9000"], ns=app.sw_ns)
    netns.run(["ip", "link", "set", mirror.ifname, "mtu", "9000"], ns=mirror.netns)
    try:
        proc = snooper(dedupe_window=0)
        rnd = random.Random(4)
        frames = []
        for i in range(100_000):
            kind = i % 10
            if kind == 0:                                 # Ethernet/IPv4/TCP cut inside the headers
                head = rnd.randbytes(12) + b"\x08\x00\x45\x00\x05\xdc" + rnd.randbytes(3) + b"\x06" + rnd.randbytes(34)
                frames.append(head[:rnd.randint(14, 53)])
                continue
            n = rnd.randint(1515, 9014) if kind == 1 else rnd.randint(14, 1514)   # jumbo, or any size
            frames.append(rnd.randbytes(n))
        sock = raw_socket(app.sw_ns, peer)
        for i in range(0, len(frames), 500):
            for f in frames[i:i + 500]:
                sock.send(f)
            time.sleep(0.005)
        sock.close()
        expected = multiset(frames)
        doc = proc.wait_status(lambda d: d["counters"]["stored"] >= len(frames), 120)
        assert proc.stop() == 0
        got = multiset(stored_frames(app.db, proc.cfg.snooper.sensor))
        assert expected - got == multiset([]), f"{sum((expected - got).values())} frames missing"
        assert sum((got - expected).values()) < 50  # at most a little noise from the hosts
        final = proc.status()
        assert final["counters"]["dropped_parse"] == 0 and final["counters"]["kernel_dropped"] == 0
        assert final["unaccounted"] == 0
        assert doc["counters"]["captured"] >= len(frames)
    finally:
        netns.run(["ip", "link", "set", mirror.ifname, "mtu", "1500"], ns=mirror.netns, check=False)
        netns.run(["ip", "link", "set", peer, "mtu", "1500"], ns=app.sw_ns, check=False)


def test_routable_mirror_interface_refused_with_exit_2(app, tmp_path):
    mirror = app.hosts["mirror"]
    write_config(app, tmp_path / "c.yaml", spool_dir=str(tmp_path / "spool"))
    app.exec("mirror", ["ip", "addr", "add", "10.0.0.5/24", "dev", mirror.ifname])
    try:
        res = pisnoop("--config", str(tmp_path / "c.yaml"), "snooper", timeout=60)
    finally:
        app.exec("mirror", ["ip", "addr", "del", "10.0.0.5/24", "dev", mirror.ifname])
    assert res.returncode == 2, res.stderr
    assert "10.0.0.5/24" in res.stderr and "link-local" in res.stderr
    assert "Traceback" not in res.stderr
    write_config(app, tmp_path / "d.yaml", interface="nosuch0", spool_dir=str(tmp_path / "spool"))
    res = pisnoop("--config", str(tmp_path / "d.yaml"), "snooper", timeout=60)
    assert res.returncode == 2 and "nosuch0 in network namespace" in res.stderr and "does not exist" in res.stderr
    write_config(app, tmp_path / "e.yaml", bpf_filter="tcp port banana", spool_dir=str(tmp_path / "spool"))
    res = pisnoop("--config", str(tmp_path / "e.yaml"), "snooper", timeout=60)
    assert res.returncode == 2 and "bpf_filter 'tcp port banana' does not compile" in res.stderr, res.stderr


def test_systemd_ready_watchdog_stopping(app, snooper, tmp_path):
    """The service speaks sd_notify: READY=1 once capturing, WATCHDOG=1 from the loop, STOPPING=1."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    seen: list[str] = []
    done = threading.Event()

    def listen():  # read as systemd does: a datagram queue left full would block the sender
        while not done.is_set():
            try:
                seen.extend(sock.recv(4096).decode().split("\n"))
            except socket.timeout:
                pass

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    try:
        proc = snooper(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        time.sleep(1.5)
        assert proc.stop() == 0
        time.sleep(0.6)
    finally:
        done.set()
        reader.join(5)
        sock.close()
    assert "READY=1" in seen and "STOPPING=1" in seen
    assert seen.index("READY=1") < seen.index("STOPPING=1")
    assert seen.count("WATCHDOG=1") >= 3  # every 0.2 s (half of WatchdogSec) while capturing
