"""The snooper's status: a document in MongoDB, a log line and Prometheus, every status_interval."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from pymongo.errors import PyMongoError

from appliance import service, store

from . import counters as counters_mod


class Reporter(threading.Thread):
    """Publishes ``snapshot()`` every ``interval`` seconds until ``stop_event`` is set (then once more)."""

    def __init__(self, db, sensor: str, interval: float, snapshot, log: logging.Logger, stop_event: threading.Event):
        super().__init__(name="pisnoop-status", daemon=True)
        self.db = db
        self.sensor = sensor
        self.interval = interval
        self.snapshot = snapshot
        self.log = log
        self.stop_event = stop_event
        self._last: tuple[float, int] | None = None    # (monotonic time, captured) of the last publication

    def run(self) -> None:
        self.publish()
        while not self.stop_event.wait(self.interval):
            self.publish()

    def publish(self, final: bool = False) -> dict:
        counters, extra = self.snapshot()
        c = counters
        self.log.info("%scaptured=%d stored=%d duplicates=%d kernel_dropped=%d spool_full=%d spooled=%d replayed=%d "
                      "in_spool=%d unaccounted=%d", "final: " if final else "", c["captured"], c["stored"],
                      c["duplicates"], c["kernel_dropped"], c["dropped_spool_full"], c["spooled"], c["replayed"],
                      extra["spool_frames"], extra["unaccounted"])
        sid = f"snooper:{self.sensor}"
        now_m = time.monotonic()
        rate = 0.0
        if self._last is not None and now_m > self._last[0]:
            rate = (c["captured"] - self._last[1]) / (now_m - self._last[0])
        self._last = (now_m, c["captured"])
        # _id in the replacement too: nx-27017 gives an upserted document a fresh ObjectId otherwise
        now = dt.datetime.now(dt.timezone.utc)
        doc = {"_id": sid, "component": "snooper", "sensor": self.sensor, "updated_at": now,
               "counters": counters, "captured_per_second": round(rate, 1), "health": service.health(), **extra}
        if final:       # the last word of a run that stopped: `pisnoop status` says so at once, not when it goes stale
            doc["stopped_at"] = now
            doc["captured_per_second"] = 0.0
        try:
            self.db[store.STATUS].replace_one({"_id": sid}, doc, upsert=True)
        except PyMongoError as exc:
            self.log.debug("status document not written: %s", exc)
        return doc


def snapshot_of(c: dict, writer, spool, ring, dedupe, run: str, interface: str, in_batch=lambda: 0, trimmer=None):
    """A consistent-enough view for one status publication (reads the kernel counters too)."""

    def snapshot():
        if ring is not None:
            packets, drops, freezes = ring.read_stats()
            c["kernel_packets"], c["kernel_dropped"], c["ring_freezes"] = packets, drops, freezes
        spool_frames = spool.frames
        pending = writer.pending_frames + in_batch()
        extra = {"run": run, "interface": interface, "store_up": writer.store_up, "spool_frames": spool_frames,
                 "spool_batches": len(spool), "spool_bytes": spool.used, "pending_frames": pending,
                 "dedupe_entries": len(dedupe) if dedupe else 0,
                 "unaccounted": counters_mod.unaccounted(c, pending, spool_frames)}
        if trimmer is not None:   # the store's size and free space as the last retention round measured them
            sizes = trimmer.status()
            extra["retention"] = sizes
            extra.update({f"store_{k}": v for k, v in sizes.items() if v is not None})
        return dict(c), extra

    return snapshot
