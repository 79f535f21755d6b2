"""Processes the lab starts and ends: the embedded store, free ports, stopping by PID.

Only the lab (virtual appliance, demo, tests, benchmarks) starts processes;
the product's services are started by systemd. Everything here ends a
process by the PID it started, never by name.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pymongo

from appliance.store import StoreUnavailable

FREE_PORT_FLOOR = 20000
_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    """The lowest port the kernel gives an outgoing connection (its ``ip_local_port_range``)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A TCP port nobody holds right now, below the kernel's ephemeral range.

    Not the kernel's ``bind(port 0)`` pick: that port is in the range every
    outgoing connection draws its source port from, so between this call and
    the server's listen another process's connect (pymongo, OVS, a client)
    could hold it and the server fail with EADDRINUSE (a CI run lost a test to
    that). Below the range only an explicit bind takes a port; a port this
    process handed out before is never handed out again.
    """
    rng = rng or random.SystemRandom()
    top = _ephemeral_floor()
    floor = FREE_PORT_FLOOR if top > FREE_PORT_FLOOR + 1000 else 1024
    for _ in range(200):
        port = rng.randrange(floor, top)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free TCP port on {host} in {floor}-{top - 1} after 200 tries")


def _nx_binary() -> str:
    beside = Path(sys.executable).parent / "nx-27017"
    if beside.exists():
        return str(beside)
    found = shutil.which("nx-27017")
    if not found:
        raise StoreUnavailable("the embedded store needs nx-27017 (pip install nx-27017): not found")
    return found


class EmbeddedStore:
    """An nx-27017 server on 127.0.0.1 with its data under ``data_dir``.

    Started as a process of its own session so that it can outlive the
    command that started it (``pisnoop virtual up``); stopped by PID only.
    """

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.pid: int | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "EmbeddedStore":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        log = open(self.data_dir / "nx-27017.log", "ab")
        proc = subprocess.Popen(
            [_nx_binary(), "--data-dir", str(self.data_dir), "--host", self.host, "-p", str(self.port),
             "--log-file", str(self.data_dir / "nx-27017.log"), "--pid-file", str(self.data_dir / "nx-27017.pid")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        cl = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500)
        try:
            while True:
                if proc.poll() is not None:
                    raise StoreUnavailable(f"nx-27017 exited with code {proc.returncode}; "
                                           f"see {self.data_dir}/nx-27017.log")
                try:
                    cl.admin.command("ping")
                    return self
                except pymongo.errors.PyMongoError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise StoreUnavailable(f"nx-27017 on {self.uri} did not answer "
                                               f"within {timeout:.0f} s") from None
                    time.sleep(0.1)
        finally:
            cl.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.pid is not None:
            stop_pid(self.pid, timeout)
            self.pid = None

    def __enter__(self) -> "EmbeddedStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL one process we started; reap it if it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while alive(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that is not our child still answers kill(0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
