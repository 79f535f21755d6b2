"""flowstats_ids: the reference IDS from switch counters (xmpp_ofc's algorithm).

Client-to-server XMPP (every family and server port) goes to the controller
at priority 150; on each packet-in the module installs a per-client allow
flow (one source address, source port and server port; idle/hard timeouts,
through the XMPP meter) and sends the packet on. Every ``poll_interval`` it
asks for the flow stats of its own cookie; a client whose allow flow counted
more than ``threshold_ppm`` packets within the last minute (a sliding window
over the polled counters) gets a drop flow for ``drop_seconds``. Off by
default.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
from typing import Callable

from ..flowspace import Flowspace, Slice
from ..messages import (
    OFPP_CONTROLLER,
    OFPP_TABLE,
    FlowRemoved,
    FlowStats,
    FlowStatsRequest,
    PacketIn,
    PacketOut,
    Tick,
    flow,
)
from ..packet import parse
from .base import COOKIE_MASK, T_FORWARD, T_POLICY, Module, digest
from .ratelimit import XMPP_METER

log = logging.getLogger("pisnoop.controller.flowstats_ids")

P_TO_CONTROLLER, P_ALLOW, P_DROP = 150, 160, 190
WINDOW = 60.0
KIND_SHIFT = 48            # cookie bits 48..55: 1 = allow flow, 2 = drop flow; 0..47: the client
KIND_ALLOW, KIND_DROP = 1, 2
SRC_FIELD = {4: "ipv4_src", 6: "ipv6_src"}


class FlowstatsIds(Module):
    name = "flowstats_ids"
    module_id = 4
    subscriptions = frozenset({"packet_in", "flow_stats", "flow_removed", "tick"})

    def __init__(self, view, next_xid: Callable[[], int]):
        super().__init__(view)
        self.next_xid = next_xid        # the core's allocator: a stats reply is routed back by its xid
        self.allowed: dict[tuple, collections.deque] = {}    # (ip, port, server port) -> (age s, packets) samples
        self.dropped: set[tuple] = set()
        self.next_poll = 0.0
        self.stats = {"clients_seen": 0, "clients_dropped": 0, "polls": 0}

    def declare(self) -> Flowspace:
        return Flowspace(self.cookie, COOKIE_MASK,
                         tuple(Slice.of(T_POLICY, 150, 199, m) for m in self.view.xmpp_matches()),
                         meters_used=frozenset({XMPP_METER}))

    def counters(self) -> dict:
        return dict(self.stats)

    def _cookie(self, kind: int, ip: str, port: int, server_port: int) -> int:
        """The client in the low 48 bits: an IPv4 address's low 16 bits and the port (as before), or a digest."""
        addr = ipaddress.ip_address(ip)
        low = ((int(addr) << 16) & ((1 << 48) - 1)) | port if addr.version == 4 else \
            digest(f"[{ip}]:{port}>{server_port}", 48)
        return self.cookie | (kind << KIND_SHIFT) | low

    def _client_match(self, ip: str, port: int, server_port: int) -> dict:
        version = ipaddress.ip_address(ip).version
        return {**self.view.l4_match(self.view.ports.inside, version, "tcp", server_port), SRC_FIELD[version]: ip,
                "tcp_src": port}

    def start(self, now: float) -> list:
        self.allowed.clear()
        self.dropped.clear()
        self.next_poll = now + self.cfg.flowstats_ids.poll_interval
        return [flow(T_POLICY, P_TO_CONTROLLER, m, self.cookie, actions=(("output", OFPP_CONTROLLER),))
                for m in self.view.xmpp_matches()]

    def handle(self, event) -> list:
        if isinstance(event, PacketIn):
            return self._packet_in(event)
        if isinstance(event, Tick) and event.now >= self.next_poll:
            self.next_poll = event.now + self.cfg.flowstats_ids.poll_interval
            self.stats["polls"] += 1
            return [FlowStatsRequest(self.next_xid(), table=T_POLICY, cookie=self.cookie, cookie_mask=COOKIE_MASK)]
        if isinstance(event, FlowStats):
            return self._judge(event)
        if isinstance(event, FlowRemoved):
            key = self._key(event.match)
            kind = (event.cookie >> KIND_SHIFT) & 0xFF
            if key and kind == KIND_ALLOW:
                self.allowed.pop(key, None)
            elif key and kind == KIND_DROP:
                self.dropped.discard(key)
        return []

    @staticmethod
    def _key(match) -> tuple | None:
        m = dict(match)
        ip = m.get("ipv4_src") or m.get("ipv6_src")
        return (ip, m["tcp_src"], m["tcp_dst"]) if ip and "tcp_src" in m and "tcp_dst" in m else None

    def _forward(self, ev: PacketIn) -> PacketOut:
        """Send the packet on. Static mode: straight to upstream (no second mirror copy)."""
        if self.cfg.switch.forwarding == "static":
            return PacketOut(ev.in_port, (("output", self.view.ports.upstream),), ev.data, ev.buffer_id)
        return PacketOut(ev.in_port, (("output", OFPP_TABLE),), ev.data, ev.buffer_id)

    def _packet_in(self, ev: PacketIn) -> list:
        h = parse(ev.data)
        if h is None or h.tcp_src is None or h.tcp_dst not in self.cfg.xmpp.server_ports:
            return []
        key = (h.ip_src, h.tcp_src, h.tcp_dst)
        if key in self.dropped:
            return []
        out = []
        if key not in self.allowed:
            ids = self.cfg.flowstats_ids
            self.allowed[key] = collections.deque()
            self.stats["clients_seen"] += 1
            out.append(flow(T_POLICY, P_ALLOW, self._client_match(*key), self._cookie(KIND_ALLOW, *key),
                            meter=XMPP_METER, goto=T_FORWARD, idle_timeout=ids.idle_timeout,
                            hard_timeout=ids.hard_timeout, send_flow_removed=True))
        out.append(self._forward(ev))
        return out

    def _judge(self, ev: FlowStats) -> list:
        out = []
        limit = self.cfg.flowstats_ids.threshold_ppm
        for e in ev.entries:
            if e.priority != P_ALLOW:
                continue
            key = self._key(e.match)
            if key is None or key in self.dropped:
                continue
            samples = self.allowed.setdefault(key, collections.deque())
            samples.append((e.duration, e.packets))
            # baseline: the newest sample at least a minute old (0 packets when the flow is younger)
            while len(samples) > 1 and samples[1][0] <= e.duration - WINDOW:
                samples.popleft()
            base = samples[0][1] if samples[0][0] <= e.duration - WINDOW else 0
            ppm = e.packets - base
            if ppm > limit:
                self.dropped.add(key)
                self.stats["clients_dropped"] += 1
                log.warning("client %s:%d (server port %d) sent %d packets in a minute (> %d): dropped for %d s",
                            *key, ppm, limit, self.cfg.flowstats_ids.drop_seconds)
                out.append(flow(T_POLICY, P_DROP, self._client_match(*key), self._cookie(KIND_DROP, *key),
                                hard_timeout=self.cfg.flowstats_ids.drop_seconds, send_flow_removed=True))
        return out
