"""The capture engine: ring blocks (or frame lists) -> dedupe -> packed batches of ``batch_size`` frames.

Two implementations with one interface and the same results byte for byte (tests/test_fastcap.py):
``snooper._fastcap.Walker`` in C (the block walk, xxh3 and the window in one pass, ~25x less CPU a
frame) and ``PyEngine`` here, built from ``ring.walk_block``, ``Dedupe.filter`` and ``framebatch.pack``.
``make`` picks the C one when it is built; ``PISNOOP_FASTCAP=off`` forces Python, ``=on`` refuses to run
without C (for the tests that must fail when the C path is broken).

Interface: ``walk(buf, base, block_size) -> (captured, duplicates, bad_headers, truncated)`` for one
TPACKET_V3 block, ``add(frames) -> (captured, duplicates, truncated)`` for ``(ts_ns, wire_len, data)``
tuples, ``ready()`` the full batches since the last call, ``take()`` those and the open one, each as
``(data, n, wire_bytes, first_ns, last_ns)``; ``pending`` frames in the open batch; ``len()`` the
dedupe entries.
"""

from __future__ import annotations

import os

from appliance import framebatch
from appliance.errors import BadInput

from .dedupe import Dedupe
from .ring import walk_block

try:
    from ._fastcap import Walker
except ImportError:  # not built (a pure install): the Python engine does the same, slower
    Walker = None

ENV = "PISNOOP_FASTCAP"


class PyEngine:
    """The pure-Python engine: what the C one does, in the same order."""

    def __init__(self, dedupe: Dedupe, snaplen: int, batch_size: int):
        self.dedupe = dedupe
        self.snaplen = snaplen
        self.batch_size = batch_size
        self.open: list = []
        self.full: list = []

    @property
    def pending(self) -> int:
        return len(self.open)

    def __len__(self) -> int:
        return len(self.dedupe)

    def walk(self, buf, base: int, bsize: int) -> tuple[int, int, int, int]:
        frames: list = []
        done, bad = walk_block(buf, base, bsize, self.snaplen, frames)
        captured, dups, trunc = self.add(frames)
        return captured, dups, bad, trunc

    def add(self, frames: list) -> tuple[int, int, int]:
        kept, dups = self.dedupe.filter(frames)
        trunc = sum(1 for f in kept if f[1] > len(f[2]))
        size, open_ = self.batch_size, self.open
        for f in kept:
            open_.append(f)
            if len(open_) >= size:
                self._finish()
                open_ = self.open
        return len(frames), dups, trunc

    def ready(self) -> list:
        out, self.full = self.full, []
        return out

    def take(self) -> list:
        if self.open:
            self._finish()
        return self.ready()

    def _finish(self) -> None:
        frames, self.open = self.open, []
        n, wire, first, last = framebatch.summary(frames)
        self.full.append((framebatch.pack(frames), n, wire, first, last))


def available() -> bool:
    return Walker is not None


def make(window_seconds: float, snaplen: int, batch_size: int, mode: str | None = None):
    """The engine for a capture: C unless it is missing or ``mode``/``$PISNOOP_FASTCAP`` says ``off``."""
    mode = (mode or os.environ.get(ENV) or "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise BadInput(f"{ENV}: got {mode!r}; expected auto, on or off")
    if mode == "on" and Walker is None:
        raise BadInput(f"{ENV}=on but snooper._fastcap is not built (pip install -e . or python -m appliance.cext)")
    if mode != "off" and Walker is not None:
        return Walker(int(window_seconds * 1e9), snaplen, batch_size)
    return PyEngine(Dedupe(window_seconds), snaplen, batch_size)
