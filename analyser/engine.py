"""One analysis step: frames -> packets -> flows -> verified? -> classifiers -> flags.

The live service, one-shot ranges and ``analyse --pcap`` all run this, so a
pcap gives the same flags as the store. A step is a list of batches; flow
records are written once per step (one bulk write), flags the moment a
classifier's window crosses its threshold.

Only verified packets reach the classifiers (analyser/flows.py says what is
verified). A packet held while its connection settles is counted as
unverified until the connection is verified on frame time, then handed to
the classifiers with its own timestamp, before the packet whose time
settled it, so the same frames give the same flags whatever the batch
boundaries. Unverified packets are counted per claimed source (the report's
"unverified traffic"); they never make a flag, and the defence against them
is the shared XMPP meter the controller installs, which limits everyone
toward the server ports and singles out no source.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from typing import Callable, Iterable, Optional

from appliance import l3l4
from appliance.framebatch import CorruptBatch

from . import policy as policy_mod
from .flags import FlagBook, now_utc
from .flows import HELD, OK, SETTLING, SPOOFED, UNTRACKED, VERIFIED, FlowTable, canonical_key, flow_key
from .neighbours import Neighbours
from .parse import TCP, UDP, Packet, address_text, mac_text, parse

log = logging.getLogger("pisnoop.analyser")
PRUNE_EVERY_NS = 10 * 10**9
MAX_SOURCES = 10_000           # claimed sources of unverified traffic kept by name; the rest are summed as "other"
PROTO_NAMES = {TCP: "tcp", UDP: "udp"}
# counters of what was written to the store (a flag, a flow record): never taken back by ``Engine.rollback``, since a
# rebuild does not write them again; every other counter counts frames read
WRITTEN = frozenset({"flags", "flags_exempt", "flows_written"})
# ICMP / ICMPv6 "destination unreachable" types: protocol -> the type whose quoted packet an end refused
ICMP_ERRORS = {1: 3, 58: 1}


def engine_class(cfg):
    """The engine ``analyser.engine`` names: the fast one (analyser/fast.py) or this reference one (also when
    numpy cannot be imported: the same results, slower, said once in the log)."""
    if cfg.analyser.engine == "fast":
        try:
            from .fast import FastEngine
        except ImportError as exc:
            log.warning("analyser.engine fast needs numpy (%s): the reference engine analyses instead", exc)
            return Engine
        return FastEngine
    return Engine


class Engine:
    def __init__(self, cfg, policy, flows: FlowTable, flagbook: FlagBook,
                 observers: Iterable[Callable[[Packet], None]] = (), on_flag: Optional[Callable[[dict], None]] = None):
        self.cfg, self.policy = cfg, policy
        self.server_ports = frozenset(policy_mod.server_ports(policy, cfg))
        flows.server_ports = self.server_ports
        flows.settle_ns = int(cfg.xmpp.settle_seconds * 1e9)
        flows.max_flows = cfg.analyser.max_flows
        self.neighbours = Neighbours(cfg.xmpp)
        self.classifiers = policy_mod.build(policy, cfg, self.neighbours)
        self.flows, self.flagbook = flows, flagbook
        self.servers = flagbook.servers
        self.observers = list(observers)
        self.on_flag = on_flag
        self.counters: Counter = Counter()
        self.unverified: Counter = Counter()      # claimed source -> unverified packets it "sent" toward a server
        self.settling: list = []                  # heap of (settle_ns, n, flow)
        self.queued = 0
        self.pruned_ns = 0
        self._checkpoints: dict = {}              # resume step -> the frame counts as of it (``checkpoint``)
        self._full_logged = 0.0                   # monotonic time before which a full flow table is not said again
        self._forgiven = None                     # the flag book's releases the classifiers have forgiven

    def reset_windows(self) -> None:
        """Fresh classifier state (after a failed step whose packets may be counted again)."""
        self.classifiers = policy_mod.build(self.policy, self.cfg, self.neighbours)
        self.settling = []
        self._forgiven = None

    def forgive(self) -> None:
        """Releases learned since the last step: the classifiers forget what their subjects sent before them
        (analyser/flags.py, ``Releases``); a step calls it first."""
        releases = self.flagbook.releases
        if releases is not self._forgiven:
            self._forgiven = releases
            if releases:
                for cl in self.classifiers:
                    cl.forgive(releases)

    TALLIES: tuple = ()                       # further per-frame counts a subclass keeps as attributes

    def checkpoint(self, step: int) -> None:
        """Note the frame counts as of resume step ``step``, before it is saved (the one saved before is kept too,
        for a save that fails). A rebuild after a store failure reads the batches after the saved step again;
        ``rollback`` takes back what they added, so that the status counters count every frame once."""
        self._checkpoints = {k: v for k, v in self._checkpoints.items() if k >= max(self._checkpoints, default=0)}
        self._checkpoints[step] = (Counter({k: v for k, v in self.counters.items() if k not in WRITTEN}),
                                   self.unverified.copy(), {a: getattr(self, a) for a in self.TALLIES})

    def rollback(self, step: int) -> None:
        """Back to the frame counts of resume step ``step`` (the store's, read again after a failure)."""
        saved = self._checkpoints.get(step)
        if saved is None:
            log.warning("no frame counts noted at step %d: the counters keep what the failed steps added", step)
            return
        counts, unverified, tallies = saved
        written = {k: v for k, v in self.counters.items() if k in WRITTEN}
        self.counters.clear()
        self.counters.update(counts)
        self.counters.update(written)
        self.unverified = unverified.copy()
        for a, v in tallies.items():
            setattr(self, a, v)

    def run_step(self, batches: Iterable[tuple[str, int, Iterable]], step: int, persistent: bool = True,
                 flush: bool = True) -> int:
        """Analyse ``(batch_id, first_index, frames)`` batches; return the number of frames read. ``flush``: write
        the flows changed since the last write, marked with ``step`` (else they wait for a later step's)."""
        self.forgive()
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
            self._prefetch(flow_key(p) for p, _, _ in parsed)
        self._classify(parsed)
        self._end_step(step, flush)
        return n

    def _prefetch(self, keys) -> None:
        for f in self.flows.prefetch(keys):
            if f.tcp == VERIFIED:              # verified before a restart: who is who is learned again
                self._learn(f)

    def flush(self, step: int) -> None:
        """Write the flows changed since the last write, marked with ``step``; forget the idle ones."""
        self.counters["flows_written"] += self.flows.flush(step)

    def _end_step(self, step: int, flush: bool = True) -> None:
        """Write the changed flows (when ``flush``); now and then drop the classifiers' stale windows."""
        if flush:
            self.flush(step)
        if self.flows.newest_ns - self.pruned_ns > PRUNE_EVERY_NS:
            for cl in self.classifiers:
                cl.prune(self.flows.newest_ns)
            self.pruned_ns = self.flows.newest_ns

    def _classify(self, parsed: list, now=None) -> None:
        update = self.flows.update
        observers = self.observers
        heap = self.settling
        unverified = self.unverified
        judge = self._judge
        book = self.flagbook
        classifiers = self.classifiers
        releases = book.releases
        forgive_ns = releases.newest_ns           # packets from before the newest release: are they forgiven?
        now = now or now_utc()
        replayed = v6 = verified = untracked = forgiven = 0
        for p, bid, i in parsed:
            if heap and p.ts_ns >= heap[0][0]:
                self._settle_due(p.ts_ns, now)
            f, d = update(p, bid)
            if f is None:
                if d != UNTRACKED:
                    replayed += 1
                    continue
                untracked += 1                          # a packet all the same, in no flow
                if p.v6:
                    v6 += 1
                continue
            if p.v6:
                v6 += 1
            for obs in observers:
                obs(p)
            st = f.status
            if st == OK:
                verified += 1
                if book.covering and f.cov_gen != book.gen:
                    judge(p, f, d, (bid, i), now)   # the slow path: is it held by a flag already?
                    continue
                if p.ts_ns < forgive_ns and releases.forgives(f.client, f.mac, p.ts_ns):
                    forgiven += 1
                    continue
                ref = (bid, i)
                for cl in classifiers:
                    v = cl.packet(p, f, d, ref)
                    if v is not None and self._offer(v, cl, now):
                        break
                continue
            if p.proto != TCP and p.proto != UDP:
                if p.proto in ICMP_ERRORS and p.plen >= 36:
                    self._icmp_error(p)
                continue
            if d == 0:
                if p.src in unverified or len(unverified) < MAX_SOURCES:
                    unverified[p.src] += 1
                else:
                    unverified["other"] += 1
            if st == HELD:
                f.held.append((p, d, (bid, i)))
                if f.tcp == SETTLING and not f.queued:
                    f.queued = True
                    self.queued += 1
                    heapq.heappush(heap, (f.settle_ns, self.queued, f))
            elif f.tcp == SPOOFED and not f.queued:
                f.queued = True                        # contradicted before it settled: counted once
                self.counters["connections_contradicted"] += 1
        c = self.counters
        n = len(parsed) - replayed
        c["packets"] += n
        c["packets_v6"] += v6
        c["packets_v4"] += n - v6
        c["verified"] += verified
        c["replayed"] += replayed
        if forgiven:
            c["forgiven"] += forgiven
        if untracked:
            c["untracked"] += untracked
            self._table_full(untracked)

    def _table_full(self, untracked: int) -> None:
        """Say so, once a minute at most, while the flow table is full (analyser.max_flows)."""
        t = time.monotonic()
        if t >= self._full_logged:
            self._full_logged = t + 60.0
            log.warning("flow table full (%d flows, analyser.max_flows): %d packets of new flows toward no server "
                        "port are counted but not recorded (counter untracked, %d in all)", len(self.flows.flows),
                        untracked, self.counters["untracked"])

    def _settle_due(self, ts_ns: int, now) -> None:
        """Verify the connections whose settling time has passed, and hand their held packets on."""
        heap = self.settling
        unverified = self.unverified
        c = self.counters
        while heap and heap[0][0] <= ts_ns:
            _, _, f = heapq.heappop(heap)
            if not f.settle():
                c["connections_contradicted"] += 1
                continue
            c["connections_verified"] += 1
            self._learn(f)
            held, f.held = f.held, []
            for p, d, ref in held:
                if d == 0:
                    left = unverified[p.src] - 1
                    if left > 0:
                        unverified[p.src] = left
                    else:
                        unverified.pop(p.src, None)
                f.counted[d] += 1
                c["verified"] += 1
                self._judge(p, f, d, ref, now)

    def _icmp_error(self, p: Packet) -> None:
        """A host refusing a UDP packet sent to it (ICMP unreachable) that a flow in its name drew from a server:
        when the refusal comes from another MAC than the flow's packets, someone else sent them in its name, and
        the flow never counts (docs/ARCHITECTURE.md, "Verified traffic")."""
        f = self.icmp_refused(p)
        if f is not None and f.client == p.src and f.mac and not p.data.startswith(f.mac, 6) and f.tcp != SPOOFED:
            f.tcp = SPOOFED
            self.counters["udp_disowned"] += 1

    def icmp_refused(self, p: Packet):
        """The UDP flow whose packet an ICMP error ``p`` (of ICMP_ERRORS) refuses, when its addressee refuses it."""
        data, off = p.data, p.poff
        if p.plen < 36 or data[off] != ICMP_ERRORS[p.proto]:
            return None
        h = l3l4.read(bytes(12) + (b"\x86\xdd" if p.v6 else b"\x08\x00") + data[off + 8:off + p.plen])
        if h.__class__ is str or h[3] != UDP:
            return None
        src, dst, sport, dport = address_text(p.v6, h[1]), address_text(p.v6, h[2]), h[4], h[5]
        if dst != p.src:
            return None                              # not a refusal by the packet's own addressee
        return self.flows.flows.get(canonical_key(UDP, (src, sport), (dst, dport)))

    def _learn(self, f) -> None:
        self.neighbours.learn(f.mac, f.client, f.ttl)
        if f.new_connection and f.sport in self.server_ports:
            self.servers.connection(f.client, f.server)

    def _judge(self, p: Packet, f, d: int, ref, now) -> None:
        book = self.flagbook
        if p.ts_ns < book.releases.newest_ns and book.releases.forgives(f.client, f.mac, p.ts_ns):
            self.counters["forgiven"] += 1
            return
        if book.covering and f.cov_gen != book.gen:
            if book.covers(f.client, f.cport, now, mac_text(f.mac) if f.mac else "", PROTO_NAMES.get(f.proto, ""),
                           f.sport):
                return
            f.cov_gen = book.gen                   # not covered: no need to look again until a flag is added
        for cl in self.classifiers:
            v = cl.packet(p, f, d, ref)
            if v is not None and self._offer(v, cl, now):
                break

    def _offer(self, v, cl, now) -> bool:
        """Hand a verdict to the flag book; True when it wrote a flag (or an exempt record)."""
        doc = self.flagbook.offer(v, cl, now)
        if doc is None:
            return False
        flagged = doc["status"] == "flagged"
        self.counters["flags" if flagged else "flags_exempt"] += 1
        log.warning("%s %s (%s): %s", "flagged" if flagged else "exempt", v.subject, doc["classifier"], doc["reason"])
        if self.on_flag:
            self.on_flag(doc)
        return True

    def unverified_top(self, n: int = 10) -> list[tuple[str, int]]:
        return self.unverified.most_common(n)
