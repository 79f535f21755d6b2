"""The analyser service: follow the store, analyse, flag, expire, report health.

Each step reads up to ``Follower.limit`` new batches and analyses them. Every
``analyser.flush_interval`` seconds (and when the service stops) the flows
changed since the last write are written, then the resume point: one write of
each active flow per interval, not per step (at 100 Mb/s of small frames a
step is ~0.4 s, and rewriting ~2,000 flow records that often was most of the
store's work). Flags are written the moment they are raised. A restart, or a
store that goes away (logged in one line and retried), reads again from the
last resume point: the in-memory flows and windows are dropped and rebuilt
from the store, a flow written after that point skips the batches it
holds (analyser/flows.py), and the status counters go back to their counts
at that point, so nothing is counted twice or lost.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import pymongo.errors

from appliance import alerts, indexes, service, statusview, store, watch
from appliance.errors import UsageError
from appliance.neverban import OwnAddresses

from . import flags as flags_mod
from . import policy as policy_mod
from .engine import engine_class
from .flows import FlowTable, MongoFlows, latest_per_key
from .packed import Packed
from .reader import Follower
from .status import Status

log = logging.getLogger("pisnoop.analyser")
# What a reload (SIGHUP) changes in a running analyser; anything else (server ports, sensor, neighbours, the store,
# metrics) is named in the reload's log line as needing a restart.
LIVE = ("xmpp.threshold_ppm", "xmpp.per_ip_threshold_ppm", "xmpp.per_host_threshold_ppm",
        "xmpp.per_prefix_threshold_ppm", "xmpp.connection_cost", "xmpp.window_seconds", "enforce",
        "analyser.policy_file", "analyser.poll_interval", "analyser.status_interval", "mongodb.retention",
        "alerts")


# Flow records written in bulk writes of at most this many: the snooper's inserts get the store in between (one
# write of ~2,000 records held nx-27017 for a second or more under load, and the batches waited behind it)
WRITE_CHUNK = 256


class SensorFlows(MongoFlows):
    """The flows of this sensor only: two appliances on one store see the same private 5-tuples
    (``idx_flows_sensor_key``), and one analyser must never continue the other's flow. (Here, not in
    ``analyser/flows.py``, while that module is being reworked; ``MongoFlows`` can take it over.)"""

    def __init__(self, db, sensor: str):
        super().__init__(db)
        self.sensor = sensor

    def latest(self, keys) -> list[dict]:
        return latest_per_key(self.coll.find({"sensor": self.sensor, "key": {"$in": list(keys)}}))

    def write(self, docs: list[dict]) -> None:
        """Whole records, upserted by ``_id`` with ``sensor`` and ``key`` in the filter too: an upsert into a
        collection sharded on ``{sensor: 1, key: 1}`` (docs/FLEET.md) must name the whole shard key."""
        from pymongo import ReplaceOne
        for k in range(0, len(docs), WRITE_CHUNK):
            self.coll.bulk_write([ReplaceOne({"_id": d["_id"], "sensor": d["sensor"], "key": d["key"]}, d, upsert=True)
                                  for d in docs[k:k + WRITE_CHUNK]], ordered=False)


class Analyser:
    def __init__(self, cfg, db, policy=None):
        self.cfg = cfg
        self.db = db
        self.policy = policy or policy_mod.load(cfg.analyser.policy_file)
        self.follower = Follower(db, cfg.snooper.sensor, frames_db=store.frames_reader(db, cfg.mongodb))
        self.flows = FlowTable(SensorFlows(db, cfg.snooper.sensor), cfg.snooper.sensor, self.follower.saved_step,
                               pending=self._pending())
        self.own = OwnAddresses()                 # read again at each housekeeping: addresses change
        self.book = flags_mod.FlagBook(cfg, flags_mod.MongoFlags(db, cfg.snooper.sensor), cfg.snooper.sensor,
                                       self.own.current(cfg))
        self.alerts = alerts.Alerter(cfg.alerts, cfg.snooper.sensor)
        self.watch = watch.Watch(cfg.alerts)
        self.engine = engine_class(cfg)(cfg, self.policy, self.flows, self.book, on_flag=self.flagged)
        self.engine.checkpoint(self.follower.saved_step)
        self.status = Status(db, cfg, self.follower, self.engine, self.alerts)
        self.stop = threading.Event()
        self.reloader: service.Reloader | None = None
        self._next_flush = 0.0                  # the first step writes at once (a restart's position moves on)

    def apply(self, cfg) -> list[str]:
        """Take a reloaded config (``service.Reloader``): the policy is read again and the classifiers are built
        anew with the new thresholds (their windows start empty); flows, flags and the position are kept."""
        policy = policy_mod.load(cfg.analyser.policy_file)
        ports = frozenset(policy_mod.server_ports(policy, cfg))
        if ports != self.engine.server_ports:
            raise UsageError(f"the policy's server ports would be {sorted(ports)}, not "
                             f"{sorted(self.engine.server_ports)}: a change of ports needs a restart")
        classifiers = policy_mod.build(policy, cfg, self.engine.neighbours)
        self.cfg = self.engine.cfg = cfg
        self.policy = self.engine.policy = policy
        self.engine.classifiers = classifiers
        self.book.cfg, self.book.enforce = cfg, cfg.enforce     # the never-ban list: at the next refresh
        self.alerts.configure(cfg.alerts)                       # webhooks, queue and retry for what comes next
        self.watch.cfg = cfg.alerts
        try:
            indexes.ensure_indexes(self.db, cfg)                # retention TTLs
        except pymongo.errors.PyMongoError as exc:
            log.warning("reload: indexes not ensured (%s); the retention TTLs change at the next start",
                        exc.__class__.__name__)
        return [f"classifiers rebuilt from {policy.source}"]

    def step(self) -> int:
        """Analyse the next batches; return how many were read (0: caught up). Flows and the resume point are
        written when ``analyser.flush_interval`` has passed since they last were."""
        docs = self.follower.next_batches()
        if docs:
            step = self.follower.step + 1
            self.engine.run_step([(d["_id"], 0, Packed(store.batch_blob(d))) for d in docs], step, flush=False)
            self.follower.advance(docs, step)
        if time.monotonic() >= self._next_flush:
            self.flush()
        return len(docs)

    def flush(self) -> None:
        """Write the flows changed since the last write (marked with the step), then the resume point; first the
        old position naming the batches since, so that a kill in between loses and doubles nothing. Not while a
        pending write of the run before is read again (Follower.recovering): until then a kill starts again from
        the same position, with the same pending write."""
        f = self.follower
        if not f.unsaved or f.recovering:
            return
        f.save_pending()
        self.engine.flush(f.step)
        self.engine.checkpoint(f.step)
        f.save()
        self.flows.pending = None
        self._next_flush = time.monotonic() + self.cfg.analyser.flush_interval

    def _pending(self):
        return dict(self.follower.pendings) or None

    def flagged(self, doc: dict) -> None:
        """A flag (or an exempt record) was written: its alert."""
        event = "flag_raised" if doc.get("status") == "flagged" else "flag_exempt"
        self.alerts.emit(event, **alerts.flag_fields(doc))

    def housekeeping(self) -> None:
        ended = self.book.expire()
        if ended:
            log.info("%d flag(s) expired", len(ended))
        for doc in ended:
            self.alerts.emit("flag_expired", **alerts.flag_fields(doc))
        self.book.own = self.own.current(self.cfg)
        self.book.refresh()

    def look(self, store_up: bool) -> None:
        """The watcher's turn: the store's state and, when it answers, the other services' status documents."""
        events = self.watch.store(store_up, time.monotonic())
        if store_up:
            ids = statusview.status_ids(self.cfg.snooper.sensor)
            docs = {name: self.db[store.STATUS].find_one({"_id": ids[name]}) for name in watch.WATCHED}
            events += self.watch.documents(docs, flags_mod.now_utc())
        for event, fields in events:
            self.alerts.emit(event, **fields)

    def recover(self) -> None:
        """After a failed step: forget unwritten flows and window state; reload the position, and take back the
        frame counts of the batches after it (they are read again)."""
        self.follower = Follower(self.db, self.cfg.snooper.sensor,
                                 frames_db=store.frames_reader(self.db, self.cfg.mongodb))
        self.flows.flows.clear()
        self.flows.replaced = []
        self.flows.pending = self._pending()
        self.flows.committed_step = self.follower.saved_step
        self.engine.reset_windows()
        self.engine.rollback(self.follower.saved_step)
        self.status.follower = self.follower

    def run(self, once: bool = False) -> int:
        wd = service.Watchdog()
        next_status = next_house = 0.0
        service.notify("READY=1")
        log.info("analysing sensor %s with %s (%s)", self.cfg.snooper.sensor, self.policy.source,
                 ", ".join(c.name for c in self.engine.classifiers) or "no classifiers")
        failing = False
        self.stale = False                      # a failed step's work is still in memory: rebuild before going on
        self.follower.rescan()
        while not self.stop.is_set():
            wd.kick()
            if self.reloader is not None:
                self.reloader.check()
            cfg = self.cfg.analyser
            try:
                if self.stale:
                    self.recover()
                    self.stale = False
                read = self.step()
                now = time.monotonic()
                if now >= next_house:
                    self.housekeeping()
                    next_house = now + cfg.poll_interval
                if now >= next_status:
                    self.look(store_up=True)
                    self.status.report()
                    next_status = now + cfg.status_interval
                if failing:
                    log.warning("store reachable again; continuing from step %d", self.follower.step)
                    failing = False
            except pymongo.errors.PyMongoError as exc:
                if not failing:
                    log.warning("store unavailable (%s: %s); retrying every %.1f s", exc.__class__.__name__,
                                str(exc)[:160], cfg.poll_interval)
                failing = self.stale = True
                self.look(store_up=False)
                self.stop.wait(cfg.poll_interval)
                continue
            if not read:
                if once:
                    break
                self.stop.wait(cfg.poll_interval)
        service.notify("STOPPING=1")
        try:
            if not self.stale:                  # (a failed step's partial counts are never written)
                self.flush()                    # what was analysed since the last write
            self.housekeeping()
            self.status.report()
        except pymongo.errors.PyMongoError as exc:
            log.warning("final flows or status not written (%s): the next start reads again from step %d",
                        exc.__class__.__name__, self.follower.saved_step)
        self.alerts.close(wait=self.cfg.alerts.timeout_seconds)
        return 0


def serve(cfg, log_level: str = "INFO", once: bool = False) -> int:
    policy = policy_mod.load(cfg.analyser.policy_file)  # a bad policy is refused before anything else
    service.setup_logging("analyser", log_level)
    db = store.database(cfg.mongodb, "pisnoop-analyser")
    store.ping(db)
    indexes.ensure_indexes(db, cfg)
    analyser = Analyser(cfg, db, policy)
    analyser.reloader = service.Reloader(cfg, LIVE, analyser.apply, log).install()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: analyser.stop.set())
    if not once:
        service.start_metrics(cfg.metrics, cfg.metrics.analyser_port, log)
    service.tune_gc()
    return analyser.run(once=once)
