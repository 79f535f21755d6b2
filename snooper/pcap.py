"""pcap out of and into the store: ``export-pcap`` and ``import-pcap``.

The file format is ``appliance.pcapfile``'s; this module is the store side.
Export queries the batches of a time range, merges their frames into time
order (batches of several runs overlap, see ``_merged``), filters them by
host and port and writes them, each with its stored capture time and wire
length. Import stores a file's frames exactly as read, through the same
batch writer (and the spool if the store is away) as the snooper.
"""

from __future__ import annotations

import datetime as dt
import heapq
import ipaddress
import struct
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

from appliance import pcapfile, store, timespec

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
           sensor: str | None = None, run: str | None = None, nano: bool = False) -> int:
    """Write the matching frames as a classic pcap (µs, or ns with ``nano``) to ``out``; return how many."""
    query: dict = {"t0": {"$lte": timespec.utc(until_ns) + dt.timedelta(milliseconds=1)},
                   "t1": {"$gte": timespec.utc(since_ns) - dt.timedelta(milliseconds=1)}}
    if sensor:
        query["sensor"] = sensor
    if run:
        query["run"] = run
    host_b = ipaddress.ip_address(host).packed if host else None
    writer = pcapfile.Writer(out, nano=nano)
    count = 0
    for ts, wire, data in _merged(db[store.FRAMES].find(query).sort("first_ns", 1)):
        if ts < since_ns or ts > until_ns or not matches(data, host_b, port):
            continue
        writer.write(ts, wire, data)
        count += 1
    return count


# --- import -----------------------------------------------------------------------

def import_file(cfg, path: str | Path, log, dedupe: bool = False, sensor: str | None = None, chunk: int = 1000):
    """Store a capture file's frames as if captured; return (counters, run id, spooled frames still waiting).

    A file that fails before its first record raises ``PcapError`` before anything starts. A fault after it
    (a capture cut off mid-write) keeps the frames read so far and is counted and logged.
    """
    from . import counters as counters_mod
    from .batch import new_run_id
    from .capture import Capture
    from .dedupe import Dedupe
    from .service import open_spool
    from .writer import Writer

    records = pcapfile.read(path)
    first = next(records, None)
    c = counters_mod.new()
    run = "import-" + new_run_id()
    spool = open_spool(cfg.snooper, c, log, replay=True)
    writer = Writer(store.database(cfg.mongodb, "pisnoop-import"), spool, c, log, cfg)
    cap = Capture(None, Dedupe(cfg.snooper.dedupe_window if dedupe else 0), writer, c, sensor or cfg.snooper.sensor,
                  run, cfg.snooper.batch_size, 1e9, threading.Event(), blocking=True)
    writer.start()
    try:
        frames: list = [] if first is None else [first]
        try:
            for f in records:
                frames.append(f)
                if len(frames) >= chunk:
                    cap.add(frames)
                    frames = []
        except pcapfile.PcapError as exc:
            c["dropped_parse"] += 1
            log.warning("stopped reading: %s", exc)
        cap.add(frames)
        cap.flush()
    finally:
        writer.stop(timeout=600)
        left = spool.frames if spool.owner else c["spooled"]
        spool.close()
    return c, run, left
