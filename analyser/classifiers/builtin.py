"""The built-in classifiers: ``xmpp_abuse``, ``bandwidth_hog``, ``payload_match``."""

from __future__ import annotations

import re
from typing import Optional

from ..parse import TCP
from . import Classifier, Verdict, Windows

NS = 10**9


class XmppAbuse(Classifier):
    """Packets per minute toward the XMPP port, per client connection and per client IP.

    The per-IP window counts all connections of a client, so a client that
    reconnects again and again (each connection under the per-connection
    threshold) is still caught.
    """

    name = "xmpp_abuse"

    def __init__(self, server_port: int, threshold_ppm: int, per_ip_threshold_ppm: int, window_seconds: float,
                 action: Optional[str] = None):
        self.server_port = server_port
        self.window_seconds = window_seconds
        self.threshold_ppm, self.per_ip_threshold_ppm = threshold_ppm, per_ip_threshold_ppm
        self.limit = threshold_ppm * window_seconds / 60.0
        self.ip_limit = per_ip_threshold_ppm * window_seconds / 60.0
        span = int(window_seconds * NS)
        self.conns = Windows(span, cap=int(self.limit * 4) + 16)
        self.ips = Windows(span, cap=int(self.ip_limit * 4) + 16)
        self.action = action

    def packet(self, p, flow, direction, ref):
        if p.dport != self.server_port or p.proto != TCP:
            return None
        conn = self.conns.get_window((p.src, p.sport))
        ip = self.ips.get_window(p.src)
        n_conn, n_ip = conn.add(p.ts_ns, 1, ref), ip.add(p.ts_ns, 1, ref)
        if n_conn > self.limit:
            return Verdict(f"{n_conn} packets in {self.window_seconds:g} s toward port {self.server_port} "
                           f"on one connection (threshold {self.threshold_ppm}/min)",
                           p.src, p.sport, self.server_port, conn.evidence(self.threshold_ppm, "packets"))
        if n_ip > self.ip_limit:
            return Verdict(f"{n_ip} packets in {self.window_seconds:g} s toward port {self.server_port} "
                           f"over all connections of the client (threshold {self.per_ip_threshold_ppm}/min)",
                           p.src, None, self.server_port, ip.evidence(self.per_ip_threshold_ppm, "packets"))
        return None

    def prune(self, now_ns):
        self.conns.prune(now_ns)
        self.ips.prune(now_ns)


class BandwidthHog(Classifier):
    """Bytes per second of a client (both directions of its flows) over a window."""

    name = "bandwidth_hog"

    def __init__(self, bytes_per_second: int, window_seconds: float, scope: str = "ip",
                 server_port: Optional[int] = None, action: Optional[str] = None):
        self.bps, self.window_seconds, self.scope, self.server_port = (bytes_per_second, window_seconds, scope,
                                                                       server_port)
        self.limit = bytes_per_second * window_seconds
        self.windows = Windows(int(window_seconds * NS))
        self.action = action

    def packet(self, p, flow, direction, ref):
        if self.server_port is not None and flow.sport != self.server_port:
            return None
        key = flow.client if self.scope == "ip" else (flow.client, flow.cport)
        w = self.windows.get_window(key)
        if w.add(p.ts_ns, p.wire_len, ref) > self.limit:
            ev = w.evidence(self.bps * 60, "bytes")
            ev["bytes_per_second"] = round(w.total / self.window_seconds, 1)
            return Verdict(f"{w.total} bytes in {self.window_seconds:g} s (threshold {self.bps} bytes/s)",
                           flow.client, flow.cport if self.scope == "connection" else None, flow.sport, ev)
        return None

    def prune(self, now_ns):
        self.windows.prune(now_ns)


class PayloadMatch(Classifier):
    """Matches of a regex in plaintext TCP payload per minute (e.g. XMPP ``<message`` stanzas).

    Works on each segment as captured: a match split across two segments is
    not seen, and an encrypted stream never matches.
    """

    def __init__(self, name: str, pattern: str, threshold_per_minute: int, window_seconds: float,
                 server_port: Optional[int], direction: str, scope: str, action: Optional[str] = None):
        self.name = name
        self.regex = re.compile(pattern.encode())
        self.pattern = pattern
        self.threshold = threshold_per_minute
        self.window_seconds = window_seconds
        self.limit = threshold_per_minute * window_seconds / 60.0
        self.server_port, self.scope, self.action = server_port, scope, action
        self.dirs = {"c2s": (0,), "s2c": (1,), "both": (0, 1)}[direction]
        self.windows = Windows(int(window_seconds * NS))

    def packet(self, p, flow, direction, ref):
        if not p.plen or p.proto != TCP or direction not in self.dirs:
            return None
        if self.server_port is not None and flow.sport != self.server_port:
            return None
        n = len(self.regex.findall(p.data, p.poff, p.poff + p.plen))
        if not n:
            return None
        key = flow.client if self.scope == "ip" else (flow.client, flow.cport)
        w = self.windows.get_window(key)
        if w.add(p.ts_ns, n, ref) > self.limit:
            return Verdict(f"{w.total} matches of {self.pattern!r} in {self.window_seconds:g} s "
                           f"(threshold {self.threshold}/min)",
                           flow.client, flow.cport if self.scope == "connection" else None, flow.sport,
                           w.evidence(self.threshold, "matches"))
        return None

    def prune(self, now_ns):
        self.windows.prune(now_ns)
