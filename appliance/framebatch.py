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


def pack(frames: Iterable[tuple[int, int, bytes]]) -> bytes:
    """Pack ``(ts_ns, wire_len, data)`` tuples into one binary."""
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
