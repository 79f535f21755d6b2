"""The writer: batches into MongoDB on its own thread, the spool when MongoDB cannot take them.

Capture never waits for the store: ``offer()`` only puts a batch on a bounded
queue, and when that queue is full the batch goes straight to the spool. The
writer thread inserts one document per batch (``store.batch_document`` plus
``ins``, the time of the insert). Ids are deterministic, so a
``DuplicateKeyError`` on a retry means an earlier attempt did get through:
the batch is stored, once. After a failure the store counts as away for a
second; meanwhile batches go to the spool, and every second the writer tries
to replay the spool oldest first, which is also how it notices the store is
back.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time

from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from appliance import store

from .batch import Batch
from .spool import Spool

RETRY_SECONDS = 1.0
_STOP = object()


def ensure_indexes(db, frames_hours: int, log: logging.Logger) -> None:
    """Indexes readers need (``ins`` to follow new data, ``t0``/``first_ns`` for ranges) and the TTL on ``t1``."""
    col = db[store.FRAMES]
    col.create_index("ins")
    col.create_index("t0")
    col.create_index("first_ns")
    if frames_hours <= 0:
        col.create_index("t1")
        return
    ttl = int(frames_hours * 3600)
    try:
        col.create_index("t1", expireAfterSeconds=ttl)
    except OperationFailure as exc:  # an index from an earlier retention setting
        try:
            db.command("collMod", store.FRAMES, index={"keyPattern": {"t1": 1}, "expireAfterSeconds": ttl})
        except PyMongoError:
            log.warning("could not set the frames TTL to %d h: %s", frames_hours, exc)


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
    def __init__(self, db, spool: Spool, counters: dict, log: logging.Logger, queue_batches: int = 64,
                 frames_hours: int = 0):
        super().__init__(name="pisnoop-writer", daemon=True)
        self.db = db
        self.spool = spool
        self.counters = counters
        self.log = log
        self.queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self.retry_at = 0.0      # monotonic time before which the store counts as away
        self.store_up = True
        self.pending_frames = 0  # frames in the queue or being written
        self._pending_lock = threading.Lock()
        self.frames_hours = frames_hours
        self.indexed = False     # indexes are made on the first contact with the store

    # --- the capture side ------------------------------------------------------

    def offer(self, batch: Batch, block: bool = False) -> None:
        """Hand a batch over: queue, or (capture must never wait) spool when the queue is full.

        ``block=True`` waits for room instead (import-pcap: a file can wait, the wire cannot).
        """
        n = len(batch.frames)
        with self._pending_lock:
            self.pending_frames += n
        if block:
            self.queue.put(batch)
            return
        try:
            self.queue.put_nowait(batch)
        except queue.Full:
            self.counters["queue_overflows"] += 1
            self.spool.put(batch)
            with self._pending_lock:
                self.pending_frames -= n

    def stop(self, timeout: float = 30.0) -> None:
        """Flush everything queued (to the store or the spool) and end the thread."""
        self.queue.put(_STOP)
        self.join(timeout)

    # --- the writer thread -------------------------------------------------------

    def run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._replay(deadline=time.monotonic() + 5.0)
                return
            if item is not None:
                self._write(item)
                with self._pending_lock:
                    self.pending_frames -= len(item.frames)
            self._replay(deadline=time.monotonic() + 0.05)

    def _insert(self, batch: Batch) -> None:
        if not self.indexed:
            ensure_indexes(self.db, self.frames_hours, self.log)
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

