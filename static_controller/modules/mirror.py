"""mirror: copy every frame between the data ports to the mirror port, and (in
static forwarding mode) patch inside <-> upstream.

Table 0 outputs the copy and goes on to table 1, so whatever table 1 later
meters or drops has already reached the snooper: evidence of an attack is
never lost. With a mirror filter only the matching frames are copied; the
rest still goes on to table 1 and is forwarded. The filter covers both
families; on a target that cannot match a protocol behind IPv6 (the Zodiac
FX) every IPv6 frame is copied: too much evidence rather than none.
"""

from __future__ import annotations

from ..config_view import ETH_TYPES, IP_PROTOS
from ..flowspace import Flowspace, Slice
from ..messages import flow
from .base import COOKIE_MASK, T_FORWARD, T_MIRROR, T_POLICY, Module

P_COPY_FILTERED, P_PASS = 110, 100
P_POLICY_DEFAULT = 0
P_PATCH = 10


class Mirror(Module):
    name = "mirror"
    module_id = 1

    def declare(self) -> Flowspace:
        slices = [Slice.of(T_MIRROR, 100, 199, {"in_port": p}) for p in self.view.data_ports]
        slices.append(Slice.of(T_POLICY, P_POLICY_DEFAULT, P_POLICY_DEFAULT))
        if self.cfg.switch.forwarding == "static":
            slices += [Slice.of(T_FORWARD, P_PATCH, P_PATCH, {"in_port": p}) for p in self.view.data_ports]
        return Flowspace(self.cookie, COOKIE_MASK, tuple(slices))

    def _copy_matches(self, in_port: int) -> list[tuple[int, dict]]:
        """(priority, match) of the frames to copy arriving on ``in_port``."""
        mc = self.cfg.mirror
        if not mc.enabled:
            return []
        flt = mc.filter
        if flt.ip_proto is None:
            return [(P_PASS, {"in_port": in_port})]
        out = []
        for version, eth_type in ETH_TYPES.items():
            if version not in self.view.families:
                out.append((P_COPY_FILTERED, {"in_port": in_port, "eth_type": eth_type}))
                continue
            base = {"in_port": in_port, "eth_type": eth_type, "ip_proto": IP_PROTOS[flt.ip_proto]}
            if flt.l4_port is None:
                out.append((P_COPY_FILTERED, base))
            else:
                out += [(P_COPY_FILTERED, {**base, f"{flt.ip_proto}_{side}": flt.l4_port}) for side in ("src", "dst")]
        return out

    def start(self, now: float) -> list:
        mirror_port = self.view.ports.mirror
        out = []
        inside, upstream = self.view.data_ports
        for in_port in (inside, upstream):
            copies = self._copy_matches(in_port)
            for prio, match in copies:
                out.append(flow(T_MIRROR, prio, match, self.cookie, actions=(("output", mirror_port),), goto=T_POLICY))
            if not copies or copies[0][0] != P_PASS:     # frames the filter does not copy still go on
                out.append(flow(T_MIRROR, P_PASS, {"in_port": in_port}, self.cookie, goto=T_POLICY))
        out.append(flow(T_POLICY, P_POLICY_DEFAULT, {}, self.cookie, goto=T_FORWARD))
        if self.cfg.switch.forwarding == "static":
            out.append(flow(T_FORWARD, P_PATCH, {"in_port": inside}, self.cookie, actions=(("output", upstream),)))
            out.append(flow(T_FORWARD, P_PATCH, {"in_port": upstream}, self.cookie, actions=(("output", inside),)))
        return out
