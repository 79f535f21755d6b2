"""The on-store layout of captured frames: many frames packed in one binary.

One MongoDB document per batch keeps a Pi fast (one BSON binary per ~1,000
frames instead of one document per frame). The packed binary is a sequence of
records, each a 16-byte header ``<qII`` (capture time in ns since the epoch,
original wire length, captured length) followed by the captured bytes.
Snooper, analyser and pcap import/export all use this module, so the format
lives in exactly one place.
"""

from __future__ import annotations

import struct
from typing import Iterable, Iterator, NamedTuple

HEADER = struct.Struct("<qII")
HEADER_SIZE = HEADER.size


class Frame(NamedTuple):
    ts_ns: int
    wire_len: int
    data: bytes


class CorruptBatch(ValueError):
    """A packed binary whose records do not add up (truncated or damaged)."""


class Packed:
    """A batch already packed (by the capture's engine), with what its document says about it.

    It stands wherever a list of ``(ts_ns, wire_len, data)`` frames does: ``len`` is the frame count,
    iterating unpacks, ``pack`` returns the binary as it is and ``summary`` reads no record.
    """

    __slots__ = ("data", "n", "wire_bytes", "first_ns", "last_ns")

    def __init__(self, data: bytes, n: int, wire_bytes: int, first_ns: int, last_ns: int):
        self.data, self.n, self.wire_bytes, self.first_ns, self.last_ns = data, n, wire_bytes, first_ns, last_ns

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Frame]:
        return unpack(self.data)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"Packed(n={self.n}, {len(self.data)} bytes)"


def summary(frames) -> tuple[int, int, int, int]:
    """``(n, wire_bytes, first_ns, last_ns)`` of a batch (first/last: the smallest and largest time)."""
    if isinstance(frames, Packed):
        return frames.n, frames.wire_bytes, frames.first_ns, frames.last_ns
    return (len(frames), sum(f[1] for f in frames), min(f[0] for f in frames), max(f[0] for f in frames))


def pack(frames: Iterable[tuple[int, int, bytes]]) -> bytes:
    """Pack ``(ts_ns, wire_len, data)`` tuples into one binary (a ``Packed`` batch is returned as it is)."""
    if isinstance(frames, Packed):
        return frames.data
    out = bytearray()
    hdr = HEADER.pack
    for ts_ns, wire_len, data in frames:
        out += hdr(ts_ns, wire_len, len(data))
        out += data
    return bytes(out)


def unpack(blob: bytes) -> Iterator[Frame]:
    """Iterate the frames of a packed binary; raise ``CorruptBatch`` if it is damaged."""
    mv = memoryview(blob)
    off, end = 0, len(blob)
    unpack_from = HEADER.unpack_from
    while off < end:
        if end - off < HEADER_SIZE:
            raise CorruptBatch(f"truncated record header at byte {off}")
        ts_ns, wire_len, cap_len = unpack_from(blob, off)
        off += HEADER_SIZE
        if off + cap_len > end:
            raise CorruptBatch(f"record at byte {off - HEADER_SIZE} claims {cap_len} bytes, {end - off} left")
        yield Frame(ts_ns, wire_len, bytes(mv[off:off + cap_len]))
        off += cap_len
