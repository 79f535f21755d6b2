"""A snooper restart loses no frame: the capture ring lives on in systemd's file descriptor store.

The test plays systemd's part of the protocol (sd_notify's FDSTORE=1 with the
socket as SCM_RIGHTS, then LISTEN_FDS/LISTEN_FDNAMES from fd 3 on the next
start; docs/ARCHITECTURE.md, "Facts: systemd"); everything else is real: the
bridge mirrors marked frames the whole time, one snooper stops, and frames
reach the mirror port while no snooper process exists at all.
"""

from __future__ import annotations

import array
import os
import re
import secrets
import socket
import threading
import time

import pytest

from appliance import netns, store

from .snooperutil import (
    BridgeLoss,
    SnooperProcess,
    mac_of,
    marked_frame,
    mirrored_appliance,
    multiset,
    raw_socket,
    stored_frames,
    wait_stored,
    with_tag,
    write_config,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, OVS)")


@pytest.fixture(scope="module")
def app():
    with mirrored_appliance() as appliance:
        yield appliance


class FdStore:
    """The service manager's side of sd_notify: messages read, FDSTORE=1 fds kept by FDNAME, FDSTOREREMOVE=1."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.fds: dict[str, int] = {}
        self.messages: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        size = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        while not self.done.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, size)
            except socket.timeout:
                continue
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append(data.decode())
            if fields.get("FDSTORE") == "1" and fds:
                self.fds[fields.get("FDNAME", "stored")] = fds[0]
                for extra in fds[1:]:
                    os.close(extra)
            elif fields.get("FDSTOREREMOVE") == "1":
                fd = self.fds.pop(fields.get("FDNAME", ""), None)
                if fd is not None:
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)

    def wait_stored(self, timeout: float = 20) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while not self.fds and time.monotonic() < deadline:
            time.sleep(0.05)
        return dict(self.fds)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()
        for fd in self.fds.values():
            os.close(fd)


def env_of(manager) -> dict:
    return {"NOTIFY_SOCKET": manager.path}


@pytest.fixture
def manager(tmp_path):
    fdstore = FdStore(str(tmp_path / "notify.sock"))
    yield fdstore
    fdstore.close()


class Sender(threading.Thread):
    """Marked frames from the inside host at a steady rate, each one's send time kept."""

    def __init__(self, app, tag: bytes, count: int, rate: float):
        super().__init__(daemon=True)
        inside, upstream = app.hosts["inside"], app.hosts["upstream"]
        self.sock = raw_socket(inside.netns, inside.ifname)
        mac_in, mac_up = mac_of(inside.netns, inside.ifname), mac_of(upstream.netns, upstream.ifname)
        self.frames = [marked_frame(mac_up, mac_in, tag, i, pad=i % 100) for i in range(count)]
        self.rate = rate
        self.sent_at: list[float] = []

    def run(self) -> None:
        start = time.monotonic()
        for i, frame in enumerate(self.frames):
            self.sock.send(frame)
            self.sent_at.append(time.monotonic())
            ahead = (i + 1) / self.rate - (time.monotonic() - start)
            if ahead > 0.002:
                time.sleep(ahead)
        self.sock.close()


def test_restart_reads_on_in_the_kept_ring_and_loses_nothing(app, manager, tmp_path):
    sensor = "r" + secrets.token_hex(4)
    cfg_path = tmp_path / "snooper.yaml"
    cfg = write_config(app, cfg_path, sensor=sensor, spool_dir=str(tmp_path / "spool"), status_interval=0.5)
    env = {"NOTIFY_SOCKET": manager.path}
    first = SnooperProcess(cfg_path, cfg, app.db, tmp_path / "first.log", env=env)
    first_run = first.status()["run"]
    kept = manager.wait_stored()
    assert len(kept) == 1 and next(iter(kept)).startswith("ring."), (manager.messages, first.output()[-2000:])
    tag = secrets.token_bytes(6)
    bridge = BridgeLoss(app)
    sender = Sender(app, tag, 6000, rate=1500)
    sender.start()
    time.sleep(1.0)
    assert first.stop() == 0
    gone = time.monotonic()                 # from here until the second run's READY no snooper process exists
    time.sleep(0.5)
    second = SnooperProcess(cfg_path, cfg, app.db, tmp_path / "second.log", env=env, listen_fds=kept)
    try:
        second.wait_status(lambda doc: doc["run"] != first_run, 30)
        back = time.monotonic()
        sender.join(30)
        got = wait_stored(app.db, sensor, tag, len(sender.frames) - bridge.lost(), timeout=30)
    finally:
        assert second.stop() == 0
    got = with_tag(stored_frames(app.db, sensor), tag)
    lost = bridge.lost()
    stored = multiset(got)
    assert max(stored.values()) == 1, "a frame was stored twice across the restart"
    assert len(got) == len(sender.frames) - lost, f"stored {len(got)} of {len(sender.frames)}; the bridge lost {lost}"
    in_gap = {sender.frames[i] for i, t in enumerate(sender.sent_at) if gone < t < back}
    assert len(in_gap) > 300, f"only {len(in_gap)} frames were sent while no snooper ran"
    assert in_gap <= set(stored), "frames sent while no snooper ran were not stored"
    assert "capture ring kept from the previous run" in second.output(), second.output()[-2000:]
    runs = {doc["run"] for doc in app.db[store.FRAMES].find({"sensor": sensor}, {"run": 1})}
    assert len(runs) == 2
    final = second.status()
    assert final["counters"]["kernel_dropped"] == 0 and final["unaccounted"] == 0


def test_a_kept_ring_of_another_shape_is_closed_and_its_frames_counted(app, manager, tmp_path):
    sensor = "s" + secrets.token_hex(4)
    cfg_path = tmp_path / "snooper.yaml"
    cfg = write_config(app, cfg_path, sensor=sensor, spool_dir=str(tmp_path / "spool"), status_interval=0.5,
                       ring_block_count=8, ring_block_size=1 << 16, ring_block_timeout_ms=10)
    env = {"NOTIFY_SOCKET": manager.path}
    first = SnooperProcess(cfg_path, cfg, app.db, tmp_path / "first.log", env=env)
    first_run = first.status()["run"]
    kept = manager.wait_stored()
    assert first.stop() == 0
    tag = secrets.token_bytes(6)
    bridge = BridgeLoss(app)
    sender = Sender(app, tag, 200, rate=2000)
    sender.run()                            # into the kept ring, which nobody reads now
    time.sleep(0.3)
    waiting = bridge.mirrored()
    bigger = write_config(app, cfg_path, sensor=sensor, spool_dir=str(tmp_path / "spool"), status_interval=0.5,
                          ring_block_count=16, ring_block_size=1 << 16, ring_block_timeout_ms=10)
    second = SnooperProcess(cfg_path, bigger, app.db, tmp_path / "second.log", env=env, listen_fds=kept)
    try:
        second.wait_status(lambda doc: doc["run"] != first_run, 30)   # running: SIGTERM is its stop, not its end
        deadline = time.monotonic() + 20
        while len(manager.fds) != 1 or set(manager.fds) == set(kept):
            assert time.monotonic() < deadline, (manager.fds, kept, second.output()[-2000:])
            time.sleep(0.05)
    finally:
        assert second.stop() == 0
    log = second.output()
    assert waiting > 150, f"the bridge mirrored only {waiting} of 200"
    found = re.search(r"is not this config's .*: closed, (\d+) frames waiting in it and (\d+) the kernel dropped", log)
    assert found, log[-2000:]
    assert int(found[1]) + int(found[2]) == waiting and int(found[1]) > 0, found[0]
    assert not with_tag(stored_frames(app.db, sensor), tag)   # they were in the old ring: counted, not read


def test_a_kept_socket_no_longer_bound_to_the_interface_is_not_adopted(app, manager, tmp_path):
    """The same name (interface indexes repeat in a remade namespace) but a socket bound elsewhere: a new ring."""
    sensor = "u" + secrets.token_hex(4)
    cfg_path = tmp_path / "snooper.yaml"
    cfg = write_config(app, cfg_path, sensor=sensor, spool_dir=str(tmp_path / "spool"), status_interval=0.5)
    first = SnooperProcess(cfg_path, cfg, app.db, tmp_path / "first.log", env=env_of(manager))
    first_run = first.status()["run"]
    (name, fd), = manager.wait_stored().items()
    assert first.stop() == 0
    mirror = app.config.snooper
    with netns.enter(mirror.netns):
        elsewhere = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        elsewhere.bind(("lo", 0))
    os.close(fd)
    manager.fds[name] = elsewhere.detach()
    second = SnooperProcess(cfg_path, cfg, app.db, tmp_path / "second.log", env=env_of(manager),
                            listen_fds=dict(manager.fds))
    try:
        second.wait_status(lambda doc: doc["run"] != first_run, 30)
        tag = secrets.token_bytes(6)
        bridge = BridgeLoss(app)
        Sender(app, tag, 100, rate=500).run()
        got = wait_stored(app.db, sensor, tag, 100 - bridge.lost(), timeout=30)
    finally:
        assert second.stop() == 0
    log = second.output()
    assert f"or no longer bound to {mirror.interface}" in log and "capture ring kept" not in log, log[-2000:]
    assert len(got) == 100 - bridge.lost()


def test_a_mirror_link_that_goes_down_and_up_neither_spins_the_snooper_nor_ends_its_capture(app, tmp_path):
    """The kernel flags the socket ENETDOWN when the link goes down; unread, that error made every poll return at
    once, a core spent for as long as the process lived. Read, it clears: idle is idle again, capture goes on."""
    import psutil
    sensor = "l" + secrets.token_hex(4)
    cfg_path = tmp_path / "snooper.yaml"
    cfg = write_config(app, cfg_path, sensor=sensor, spool_dir=str(tmp_path / "spool"), status_interval=0.5)
    proc = SnooperProcess(cfg_path, cfg, app.db, tmp_path / "snooper.log")
    mirror = app.config.snooper
    try:
        for state in ("down", "up"):
            netns.run(["ip", "link", "set", mirror.interface, state], ns=mirror.netns)
            time.sleep(0.5)
        ps = psutil.Process(proc.proc.pid)
        before = sum(ps.cpu_times()[:2])
        time.sleep(3)
        busy = sum(ps.cpu_times()[:2]) - before
        assert busy < 1.0, f"the idle snooper used {busy:.2f} s of CPU in 3 s after the link came back"
        tag = secrets.token_bytes(6)
        bridge = BridgeLoss(app)
        Sender(app, tag, 100, rate=500).run()
        got = wait_stored(app.db, sensor, tag, 100 - bridge.lost(), timeout=30)
        assert len(got) == 100 - bridge.lost()
    finally:
        netns.run(["ip", "link", "set", mirror.interface, "up"], ns=mirror.netns)
        assert proc.stop() == 0
