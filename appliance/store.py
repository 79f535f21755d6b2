"""MongoDB access: the client, the collections, the ``frames`` document.

pisnoop speaks plain pymongo and uses only what MongoDB 4.4 has (no change
streams, no time-series collections), so the same code runs against a Pi's
local mongod, a remote replica set, or the embedded ``nx-27017`` wire-protocol
server (started by the lab, ``lab/procs.py``, or by the ``pisnoop-store`` unit).

Collections (one database, ``mongodb.database``):

* ``frames``  one document per capture batch (``batch_document``)
* ``flows``   flow records written by the analyser
* ``flags``   abusive clients, written by the analyser, read by the controller
* ``status``  one document per running component (counters, health)
* ``state``   small resume points (e.g. the analyser's position)
"""

from __future__ import annotations

from typing import Iterable

import pymongo
from bson import Binary
from pymongo.database import Database

from . import framebatch, timespec
from .config import MongoDB
from .errors import Failure

FRAMES, FLOWS, FLAGS, STATUS, STATE = "frames", "flows", "flags", "status", "state"
NEVER_BAN = "never_ban"     # the operator's never-ban entries (`pisnoop flags allow`): appliance.neverban


class StoreUnavailable(Failure):
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
        raise StoreUnavailable(f"MongoDB at {_redact(db.client)} did not answer: "
                               f"{exc.__class__.__name__}: {str(exc)[:200]}") from None


def _redact(cl: pymongo.MongoClient) -> str:
    try:
        return ",".join(f"{h}:{p}" for h, p in cl.topology_description.server_descriptions())
    except Exception:  # the description is only for a message
        return "the configured URI"


def batch_id(sensor: str, run: str, seq: int) -> str:
    """Deterministic id: a batch retried or replayed from the spool is never stored twice."""
    return f"{sensor}:{run}:{seq:012d}"


def batch_document(sensor: str, run: str, seq: int, frames) -> dict:
    """The ``frames`` document for one batch (frames are ``(ts_ns, wire_len, data)``, or a ``framebatch.Packed``).

    ``ins`` (when the batch reached the store) is set by the writer at write
    time, so that a reader following new batches also sees batches replayed
    late from the spool.
    """
    if not len(frames):
        raise ValueError("a batch holds at least one frame")
    n, wire_bytes, first, last = framebatch.summary(frames)
    return {
        "_id": batch_id(sensor, run, seq),
        "sensor": sensor,
        "run": run,
        "seq": seq,
        "n": n,
        "wire_bytes": wire_bytes,
        "first_ns": first,
        "last_ns": last,
        "t0": timespec.utc(first),
        "t1": timespec.utc(last),
        "data": Binary(framebatch.pack(frames)),
    }


def batch_frames(doc: dict) -> Iterable[framebatch.Frame]:
    return framebatch.unpack(bytes(doc["data"]))
