"""l2switch: MAC learning in the forwarding table, instead of the static patch.

Unknown traffic in table 2 goes to the controller; the module learns the
source MAC's port, installs a flow toward a known destination and sends the
packet on, or floods it to the other data ports. "Flood" never includes the
mirror port (it already has its copy from table 0) or a management port.
"""

from __future__ import annotations

from ..flowspace import Flowspace, Slice
from ..messages import OFPP_CONTROLLER, FlowRemoved, PacketIn, PacketOut, flow
from ..packet import parse
from .base import COOKIE_MASK, T_FORWARD, Module

P_MISS, P_KNOWN = 0, 100
IDLE_SECONDS = 60


class L2Switch(Module):
    name = "l2switch"
    module_id = 5
    subscriptions = frozenset({"packet_in", "flow_removed"})

    def __init__(self, view):
        super().__init__(view)
        self.table: dict[str, int] = {}        # MAC -> port
        self.stats = {"macs_learned": 0, "floods": 0, "flows_installed": 0}

    def declare(self) -> Flowspace:
        return Flowspace(self.cookie, COOKIE_MASK, (Slice.of(T_FORWARD, P_MISS, 199),))

    def counters(self) -> dict:
        return {**self.stats, "macs_known": len(self.table)}

    def start(self, now: float) -> list:
        self.table.clear()
        return [flow(T_FORWARD, P_MISS, {}, self.cookie, actions=(("output", OFPP_CONTROLLER),))]

    def handle(self, event) -> list:
        if isinstance(event, PacketIn):
            return self._packet_in(event)
        if isinstance(event, FlowRemoved):
            dst = dict(event.match).get("eth_dst")
            if dst:
                self.table.pop(dst, None)
        return []

    def _packet_in(self, ev: PacketIn) -> list:
        h = parse(ev.data)
        data_ports = self.view.data_ports
        if h is None or ev.in_port not in data_ports:
            return []
        if self.table.get(h.eth_src) != ev.in_port and not int(h.eth_src.split(":")[0], 16) & 1:
            self.table[h.eth_src] = ev.in_port
            self.stats["macs_learned"] += 1
        out_port = self.table.get(h.eth_dst)
        if out_port == ev.in_port:
            return []
        if out_port is None:
            self.stats["floods"] += 1
            ports = tuple(("output", p) for p in data_ports if p != ev.in_port)
            return [PacketOut(ev.in_port, ports, ev.data, ev.buffer_id)]
        self.stats["flows_installed"] += 1
        return [flow(T_FORWARD, P_KNOWN, {"in_port": ev.in_port, "eth_dst": h.eth_dst}, self.cookie,
                     actions=(("output", out_port),), idle_timeout=IDLE_SECONDS, send_flow_removed=True),
                PacketOut(ev.in_port, (("output", out_port),), ev.data, ev.buffer_id)]
