"""The controller's one link to the store: a plain thread, never the event loop.

It ensures the indexes (``appliance.indexes``) on its first contact with the
store, polls the ``flags`` that apply to its sensor (``flagdoc.applies_to``:
its own and the fleet's, filtered by the store) by ``updated_at`` (no change
streams: MongoDB 4.4 on a single-node Pi has none) and the small
``never_ban`` collection whole (handed on when it changed, and always before
a snapshot's flags, so an exempt subject is never banned for a moment),
loads every active flag when asked (each switch connect), and writes the
controller's status document. It also watches the analyser (``appliance.watch``,
``alerts.service_down_seconds`` on the analyser's status document): the
analyser alerts when this controller or the snooper goes quiet, and this
thread when the analyser does, so no service is its own only witness.
pymongo blocks for up to ``mongodb.timeout_ms`` when the store is
away, so it runs here and hands results to the os-ken event loop through
``post`` (a thread-safe queue put). A store outage is logged once, counted,
and retried every poll interval; the switch keeps its flows meanwhile.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Callable, Optional

import pymongo

from appliance import alerts, flagdoc, indexes, neverban, service, statusview, store, watch
from appliance.flagdoc import EXPIRES_AT, FLAGGED, STATUS, UPDATED_AT

from .messages import Flags

log = logging.getLogger("pisnoop.controller.store")

# Each poll re-reads the flags changed in the last OVERLAP before the newest change seen. The stamps come from the
# clocks of whoever wrote them (this sensor's analyser, another sensor's, an operator's `flags ban`), so the window is
# the clock skew tolerated between them (docs/FLEET.md: run NTP); only documents that changed are handed on (a
# change that kept its stamp, a writer that did not bump it, is one too).
OVERLAP = dt.timedelta(seconds=60)
WATCHED = ("analyser",)             # the services this controller alerts on (the analyser watches the others)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class FlagWatcher(threading.Thread):
    def __init__(self, cfg, post: Callable[[Flags], None], status_id: str):
        super().__init__(name="pisnoop-flags", daemon=True)
        self.cfg = cfg
        self.post = post
        self.status_id = status_id
        self.status_doc: dict = {}           # replaced (never mutated) by the event loop
        self._stop = threading.Event()
        self._want_snapshot = threading.Event()
        self._want_snapshot.set()
        self.last_seen: Optional[dt.datetime] = None
        self.up = False
        self.outages = 0
        self.polls = 0
        self._indexed = False
        self._next_status = self._next_watch = 0.0
        self._never_ban: Optional[list] = None       # the never_ban documents last handed on
        self._handed: dict = {}                       # flag id -> the document handed on, for those inside the overlap
        self.own_reader = neverban.OwnAddresses()        # read again at every poll: addresses change
        self.own: Optional[tuple] = None                 # this machine's addresses last handed on
        self.sensor = cfg.snooper.sensor    # this appliance: its own flags and the fleet's apply (flagdoc.applies_to)
        self.alerts = alerts.Alerter(cfg.alerts, self.sensor)
        self.watch = watch.Watch(cfg.alerts, watched=WATCHED)

    def configure(self, cfg) -> None:
        """A reloaded config: read from the next poll on (the retention TTLs ensured again, alerts re-aimed)."""
        self.cfg = cfg
        self._indexed = False
        self.alerts.configure(cfg.alerts)
        self.watch.cfg = cfg.alerts

    def request_snapshot(self) -> None:
        self._want_snapshot.set()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        db = store.database(self.cfg.mongodb, "pisnoop-controller")
        interval = self.cfg.enforce.poll_interval
        while not self._stop.is_set():
            try:
                self._once(db)
                if not self.up:
                    if self.outages:
                        log.info("store reachable again; reloading the active flags")
                        self._want_snapshot.set()
                    self.up = True
            except pymongo.errors.PyMongoError as exc:
                if self.up or self.outages == 0:
                    self.outages += 1
                    log.warning("store unreachable (%s: %s); enforcing the flags already known, retrying every %.1f s",
                                exc.__class__.__name__, str(exc)[:160], interval)
                self.up = False
            self._stop.wait(interval)
        db.client.close()
        self.alerts.close(wait=self.cfg.alerts.timeout_seconds)

    def _news(self, docs: list) -> list:
        """The documents read in the overlap that were not handed on with this stamp; moves ``last_seen`` on."""
        new = [d for d in docs if self._handed.get(d.get("_id")) != d]
        stamps = [d[UPDATED_AT] for d in docs if isinstance(d.get(UPDATED_AT), dt.datetime)]
        if stamps:
            self.last_seen = max(stamps + ([self.last_seen] if self.last_seen else []))
        for d in new:
            self._handed[d.get("_id")] = d
        if self.last_seen is not None:
            horizon = self.last_seen - OVERLAP
            self._handed = {k: v for k, v in self._handed.items()
                            if not isinstance(v.get(UPDATED_AT), dt.datetime) or v[UPDATED_AT] >= horizon}
        return new

    def _once(self, db) -> None:
        flags = store.flags(db)          # the primary: a ban is read where it was written with w: majority
        if not self._indexed:
            indexes.ensure_or_go_on(db, self.cfg, log)
            self._indexed = True
        now = utcnow()
        mine = flagdoc.applies_to(self.sensor)       # in the query (indexes lead with sensor and scope)
        entries = list(db[store.NEVER_BAN].find(neverban.applies_to(self.sensor)).sort("_id", 1))
        own = self.own_reader.current(self.cfg)
        changed = entries != self._never_ban or own != self.own
        never = dict(never_ban=tuple(entries), own=own) if changed else {}
        if self._want_snapshot.is_set():
            self._want_snapshot.clear()
            docs = list(flags.find(flagdoc.within(mine, {STATUS: FLAGGED, EXPIRES_AT: {"$gt": now}})))
            latest = list(flags.find(mine, {UPDATED_AT: 1}).sort(UPDATED_AT, -1).limit(1))
            self.last_seen = latest[0].get(UPDATED_AT) if latest else None
            self._handed = {d.get("_id"): d for d in docs}
            self.post(Flags(tuple(docs), snapshot=True, now=time.time(), never_ban=tuple(entries), own=own))
        else:
            query = flagdoc.within(mine, {UPDATED_AT: {"$gte": self.last_seen - OVERLAP}} if self.last_seen else {})
            docs = self._news(list(flags.find(query).sort(UPDATED_AT, 1)))
            if docs or changed:
                self.post(Flags(tuple(docs), snapshot=False, now=time.time(), **never))
        self._never_ban, self.own = entries, own        # handed on: a poll that failed before hands them again
        self.polls += 1
        if time.monotonic() >= self._next_watch:
            self._next_watch = time.monotonic() + self.cfg.snooper.status_interval
            self._watch(db)
        if time.monotonic() >= self._next_status and self.status_doc:
            self._next_status = time.monotonic() + self.cfg.snooper.status_interval
            doc = dict(self.status_doc)
            doc["counters"] = {**doc.get("counters", {}), "store_outages": self.outages, "flag_polls": self.polls}
            doc["alerts"] = {**self.alerts.counters, "pending": self.alerts.pending()}
            # _id in the document too: nx-27017's upsert does not take it from the filter
            doc.update(_id=self.status_id, updated_at=utcnow(), health=service.health())
            db[store.STATUS].replace_one({"_id": self.status_id}, doc, upsert=True)

    def _watch(self, db) -> None:
        """The analyser's status document, at the status cadence: ``service_down`` once it is stale, then
        ``service_up``."""
        sid = statusview.status_ids(self.sensor)["analyser"]
        docs = {"analyser": db[store.STATUS].find_one({"_id": sid})}
        for event, fields in self.watch.documents(docs, utcnow()):
            self.alerts.emit(event, **fields)
