"""Health of the analyser: frames/s, lag, skipped counters, packets per family, verified and unverified
traffic (with its top claimed sources and the defence), exempt flags, routers and shared prefixes learned — on
the log, in the status document ``analyser:<sensor>`` and on the Prometheus endpoint."""

from __future__ import annotations

import datetime as dt
import logging
import time

from appliance import service, store

from .report import DEFENCE

log = logging.getLogger("pisnoop.analyser")
_METRICS = None


def _metrics():
    """The Prometheus series, created once per process (the registry is global)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Gauge
        _METRICS = {
            "frames": Counter("pisnoop_analyser_frames", "stored frames read by the analyser"),
            "skipped": Counter("pisnoop_analyser_skipped_frames", "frames not analysed, by reason", ["reason"]),
            "flags": Counter("pisnoop_analyser_flags", "flags raised"),
            "exempt": Counter("pisnoop_analyser_flags_exempt", "verdicts recorded exempt (never-ban list)"),
            "packets": Counter("pisnoop_analyser_packets", "packets analysed, by IP family", ["family"]),
            "unverified": Counter("pisnoop_analyser_unverified_packets",
                                  "packets toward a server no verified connection holds (never a ban)"),
            "fps": Gauge("pisnoop_analyser_frames_per_second", "frames analysed per second (last interval)"),
            "lag": Gauge("pisnoop_analyser_lag_seconds", "newest stored batch minus the last one read"),
        }
    return _METRICS


SKIP_REASONS = ("malformed", "not_ip", "corrupt_batches", "replayed")


class Status:
    def __init__(self, db, cfg, follower, engine, alerts=None):
        self.coll = db[store.STATUS]
        self.sensor = cfg.snooper.sensor
        self.id = f"analyser:{self.sensor}"
        self.follower, self.engine = follower, engine
        self.alerts = alerts
        self.metrics = _metrics() if cfg.metrics.enabled else None
        self.last_t = time.monotonic()
        self.high = dict(engine.counters)       # each counter's highest count reported (``report``)
        self.fps = 0.0

    def report(self) -> dict:
        """Write the status document, update the metrics, log one line; return the document."""
        now_m = time.monotonic()
        c = dict(self.engine.counters)
        c["late_batches"] = self.follower.late
        c["flags_refused"] = self.engine.flagbook.refused
        c["unverified"] = c.get("packets", 0) - c.get("verified", 0)
        # what is new since the last report: counted beyond each counter's highest count so far, since after a
        # store failure the frame counts go back to the resume point (Engine.rollback) and count the same again
        new = {k: max(0, v - self.high.get(k, 0)) for k, v in c.items()}
        self.high = {k: max(v, self.high.get(k, 0)) for k, v in c.items()}
        dt_s = max(now_m - self.last_t, 1e-6)
        self.fps = new.get("frames", 0) / dt_s
        lag = self.follower.lag_seconds()
        if self.metrics:
            m = self.metrics
            m["frames"].inc(new.get("frames", 0))
            m["flags"].inc(new.get("flags", 0))
            m["exempt"].inc(new.get("flags_exempt", 0))
            for fam in ("v4", "v6"):
                m["packets"].labels(fam).inc(new.get(f"packets_{fam}", 0))
            m["unverified"].inc(new["unverified"])
            for r in SKIP_REASONS:
                m["skipped"].labels(r).inc(new.get(r, 0))
            m["fps"].set(self.fps)
            m["lag"].set(lag)
        self.last_t = now_m
        doc = {
            "_id": self.id, "component": "analyser", "sensor": self.sensor,
            "updated_at": dt.datetime.now(dt.timezone.utc),
            "counters": {k: int(v) for k, v in c.items()},
            "frames_per_second": round(self.fps, 1), "lag_seconds": round(lag, 3),
            "resume": self.follower.resume, "step": self.follower.step,
            "policy": self.engine.policy.source, "classifiers": [cl.name for cl in self.engine.classifiers],
            "unverified_sources": [{"source": src, "packets": n} for src, n in self.engine.unverified_top(10)],
            "unverified_defence": DEFENCE, "neighbours": self.engine.neighbours.describe(),
            "servers_exempt": self.engine.servers.addresses()[:32],
            "health": service.health(),
        }
        if self.alerts is not None:
            doc["alerts"] = {**self.alerts.counters, "pending": self.alerts.pending()}
        self.coll.replace_one({"_id": self.id}, doc, upsert=True)
        log.info("%d frames (%.0f/s), lag %.1f s, skipped %s, flags %d, exempt %d, unverified %d", c.get("frames", 0),
                 self.fps, lag, {r: c.get(r, 0) for r in SKIP_REASONS if c.get(r)} or 0, c.get("flags", 0),
                 c.get("flags_exempt", 0), c["unverified"])
        return doc
