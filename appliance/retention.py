"""Retention by size: the oldest ``frames`` batches go when the frames pass a cap or the store's disk fills.

Age is the TTL indexes' job (appliance/indexes.py); this is the size side
(``mongodb.retention.frames_max_gb`` and ``min_free_gb``). Only ``frames``
is trimmed: flows and flags are small and kept for their own (longer)
times. The decision is pure, given sizes (``bytes_to_free``, ``how_many``);
``measure`` reads the sizes from the store, ``trim`` removes the oldest
batches (by ``ins``) one by one, so that every removed batch and its frames
are counted exactly (the bytes are what the store's measure fell by);
``Trimmer`` runs a round every interval in the service that owns
``frames`` (the snooper).

Sizes follow MongoDB's semantics (docs/ARCHITECTURE.md, "Facts: store sizes"):

* the frames' size is ``collStats.size``, the uncompressed BSON size of the
  documents (what was stored, whatever the engine compresses); a server that
  leaves it out gets the sum of ``$bsonSize``, which is what it means;
* the free space is that of the store's file system (``mongodb.data_dir``
  when the store is on this machine: what an unprivileged writer may use;
  else dbStats ``fsTotalSize - fsUsedSize``, which counts the blocks
  reserved for root as free) plus the space the store holds for reuse
  (dbStats ``freeStorageSize``, MongoDB 4.4+; else dbStats ``storageSize``
  less the collections' ``storageSize``). WiredTiger and SQLite keep the
  pages of removed documents and reuse them: without that term the disk's
  free space would not rise after a trim and the floor would empty the store.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from pymongo.errors import OperationFailure, PyMongoError

from .store import FRAMES

GB = 10**9
HEADROOM = 0.05     # a trim goes this share of the cap below it, so that not every round has to trim
BUSY_SHARE = 10         # the next round waits at least this many times as long as the last one took
MAX_BATCHES = 20_000   # removed in one round at most (the next round goes on): a round stays seconds long

log = logging.getLogger("pisnoop.retention")


# --- the decision ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    frames_bytes: int
    free_bytes: Optional[int]       # free on the store's file system, reusable space included; None: not known


def bytes_to_free(sizes: Sizes, max_bytes: int, min_free: int) -> int:
    """How many bytes of frames to remove (0: none); a cap or floor of 0 is off."""
    need = 0
    if max_bytes and sizes.frames_bytes > max_bytes:
        need = sizes.frames_bytes - int(max_bytes * (1 - HEADROOM))
    if min_free and sizes.free_bytes is not None and sizes.free_bytes < min_free:
        need = max(need, min_free - sizes.free_bytes + int(min_free * HEADROOM))
    return min(need, sizes.frames_bytes)


def how_many(need: int, avg_batch: float) -> int:
    """Batches to remove for ``need`` bytes at ``avg_batch`` bytes a batch (at least one when anything is needed)."""
    if need <= 0:
        return 0
    return max(1, math.ceil(need / avg_batch)) if avg_batch > 0 else 1


def limits(retention) -> tuple[int, int]:
    """``(frames cap, free-space floor)`` in bytes from ``mongodb.retention`` (0: off)."""
    return int(retention.frames_max_gb * GB), int(retention.min_free_gb * GB)


# --- the store side ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FramesStats:
    bytes: int
    count: int
    avg: float            # bytes a batch, on average
    storage: int          # what the collection holds in the store's files


def frames_stats(db) -> FramesStats:
    """``collStats`` of ``frames``; without ``size`` (a laxer server), the sum of ``$bsonSize``, its meaning."""
    try:
        stats = db.command("collStats", FRAMES)
    except OperationFailure:
        if FRAMES in db.list_collection_names():
            raise
        return FramesStats(0, 0, 0.0, 0)           # nothing stored yet (nx-27017 refuses collStats then)
    count = int(stats.get("count", 0))
    if "size" in stats:
        size = int(stats["size"])
    else:
        rows = list(db[FRAMES].aggregate([{"$group": {"_id": None, "size": {"$sum": {"$bsonSize": "$$ROOT"}},
                                                      "count": {"$sum": 1}}}]))
        size, count = (int(rows[0]["size"]), int(rows[0]["count"])) if rows else (0, 0)
    avg = float(stats.get("avgObjSize") or (size / count if count else 0))
    return FramesStats(size, count, avg, int(stats.get("storageSize", 0)))


def frames_bytes(db) -> int:
    return frames_stats(db).bytes


def free_bytes(db, data_dir: Optional[str], frames: Optional[FramesStats] = None,
               warn: Callable[[str], None] = log.warning) -> Optional[int]:
    """Free space for the store: its file system's, plus what it holds for reuse; None when neither is known."""
    stats = db.command("dbStats", freeStorage=1)
    disk = None
    if data_dir:
        try:
            disk = shutil.disk_usage(data_dir).free
        except OSError as exc:
            warn(f"retention: mongodb.data_dir {data_dir}: {exc.strerror}; using the file system the store reports")
    if disk is None and "fsTotalSize" in stats and "fsUsedSize" in stats:
        disk = int(stats["fsTotalSize"]) - int(stats["fsUsedSize"])
    if disk is None:
        return None
    return disk + reusable_bytes(db, stats, frames)


def reusable_bytes(db, stats: Optional[dict] = None, frames: Optional[FramesStats] = None) -> int:
    """Space the store holds in its files for new documents (dbStats ``freeStorageSize``, or its fallback)."""
    stats = stats or db.command("dbStats", freeStorage=1)
    if "freeStorageSize" in stats:
        return int(stats["freeStorageSize"])
    held = sum(frames.storage if frames is not None and name == FRAMES
               else int(db.command("collStats", name).get("storageSize", 0)) for name in db.list_collection_names())
    return max(0, int(stats.get("storageSize", 0)) - held)


def measure(db, mcfg, warn: Callable[[str], None] = log.warning) -> Sizes:
    frames = frames_stats(db)
    return Sizes(frames.bytes, free_bytes(db, mcfg.data_dir, frames, warn))


@dataclass
class Removed:
    batches: int = 0
    frames: int = 0
    bytes: int = 0        # by how much the frames' size fell (collStats.size before and after)


def trim(db, need: int, max_batches: int = MAX_BATCHES, done: Optional[Removed] = None) -> Removed:
    """Remove the oldest batches (by ``ins``) until ``need`` bytes are gone, no batch is left or ``max_batches``.

    How many go is ``need`` over the average batch size, then measured again
    (batches differ in size). The oldest are read through ``idx_frames_ins``
    (``find().sort().limit()``: an aggregation ``$sort`` scans the whole
    collection on nx-27017), ids and frame counts only. Each batch is its own
    ``delete_one``: one that the TTL or another trimmer removed first is not
    counted here, so the counts are exact. ``done`` is filled as it goes:
    after a store error it still holds what was removed before it.
    """
    done = Removed() if done is None else done
    stats = frames_stats(db)
    while done.bytes < need and done.batches < max_batches and stats.count:
        k = min(how_many(need - done.bytes, stats.avg), max_batches - done.batches)
        removed = 0
        for d in db[FRAMES].find({}, {"n": 1}).sort("ins", 1).limit(k):
            if db[FRAMES].delete_one({"_id": d["_id"]}).deleted_count:
                removed += 1
                done.batches += 1
                done.frames += int(d.get("n", 0))
        after = frames_stats(db)
        done.bytes += max(0, stats.bytes - after.bytes)
        stats = after
        if not removed:
            break
    return done


class Trimmer(threading.Thread):
    """A trimming round every ``interval`` seconds; ``config()`` gives the config in force (a reload changes it).

    ``counters`` gets ``retention_batches``, ``retention_frames`` and
    ``retention_bytes`` (this thread alone writes them); ``status()`` is the
    last measurement for the owning service's status document.
    """

    def __init__(self, db, config: Callable, counters: dict, interval: float, stop_event: threading.Event,
                 log: logging.Logger = log):
        super().__init__(name="pisnoop-retention", daemon=True)
        self.db, self.config, self.counters, self.interval = db, config, counters, interval
        self.stop_event = stop_event
        self.log = log
        self.last: dict = {}
        self._failing = False
        self._short = False
        self._warned: set = set()
        for key in COUNTERS:
            counters.setdefault(key, 0)

    def run(self) -> None:
        while True:
            t0 = time.monotonic()
            self.round()
            # a store whose statistics cost time (nx-27017 reads every document for collStats) is asked at most a
            # tenth of the time
            if self.stop_event.wait(max(self.interval, BUSY_SHARE * (time.monotonic() - t0))):
                return

    def round(self) -> Removed:
        """Measure, and trim when due; a store error is logged once per outage and retried next round."""
        mcfg = self.config().mongodb
        max_bytes, min_free = limits(mcfg.retention)
        removed = Removed()
        try:
            sizes = measure(self.db, mcfg, self._warn_once)
            need = bytes_to_free(sizes, max_bytes, min_free)
            if need:
                trim(self.db, need, done=removed)
                sizes = measure(self.db, mcfg, self._warn_once)
        except PyMongoError as exc:
            if not self._failing:
                self.log.warning("retention: the store failed (%s: %s); trying again every %.3g s",
                                 exc.__class__.__name__, str(exc)[:160], self.interval)
            self._failing = True
            return removed
        finally:
            c = self.counters     # what went before a store error is counted too
            c["retention_batches"] += removed.batches
            c["retention_frames"] += removed.frames
            c["retention_bytes"] += removed.bytes
        self._failing = False
        self.last = {"frames_bytes": sizes.frames_bytes, "free_bytes": sizes.free_bytes,
                     "frames_max_bytes": max_bytes, "min_free_bytes": min_free}
        if removed.batches:
            self.log.info("retention: removed the %d oldest batches (%d frames, %d bytes): frames now %d bytes "
                          "(cap %s), %s free (floor %s)", removed.batches, removed.frames, removed.bytes,
                          sizes.frames_bytes, max_bytes or "off", _shown(sizes.free_bytes), min_free or "off")
        under_floor = bool(min_free) and sizes.free_bytes is not None and sizes.free_bytes < min_free
        short = (bool(need) and removed.bytes < need) or under_floor
        if short and not self._short:     # once until it is met again: a full disk must not fill the journal too
            self.log.warning("retention: %d bytes to free, %d could go (no batch left, or the round's limit); "
                             "frames now %d bytes, %s free (floor %s)", need, removed.bytes, sizes.frames_bytes,
                             _shown(sizes.free_bytes), min_free or "off")
        self._short = short
        return removed

    def status(self) -> dict:
        return dict(self.last)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.log.warning("%s", message)


COUNTERS = {
    "retention_batches": "batches removed by retention by size (frames_max_gb, min_free_gb), oldest first",
    "retention_frames": "frames in the batches removed by retention by size",
    "retention_bytes": "bytes by which retention by size brought the frames' size down (collStats.size)",
}


def _shown(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n} bytes"
