"""The capture loop: ring blocks -> dedupe -> batches -> the writer's queue.

It runs on its own thread and never waits for anything but the ring: a full
batch (``batch_size`` frames, or ``batch_interval`` seconds old) is handed to
``Writer.offer``, which queues or spools without blocking. The loop kicks
the systemd watchdog, so a hung capture gets the service restarted.
"""

from __future__ import annotations

import threading
import time

from appliance import framebatch, service

from .batch import Batch
from .engine import PyEngine


class Capture:
    def __init__(self, ring, dedupe, writer, counters: dict, sensor: str, run: str, batch_size: int,
                 batch_interval: float, stop_event: threading.Event, blocking: bool = False, engine=None):
        self.ring = ring
        self.writer = writer
        self.c = counters
        self.sensor = sensor
        self.run_id = run
        self.batch_interval = batch_interval
        self.stop_event = stop_event
        self.blocking = blocking
        self.seq = 0
        self.batch_started = 0.0
        self.watchdog = service.Watchdog()
        # the engine (snooper/engine.py) dedupes and packs; ``dedupe`` is the Python one's window
        self.engine = engine if engine is not None else PyEngine(dedupe, getattr(ring, "snaplen", 1 << 18), batch_size)

    def in_batch(self) -> int:
        return self.engine.pending

    def run(self) -> None:
        ring, stop = self.ring, self.stop_event
        wait_ms = max(10, min(100, int(self.batch_interval * 1000)))
        service.notify("READY=1")
        service.notify(f"STATUS=capturing on {ring.ifname}")
        while not stop.is_set():
            self.watchdog.kick()
            if ring.wait(wait_ms):
                self._block()
            if self.engine.pending and time.monotonic() - self.batch_started >= self.batch_interval:
                self._flush()
        for _ in range(ring.block_count):    # what the kernel already handed over is kept: at most one ring's worth,
            if self._block() is None:        # so an overloaded link cannot hold the stop past TimeoutStopSec (a kept
                break                        # ring's next run reads the rest)
        self._flush()

    def _block(self) -> int | None:
        ring = self.ring
        base = ring.ready()
        if base is None:
            return None
        was = self.engine.pending
        try:
            captured, dups, bad, trunc = self.engine.walk(ring.mm, base, ring.block_size)
        finally:
            ring.release()
        self._count(captured, dups, trunc, was)
        if bad:
            self.c["dropped_parse"] += bad
        return captured

    def add(self, frames: list) -> None:
        """Dedupe and batch frames ``(ts_ns, wire_len, data)`` (also used by import-pcap)."""
        was = self.engine.pending
        self._count(*self.engine.add(frames), was)

    def _count(self, captured: int, dups: int, trunc: int, was_pending: int) -> None:
        c = self.c
        c["captured"] += captured
        c["duplicates"] += dups
        c["truncated"] += trunc
        full = self.engine.ready()
        if self.engine.pending and (not was_pending or full):
            self.batch_started = time.monotonic()    # a new open batch: its age counts from now
        self._offer(full)

    def flush(self) -> None:
        self._flush()

    def _flush(self) -> None:
        self._offer(self.engine.take())

    def _offer(self, batches: list) -> None:
        for data, n, wire, first, last in batches:
            self.c["batches"] += 1
            packed = framebatch.Packed(data, n, wire, first, last)
            self.writer.offer(Batch(self.sensor, self.run_id, self.seq, packed), block=self.blocking)
            self.seq += 1
