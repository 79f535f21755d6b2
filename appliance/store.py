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

Many appliances may share one store (README, "Many appliances, one store";
docs/FLEET.md): every document names its ``sensor``. Flags are written with
``w: majority`` (``flags``): a ban acknowledged by the primary alone can be
rolled back by a failover, and the other controllers read flags from the
primary. On a standalone server (a Pi's mongod, nx-27017) majority is the one
node. The URI's own options (``replicaSet``, ``tls``, credentials,
``retryWrites``, ``readPreference``) are pymongo's; ``redact`` is the only way
a URI is shown.
"""

from __future__ import annotations

from typing import Iterable, Optional

import pymongo
from bson import Binary
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.read_preferences import ReadPreference
from pymongo.write_concern import WriteConcern

from . import framebatch, timespec
from .config import MongoDB
from .errors import BadInput, Failure
from .redact import redact

FRAMES, FLOWS, FLAGS, STATUS, STATE = "frames", "flows", "flags", "status", "state"
NEVER_BAN = "never_ban"     # the operator's never-ban entries (`pisnoop flags allow`): appliance.neverban


class StoreUnavailable(Failure):
    """The store cannot be reached; the message says where and why."""


class BadUri(BadInput):
    """``mongodb.uri`` has an option pymongo refuses; the message shows the URI without its password."""


# mongodb.read_preference's names -> pymongo's; the controller and every writer read the primary whatever it says
READ_PREFERENCES = {"primary": ReadPreference.PRIMARY, "primaryPreferred": ReadPreference.PRIMARY_PREFERRED,
                    "secondaryPreferred": ReadPreference.SECONDARY_PREFERRED,
                    "secondary": ReadPreference.SECONDARY, "nearest": ReadPreference.NEAREST}


def client(mcfg: MongoDB, appname: str = "pisnoop") -> pymongo.MongoClient:
    """A client with the configured timeouts; it connects lazily. A URI pymongo refuses (a bad option, a
    password it cannot parse) is one line without the URI's credentials."""
    try:
        return pymongo.MongoClient(
            mcfg.uri,
            appname=appname,
            serverSelectionTimeoutMS=mcfg.timeout_ms,
            connectTimeoutMS=mcfg.timeout_ms,
            socketTimeoutMS=max(mcfg.timeout_ms * 5, 10_000),
            tz_aware=True,
        )
    except (pymongo.errors.ConfigurationError, pymongo.errors.InvalidURI, ValueError, TypeError) as exc:
        raise BadUri(f"mongodb.uri {redact(mcfg.uri)}: {redact(str(exc))[:200]}") from None


def database(mcfg: MongoDB, appname: str = "pisnoop") -> Database:
    return client(mcfg, appname)[mcfg.database]


def frames_reader(db: Database, mcfg: MongoDB) -> Database:
    """The database handle the analyser reads ``frames`` through: ``mongodb.read_preference`` (a secondary may
    serve the analyser's reads; it lags the primary by its replication delay, the analyser catches up)."""
    return db.client.get_database(db.name, read_preference=READ_PREFERENCES[mcfg.read_preference])


def flags(db: Database, timeout_ms: Optional[int] = None) -> Collection:
    """The ``flags`` collection, written with ``w: majority`` and read from the primary (every controller)."""
    wtimeout = timeout_ms or max(int((db.client.options.pool_options.socket_timeout or 10) * 500), 1000)
    return db.get_collection(FLAGS, write_concern=WriteConcern("majority", wtimeout=wtimeout),
                             read_preference=ReadPreference.PRIMARY)


def ping(db: Database) -> None:
    """Raise ``StoreUnavailable`` with a readable reason if the store does not answer."""
    try:
        db.client.admin.command("ping")
    except pymongo.errors.PyMongoError as exc:
        raise StoreUnavailable(f"MongoDB at {_hosts(db.client)} did not answer: "
                               f"{exc.__class__.__name__}: {redact(str(exc))[:200]}") from None


def _hosts(cl: pymongo.MongoClient) -> str:
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


def batch_blob(doc: dict) -> bytes:
    """The packed binary of a ``frames`` document (appliance/framebatch.py's format)."""
    return bytes(doc["data"])


def batch_frames(doc: dict) -> Iterable[framebatch.Frame]:
    return framebatch.unpack(batch_blob(doc))
