"""Classifiers: they see every verified packet with its flow and may return a ``Verdict``.

Built-ins live in ``builtin``; custom ones are Python files in the directory
the policy names (``custom``). Every classifier is evaluated per packet on the
frames' own timestamps, so a flag is raised the moment a window crosses its
threshold, and a pcap gives the same verdicts as the live path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

SAMPLES = 5  # frame ids kept as evidence


@dataclass
class Verdict:
    """What a classifier found, and what it is about (the flag's subject, appliance/flagdoc.py).

    ``client_ip`` is an address or a prefix ``ADDR/LEN``; ``client_mac`` a
    host (then ``client_ip`` is None); ``client_port`` None means every
    connection. ``server_ports`` (or the older single ``server_port``),
    ``protocol`` and ``direction`` say what the ban blocks; ``addresses`` are
    the host's known addresses, for the never-ban check of a MAC subject.
    """
    reason: str
    client_ip: Optional[str] = None
    client_port: Optional[int] = None
    server_port: Optional[int] = None
    evidence: dict = field(default_factory=dict)
    action: Optional[str] = None
    classifier: Optional[str] = None
    server_ports: Optional[list] = None
    client_mac: Optional[str] = None
    protocol: Optional[str] = None      # None: tcp
    direction: Optional[str] = None     # None: outbound
    addresses: tuple = ()

    @property
    def ports(self) -> list:
        return list(self.server_ports) if self.server_ports else [self.server_port]

    @property
    def subject(self) -> str:
        """The subject's key in the flag book (MAC, prefix, address or address|port)."""
        if self.client_mac:
            return self.client_mac
        return self.client_ip if self.client_port is None else f"{self.client_ip}|{self.client_port}"


class Window:
    """A sliding window over frame time: the sum of weights of the last ``span_ns``."""

    __slots__ = ("span_ns", "times", "weights", "total", "refs", "cap")

    def __init__(self, span_ns: int, cap: int = 0):
        self.span_ns = span_ns
        self.times: deque = deque()
        self.weights: deque = deque()
        self.total = 0
        self.refs: deque = deque(maxlen=SAMPLES)
        self.cap = cap  # keep at most this many entries (the count then stays a lower bound)

    def add(self, ts_ns: int, weight: int, ref) -> int:
        times, weights = self.times, self.weights
        times.append(ts_ns)
        weights.append(weight)
        self.total += weight
        self.refs.append(ref)
        edge = ts_ns - self.span_ns
        while times[0] <= edge or (self.cap and len(times) > self.cap):
            times.popleft()
            self.total -= weights.popleft()
        return self.total

    def drop_before(self, ns: int) -> None:
        """Forget the entries older than ``ns`` (what a released subject sent before its release)."""
        times, weights = self.times, self.weights
        if all(t >= ns for t in times):        # (not only the first: a settled packet comes in with its own time)
            return
        kept = [(t, wt) for t, wt in zip(times, weights) if t >= ns]
        times.clear()
        weights.clear()
        for t, wt in kept:
            times.append(t)
            weights.append(wt)
        self.total = sum(weights)
        refs = list(self.refs)[len(self.refs) - min(len(self.refs), len(kept)):]   # the samples of the kept
        self.refs.clear()
        self.refs.extend(refs)

    def stale(self, now_ns: int) -> bool:
        return not self.times or self.times[-1] <= now_ns - self.span_ns

    def evidence(self, threshold, unit: str) -> dict:
        """What a person needs to check the verdict: window, count, rate, threshold, times, sample frames."""
        first, last = self.times[0], self.times[-1]
        window_s = self.span_ns / 1e9
        span_s = (last - first) / 1e9
        per_min = self.total * 60.0 / window_s
        if span_s >= 1.0 and len(self.times) > 1:  # the rate the packets themselves show
            per_min = (self.total - self.weights[0]) * 60.0 / span_s
        return {
            "window_seconds": window_s, "count": self.total, "rate": round(per_min, 1), "rate_unit": f"{unit}/min",
            "threshold": threshold, "first_packet_ns": first, "last_packet_ns": last,
            "samples": [ref if isinstance(ref, str) else f"{ref[0]}#{ref[1]}" for ref in self.refs],
        }


class Windows(dict):
    """Windows by key, created on first use and dropped when stale (bounded memory)."""

    def __init__(self, span_ns: int, cap: int = 0):
        super().__init__()
        self.span_ns, self.cap = span_ns, cap

    def get_window(self, key) -> Window:
        w = self.get(key)
        if w is None:
            w = self[key] = Window(self.span_ns, self.cap)
        return w

    def prune(self, now_ns: int) -> None:
        for k in [k for k, w in self.items() if w.stale(now_ns)]:
            del self[k]

    def forgive(self, released_ns: Callable[[object], int]) -> None:
        """Drop from each window what was sent before ``released_ns(key)`` (0: no release); empty windows go."""
        for k in list(self):
            ns = released_ns(k)
            if ns:
                w = self[k]
                w.drop_before(ns)
                if not w.times:
                    del self[k]

    def seeded(self, key, sources) -> Window:
        """The window of ``key``, made on first use from the entries of ``sources`` (windows of the same span):
        a host's window starts with what its addresses already sent."""
        w = self.get(key)
        if w is None:
            w = self[key] = Window(self.span_ns, self.cap)
            entries = sorted((t, wt) for src in sources for t, wt in zip(src.times, src.weights))
            for t, wt in entries[-self.cap:] if self.cap else entries:
                w.times.append(t)
                w.weights.append(wt)
                w.total += wt
            for src in sources:
                w.refs.extend(src.refs)
        return w


class Classifier:
    """Base of every classifier: ``packet`` sees each packet, ``prune`` bounds memory."""

    name = "classifier"
    action: Optional[str] = None

    def packet(self, p, flow, direction: int, ref) -> Optional[Verdict]:  # pragma: no cover - interface
        """Called for verified packets only (analyser/flows.py): a spoofed source never reaches a classifier."""
        raise NotImplementedError

    def prune(self, now_ns: int) -> None:
        pass

    def forgive(self, releases) -> None:
        """Forget what released subjects sent before their release (``analyser.flags.Releases``). The built-in
        classifiers drop it from their windows; a custom classifier's own state is its own (the engine hands it
        no packet sent before a release it knows)."""
