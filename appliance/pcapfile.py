"""The one reader and writer of capture files: classic pcap and pcapng of Ethernet frames.

``import-pcap``, ``export-pcap`` and ``analyse --pcap`` all go through here, so
a record means the same to each of them: ``(ts_ns, wire_len, data)``, where

* ``ts_ns`` is the capture time in ns, computed with integers from the file's
  own resolution (a float would shift the last digits);
* ``wire_len`` is the original length exactly as the file states it, even
  when it is smaller than the captured bytes: the file is all we know, and
  writing it back unchanged keeps export -> import -> export byte-identical;
* ``data`` is the captured bytes.

Only Ethernet (link type 1) is read: the store, the analyser and the export
know no other framing. Files are read one record at a time (they can be
larger than memory), with ``struct`` only.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import BadInput

Record = tuple[int, int, bytes]

ETHERNET = 1
SNAPLEN = 262144  # the snap length export writes, and the most any record may capture (tcpdump's limit for Ethernet)
MAX_BLOCK = 16 * 1024 * 1024  # a longer pcapng block is damage, not data: refuse it before allocating it
NS = 1_000_000_000

# classic pcap: the magic as it appears in the file -> (byte order, ns per timestamp fraction unit)
_CLASSIC = {b"\xd4\xc3\xb2\xa1": ("<", 1000), b"\xa1\xb2\xc3\xd4": (">", 1000),
            b"\x4d\x3c\xb2\xa1": ("<", 1), b"\xa1\xb2\x3c\x4d": (">", 1)}
_SHB = b"\x0a\x0d\x0d\x0a"  # the section header's type, the same in either byte order
_SHB_TYPE = 0x0A0D0D0A
_BYTE_ORDER = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
_IDB, _PB, _SPB, _EPB = 1, 2, 3, 6
_IF_TSRESOL, _IF_TSOFFSET = 9, 14


class PcapError(BadInput):
    """A file that is not a readable capture of Ethernet frames; the message names the file and the fault."""


def read(path: str | Path) -> Iterator[Record]:
    """The records of the capture file at ``path``."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise PcapError(f"{path}: {exc.strerror}") from None
    with fh:
        yield from read_stream(fh, str(path))


def read_stream(fh: BinaryIO, name: str) -> Iterator[Record]:
    """The records of an open capture file (need not be seekable); ``name`` is for messages."""
    magic = fh.read(4)
    if len(magic) < 4:
        raise PcapError(f"{name}: not a capture file (too short)")
    if magic == _SHB:
        yield from _pcapng(fh, name)
    elif magic in _CLASSIC:
        yield from _classic(fh, name, *_CLASSIC[magic])
    else:
        raise PcapError(f"{name}: not a pcap or pcapng file (magic {magic.hex()})")


def _not_ethernet(name: str, linktype: int, where: str = "") -> PcapError:
    return PcapError(f"{name}: {where}link type {linktype} (expected 1, Ethernet)")


def _classic(fh: BinaryIO, name: str, order: str, unit_ns: int) -> Iterator[Record]:
    head = fh.read(20)
    if len(head) < 20:
        raise PcapError(f"{name}: truncated file header")
    linktype = struct.unpack(order + "I", head[16:20])[0]
    if linktype != ETHERNET:
        raise _not_ethernet(name, linktype)
    rec = struct.Struct(order + "IIII")
    off = 24
    while True:
        h = fh.read(16)
        if not h:
            return
        if len(h) < 16:
            raise PcapError(f"{name}: truncated record header at byte {off}")
        sec, frac, caplen, wire = rec.unpack(h)
        if caplen > SNAPLEN:
            raise PcapError(f"{name}: record at byte {off} claims {caplen} captured bytes (at most {SNAPLEN})")
        data = fh.read(caplen)
        if len(data) < caplen:
            raise PcapError(f"{name}: truncated record at byte {off}")
        yield sec * NS + frac * unit_ns, wire, data
        off += 16 + caplen


class _Interface:
    """What an IDB says that its packets need: link type, snap length, and how to turn a timestamp into ns."""

    def __init__(self, linktype: int, snaplen: int, units_per_s: int, offset_s: int):
        self.linktype, self.snaplen = linktype, snaplen
        self.units_per_s, self.offset_ns = units_per_s, offset_s * NS

    def ns(self, units: int) -> int:
        return units * NS // self.units_per_s + self.offset_ns


def _pcapng(fh: BinaryIO, name: str) -> Iterator[Record]:
    """Blocks one by one; each SHB starts a section with its own byte order and interfaces."""
    order = "<"
    interfaces: list[_Interface] = []
    last_ns = 0
    off = 0
    head = _SHB + fh.read(8)  # type, total length, and the first 4 bytes after it (an SHB's byte-order magic)
    while head:
        if len(head) < 12:
            raise PcapError(f"{name}: truncated block header at byte {off}")
        if head[:4] == _SHB:
            if head[8:12] not in _BYTE_ORDER:
                raise PcapError(f"{name}: bad byte-order magic {head[8:12].hex()} in the section header at byte {off}")
            order = _BYTE_ORDER[head[8:12]]
            interfaces = []
        btype, blen = struct.unpack(order + "II", head[:8])
        if blen < 12 or blen % 4 or blen > MAX_BLOCK:
            raise PcapError(f"{name}: bad block length {blen} at byte {off}")
        rest = fh.read(blen - 12)
        if len(rest) < blen - 12:
            raise PcapError(f"{name}: truncated block at byte {off}")
        content = head[8:] + rest
        body, trailer = content[:-4], struct.unpack(order + "I", content[-4:])[0]
        if trailer != blen:
            raise PcapError(f"{name}: bad block length at byte {off} ({blen} at the start, {trailer} at the end)")
        where = f"{name}: block at byte {off}"
        if btype == _SHB_TYPE:
            if len(body) < 16:
                raise PcapError(f"{name}: bad block length {blen} at byte {off}")
            major, minor = struct.unpack_from(order + "HH", body, 4)
            if major != 1:
                raise PcapError(f"{where}: pcapng version {major}.{minor} (expected 1.x)")
        elif btype == _IDB:
            interfaces.append(_interface(body, order, where))
        elif btype in (_EPB, _PB, _SPB):
            rec = _packet(btype, body, order, interfaces, last_ns, name, where)
            last_ns = rec[0]
            yield rec
        off += blen
        head = fh.read(12)


def _interface(body: bytes, order: str, where: str) -> _Interface:
    if len(body) < 8:
        raise PcapError(f"{where}: interface description too short")
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
    units_per_s, offset_s = 10 ** 6, 0
    pos = 8
    while pos + 4 <= len(body):
        code, size = struct.unpack_from(order + "HH", body, pos)
        value = body[pos + 4:pos + 4 + size]
        if code == 0:
            break
        if len(value) < size:
            raise PcapError(f"{where}: option {code} runs past the block")
        if code == _IF_TSRESOL and size == 1:
            units_per_s = 2 ** (value[0] & 0x7F) if value[0] & 0x80 else 10 ** value[0]
        elif code == _IF_TSOFFSET and size == 8:
            offset_s = struct.unpack(order + "q", value)[0]
        pos += 4 + (size + 3) // 4 * 4
    return _Interface(linktype, snaplen, units_per_s, offset_s)


def _packet(btype: int, body: bytes, order: str, interfaces: list[_Interface], last_ns: int, name: str,
            where: str) -> Record:
    """An EPB, an obsolete PB or an SPB as a record. An SPB has no timestamp: it gets the time of the packet
    before it in the file (0 for the first), which keeps the file's order when frames are merged by time."""
    if btype == _SPB:
        if len(body) < 4:
            raise PcapError(f"{where}: simple packet too short")
        iface, units, wire = 0, None, struct.unpack_from(order + "I", body)[0]
        caplen, start = min(wire, len(body) - 4), 4
    else:
        if len(body) < 20:
            raise PcapError(f"{where}: packet too short")
        iface, hi, lo, caplen, wire = struct.unpack_from(order + ("I" if btype == _EPB else "H2x") + "IIII", body)
        units, start = hi << 32 | lo, 20
        if start + caplen > len(body):
            raise PcapError(f"{where}: packet of {caplen} bytes does not fit its block")
    if iface >= len(interfaces):
        raise PcapError(f"{where}: packet of interface {iface}, which its section does not describe")
    intf = interfaces[iface]
    if intf.linktype != ETHERNET:
        raise _not_ethernet(name, intf.linktype, f"interface {iface}: ")
    if btype == _SPB and intf.snaplen:
        caplen = min(caplen, intf.snaplen)
    if caplen > SNAPLEN:
        raise PcapError(f"{where}: packet claims {caplen} captured bytes (at most {SNAPLEN})")
    return (last_ns if units is None else intf.ns(units)), wire, body[start:start + caplen]


class Writer:
    """A classic little-endian pcap of Ethernet frames, written as they come.

    Timestamps are µs by default (capture ns truncated, what every tool reads)
    or ns with ``nano``. Each record's original length is the stored wire
    length as it is (see the module docstring), the captured length the bytes.
    """

    def __init__(self, fh: BinaryIO, nano: bool = False):
        self.fh, self.nano = fh, nano
        fh.write(struct.pack("<IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, ETHERNET))

    def write(self, ts_ns: int, wire_len: int, data: bytes) -> None:
        sec, ns = divmod(ts_ns, NS)
        self.fh.write(struct.pack("<IIII", sec, ns if self.nano else ns // 1000, len(data), wire_len))
        self.fh.write(data)
