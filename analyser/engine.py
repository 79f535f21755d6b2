"""One analysis step: frames -> packets -> flows -> classifiers -> flags.

The live service, one-shot ranges and ``analyse --pcap`` all run this, so a
pcap gives the same flags as the store. A step is a list of batches; flow
records are written once per step (one bulk write), flags the moment a
classifier's window crosses its threshold.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Iterable, Optional

from appliance.framebatch import CorruptBatch

from . import policy as policy_mod
from .flags import FlagBook, now_utc
from .flows import FlowTable
from .parse import Packet, parse

log = logging.getLogger("pisnoop.analyser")
PRUNE_EVERY_NS = 10 * 10**9


class Engine:
    def __init__(self, cfg, policy, flows: FlowTable, flagbook: FlagBook,
                 observers: Iterable[Callable[[Packet], None]] = (), on_flag: Optional[Callable[[dict], None]] = None):
        self.cfg, self.policy = cfg, policy
        self.classifiers = policy_mod.build(policy, cfg)
        self.flows, self.flagbook = flows, flagbook
        self.observers = list(observers)
        self.on_flag = on_flag
        self.counters: Counter = Counter()
        self.pruned_ns = 0

    def reset_windows(self) -> None:
        """Fresh classifier state (after a failed step whose packets may be counted again)."""
        self.classifiers = policy_mod.build(self.policy, self.cfg)

    def run_step(self, batches: Iterable[tuple[str, int, Iterable]], step: int, persistent: bool = True) -> int:
        """Analyse ``(batch_id, first_index, frames)`` batches; return the number of frames read."""
        c = self.counters
        parsed = []
        append = parsed.append
        n = 0
        for bid, start, frames in batches:
            i = start - 1
            try:
                for ts, wl, data in frames:
                    i += 1
                    if not data:  # outside a one-shot range (a frame is never empty)
                        continue
                    p = parse(ts, wl, data)
                    if p.__class__ is Packet:
                        append((p, bid, i))
                    else:
                        c[p] += 1
            except CorruptBatch as exc:
                c["corrupt_batches"] += 1
                log.warning("batch %s: %s; its remaining frames are skipped", bid, exc)
            n += i - start + 1
            c["batches"] += 1
        c["frames"] += n
        if persistent:
            self.flows.prefetch(p for p, _, _ in parsed)
        self._classify(parsed)
        c["flows_written"] += self.flows.flush(step)
        if self.flows.newest_ns - self.pruned_ns > PRUNE_EVERY_NS:
            for cl in self.classifiers:
                cl.prune(self.flows.newest_ns)
            self.pruned_ns = self.flows.newest_ns
        return n

    def _classify(self, parsed: list) -> None:
        update = self.flows.update
        book = self.flagbook
        classifiers = self.classifiers
        observers = self.observers
        now = now_utc()
        replayed = 0
        for p, bid, i in parsed:
            f, d = update(p, bid)
            if f is None:
                replayed += 1
                continue
            for obs in observers:
                obs(p)
            if book.covering and book.covers(f.client, f.cport, now):
                continue
            for cl in classifiers:
                v = cl.packet(p, f, d, (bid, i))
                if v is not None:
                    doc = book.offer(v, cl, now)
                    if doc is not None:
                        self.counters["flags"] += 1
                        log.warning("flagged %s (%s): %s", doc["client_ip"] if doc["client_port"] is None
                                    else f"{doc['client_ip']}:{doc['client_port']}", doc["classifier"], doc["reason"])
                        if self.on_flag:
                            self.on_flag(doc)
                        break
        self.counters["packets"] += len(parsed) - replayed
        self.counters["replayed"] += replayed
