"""The appliance's health as events: a service down or back, the store unreachable or back, capture drops.

Pure: the caller hands in what it saw (the status documents, whether the
store answered) with the time, and gets the events to alert on
(``appliance/alerts.py``). The analyser service watches the controller and
the snooper and the store: it runs all the time, already reads the store
every poll, and is the one service that sees the store go away first-hand.
The controller's store thread (``static_controller/flagwatch.py``) watches
the analyser, which cannot report itself down. The status command runs only
when a person asks.

* ``service_down`` once a service's status document is older than
  ``alerts.service_down_seconds``; ``service_up`` when it is fresh again.
* ``store_down`` once the store has not answered for
  ``alerts.store_down_seconds``; ``store_up`` when it answers again.
* ``capture_drops`` when the snooper's loss counters grew since the last
  look (within one snooper run: a new run starts from its own first look).
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

WATCHED = ("controller", "snooper")
LOSS_COUNTERS = ("kernel_dropped", "dropped_parse", "dropped_spool_full", "dropped_corrupt")


class Watch:
    def __init__(self, acfg, watched: tuple = WATCHED):
        self.cfg = acfg
        self.watched = watched
        self.down: dict[str, bool] = {}
        self.store_since: Optional[float] = None      # monotonic time the store first failed, None while it answers
        self.store_alerted = False
        self.losses: Optional[tuple[str, dict]] = None  # (snooper run, its loss counters at the last look)

    def store(self, up: bool, now_m: float) -> list[tuple[str, dict]]:
        """The store answered (``up``) or not, at monotonic time ``now_m``."""
        if up:
            out = [("store_up", {"seconds": round(now_m - self.store_since, 1)})] if self.store_alerted else []
            self.store_since, self.store_alerted = None, False
            return out
        if self.store_since is None:
            self.store_since = now_m
        if not self.store_alerted and now_m - self.store_since >= self.cfg.store_down_seconds:
            self.store_alerted = True
            return [("store_down", {"seconds": round(now_m - self.store_since, 1),
                                    "reason": "the store has not answered"})]
        return []

    def documents(self, docs: dict, now: dt.datetime) -> list[tuple[str, dict]]:
        """The status documents of the watched services (``{"controller": doc or None, ...}``) read at wall time
        ``now``."""
        out = []
        for name in self.watched:
            doc = docs.get(name)
            if doc is None and name not in self.down:
                continue                                # never ran against this store: nothing to miss
            t = (doc or {}).get("updated_at")
            age = (now - t).total_seconds() if isinstance(t, dt.datetime) else None
            is_down = age is None or age > self.cfg.service_down_seconds
            if is_down and not self.down.get(name):
                out.append(("service_down", {"service": name, "seconds": None if age is None else round(age, 1),
                                             "reason": "its status document is stale"}))
            elif not is_down and self.down.get(name):
                out.append(("service_up", {"service": name}))
            self.down[name] = is_down
        if "snooper" in self.watched:
            out += self._drops(docs.get("snooper"))
        return out

    def _drops(self, doc: Optional[dict]) -> list[tuple[str, dict]]:
        if not doc:
            return []
        c = doc.get("counters", {})
        now = {k: int(c.get(k, 0)) for k in LOSS_COUNTERS}
        run = doc.get("run")
        last = self.losses
        self.losses = (run, now)
        if last is None or last[0] != run:
            return []
        grew = {k: now[k] - last[1][k] for k in LOSS_COUNTERS if now[k] > last[1][k]}
        if not grew:
            return []
        return [("capture_drops", {"service": "snooper", "counters": grew, "totals": now,
                                   "unaccounted": doc.get("unaccounted", 0)})]
