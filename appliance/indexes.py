"""Every index of every pisnoop collection, declared once, and ``ensure_indexes`` that makes a store match.

Each service calls ``ensure_indexes(db, cfg)`` once when it first reaches the
store; nothing else creates or drops an index. After it a collection has the
indexes declared in ``INDEXES``: an index that is right is left alone, a
missing one is created, one that stands in the way of a declared one (the
same key pattern or the same name, other options) is dropped and made again,
and one that earlier versions made and none needs now (``LEGACY``: the
``t0``/``t1`` indexes of ``frames``) is dropped. Any other index is not
pisnoop's (an operator's, say) and is left alone. ``status`` and ``state`` are
only read by ``_id``; ``status`` has its retention index.

Names follow ``idx_<collection>_<fields>``: nx-27017 ignores the name it is
given and uses exactly that, so with it both servers show the same names, and
a name tells which index it is. ``conflicts`` checks the declaration for what
real MongoDB refuses and nx-27017 lets through (the same key pattern twice, a
name with other keys).

Retention by age is a TTL (``expireAfterSeconds``) from ``mongodb.retention``:
frames from when they reached the store, flows from when last seen, a flag
from its end (``expires_at``: an active ban is never removed under the
controller, and a flag is kept ``flags_days`` after it ends, for
escalation and the report), a status document from its last update (a
component gone for good). Retention by size is appliance/retention.py. On
MongoDB 4.4 ``collMod`` can change the seconds of a TTL index, but it can
neither make an index TTL (5.1 can) nor take the TTL away. So the retention
indexes are TTL indexes always, and a retention of 0 (keep) is
``KEEP_SECONDS`` (2^31-1 s, 68 years, the largest value MongoDB accepts):
every change of retention, keep included, is a ``collMod``, and frames or
flows are never dropped to change it. Earlier versions made the same keys
under MongoDB's default names (``ins_1``, with or without a TTL): such an
index, or any with the right keys but other options, is dropped and made
again (MongoDB allows one index per key pattern), which loses no document.
Several services may ensure at once; the last config read wins the TTL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

from pymongo.errors import OperationFailure

from .store import FLAGS, FLOWS, FRAMES, STATE, STATUS

COLLECTIONS = (FRAMES, FLOWS, FLAGS, STATUS, STATE)
KEEP_SECONDS = 2**31 - 1
_INDEX_NOT_FOUND = 27
_NOT_OPTIONS = {"v", "key", "name", "ns", "background"}   # listIndexes fields that say nothing about behaviour

log = logging.getLogger("pisnoop.store")


@dataclass(frozen=True)
class Index:
    collection: str
    name: str
    keys: tuple[tuple[str, int], ...]
    why: str
    retention: Optional[str] = None   # the mongodb.retention field (_hours or _days) that makes it a TTL index

    def options(self, retention) -> dict:
        if self.retention is None:
            return {}
        value = getattr(retention, self.retention)
        return {"expireAfterSeconds": ttl_seconds(value * 24 if self.retention.endswith("_days") else value)}


INDEXES: tuple[Index, ...] = (
    Index(FRAMES, "idx_frames_ins", (("ins", 1),),
          "retention, counted from when a batch reached the store (an imported old pcap still gets all of it)",
          "frames_hours"),
    Index(FRAMES, "idx_frames_sensor_ins", (("sensor", 1), ("ins", 1)),
          "the analyser follows one sensor's new batches by ins, oldest first and newest first"),
    Index(FRAMES, "idx_frames_sensor_t1", (("sensor", 1), ("t1", 1)),
          "one sensor's capture-time range (report, analyser --once --since): t1 >= since bounds the scan "
          "and the index gives the order (no sort in memory)"),
    Index(FRAMES, "idx_frames_first_ns", (("first_ns", 1),),
          "export-pcap (any sensor) reads in first_ns order: the index gives the order, no sort in memory"),
    Index(FLOWS, "idx_flows_sensor_key", (("sensor", 1), ("key", 1)),
          "the analyser loads its sensor's stored flows of 5-tuples it has not in memory (two sites see the same "
          "private addresses)"),
    Index(FLOWS, "idx_flows_last_seen", (("last_seen", 1),),
          "retention, and the report's flows seen since a time", "flows_hours"),
    Index(FLAGS, "idx_flags_status_expires_at", (("status", 1), ("expires_at", 1)),
          "the active and the due flags (analyser expiry, controller snapshot)"),
    Index(FLAGS, "idx_flags_updated_at", (("updated_at", 1),),
          "the newest change of any flag (the controller's poll starts there after a snapshot)"),
    # A controller reads flagdoc.applies_to(sensor): {$or: [{sensor}, {scope: fleet}]}; MongoDB plans each clause
    # of an $or on its own index, with the query's other fields (status, expires_at or updated_at) pushed into it.
    Index(FLAGS, "idx_flags_sensor_updated_at", (("sensor", 1), ("updated_at", 1)),
          "a controller polls its own sensor's flags changed since its last poll"),
    Index(FLAGS, "idx_flags_scope_updated_at", (("scope", 1), ("updated_at", 1)),
          "... and the fleet's (every controller)"),
    Index(FLAGS, "idx_flags_sensor_status_expires_at", (("sensor", 1), ("status", 1), ("expires_at", 1)),
          "a controller's snapshot and an analyser's covering flags: its sensor's active ones"),
    Index(FLAGS, "idx_flags_scope_status_expires_at", (("scope", 1), ("status", 1), ("expires_at", 1)),
          "... and the fleet's active ones"),
    Index(FLAGS, "idx_flags_client_ip_flagged_at", (("client_ip", 1), ("flagged_at", 1)),
          "a client's earlier offences (escalation) and its flags (release)"),
    Index(FLAGS, "idx_flags_client_mac_flagged_at", (("client_mac", 1), ("flagged_at", 1)),
          "a host's (MAC subject's) earlier offences (escalation)"),
    Index(FLAGS, "idx_flags_flagged_at", (("flagged_at", 1),),
          "flags since a time in flag order (report, flags list --all)"),
    Index(FLAGS, "idx_flags_expires_at", (("expires_at", 1),),
          "retention, counted from a flag's end: an active ban is never removed", "flags_days"),
    Index(STATUS, "idx_status_updated_at", (("updated_at", 1),),
          "retention: the status of a component gone for good", "status_hours"),
)


# key patterns that earlier versions indexed and no query needs any more: dropped where found
LEGACY: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = (
    (FRAMES, (("t0", 1),)),
    (FRAMES, (("t1", 1),)),
    (FLOWS, (("key", 1),)),          # before flows were read per sensor
)


def ttl_seconds(hours: float) -> int:
    """``expireAfterSeconds`` for a retention in hours; 0 (keep) is KEEP_SECONDS."""
    return max(1, round(hours * 3600)) if hours > 0 else KEEP_SECONDS


def conflicts(specs: Iterable[Index]) -> list[str]:
    """One line per problem real MongoDB (or nx-27017's naming) would have with ``specs``; [] when none."""
    out = []
    by_keys: dict[tuple, Index] = {}
    by_name: dict[tuple, Index] = {}
    for s in specs:
        where = f"{s.collection}.{s.name}"
        other = by_keys.get((s.collection, s.keys))
        if other is not None:
            out.append(f"{where}: the key pattern of {other.name} again (MongoDB allows one index per key pattern)")
        other = by_name.get((s.collection, s.name))
        if other is not None and other.keys != s.keys:
            out.append(f"{where}: the name is declared with other keys too (IndexKeySpecsConflict on MongoDB)")
        by_keys.setdefault((s.collection, s.keys), s)
        by_name.setdefault((s.collection, s.name), s)
        expected = "_".join(["idx", s.collection, *(k for k, _ in s.keys)])
        if s.name != expected:
            out.append(f"{where}: nx-27017 would name it {expected}")
        if any(d != 1 for _, d in s.keys):
            out.append(f"{where}: descending keys (nx-27017 makes every key ascending)")
        if s.retention and len(s.keys) != 1:
            out.append(f"{where}: a TTL needs a single-field index (MongoDB ignores it on a compound one)")
    return out


@dataclass(frozen=True)
class Change:
    """One step toward the declared indexes: ``drop`` an index, set its ``ttl``, or ``create`` it."""
    action: str
    collection: str
    name: str
    keys: tuple[tuple[str, int], ...] = ()
    options: Optional[dict] = None

    def __str__(self) -> str:
        extra = f" {self.options}" if self.options else ""
        return f"{self.action} {self.collection}.{self.name}{extra}"


def plan(collection: str, existing: Iterable[dict], retention) -> list[Change]:
    """The changes that turn ``existing`` (``listIndexes`` documents) into the declared indexes.

    Drops come first: MongoDB refuses a second index on a key pattern, so an
    old one must be gone before its replacement is made.
    """
    want = {s.name: s for s in INDEXES if s.collection == collection}
    ours = {s.keys for s in want.values()} | {keys for c, keys in LEGACY if c == collection}
    drops, ttls, kept = [], [], set()
    for ix in existing:
        name = ix["name"]
        if name == "_id_" or (name not in want and _keys(ix) not in ours):
            continue                                    # not pisnoop's: left alone
        spec = want.get(name)
        if spec is not None and _keys(ix) == spec.keys:
            have, opts = _options(ix), spec.options(retention)
            if have == opts:
                kept.add(name)
                continue
            if set(have) == set(opts) == {"expireAfterSeconds"}:
                ttls.append(Change("ttl", collection, name, spec.keys, opts))
                kept.add(name)
                continue
        drops.append(Change("drop", collection, name))
    creates = [Change("create", collection, s.name, s.keys, s.options(retention)) for s in want.values()
               if s.name not in kept]
    return drops + ttls + creates


def ensure_indexes(db, cfg) -> list[Change]:
    """Bring every collection to its declared indexes; return what was changed (nothing when all is right).

    A store error is raised as the ``PyMongoError`` it is: the caller's usual store-error path.
    """
    done = []
    for collection in COLLECTIONS:
        for change in plan(collection, db[collection].list_indexes(), cfg.mongodb.retention):
            _apply(db, change)
            log.info("index %s", change)
            done.append(change)
    return done


def ensure_or_go_on(db, cfg, log: logging.Logger) -> bool:
    """``ensure_indexes`` for a service whose job does not need the indexes (capture, enforcement).

    When the store refuses (a user without the createIndex right, an index
    build that fails) the service logs it and goes on storing or enforcing;
    the refusal is not retried. A store that cannot be reached is raised as
    usual: the caller's store-error path retries. Returns whether the indexes
    were ensured.
    """
    try:
        ensure_indexes(db, cfg)
    except OperationFailure as exc:
        log.error("the store refused to set up the indexes (%s: code %s, %s); going on without them",
                  exc.__class__.__name__, exc.code, str(exc)[:160])
        return False
    return True


def _apply(db, c: Change) -> None:
    coll = db[c.collection]
    if c.action == "drop":
        try:
            coll.drop_index(c.name)
        except OperationFailure as exc:
            if exc.code != _INDEX_NOT_FOUND:  # else another service ensuring at the same time dropped it first
                raise
        return
    if c.action == "ttl":
        db.command("collMod", c.collection, index={"keyPattern": dict(c.keys), **c.options})
    # After a collMod this is a no-op on MongoDB (the index matches now); nx-27017, whose collMod
    # changes nothing, takes the new TTL from it.
    coll.create_index(list(c.keys), name=c.name, **c.options)


def _keys(ix: dict) -> tuple:
    return tuple((k, int(v) if isinstance(v, (int, float)) else v) for k, v in ix["key"].items())


def _options(ix: dict) -> dict:
    opts = {k: v for k, v in ix.items() if k not in _NOT_OPTIONS}
    if "expireAfterSeconds" in opts:
        opts["expireAfterSeconds"] = int(opts["expireAfterSeconds"])
    return opts
