"""What a switch can hold: the ``ovs`` and ``zodiacfx`` profiles.

The Zodiac FX cannot run here, so its profile is a model built from its
published limits (4 ports, port 4 management; 8 meters of at most 3 bands,
KBPS/PKTPS only, no BURST/STATS; 480 flows; 10 tables; group type ALL; no
IPv6 matching; a small receive buffer, so pushes are paced; flows wiped on
disconnect). The plan is checked against the profile before anything is
pushed, and each new flow against the room left, so a plan the target cannot
hold is refused with a clear message instead of failing half-way on the
switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from appliance.errors import BadInput

from .messages import ETH_IPV6, OFPP_CONTROLLER, OFPP_TABLE, Flow, Meter

L3_L4 = ("ip_proto", "tcp_src", "tcp_dst", "udp_src", "udp_dst")

# OXM payload bytes per match field (OpenFlow 1.3.5 section 7.2.3.7); each field adds a 4-byte header, a
# masked field (a (value, mask) pair) carries its payload twice.
OXM_PAYLOAD = {"in_port": 4, "eth_dst": 6, "eth_src": 6, "eth_type": 2, "vlan_vid": 2, "ip_proto": 1,
               "ipv4_src": 4, "ipv4_dst": 4, "ipv6_src": 16, "ipv6_dst": 16, "tcp_src": 2, "tcp_dst": 2,
               "udp_src": 2, "udp_dst": 2, "arp_spa": 4, "arp_tpa": 4}


def oxm_bytes(match) -> int:
    return sum(4 + OXM_PAYLOAD[k] * (2 if isinstance(v, tuple) else 1) for k, v in match)


def instruction_bytes(f: Flow) -> int:
    """Meter 8, Apply-Actions 8 + 16 per output, Goto-Table 8 (OpenFlow 1.3.5 section 7.2.4)."""
    return ((8 if f.meter is not None else 0) + (8 + 16 * len(f.actions) if f.actions else 0)
            + (8 if f.goto is not None else 0))


@dataclass(frozen=True)
class BlockPool:
    """A switch that stores flows, matches, instructions and meters in one pool of fixed-size blocks.

    The Zodiac FX: each flow takes a 56-byte block for its flow_mod, one for
    its match and one for its instruction list (when not empty), a meter one
    of 40 + 16 per band, each the smallest free block that fits; nothing over
    the largest block (docs/ARCHITECTURE.md, "Facts: the Zodiac FX"). Smallest
    fit over blocks that only ever fit upward succeeds, in any order, exactly
    when for every block size there are at least as many blocks that large or
    larger as requests that need them; so the count needs no replay.
    """
    sizes: tuple            # (block bytes, how many), smallest first
    flow_block: int
    meter_block: int
    band_bytes: int

    def requests(self, flows: Iterable[Flow], meters: Iterable[Meter]) -> list[int]:
        out = []
        for f in flows:
            out.append(self.flow_block)
            out += [n for n in (oxm_bytes(f.match), instruction_bytes(f)) if n]
        out += [self.meter_block + self.band_bytes * len(m.bands) for m in meters]
        return out

    def problem(self, flows: Iterable[Flow], meters: Iterable[Meter], name: str) -> Optional[str]:
        """Why these flows and meters do not fit in the pool together, or None."""
        need = [0] * len(self.sizes)
        for n in self.requests(flows, meters):
            k = next((i for i, (size, _count) in enumerate(self.sizes) if size >= n), None)
            if k is None:
                return f"needs a {n}-byte block; the largest {name} block holds {self.sizes[-1][0]}"
            need[k] += 1
        wanted = have = 0
        for k in reversed(range(len(self.sizes))):
            wanted, have = wanted + need[k], have + self.sizes[k][1]
            if wanted > have:
                return (f"needs {wanted} blocks of {self.sizes[k][0]} bytes or more; {name}'s pool has {have} "
                        f"(its flows, matches, instructions and meters share {sum(c for _s, c in self.sizes)} "
                        "blocks)")
        return None



class PlanRefused(BadInput):
    """The target cannot hold this plan; ``str()`` says why, in one line."""


@dataclass(frozen=True)
class Profile:
    name: str
    max_flows: Optional[int]
    max_meters: Optional[int]
    max_bands: Optional[int]
    max_tables: int
    units: frozenset
    burst: bool
    data_ports: Optional[frozenset]     # None: any port number
    management_port: Optional[int]
    ipv6: bool = True                   # matches IPv6 addresses, and protocol and ports behind IPv6
    meter_stats: bool = True            # its meter counters can be polled (the Zodiac's cannot)
    window_bytes: Optional[int] = None  # at most this many bytes unconfirmed by a barrier reply; None: no pacing
    keeps_flows: bool = True            # keeps its flows while no controller is connected (OVS secure fail mode)
    pool: Optional[BlockPool] = None    # flows and meters share a pool of blocks (the Zodiac's membag)

    def room_problem(self, flows: Iterable[Flow], meters: Iterable[Meter]) -> Optional[str]:
        """Why the target has no room for all of ``flows`` and ``meters`` at once, or None."""
        flows = list(flows)
        if self.max_flows is not None and len(flows) > self.max_flows:
            return f"needs {len(flows)} flows; {self.name} holds at most {self.max_flows}"
        return self.pool.problem(flows, meters, self.name) if self.pool else None

    def match_problem(self, match) -> Optional[str]:
        """Why the target cannot match ``match`` (a dict or frozen pairs), or None."""
        m = dict(match)
        if self.ipv6:
            return None
        for key in m:
            if key.startswith("ipv6_") or (m.get("eth_type") == ETH_IPV6 and key in L3_L4):
                return (f"cannot match {key} in IPv6: {self.name} matches IPv6 frames by eth_type only "
                        "(no IPv6 address, protocol or port)")
        return None

    def flow_problem(self, f: Flow) -> Optional[str]:
        if f.table >= self.max_tables or (f.goto is not None and f.goto >= self.max_tables):
            return f"uses table {max(f.table, f.goto or 0)}; {self.name} has tables 0 to {self.max_tables - 1}"
        why = self.match_problem(f.match)
        if why:
            return why
        ports = [v for k, v in f.match if k == "in_port"] + [a[1] for a in f.actions if a[0] == "output"]
        for p in ports:
            if p in (OFPP_CONTROLLER, OFPP_TABLE):
                continue
            if self.management_port is not None and p == self.management_port:
                return f"uses port {p}, the {self.name} management port"
            if self.data_ports is not None and p not in self.data_ports:
                return f"uses port {p}; {self.name} data ports are {sorted(self.data_ports)}"
        return None

    def meter_problem(self, m: Meter) -> Optional[str]:
        if m.unit not in self.units:
            return f"meter {m.meter_id}: unit {m.unit} is not supported by {self.name}"
        if self.max_bands is not None and len(m.bands) > self.max_bands:
            return f"meter {m.meter_id}: {len(m.bands)} bands; {self.name} allows at most {self.max_bands}"
        if m.burst and not self.burst:
            return f"meter {m.meter_id}: a burst size needs the BURST flag, which {self.name} does not support"
        return None

    def validate(self, flows: Iterable[Flow], meters: Iterable[Meter]) -> None:
        """Raise ``PlanRefused`` naming the first thing the target cannot hold."""
        flows, meters = list(flows), list(meters)
        if self.max_meters is not None and len(meters) > self.max_meters:
            raise PlanRefused(f"the plan needs {len(meters)} meters; {self.name} holds at most {self.max_meters}")
        for m in meters:
            why = self.meter_problem(m)
            if why:
                raise PlanRefused(why)
        for f in flows:
            why = self.flow_problem(f)
            if why:
                raise PlanRefused(f"flow {f.describe()}: {why}")
        why = self.room_problem(flows, meters)
        if why:
            raise PlanRefused(f"the plan {why}")


OVS = Profile("ovs", max_flows=None, max_meters=None, max_bands=None, max_tables=254,
              units=frozenset({"pktps", "kbps"}), burst=True, data_ports=None, management_port=None)

# The Zodiac's OpenFlow receive buffer is about 1,136 bytes; 1,024 leaves room for the echo replies and
# other unpaced small messages (docs/ARCHITECTURE.md, "Facts: the Zodiac FX").
ZODIACFX = Profile("zodiacfx", max_flows=480, max_meters=8, max_bands=3, max_tables=10,
                   units=frozenset({"pktps", "kbps"}), burst=False, data_ports=frozenset({1, 2, 3}),
                   management_port=4, ipv6=False, meter_stats=False, window_bytes=1024, keeps_flows=False,
                   # config/conf_membag.h:52-60: 32 bags of 32 blocks; sizeof flow_mod 56, meter_entry13 40
                   pool=BlockPool(sizes=((16, 128), (24, 256), (56, 256), (72, 256), (96, 128)), flow_block=56,
                                  meter_block=40, band_bytes=16))

PROFILES = {"ovs": OVS, "zodiacfx": ZODIACFX}


def profile(name: str) -> Profile:
    return PROFILES[name]
