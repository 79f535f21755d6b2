"""Drop byte-identical frames seen within a short time window.

A mirror can deliver the same frame twice (both directions mirrored, a loop,
a retransmitting switch). Hashing the whole captured frame with xxh3-64 is the
simple correct baseline (docs/ARCHITECTURE.md, "Facts: capture": ~30 ns at 64 B, 42 ns at 512 B; sha256 is
10x slower). Memory stays bounded: two generations of ``hash -> first time``
dicts, the older one dropped every ``window`` seconds, so no dict ever grows
past what one window of traffic holds and no single resize stalls capture for
long. A frame counts as a duplicate only if its twin was kept at most
``window`` seconds earlier (checked against the stored time, so the
generations do not stretch the window); identical frames further apart are
both kept.
"""

from __future__ import annotations

import xxhash

frame_hash = xxhash.xxh3_64_intdigest


class Dedupe:
    """``seen(ts_ns, wire_len, data)`` is True for a duplicate (to be dropped), False for a frame to keep.

    The wire length seeds the hash: with a small snaplen, two frames that share their first bytes
    but differ in length are different frames.
    """

    def __init__(self, window_seconds: float):
        self.window_ns = int(window_seconds * 1e9)
        self.enabled = self.window_ns > 0
        self.current: dict[int, int] = {}
        self.previous: dict[int, int] = {}
        self.rotate_at: int | None = None

    def seen(self, ts_ns: int, wire_len: int, data: bytes) -> bool:
        if not self.enabled:
            return False
        if self.rotate_at is None or ts_ns >= self.rotate_at:
            self._rotate(ts_ns)
        h = frame_hash(data, wire_len)
        first = self.current.get(h)
        if first is None:
            first = self.previous.get(h)
        if first is not None and 0 <= ts_ns - first <= self.window_ns:
            return True
        self.current[h] = ts_ns
        return False

    def filter(self, frames: list) -> tuple[list, int]:
        """The frames ``(ts_ns, wire_len, data)`` to keep, and how many were duplicates.

        The same rule as ``seen``, in one loop over a whole ring block: the capture's hot path.
        """
        if not self.enabled:
            return frames, 0
        h, window = frame_hash, self.window_ns
        cur, prev = self.current, self.previous
        kept: list = []
        keep = kept.append
        dups = 0
        for f in frames:
            ts = f[0]
            if self.rotate_at is None or ts >= self.rotate_at:
                self._rotate(ts)
                cur, prev = self.current, self.previous
            k = h(f[2], f[1])
            first = cur.get(k)
            if first is None:
                first = prev.get(k)
            if first is not None and 0 <= ts - first <= window:
                dups += 1
                continue
            cur[k] = ts
            keep(f)
        return kept, dups

    def _rotate(self, ts_ns: int) -> None:
        if self.rotate_at is not None:
            # a gap longer than two windows empties both generations
            self.previous = self.current if ts_ns < self.rotate_at + self.window_ns else {}
            self.current = {}
        self.rotate_at = ts_ns + self.window_ns

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)
