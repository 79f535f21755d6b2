"""The capture loop: ring blocks -> dedupe -> batches -> the writer's queue.

It runs on its own thread and never waits for anything but the ring: a full
batch (``batch_size`` frames, or ``batch_interval`` seconds old) is handed to
``Writer.offer``, which queues or spools without blocking. The loop kicks
the systemd watchdog, so a hung capture gets the service restarted.
"""

from __future__ import annotations

import threading
import time

from appliance import service

from .batch import Batch


class Capture:
    def __init__(self, ring, dedupe, writer, counters: dict, sensor: str, run: str, batch_size: int,
                 batch_interval: float, stop_event: threading.Event, blocking: bool = False):
        self.ring = ring
        self.dedupe = dedupe
        self.writer = writer
        self.c = counters
        self.sensor = sensor
        self.run_id = run
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.stop_event = stop_event
        self.blocking = blocking
        self.seq = 0
        self.batch: list = []
        self.batch_started = 0.0
        self.watchdog = service.Watchdog()

    def in_batch(self) -> int:
        return len(self.batch)

    def run(self) -> None:
        ring, stop = self.ring, self.stop_event
        wait_ms = max(10, min(100, int(self.batch_interval * 1000)))
        service.notify("READY=1")
        service.notify(f"STATUS=capturing on {ring.ifname}")
        while not stop.is_set():
            self.watchdog.kick()
            if ring.wait(wait_ms):
                self._block()
            if self.batch and time.monotonic() - self.batch_started >= self.batch_interval:
                self._flush()
        while self._block() is not None:  # what the kernel already handed over is kept
            pass
        self._flush()

    def _block(self) -> int | None:
        frames: list = []
        n = self.ring.read_block(frames)
        if n is None:
            return None
        if self.ring.bad_headers:
            self.c["dropped_parse"] += self.ring.bad_headers
            self.ring.bad_headers = 0
        self.add(frames)
        return n

    def add(self, frames: list) -> None:
        """Dedupe and batch frames ``(ts_ns, wire_len, data)`` (also used by import-pcap)."""
        c = self.c
        c["captured"] += len(frames)
        kept, dups = self.dedupe.filter(frames)
        c["duplicates"] += dups
        c["truncated"] += sum(1 for f in kept if f[1] > len(f[2]))
        size = self.batch_size
        while kept:
            if not self.batch:
                self.batch_started = time.monotonic()
            room = size - len(self.batch)
            if len(kept) <= room:
                self.batch.extend(kept)
                kept = None
            else:
                self.batch.extend(kept[:room])
                kept = kept[room:]
            if len(self.batch) >= size:
                self._flush()

    def flush(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        self.c["batches"] += 1
        self.writer.offer(Batch(self.sensor, self.run_id, self.seq, batch), block=self.blocking)
        self.seq += 1
