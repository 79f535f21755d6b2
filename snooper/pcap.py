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
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

from appliance import l3l4, pcapfile, store, timespec

# --- export ---------------------------------------------------------------------

def matches(frame: bytes, host: bytes | None, port: int | None) -> bool:
    """Whether a frame is from or to ``host`` (packed IPv4 or IPv6) and ``port`` (TCP or UDP), either or both."""
    if host is None and port is None:
        return True
    h = l3l4.read(frame)
    if h.__class__ is str:
        return False
    _v, src, dst, proto, sport, dport = h[:6]
    if host is not None and host not in (src, dst):
        return False
    return port is None or (proto in (l3l4.TCP, l3l4.UDP) and port in (sport, dport) and port != 0)


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
           sensor: str | None = None, run: str | None = None, nano: bool = False, progress=None) -> int:
    """Write the matching frames as a classic pcap (µs, or ns with ``nano``) to ``out``; return how many.

    ``progress`` (``appliance.progress.Progress``, total: the range in ns) hears of every 1,024 frames read."""
    query: dict = {"t0": {"$lte": timespec.utc(until_ns) + dt.timedelta(milliseconds=1)},
                   "t1": {"$gte": timespec.utc(since_ns) - dt.timedelta(milliseconds=1)}}
    if sensor:
        query["sensor"] = sensor
    if run:
        query["run"] = run
    host_b = ipaddress.ip_address(host).packed if host else None
    writer = pcapfile.Writer(out, nano=nano)
    count = seen = 0
    for ts, wire, data in _merged(db[store.FRAMES].find(query).sort("first_ns", 1)):
        seen += 1
        if progress is not None and not seen & 1023:
            progress.update(seen, ts - since_ns)
        if ts < since_ns or ts > until_ns or not matches(data, host_b, port):
            continue
        writer.write(ts, wire, data)
        count += 1
    return count


# --- import -----------------------------------------------------------------------

def import_file(cfg, path: str | Path, log, dedupe: bool = False, sensor: str | None = None, chunk: int = 1000,
                progress=None):
    """Store a capture file's frames as if captured; return (counters, run id, spooled frames still waiting).

    ``progress`` (``appliance.progress.Progress``, total: the file's size) hears of every chunk, with the
    bytes read so far estimated from the records (a record header and its data).

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
            at = 0
            for f in records:
                frames.append(f)
                if len(frames) >= chunk:
                    cap.add(frames)
                    if progress is not None:
                        at += sum(16 + len(x[2]) for x in frames)
                        progress.update(c["captured"], at)
                    frames = []
        except pcapfile.PcapError as exc:
            c["dropped_parse"] += 1
            log.warning("stopped reading: %s", exc)
        cap.add(frames)
        cap.flush()
    finally:
        writer.stop(timeout=600, store_seconds=600)     # a file can wait for the store (a service stop cannot)
        left = spool.frames if spool.owner else c["spooled"]
        spool.close()
    return c, run, left
