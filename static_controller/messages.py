"""The controller's own OpenFlow vocabulary: small frozen values, no os-ken.

The pure core and the modules speak only these; ``glue.py`` turns them into
os-ken messages at the very edge, so the planning logic runs in unit tests
without a switch and the Ryu/os-ken dependency stays in one place.
Match keys are OpenFlow 1.3 OXM names as os-ken spells them (``in_port``,
``eth_type``, ``ip_proto``, ``ipv4_src``, ``ipv6_src``, ``eth_src``, ``tcp_dst``
...); an address is a string, a masked one the pair os-ken decodes from the
switch, ``("fd00::", "ffff:ffff:ffff:ffff::")``, so a flow read back compares
equal to the one sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
IPPROTO_TCP, IPPROTO_UDP = 6, 17

# special ports (OpenFlow 1.3 numbering)
OFPP_TABLE = 0xFFFFFFF9
OFPP_CONTROLLER = 0xFFFFFFFD


def freeze_match(match: Mapping[str, Any] | tuple) -> tuple:
    """A match as a sorted tuple of pairs: hashable, order-free, printable."""
    items = match.items() if isinstance(match, Mapping) else match
    return tuple(sorted((str(k), v) for k, v in items))


@dataclass(frozen=True)
class Flow:
    """One flow-mod. ``actions`` are apply-actions: ``("output", port)``;
    ``meter`` and ``goto`` become their own instructions (meter runs first)."""

    table: int
    priority: int
    match: tuple
    cookie: int
    actions: tuple = ()
    meter: Optional[int] = None
    goto: Optional[int] = None
    idle_timeout: int = 0
    hard_timeout: int = 0
    send_flow_removed: bool = False
    command: str = "add"            # add | delete_strict

    @property
    def key(self) -> tuple:
        """What makes two flows the same entry in a switch table."""
        return (self.table, self.priority, self.match)

    def describe(self) -> str:
        m = ",".join(f"{k}={v}" for k, v in self.match) or "*"
        acts = [f"meter:{self.meter}"] if self.meter else []
        acts += [f"{a[0]}:{a[1]}" if len(a) > 1 else a[0] for a in self.actions]
        acts += [f"goto:{self.goto}"] if self.goto is not None else []
        return (f"{self.command} table={self.table} prio={self.priority} cookie={self.cookie:#x} {m} "
                f"-> {','.join(acts) or 'drop'}")


def flow(table: int, priority: int, match: Mapping[str, Any], cookie: int, **kw) -> Flow:
    return Flow(table=table, priority=priority, match=freeze_match(match), cookie=cookie, **kw)


@dataclass(frozen=True)
class Band:
    rate: int
    burst: int = 0


@dataclass(frozen=True)
class Meter:
    """A meter with drop bands; ``unit`` is pktps or kbps; ``command`` add or modify."""

    meter_id: int
    unit: str
    bands: tuple
    command: str = "add"

    @property
    def burst(self) -> bool:
        return any(b.burst for b in self.bands)

    def same_config(self, unit: str, bands: tuple) -> bool:
        return self.unit == unit and tuple(self.bands) == tuple(bands)


@dataclass(frozen=True)
class PacketOut:
    in_port: int
    actions: tuple            # ("output", port) ...
    data: bytes = b""
    buffer_id: Optional[int] = None


@dataclass(frozen=True)
class FlowStatsRequest:
    xid: int
    table: Optional[int] = None     # None = all tables
    cookie: int = 0
    cookie_mask: int = 0


@dataclass(frozen=True)
class MeterConfigRequest:
    xid: int


@dataclass(frozen=True)
class MeterStatsRequest:
    xid: int


@dataclass(frozen=True)
class Barrier:
    xid: int


# --- what comes back from the switch (already decoded by the glue) ----------


@dataclass(frozen=True)
class PacketIn:
    cookie: int
    table: int
    in_port: int
    data: bytes
    buffer_id: Optional[int] = None


@dataclass(frozen=True)
class FlowStat:
    table: int
    priority: int
    match: tuple
    cookie: int
    packets: int
    bytes: int
    duration: float
    idle_timeout: int = 0
    hard_timeout: int = 0


@dataclass(frozen=True)
class FlowStats:
    xid: int
    entries: tuple
    more: bool = False


@dataclass(frozen=True)
class FlowRemoved:
    cookie: int
    table: int
    priority: int
    match: tuple
    reason: str            # idle_timeout | hard_timeout | delete | group_delete | meter_delete


@dataclass(frozen=True)
class MeterConfig:
    """The switch's answer to a meter config request: id -> (unit, bands)."""

    xid: int
    meters: tuple          # ((meter_id, unit, bands), ...)
    more: bool = False


@dataclass(frozen=True)
class MeterStats:
    xid: int
    meters: tuple          # ((meter_id, packets_in, (band_drop_packets, ...)), ...)
    more: bool = False


@dataclass(frozen=True)
class Error:
    """An OFPT_ERROR, with what the glue could read back from the failed request.

    ``name`` is the code's OpenFlow 1.3 name as os-ken's ofproto spells it
    (``OFPMMFC_UNKNOWN_METER``, ``OFPBRC_BAD_MULTIPART``): the core reacts to
    names, never to numbers."""

    xid: int
    type: int
    code: int
    cookie: Optional[int] = None
    meter_id: Optional[int] = None
    request: Optional[str] = None   # flow_mod | meter_mod | other
    name: Optional[str] = None

    def describe(self) -> str:
        return self.name or f"type {self.type} code {self.code}"


@dataclass(frozen=True)
class BarrierReply:
    xid: int


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class Flags:
    """Flag documents from the store; ``snapshot`` means: this is every active flag.

    ``never_ban`` is the ``never_ban`` collection's documents when they were
    (re)read, None when unchanged; ``own`` this machine's addresses (for
    ``enforce.never_ban_self``), sent with every ``never_ban``."""

    docs: tuple
    snapshot: bool = False
    now: float = field(default=0.0)
    never_ban: Optional[tuple] = None
    own: tuple = ()
