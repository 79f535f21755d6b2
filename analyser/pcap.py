"""Frames from a pcap or pcapng file, with their exact capture times in ns."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

import dpkt

_MAGIC = {0xA1B2C3D4: ("<", 1000), 0xD4C3B2A1: (">", 1000), 0xA1B23C4D: ("<", 1), 0x4D3CB2A1: (">", 1)}


class PcapError(ValueError):
    """Not a readable capture file; the message says why."""


def read(path: str | Path) -> Iterator[tuple[int, int, bytes]]:
    """``(ts_ns, wire_len, data)`` for every frame; PcapError if the file is not a capture."""
    with open(path, "rb") as fh:
        head = fh.read(24)
        if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == 0x0A0D0D0A:
            fh.seek(0)
            yield from _pcapng(fh, path)
            return
        if len(head) < 24:
            raise PcapError(f"{path}: not a pcap file (too short)")
        magic = struct.unpack("<I", head[:4])[0]
        if magic not in _MAGIC:
            raise PcapError(f"{path}: not a pcap file (magic {magic:#x})")
        endian, mult = _MAGIC[magic]
        linktype = struct.unpack(endian + "I", head[20:24])[0]
        if linktype != 1:
            raise PcapError(f"{path}: link type {linktype}; expected 1 (Ethernet)")
        rec = struct.Struct(endian + "IIII")
        while True:
            h = fh.read(16)
            if not h:
                return
            if len(h) < 16:
                raise PcapError(f"{path}: truncated record header")
            sec, frac, caplen, wire = rec.unpack(h)
            data = fh.read(caplen)
            if len(data) < caplen:
                raise PcapError(f"{path}: truncated record")
            yield sec * 1_000_000_000 + frac * mult, wire, data


def _pcapng(fh, path) -> Iterator[tuple[int, int, bytes]]:
    try:
        for ts, data in dpkt.pcapng.Reader(fh):
            yield int(round(ts * 1e9)), len(data), bytes(data)
    except (ValueError, dpkt.UnpackError) as exc:
        raise PcapError(f"{path}: unreadable pcapng ({exc})") from None


def write(path: str | Path, frames) -> None:
    """A nanosecond pcap of ``(ts_ns, wire_len, data)`` frames (tests and exports)."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        for ts, wire, data in frames:
            fh.write(struct.pack("<IIII", ts // 1_000_000_000, ts % 1_000_000_000, len(data), wire))
            fh.write(data)
