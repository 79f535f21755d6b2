"""The writer: batches into MongoDB on its own thread, the spool when MongoDB cannot take them.

Capture never waits for the store: ``offer()`` only puts a batch on a bounded
queue, and when that queue is full the batch goes straight to the spool. The
writer thread inserts one document per batch (``store.batch_document`` plus
``ins``, the time of the insert). Ids are deterministic, so a
``DuplicateKeyError`` on a retry means an earlier attempt did get through:
the batch is stored, once. After a failure the store counts as away for a
second; meanwhile batches go to the spool, and every second the writer tries
to replay the spool oldest first, which is also how it notices the store is
back. Its first contact with the store ensures the indexes (``appliance.indexes``).
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time

from pymongo.errors import DuplicateKeyError, PyMongoError

from appliance import framebatch, indexes, store

from .batch import Batch
from .spool import Spool

RETRY_SECONDS = 1.0
# On a stop, how long queued batches still go to the store; the rest go to the spool (local disk, fast). A slow store
# must not hold the stop past systemd's TimeoutStopSec (20 s) and its SIGKILL, which loses the queue (up to
# QUEUE_BYTES): this, plus one insert's socket timeout at worst, plus spooling the rest, stays within it.
STOP_STORE_SECONDS = 5.0
QUEUE_BYTES = 96 << 20   # frames waiting in memory for the store before spooling (see _size)
_FRAME_OVERHEAD = 100
_STOP = object()


def _size(batch: Batch) -> int:
    """The memory a queued batch holds: a packed one its binary, a list its bytes and ~100 B a tuple."""
    if isinstance(batch.frames, framebatch.Packed):
        return len(batch.frames.data)
    return sum(len(f[2]) for f in batch.frames) + _FRAME_OVERHEAD * len(batch.frames)


def insert(db, batch: Batch, counters: dict) -> None:
    """Store one batch exactly once; raises ``PyMongoError`` if the store did not take it."""
    doc = store.batch_document(batch.sensor, batch.run, batch.seq, batch.frames)
    doc["ins"] = dt.datetime.now(dt.timezone.utc)
    try:
        db[store.FRAMES].insert_one(doc)
    except DuplicateKeyError:
        pass  # stored by an earlier attempt whose answer was lost
    counters["stored"] += len(batch.frames)
    counters["stored_batches"] += 1


class Writer(threading.Thread):
    def __init__(self, db, spool: Spool, counters: dict, log: logging.Logger, cfg, queue_bytes: int = QUEUE_BYTES):
        super().__init__(name="pisnoop-writer", daemon=True)
        self.db = db
        self.spool = spool
        self.counters = counters
        self.log = log
        self.queue: queue.Queue = queue.Queue()
        self.queue_bytes = queue_bytes   # the bound: in bytes, so that big frames cannot exhaust memory
        self.retry_at = 0.0      # monotonic time before which the store counts as away
        self.store_up = True
        self.pending_frames = 0  # frames in the queue or being written
        self.pending_bytes = 0
        self._pending_lock = threading.Lock()
        self.cfg = cfg
        self.indexed = False     # indexes (and the retention TTL) are ensured on the first contact with the store
        self.stop_by: float | None = None   # set by stop(): the monotonic time after which batches are spooled

    # --- the capture side ------------------------------------------------------

    def offer(self, batch: Batch, block: bool = False) -> None:
        """Hand a batch over: queue, or (capture must never wait) spool when the queue is full.

        ``block=True`` waits for room instead (import-pcap: a file can wait, the wire cannot).
        """
        n = len(batch.frames)
        size = _size(batch)
        while block and self.pending_bytes and self.pending_bytes + size > self.queue_bytes and self.is_alive():
            time.sleep(0.01)
        with self._pending_lock:
            if not block and self.pending_bytes + size > self.queue_bytes:
                full = True
            else:
                full = False
                self.pending_frames += n
                self.pending_bytes += size
        if full:
            self.counters["queue_overflows"] += 1
            self.spool.put(batch)
        else:
            self.queue.put(batch)

    def stop(self, timeout: float = 15.0, store_seconds: float = STOP_STORE_SECONDS) -> None:
        """Flush everything queued and end the thread: to the store for ``store_seconds``, then to the spool,
        which the next run replays; wait at most ``timeout`` (under the unit's TimeoutStopSec=20s)."""
        self.stop_by, self.stop_store_seconds = time.monotonic() + store_seconds, store_seconds
        self.queue.put(_STOP)
        self.join(timeout)

    # --- the writer thread -------------------------------------------------------

    def run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is _STOP:  # a last go at the spool (the store may be back by now), then leave it for next time
                end = min(time.monotonic() + 5.0, self.stop_by or 0.0)
                if self.counters.get("stop_spooled"):
                    self.log.warning("stopping: %d frames spooled for the next run (the store took more than %.1f s "
                                     "for the queue)", self.counters["stop_spooled"], self.stop_store_seconds)
                while len(self.spool) and self.spool.owner and time.monotonic() < end:
                    time.sleep(max(0.0, min(self.retry_at, end) - time.monotonic()))
                    self._replay(deadline=end)
                return
            if item is not None:
                try:
                    if self.stop_by is not None and time.monotonic() >= self.stop_by:
                        self.counters["stop_spooled"] += len(item.frames)
                        self.spool.put(item)          # stopping, and out of time for the store
                    else:
                        self._write(item)
                except Exception:  # a bug must not silently stop storing: keep the batch, keep going
                    self.log.exception("writing batch %s:%d failed unexpectedly; spooling it", item.run, item.seq)
                    self.counters["store_errors"] += 1
                    self.spool.put(item)
                with self._pending_lock:
                    self.pending_frames -= len(item.frames)
                    self.pending_bytes -= _size(item)
            if self.queue.empty():  # replay only when idle: under load, fresh batches first, or the spool snowballs
                self._replay(deadline=time.monotonic() + 0.1)

    def _insert(self, batch: Batch) -> None:
        if not self.indexed:
            indexes.ensure_or_go_on(self.db, self.cfg, self.log)
            self.indexed = True
        insert(self.db, batch, self.counters)

    def _write(self, batch: Batch) -> None:
        if time.monotonic() >= self.retry_at:
            try:
                self._insert(batch)
                self._mark(True)
                return
            except PyMongoError as exc:
                self.counters["store_errors"] += 1
                self._mark(False, exc)
        self.spool.put(batch)

    def _replay(self, deadline: float) -> None:
        """Replay spooled batches oldest first until the spool is empty, the store fails, or time is up."""
        if not self.spool.owner or time.monotonic() < self.retry_at:
            return
        while time.monotonic() < deadline:
            name = self.spool.oldest()
            if name is None:
                return
            batch = self.spool.load(name)
            if batch is None:
                continue
            try:
                self._insert(batch)
            except PyMongoError as exc:
                self.counters["store_errors"] += 1
                self._mark(False, exc)
                return
            self.counters["replayed"] += len(batch.frames)
            self.spool.remove(name)
            self._mark(True)

    def _mark(self, up: bool, exc: Exception | None = None) -> None:
        if up and not self.store_up:
            self.log.info("store is back: writing directly again, %d batches left in the spool", len(self.spool))
        elif not up:
            self.retry_at = time.monotonic() + RETRY_SECONDS
            if self.store_up:
                self.log.warning("store write failed (%s: %s): spooling to %s", exc.__class__.__name__,
                                 str(exc)[:160], self.spool.dir)
        self.store_up = up

