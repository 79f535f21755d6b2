"""A stored batch as its packed binary (appliance/framebatch.py), so the fast engine reads it as one array."""

from __future__ import annotations

from appliance import framebatch


class Packed:
    """Iterates like ``framebatch.unpack(blob)`` (what the reference engine reads) and keeps ``blob``
    (what the fast engine, analyser/fast.py, reads)."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes):
        self.blob = blob

    def __iter__(self):
        return framebatch.unpack(self.blob)
