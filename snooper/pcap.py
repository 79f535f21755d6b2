"""pcap out of and into the store: ``export-pcap`` and ``import-pcap``.

Export writes a classic (microsecond) pcap with dpkt's writer: each record
keeps the frame's original capture time (ns truncated to us) and its
original wire length, so a snaplen-truncated frame stays marked as such.
Frames come out in time order even when batches of several runs overlap (a
merge keyed on time, see ``_merged``). Import reads classic pcap (us or ns)
and pcapng and stores the frames exactly as in the file, through the same
batch writer (and the spool if the store is away) as the snooper.
"""

from __future__ import annotations

import datetime as dt
import decimal
import heapq
import ipaddress
import re
import struct
import threading
from typing import BinaryIO, Iterator

import dpkt

from appliance import store

LINKTYPE = dpkt.pcap.DLT_EN10MB
SNAPLEN = 262144


class PcapError(ValueError):
    """The pcap file cannot be read as Ethernet frames; the message says why."""


# --- time arguments --------------------------------------------------------------

_REL = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")


def parse_time(text: str, now: dt.datetime | None = None) -> int:
    """ns since the epoch from ISO 8601 (UTC if no zone), epoch seconds, ``now`` or ``-30s``/``-5m``/``-2h``/``-1d``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    t = text.strip()
    m = _REL.match(t)
    if t == "now":
        when = now
    elif m:
        when = now - dt.timedelta(seconds=float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])
    else:
        try:
            return int(decimal.Decimal(t) * 1_000_000_000)  # exact: a float would shift the ns
        except decimal.InvalidOperation:
            pass
        try:
            when = dt.datetime.fromisoformat(t)
        except ValueError:
            raise ValueError(f"{text!r}: expected ISO 8601 (2024-05-01T12:00:00Z), epoch seconds, now, or -30s/-5m/-2h/-1d") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


# --- export ---------------------------------------------------------------------

def _l3l4(frame: bytes) -> tuple[bytes, bytes, int | None, int | None] | None:
    """(src ip, dst ip, src port, dst port) of an IPv4/IPv6 frame (ports None unless TCP/UDP); None otherwise."""
    off = 12
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, off)[0]
    while etype in (0x8100, 0x88A8) and len(frame) >= off + 6:
        off += 4
        etype = struct.unpack_from("!H", frame, off)[0]
    off += 2
    if etype == 0x0800 and len(frame) >= off + 20:
        ihl = (frame[off] & 0x0F) * 4
        proto = frame[off + 9]
        frag = struct.unpack_from("!H", frame, off + 6)[0] & 0x1FFF
        src, dst = frame[off + 12:off + 16], frame[off + 16:off + 20]
        l4 = off + ihl if not frag else None
    elif etype == 0x86DD and len(frame) >= off + 40:
        proto = frame[off + 6]
        src, dst = frame[off + 8:off + 24], frame[off + 24:off + 40]
        l4 = off + 40
    else:
        return None
    if l4 is not None and proto in (6, 17) and len(frame) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        return src, dst, sport, dport
    return src, dst, None, None


def matches(frame: bytes, host: bytes | None, port: int | None) -> bool:
    if host is None and port is None:
        return True
    info = _l3l4(frame)
    if info is None:
        return False
    src, dst, sport, dport = info
    if host is not None and host not in (src, dst):
        return False
    return port is None or port in (sport, dport)


def _merged(docs) -> Iterator[tuple[int, int, bytes]]:
    """Frames of batches (sorted by first_ns) in time order; stable, holding only overlapping batches."""
    heap: list = []
    n = 0
    for doc in docs:
        while heap and heap[0][0] < doc["first_ns"]:
            ts, _, wire, data = heapq.heappop(heap)
            yield ts, wire, data
        for f in store.batch_frames(doc):
            heapq.heappush(heap, (f.ts_ns, n, f.wire_len, f.data))
            n += 1
    while heap:
        ts, _, wire, data = heapq.heappop(heap)
        yield ts, wire, data


def export(db, out: BinaryIO, since_ns: int, until_ns: int, host: str | None = None, port: int | None = None,
           sensor: str | None = None, run: str | None = None) -> int:
    """Write the matching frames as a classic pcap to ``out``; return how many."""
    query: dict = {"t0": {"$lte": store.utc_from_ns(until_ns) + dt.timedelta(milliseconds=1)},
                   "t1": {"$gte": store.utc_from_ns(since_ns) - dt.timedelta(milliseconds=1)}}
    if sensor:
        query["sensor"] = sensor
    if run:
        query["run"] = run
    host_b = ipaddress.ip_address(host).packed if host else None
    writer = dpkt.pcap.Writer(out, snaplen=SNAPLEN, linktype=LINKTYPE)
    pack_hdr = writer._pack_hdr  # dpkt's record header; its writepkt() would set len = caplen
    count = 0
    for ts, wire, data in _merged(db[store.FRAMES].find(query).sort("first_ns", 1)):
        if ts < since_ns or ts > until_ns or not matches(data, host_b, port):
            continue
        sec, ns = divmod(ts, 1_000_000_000)
        out.write(pack_hdr(sec, ns // 1000, len(data), max(wire, len(data))) + data)
        count += 1
    return count


# --- import -----------------------------------------------------------------------

def read_frames(fh: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """``(ts_ns, wire_len, data)`` of each record of a classic pcap or pcapng file of Ethernet frames."""
    head = fh.read(dpkt.pcap.FileHdr.__hdr_len__)
    if len(head) < 4:
        raise PcapError("not a pcap file: too short")
    if head[:4] == b"\x0a\x0d\x0d\x0a":
        fh.seek(0)
        yield from _read_pcapng(fh)
        return
    if len(head) < dpkt.pcap.FileHdr.__hdr_len__:
        raise PcapError("not a pcap file: truncated header")
    magic_le = struct.unpack("<I", head[:4])[0]
    le = magic_le in (dpkt.pcap.TCPDUMP_MAGIC, dpkt.pcap.TCPDUMP_MAGIC_NANO)
    fhdr = (dpkt.pcap.LEFileHdr if le else dpkt.pcap.FileHdr)(head)
    if fhdr.magic not in (dpkt.pcap.TCPDUMP_MAGIC, dpkt.pcap.TCPDUMP_MAGIC_NANO):
        raise PcapError("not a pcap file: unknown magic")
    if fhdr.linktype != LINKTYPE:
        raise PcapError(f"link type {fhdr.linktype}: only Ethernet (1) can be imported")
    scale = 1 if fhdr.magic == dpkt.pcap.TCPDUMP_MAGIC_NANO else 1000
    phdr = dpkt.pcap.LEPktHdr if le else dpkt.pcap.PktHdr
    hlen = phdr.__hdr_len__
    while True:
        raw = fh.read(hlen)
        if not raw:
            return
        if len(raw) < hlen:
            raise PcapError("truncated record header at the end of the file")
        h = phdr(raw)
        data = fh.read(h.caplen)
        if len(data) < h.caplen:
            raise PcapError("truncated record at the end of the file")
        yield h.tv_sec * 1_000_000_000 + h.tv_usec * scale, max(h.len, h.caplen), data


def _read_pcapng(fh: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    try:
        reader = dpkt.pcapng.Reader(fh)
    except (ValueError, dpkt.dpkt.UnpackError) as exc:
        raise PcapError(f"not a readable pcapng file: {exc}") from None
    if reader.datalink() != LINKTYPE:
        raise PcapError(f"link type {reader.datalink()}: only Ethernet (1) can be imported")
    for ts, data in reader:
        yield int(round(float(ts) * 1e6)) * 1000, len(data), bytes(data)


def import_file(cfg, fh: BinaryIO, log, dedupe: bool = False, sensor: str | None = None, chunk: int = 1000):
    """Store a pcap's frames as if captured; return (counters, run id, spooled frames still waiting)."""
    from . import counters as counters_mod
    from .batch import new_run_id
    from .capture import Capture
    from .dedupe import Dedupe
    from .service import open_spool
    from .writer import Writer

    c = counters_mod.new()
    run = "import-" + new_run_id()
    spool = open_spool(cfg.snooper, c, log, replay=True)
    writer = Writer(store.database(cfg.mongodb, "pisnoop-import"), spool, c, log, cfg)
    cap = Capture(None, Dedupe(cfg.snooper.dedupe_window if dedupe else 0), writer, c, sensor or cfg.snooper.sensor,
                  run, cfg.snooper.batch_size, 1e9, threading.Event(), blocking=True)
    writer.start()
    try:
        frames: list = []
        try:
            for f in read_frames(fh):
                frames.append(f)
                if len(frames) >= chunk:
                    cap.add(frames)
                    frames = []
        except PcapError as exc:
            c["dropped_parse"] += 1
            log.warning("%s: stopped reading: %s", getattr(fh, "name", "pcap"), exc)
            if not c["captured"] and not frames:
                raise
        cap.add(frames)
        cap.flush()
    finally:
        writer.stop(timeout=600)
        left = spool.frames if spool.owner else c["spooled"]
        spool.close()
    return c, run, left
