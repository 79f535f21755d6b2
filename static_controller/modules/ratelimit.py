"""ratelimit: one meter on all client-to-server XMPP traffic, plus the shared
penalty meter that enforce uses for clients flagged with action "limit".

All XMPP is one meter, whatever the family and server port (one flow per
family and port, all through meter 1): an attacker gains nothing by moving
from 5222 to 5223 or from IPv4 to IPv6, and the Zodiac FX's 8 meters are
never the limit on how many server ports there are.

When flowstats_ids is on, it owns the XMPP slice below this band (its
per-client allow flows carry the XMPP meter), so this module then pushes only
the meters: its catch-all XMPP flow would shadow the IDS flows, and the
flowspace check would refuse one of them.
"""

from __future__ import annotations

from ..flowspace import Flowspace, Slice
from ..messages import Band, Meter, flow
from .base import COOKIE_MASK, T_FORWARD, T_POLICY, Module

XMPP_METER, PENALTY_METER = 1, 2
P_XMPP = 200


def meter_of(meter_id: int, mcfg) -> Meter:
    return Meter(meter_id, mcfg.unit, (Band(mcfg.rate, mcfg.burst),))


class RateLimit(Module):
    name = "ratelimit"
    module_id = 2

    def declare(self) -> Flowspace:
        return Flowspace(self.cookie, COOKIE_MASK,
                         tuple(Slice.of(T_POLICY, 200, 249, m) for m in self.view.xmpp_matches()),
                         meters_owned=frozenset({XMPP_METER, PENALTY_METER}))

    def start(self, now: float) -> list:
        x = self.cfg.xmpp
        out: list = [meter_of(XMPP_METER, x.meter), meter_of(PENALTY_METER, x.penalty_meter)]
        if not self.cfg.flowstats_ids.enabled:
            out += [flow(T_POLICY, P_XMPP, m, self.cookie, meter=XMPP_METER, goto=T_FORWARD)
                    for m in self.view.xmpp_matches()]
        return out
