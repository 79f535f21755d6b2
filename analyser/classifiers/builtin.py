"""The built-in classifiers: ``xmpp_abuse``, ``bandwidth_hog``, ``payload_match``.

They see verified packets only (analyser/flows.py), so every window counts
what a client really sent; each verdict names a subject, TCP or UDP, server
ports and a direction that enforce can turn into a flow.
"""

from __future__ import annotations

import re
from typing import Optional

from ..parse import TCP, UDP, mac_text
from . import Classifier, Verdict, Windows

NS = 10**9
PROTOCOLS = {"tcp": TCP, "udp": UDP}
PROTOCOL_NAMES = {TCP: "tcp", UDP: "udp"}


class XmppAbuse(Classifier):
    """Packets per minute toward the XMPP ports, per connection, address, host (MAC) and prefix behind a router.

    The aggregate windows count every connection of the subject, and a new
    connection counts ``connection_cost`` packets more (what the server
    spends on TLS, authentication and roster for it), so a client that
    reconnects again and again, each connection under the per-connection
    line, is caught; a host rotating addresses is caught as its MAC, a
    client rotating inside its prefix behind a router as that prefix
    (``analyser.neighbours`` says which applies). The connection's flag bans
    its server port; the others ban all ``server_ports``.
    """

    name = "xmpp_abuse"

    def __init__(self, server_ports, threshold_ppm: int, per_ip_threshold_ppm: int, window_seconds: float,
                 action: Optional[str] = None, per_host_threshold_ppm: Optional[int] = None,
                 per_prefix_threshold_ppm: Optional[int] = None, connection_cost: int = 0, neighbours=None):
        self.server_ports = (server_ports,) if isinstance(server_ports, int) else tuple(server_ports)
        self.ports = frozenset(self.server_ports)
        self.window_seconds = window_seconds
        self.thresholds = {"connection": threshold_ppm, "address": per_ip_threshold_ppm,
                           "host": per_host_threshold_ppm or per_ip_threshold_ppm,
                           "prefix": per_prefix_threshold_ppm or per_ip_threshold_ppm}
        self.threshold_ppm, self.per_ip_threshold_ppm = threshold_ppm, per_ip_threshold_ppm
        self.limits = {k: v * window_seconds / 60.0 for k, v in self.thresholds.items()}
        self.limit, self.ip_limit = self.limits["connection"], self.limits["address"]
        self.host_limit, self.prefix_limit = self.limits["host"], self.limits["prefix"]
        self.cost = connection_cost
        self.neighbours = neighbours
        span = int(window_seconds * NS)
        self.conns = Windows(span, cap=int(self.limit * 4) + 16)
        self.ips = Windows(span, cap=int(self.ip_limit * 4) + 16)
        self.hosts = Windows(span, cap=int(self.host_limit * 4) + 16)
        self.prefixes = Windows(span, cap=int(self.prefix_limit * 4) + 16)
        self.action = action
        self.port_text = ", ".join(map(str, self.server_ports))

    def packet(self, p, flow, direction, ref):
        if direction or flow.sport not in self.ports or flow.proto != TCP:
            return None
        ts = p.ts_ns
        # a new connection's first packet carries its cost toward the aggregates
        weight = 1 + self.cost if flow.counted[0] == 1 and flow.new_connection else 1
        host = prefix = hw = pw = None
        nb = self.neighbours
        if nb is not None:
            if flow.agg_gen != nb.gen:
                flow.agg, flow.agg_gen = nb.keys(flow.mac, flow.client), nb.gen
            host, prefix = flow.agg
            if host is not None:
                hw = self.hosts.get(host)
                if hw is None:   # the host's second address: its window starts with what its addresses sent
                    ips = self.ips
                    hw = self.hosts.seeded(host, [ips[a] for a in nb.addresses(host) if a in ips])
                hw.add(ts, weight, ref)
            if prefix is not None:
                pw = self.prefixes.get_window(prefix)
                pw.add(ts, weight, ref)
        conn = self.conns.get_window((flow.client, flow.cport))
        ip = self.ips.get_window(flow.client)
        n_conn, n_ip = conn.add(ts, 1, ref), ip.add(ts, weight, ref)
        if n_conn > self.limit:
            return self._verdict(conn, "connection", f"on one connection toward port {flow.sport}",
                                 client_ip=flow.client, client_port=flow.cport, server_ports=[flow.sport])
        if n_ip > self.ip_limit:
            return self._verdict(ip, "address", "over all connections of the address", client_ip=flow.client)
        if hw is not None and hw.total > self.host_limit:
            addrs = nb.addresses(host)
            return self._verdict(hw, "host", f"over all addresses of the host {mac_text(host)} ({len(addrs)} seen)",
                                 client_mac=mac_text(host), addresses=tuple(addrs))
        if pw is not None and pw.total > self.prefix_limit:
            return self._verdict(pw, "prefix", f"over all addresses of {prefix} behind the router "
                                 f"{mac_text(flow.mac)}", client_ip=prefix)
        return None

    def _verdict(self, w, scope: str, what: str, **subject) -> Verdict:
        thr = self.thresholds[scope]
        cost = f"; a new connection counts {self.cost + 1}" if self.cost and scope != "connection" else ""
        ev = w.evidence(thr, "packets")
        ev["scope"] = scope
        subject.setdefault("server_ports", list(self.server_ports))
        return Verdict(f"{w.total} packets in {self.window_seconds:g} s toward port(s) "
                       f"{self.port_text if scope != 'connection' else subject['server_ports'][0]} {what} "
                       f"(threshold {thr}/min{cost})", evidence=ev, protocol="tcp", direction="outbound", **subject)

    def prune(self, now_ns):
        for w in (self.conns, self.ips, self.hosts, self.prefixes):
            w.prune(now_ns)

    def forgive(self, releases):
        """A released address: its connections' and its own windows; a released MAC: its host window and its
        addresses'; a released prefix: its window and its addresses'. (Not the other way: an address's release
        leaves the window of its host or prefix, which holds what other addresses sent.)"""
        nb = self.neighbours
        by_mac: dict = {}
        if nb is not None:
            for mac in releases.macs:
                for a in nb.addresses(mac):
                    by_mac[a] = max(releases.macs[mac], by_mac.get(a, 0))

        def address(ip):
            return max(releases.address_ns(ip), by_mac.get(ip, 0))
        self.conns.forgive(lambda k: address(k[0]))
        self.ips.forgive(address)
        self.hosts.forgive(releases.mac_ns)
        self.prefixes.forgive(releases.prefix_ns)


class BandwidthHog(Classifier):
    """Bytes per second of a client (both directions of its flows) over a window, per protocol and server port."""

    name = "bandwidth_hog"

    def __init__(self, bytes_per_second: int, window_seconds: float, scope: str = "ip",
                 server_port: Optional[int] = None, action: Optional[str] = None, protocol: str = "tcp",
                 direction: str = "outbound"):
        self.bps, self.window_seconds, self.scope, self.server_port = (bytes_per_second, window_seconds, scope,
                                                                       server_port)
        self.proto = PROTOCOLS[protocol]
        self.direction = direction
        self.limit = bytes_per_second * window_seconds
        self.windows = Windows(int(window_seconds * NS))
        self.action = action

    def packet(self, p, flow, direction, ref):
        if flow.proto != self.proto or (self.server_port is not None and flow.sport != self.server_port):
            return None
        key = (flow.client, flow.sport) if self.scope == "ip" else (flow.client, flow.sport, flow.cport)
        w = self.windows.get_window(key)
        if w.add(p.ts_ns, p.wire_len, ref) > self.limit:
            ev = w.evidence(self.bps * 60, "bytes")
            ev["bytes_per_second"] = round(w.total / self.window_seconds, 1)
            return Verdict(f"{w.total} bytes in {self.window_seconds:g} s on {PROTOCOL_NAMES[self.proto]} port "
                           f"{flow.sport} (threshold {self.bps} bytes/s)",
                           flow.client, flow.cport if self.scope == "connection" else None, flow.sport, ev,
                           protocol=PROTOCOL_NAMES[self.proto], direction=self.direction)
        return None

    def prune(self, now_ns):
        self.windows.prune(now_ns)

    def forgive(self, releases):
        self.windows.forgive(lambda k: releases.address_ns(k[0]))


class PayloadMatch(Classifier):
    """Matches of a regex in plaintext payload per minute (e.g. XMPP ``<message`` stanzas), TCP or UDP.

    Works on each segment as captured: a match split across two segments is
    not seen, and an encrypted stream (XMPP over TLS) never matches.
    """

    def __init__(self, name: str, pattern: str, threshold_per_minute: int, window_seconds: float,
                 server_port: Optional[int], direction: str, scope: str, action: Optional[str] = None,
                 protocol: str = "tcp", flag_direction: str = "outbound"):
        self.name = name
        self.regex = re.compile(pattern.encode())
        self.pattern = pattern
        self.threshold = threshold_per_minute
        self.window_seconds = window_seconds
        self.limit = threshold_per_minute * window_seconds / 60.0
        self.server_port, self.scope, self.action = server_port, scope, action
        self.proto = PROTOCOLS[protocol]
        self.flag_direction = flag_direction
        self.dirs = {"c2s": (0,), "s2c": (1,), "both": (0, 1)}[direction]
        self.windows = Windows(int(window_seconds * NS))

    def packet(self, p, flow, direction, ref):
        if not p.plen or flow.proto != self.proto or direction not in self.dirs:
            return None
        if self.server_port is not None and flow.sport != self.server_port:
            return None
        n = len(self.regex.findall(p.data, p.poff, p.poff + p.plen))
        if not n:
            return None
        key = (flow.client, flow.sport) if self.scope == "ip" else (flow.client, flow.sport, flow.cport)
        w = self.windows.get_window(key)
        if w.add(p.ts_ns, n, ref) > self.limit:
            return Verdict(f"{w.total} matches of {self.pattern!r} in {self.window_seconds:g} s "
                           f"(threshold {self.threshold}/min)",
                           flow.client, flow.cport if self.scope == "connection" else None, flow.sport,
                           w.evidence(self.threshold, "matches"), protocol=PROTOCOL_NAMES[self.proto],
                           direction=self.flag_direction)
        return None

    def prune(self, now_ns):
        self.windows.prune(now_ns)

    def forgive(self, releases):
        self.windows.forgive(lambda k: releases.address_ns(k[0]))
