"""The analyser service: follow the store, analyse, flag, expire, report health.

Each step reads up to ``Follower.limit`` new batches, analyses them, writes
their flows, then the resume point. A store that goes away is logged in one
line and retried; the in-memory flows and windows of the failed step are
dropped and rebuilt from the store, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import pymongo.errors

from appliance import indexes, service, store
from appliance.neverban import own_addresses

from . import flags as flags_mod
from . import policy as policy_mod
from .engine import Engine
from .flows import FlowTable, MongoFlows
from .reader import Follower
from .status import Status

log = logging.getLogger("pisnoop.analyser")


class Analyser:
    def __init__(self, cfg, db, policy=None):
        self.cfg = cfg
        self.db = db
        self.policy = policy or policy_mod.load(cfg.analyser.policy_file)
        self.follower = Follower(db, cfg.snooper.sensor)
        self.flows = FlowTable(MongoFlows(db), cfg.snooper.sensor, self.follower.step)
        self.book = flags_mod.FlagBook(cfg, flags_mod.MongoFlags(db), cfg.snooper.sensor, own_addresses(cfg))
        self.engine = Engine(cfg, self.policy, self.flows, self.book)
        self.status = Status(db, cfg, self.follower, self.engine)
        self.stop = threading.Event()

    def step(self) -> int:
        """Analyse the next batches; return how many were read (0: caught up)."""
        docs = self.follower.next_batches()
        if not docs:
            return 0
        step = self.follower.step + 1
        self.engine.run_step([(d["_id"], 0, store.batch_frames(d)) for d in docs], step)
        self.follower.commit(docs, step)
        return len(docs)

    def housekeeping(self) -> None:
        n = self.book.expire()
        if n:
            log.info("%d flag(s) expired", n)
        self.book.refresh()

    def recover(self) -> None:
        """After a failed step: forget unwritten flows and window state; reload the position."""
        self.follower = Follower(self.db, self.cfg.snooper.sensor)
        self.flows.flows.clear()
        self.flows.committed_step = self.follower.step
        self.engine.reset_windows()
        self.status.follower = self.follower

    def run(self, once: bool = False) -> int:
        cfg = self.cfg.analyser
        wd = service.Watchdog()
        next_status = next_house = 0.0
        service.notify("READY=1")
        log.info("analysing sensor %s with %s (%s)", self.cfg.snooper.sensor, self.policy.source,
                 ", ".join(c.name for c in self.engine.classifiers) or "no classifiers")
        failing = False
        self.follower.rescan()
        while not self.stop.is_set():
            wd.kick()
            try:
                read = self.step()
                now = time.monotonic()
                if now >= next_house:
                    self.housekeeping()
                    next_house = now + cfg.poll_interval
                if now >= next_status:
                    self.status.report()
                    next_status = now + cfg.status_interval
                if failing:
                    log.warning("store reachable again; continuing from step %d", self.follower.step)
                    failing = False
            except pymongo.errors.PyMongoError as exc:
                if not failing:
                    log.warning("store unavailable (%s: %s); retrying every %.1f s", exc.__class__.__name__,
                                str(exc)[:160], cfg.poll_interval)
                failing = True
                self.stop.wait(cfg.poll_interval)
                try:
                    self.recover()
                except pymongo.errors.PyMongoError:
                    pass
                continue
            if not read:
                if once:
                    break
                self.stop.wait(cfg.poll_interval)
        service.notify("STOPPING=1")
        try:
            self.housekeeping()
            self.status.report()
        except pymongo.errors.PyMongoError as exc:
            log.warning("final status not written: %s", exc.__class__.__name__)
        return 0


def serve(cfg, log_level: str = "INFO", once: bool = False) -> int:
    policy = policy_mod.load(cfg.analyser.policy_file)  # a bad policy is refused before anything else
    service.setup_logging("analyser", log_level)
    db = store.database(cfg.mongodb, "pisnoop-analyser")
    store.ping(db)
    indexes.ensure_indexes(db, cfg)
    analyser = Analyser(cfg, db, policy)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: analyser.stop.set())
    if not once:
        service.start_metrics(cfg.metrics, cfg.metrics.analyser_port, log)
    return analyser.run(once=once)
