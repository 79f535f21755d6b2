"""MongoDB access and the embedded store.

pisnoop speaks plain pymongo and uses only what MongoDB 4.4 has (no change
streams, no time-series collections), so the same code runs against a Pi's
local mongod, a remote replica set, or the embedded ``nx-27017`` wire-protocol
server that the virtual appliance and the tests start.

Collections (one database, ``mongodb.database``):

* ``frames``  one document per capture batch (``batch_document``)
* ``flows``   flow records written by the analyser
* ``flags``   abusive clients, written by the analyser, read by the controller
* ``status``  one document per running component (counters, health)
* ``state``   small resume points (e.g. the analyser's position)
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import pymongo
from bson import Binary
from pymongo.database import Database

from . import framebatch
from .config import MongoDB

FRAMES, FLOWS, FLAGS, STATUS, STATE = "frames", "flows", "flags", "status", "state"


class StoreUnavailable(RuntimeError):
    """The store cannot be reached; the message says where and why."""


def client(mcfg: MongoDB, appname: str = "pisnoop") -> pymongo.MongoClient:
    """A client with the configured timeouts; it connects lazily."""
    return pymongo.MongoClient(
        mcfg.uri,
        appname=appname,
        serverSelectionTimeoutMS=mcfg.timeout_ms,
        connectTimeoutMS=mcfg.timeout_ms,
        socketTimeoutMS=max(mcfg.timeout_ms * 5, 10_000),
        tz_aware=True,
    )


def database(mcfg: MongoDB, appname: str = "pisnoop") -> Database:
    return client(mcfg, appname)[mcfg.database]


def ping(db: Database) -> None:
    """Raise ``StoreUnavailable`` with a readable reason if the store does not answer."""
    try:
        db.client.admin.command("ping")
    except pymongo.errors.PyMongoError as exc:
        raise StoreUnavailable(f"MongoDB at {_redact(db.client)} did not answer: {exc.__class__.__name__}: {str(exc)[:200]}") from None


def _redact(cl: pymongo.MongoClient) -> str:
    try:
        return ",".join(f"{h}:{p}" for h, p in cl.topology_description.server_descriptions())
    except Exception:  # the description is only for a message
        return "the configured URI"


def utc_from_ns(ts_ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts_ns / 1e9, tz=dt.timezone.utc)


def batch_id(sensor: str, run: str, seq: int) -> str:
    """Deterministic id: a batch retried or replayed from the spool is never stored twice."""
    return f"{sensor}:{run}:{seq:012d}"


def batch_document(sensor: str, run: str, seq: int, frames: list[tuple[int, int, bytes]]) -> dict:
    """The ``frames`` document for one batch (frames are ``(ts_ns, wire_len, data)``).

    ``ins`` (when the batch reached the store) is set by the writer at write
    time, so that a reader following new batches also sees batches replayed
    late from the spool.
    """
    if not frames:
        raise ValueError("a batch holds at least one frame")
    first = min(f[0] for f in frames)
    last = max(f[0] for f in frames)
    return {
        "_id": batch_id(sensor, run, seq),
        "sensor": sensor,
        "run": run,
        "seq": seq,
        "n": len(frames),
        "wire_bytes": sum(f[1] for f in frames),
        "first_ns": first,
        "last_ns": last,
        "t0": utc_from_ns(first),
        "t1": utc_from_ns(last),
        "data": Binary(framebatch.pack(frames)),
    }


def batch_frames(doc: dict) -> Iterable[framebatch.Frame]:
    return framebatch.unpack(bytes(doc["data"]))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
                    raise StoreUnavailable(f"nx-27017 exited with code {proc.returncode}; see {self.data_dir}/nx-27017.log")
                try:
                    cl.admin.command("ping")
                    return self
                except pymongo.errors.PyMongoError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise StoreUnavailable(f"nx-27017 on {self.uri} did not answer within {timeout:.0f} s") from None
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
