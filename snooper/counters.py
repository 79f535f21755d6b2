"""The snooper's accounting: every frame is stored, a counted duplicate, or a counted loss.

Counters are plain ints in one dict; each is written by one thread only (or
under the spool's lock), read by the status thread and by the Prometheus
collector at scrape time, so the hot loop pays for a dict increment and
nothing else.
"""

from __future__ import annotations

from appliance.retention import COUNTERS as RETENTION

NAMES = {
    "captured": "frames read from the capture ring (or from a pcap by import-pcap)",
    "kernel_packets": "frames the kernel offered to the socket (PACKET_STATISTICS tp_packets, incl. drops)",
    "kernel_dropped": "frames the kernel dropped because the ring was full (PACKET_STATISTICS tp_drops)",
    "ring_freezes": "times the kernel found the ring full (PACKET_STATISTICS tp_freeze_q_cnt)",
    "dropped_parse": "frames whose ring or pcap record header was inconsistent: not storable",
    "dropped_spool_full": "frames dropped because the spool was full (spool_full_policy)",
    "duplicates": "frames dropped as byte-identical to one kept within dedupe_window",
    "truncated": "frames stored shorter than on the wire (snaplen, or larger than a ring block)",
    "batches": "batches formed",
    "stored": "frames written to the store (directly or replayed)",
    "stored_batches": "batches written to the store",
    "spooled": "frames written to the spool while the store was away or slow",
    "spooled_batches": "batches written to the spool",
    "replayed": "frames replayed from the spool into the store",
    "spool_corrupt": "spool files that failed their checksum (moved to spool_dir/corrupt)",
    "dropped_corrupt": "frames lost in spool files that failed their checksum",
    "spool_inherited": "frames found in the spool at start (left by an earlier run, replayed by this one)",
    "queue_overflows": "batches sent straight to the spool because the writer queue was full",
    "stop_spooled": "frames queued for the store at a stop that went to the spool when the stop's time for the "
                    "store was up (the next run replays them)",
    "store_errors": "failed store writes (each then spooled)",
    **RETENTION,   # the snooper owns frames, so it trims them (appliance/retention.py)
}


def new() -> dict[str, int]:
    return dict.fromkeys(NAMES, 0)


def unaccounted(c: dict[str, int], pending_frames: int = 0, spool_frames: int = 0) -> int:
    """Frames captured but neither stored, duplicate, dropped with a cause, in the spool nor in flight (must be 0).

    ``stored`` includes replayed frames; ``spool_frames`` is what the spool holds now.
    """
    return (c["captured"] + c["spool_inherited"] - c["duplicates"] - c["stored"] - c["dropped_spool_full"]
            - c["dropped_corrupt"] - spool_frames - pending_frames)


class Collector:
    """Prometheus collector reading the live dict at scrape time."""

    def __init__(self, counters: dict[str, int], gauges, sensor: str):
        self.counters = counters
        self.gauges = gauges
        self.sensor = sensor

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        for name, help_ in NAMES.items():
            m = CounterMetricFamily(f"pisnoop_snooper_{name}", help_, labels=["sensor"])
            m.add_metric([self.sensor], self.counters.get(name, 0))
            yield m
        for name, value in self.gauges().items():
            g = GaugeMetricFamily(f"pisnoop_snooper_{name}", name.replace("_", " "), labels=["sensor"])
            g.add_metric([self.sensor], value)
            yield g
