"""A progress line for long commands (import-pcap, export-pcap, analyse --pcap, report): frames, rate, time left.

Only on a terminal: ``stream.isatty()`` and not under systemd (``service.under_systemd``); piped, redirected or
in a unit it writes nothing, so the command's own summary is the same either way. The line is redrawn in place
(``\\r`` and erase-to-end) at most every ``every`` seconds and erased by ``done()``. ``update`` is cheap enough for
every chunk of frames: one clock read.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

ERASE = "\r\x1b[K"


def wanted(stream: TextIO) -> bool:
    from .service import under_systemd
    try:
        return stream.isatty() and not under_systemd()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``update(frames, position)``: ``position`` out of ``total`` (bytes of a file, batches, capture ns) gives the
    fraction done and the time left; without a total only frames and the rate are shown."""

    def __init__(self, what: str, total: Optional[float] = None, stream: Optional[TextIO] = None,
                 every: float = 0.5, enabled: Optional[bool] = None):
        self.what = what
        self.total = total if total and total > 0 else None
        self.stream = stream or sys.stderr
        self.every = every
        self.enabled = wanted(self.stream) if enabled is None else enabled
        self.start = time.monotonic()
        self.next = self.start            # the first update draws at once
        self.frames = 0
        self.drawn = 0

    def update(self, frames: int, position: Optional[float] = None) -> None:
        self.frames = frames
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.every
        self.stream.write(ERASE + self.line(frames, position, now) + "\r")   # a log line then overwrites it
        self.stream.flush()
        self.drawn += 1

    def line(self, frames: int, position: Optional[float], now: float) -> str:
        took = max(now - self.start, 1e-6)
        text = f"{self.what}: {frames:,} frames, {frames / took:,.0f} frames/s"
        if self.total and position is not None:
            frac = min(max(position / self.total, 0.0), 1.0)
            left = took * (1 - frac) / frac if frac > 0 else None
            text += f", {frac * 100:.0f} %"
            if left is not None:
                text += f", {_duration(left)} left"
        return text

    def done(self) -> None:
        """Erase the line: what follows (the command's summary) starts at the left margin, as when piped."""
        if self.enabled and self.drawn:
            self.stream.write(ERASE)
            self.stream.flush()


def file_size(path) -> Optional[int]:
    import os
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
