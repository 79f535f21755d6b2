"""Helpers for the snooper tests: run the real ``pisnoop snooper``, send marked frames, read the store."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from appliance import config as config_mod
from appliance import netns, store

REPO = Path(__file__).resolve().parent.parent
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing on the hosts answers it


def write_config(va, path: Path, **snooper) -> config_mod.Config:
    """The appliance's config with snooper keys changed, written to ``path``."""
    data = config_mod.to_dict(va.config)
    data["snooper"].update(snooper)
    cfg = config_mod.from_dict(data, str(path))
    path.write_text(config_mod.dump(cfg))
    return cfg


class SnooperProcess:
    """``pisnoop snooper`` as a subprocess; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, cfg_path: Path, cfg: config_mod.Config, db, log_path: Path, env: dict | None = None,
                 listen_fds: dict[str, int] | None = None):
        """``listen_fds`` ({name: fd}) are handed over the way systemd passes its fd store (from fd 3 on)."""
        self.cfg = cfg
        self.db = db
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        env.pop("PISNOOP_CONFIG", None)
        argv = [sys.executable, "-m", "appliance.cli", "--config", str(cfg_path), "snooper"]
        fds = list((listen_fds or {}).values())
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(listen_fds))
            argv = [sys.executable, "-c", _LISTEN_FDS_LAUNCHER, ",".join(map(str, fds)), *argv]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=str(REPO), env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     pass_fds=fds)
        self.wait_status(lambda doc: doc.get("run") and doc["updated_at"].timestamp() > time.time() - 60, 30)

    def status(self) -> dict | None:
        return self.db[store.STATUS].find_one({"_id": f"snooper:{self.cfg.snooper.sensor}"})

    def wait_status(self, pred, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"snooper exited {self.proc.returncode}: {self.output()[-2000:]}")
            doc = self.status()
            if doc and pred(doc):
                return doc
            time.sleep(0.2)
        raise AssertionError(f"snooper status never matched; last {self.status()}; log {self.output()[-2000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


# what systemd does before exec: the passed fds moved to 3, 4, ... and LISTEN_PID set to the service's own PID
_LISTEN_FDS_LAUNCHER = """
import fcntl, os, sys
fds = [int(f) for f in sys.argv[1].split(",")]
moved = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for f in fds]  # above the targets, then onto them
for i, f in enumerate(moved):
    os.dup2(f, 3 + i)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


@contextlib.contextmanager
def mirrored_appliance():
    """A virtual appliance whose bridge forwards 1<->3 and copies both ways to mirror port 2, as the controller
    does (installed with ovs-ofctl: no controller), with ``.db`` on its embedded store."""
    from lab.virtual import VirtualAppliance
    from tests.conftest import assert_gone

    appliance = VirtualAppliance()
    with appliance:
        appliance.ofctl("add-flow", "in_port=1,actions=output:2,output:3")
        appliance.ofctl("add-flow", "in_port=3,actions=output:2,output:1")
        appliance.db = store.database(appliance.config.mongodb)
        yield appliance
        appliance.db.client.close()
    assert_gone(appliance)


def raw_socket(ns: str, ifname: str) -> socket.socket:
    with netns.enter(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((ifname, 0))
    return s


def mac_of(ns: str, ifname: str) -> bytes:
    out = netns.run(["cat", f"/sys/class/net/{ifname}/address"], ns=ns).stdout.strip()
    return bytes.fromhex(out.replace(":", ""))


def marked_frame(dst: bytes, src: bytes, tag: bytes, seq: int, pad: int = 0) -> bytes:
    return dst + src + struct.pack("!H", ETHERTYPE) + tag + struct.pack("!Q", seq) + b"\xa5" * pad


def udp_frame(dst: bytes, src: bytes, ip_src: str, ip_dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An Ethernet/IPv4/UDP frame (checksums zero: nobody on the wire verifies them here)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(ip_src),
                     socket.inet_aton(ip_dst))
    return dst + src + b"\x08\x00" + ip + udp


def stored_frames(db, sensor: str) -> list:
    """All frames stored for ``sensor`` in store order (run, seq, position)."""
    out = []
    for doc in db[store.FRAMES].find({"sensor": sensor}).sort([("run", 1), ("seq", 1)]):
        out.extend(store.batch_frames(doc))
    return out


def with_tag(frames, tag: bytes) -> list:
    return [f for f in frames if f.data[12:14] == struct.pack("!H", ETHERTYPE) and f.data[14:14 + len(tag)] == tag]


def wait_stored(db, sensor: str, tag: bytes, n: int, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while True:
        got = with_tag(stored_frames(db, sensor), tag)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def multiset(frames) -> collections.Counter:
    return collections.Counter(bytes(f.data if hasattr(f, "data") else f) for f in frames)


def spool_files(cfg) -> list[str]:
    d = Path(cfg.snooper.spool_dir)
    return sorted(p.name for p in d.glob("*.psb")) if d.exists() else []


@dataclasses.dataclass
class Paced:
    """Send frames at about ``rate`` per second (modest: the userspace bridge is slow)."""
    rate: float

    def send(self, sock: socket.socket, frames) -> None:
        start = time.monotonic()
        for i, f in enumerate(frames):
            sock.send(f)
            ahead = i / self.rate - (time.monotonic() - start)
            if ahead > 0.002:
                time.sleep(ahead)


def port_counts(va) -> dict[int, tuple[int, int]]:
    """{ofport: (rx packets, tx packets)} of the bridge."""
    out, port = {}, None
    for line in va.ofctl("dump-ports").splitlines():
        line = line.strip()
        if line.startswith("port") and "rx pkts=" in line:
            name = line.split(":")[0].split()[1]
            port = int(name) if name.isdigit() else None
            rx = int(line.split("rx pkts=")[1].split(",")[0])
            if port is not None:
                out[port] = [rx, 0]
        elif line.startswith("tx pkts=") and port is not None:
            out[port][1] = int(line.split("tx pkts=")[1].split(",")[0])
    return {p: tuple(v) for p, v in out.items()}


class BridgeLoss:
    """Frames the userspace bridge itself lost between ``start()`` and ``lost()``.

    Every frame arriving on port 1 or 3 must leave on mirror port 2; on this
    shared 2-core machine ovs-vswitchd occasionally drops a few under load.
    Tests count those against the bridge, so they still prove that the
    snooper stored every frame the mirror port transmitted.
    """

    def __init__(self, va, ports=(1, 3), mirror: int = 2):
        self.va, self.ports, self.mirror = va, ports, mirror
        self.before = port_counts(va)

    def lost(self) -> int:
        now = port_counts(self.va)
        came = sum(now[p][0] - self.before[p][0] for p in self.ports)
        went = now[self.mirror][1] - self.before[self.mirror][1]
        return came - went

    def mirrored(self) -> int:
        return port_counts(self.va)[self.mirror][1] - self.before[self.mirror][1]
