"""Flowspace slicing, after FlowVisor: who may touch which flows.

Each module declares the cookie bits it owns, the meters it owns or may use,
and a list of slices (table, priority band, match space). The core checks
every flow a module emits against that declaration and against the flows of
the other modules (``classify`` gives FlowVisor's relation between two
matches), so one module cannot hide another module's flows by accident.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .messages import Flow, freeze_match


class Rel(enum.Enum):
    """How match A relates to match B (FlowVisor's MatchType)."""

    NONE = "none"            # no packet matches both
    SUBSET = "subset"        # every packet A matches, B matches too
    SUPERSET = "superset"
    INTERSECT = "intersect"  # overlap, neither contains the other
    EQUAL = "equal"


def _as_set(key: str, value: Any):
    """A field value as something with containment: an IP network or a singleton.

    A masked address is the pair os-ken uses, ``(address, mask)``; the mask of
    an IPv6 pair is an address too (``ffff:ffff:ffff:ffff::``), which
    ``ipaddress`` does not read as a netmask, so it is counted into a length.
    """
    if key.startswith(("ipv4_", "ipv6_", "arp_spa", "arp_tpa")):
        if isinstance(value, tuple):
            addr, mask = value
            bits = bin(int(ipaddress.ip_address(mask))).count("1") if not isinstance(mask, int) else mask
            value = f"{addr}/{bits}"
        return ipaddress.ip_network(str(value), strict=False)
    return value


def _field_rel(key: str, a: Any, b: Any) -> Rel:
    sa, sb = _as_set(key, a), _as_set(key, b)
    if isinstance(sa, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        if sa == sb:
            return Rel.EQUAL
        if sa.version == sb.version and sa.subnet_of(sb):
            return Rel.SUBSET
        if sa.version == sb.version and sb.subnet_of(sa):
            return Rel.SUPERSET
        return Rel.NONE
    return Rel.EQUAL if sa == sb else Rel.NONE


def classify(a: Iterable, b: Iterable) -> Rel:
    """Relation of match ``a`` to match ``b`` (a missing field is a wildcard)."""
    da, db = dict(freeze_match(dict(a))), dict(freeze_match(dict(b)))
    a_wider = b_wider = False        # a has a wildcard where b has a value, and vice versa
    for key in set(da) | set(db):
        if key not in da:
            a_wider = True
            continue
        if key not in db:
            b_wider = True
            continue
        rel = _field_rel(key, da[key], db[key])
        if rel is Rel.NONE:
            return Rel.NONE
        if rel is Rel.SUBSET:
            b_wider = True
        elif rel is Rel.SUPERSET:
            a_wider = True
    if a_wider and b_wider:
        return Rel.INTERSECT
    if a_wider:
        return Rel.SUPERSET
    if b_wider:
        return Rel.SUBSET
    return Rel.EQUAL


@dataclass(frozen=True)
class Slice:
    """One piece of flowspace: flows in ``table`` with priority in [lo, hi] whose match lies inside ``match``."""

    table: int
    lo: int
    hi: int
    match: tuple = ()

    @classmethod
    def of(cls, table: int, lo: int, hi: int, match: Optional[dict] = None) -> "Slice":
        return cls(table, lo, hi, freeze_match(match or {}))

    def holds(self, f: Flow) -> bool:
        return (f.table == self.table and self.lo <= f.priority <= self.hi
                and classify(f.match, self.match) in (Rel.SUBSET, Rel.EQUAL))


@dataclass(frozen=True)
class Flowspace:
    """A module's declaration: cookie value/mask, slices, meters owned and meters it may use.

    ``may_shadow`` names the modules whose flows this one may hide on purpose
    (a ban overrides flowstats_ids' per-client allow flow of the same client);
    every other overlap is still refused.
    """

    cookie: int
    cookie_mask: int
    slices: tuple
    meters_owned: frozenset = field(default_factory=frozenset)
    meters_used: frozenset = field(default_factory=frozenset)
    may_shadow: frozenset = field(default_factory=frozenset)

    def owns_cookie(self, cookie: int) -> bool:
        return cookie & self.cookie_mask == self.cookie

    def outside(self, f: Flow) -> Optional[str]:
        """Why ``f`` lies outside this declaration, or None when it is inside."""
        if not self.owns_cookie(f.cookie):
            return f"cookie {f.cookie:#x} is not {self.cookie:#x}/{self.cookie_mask:#x}"
        if f.command != "add":
            if not any(s.table == f.table and s.lo <= f.priority <= s.hi for s in self.slices):
                return f"table {f.table} priority {f.priority} is outside the declared slices"
            return None
        if not any(s.holds(f) for s in self.slices):
            return f"table {f.table} priority {f.priority} match {dict(f.match)} is outside the declared slices"
        if f.meter is not None and f.meter not in (self.meters_owned | self.meters_used):
            return f"meter {f.meter} is neither owned nor declared as used"
        return None


def conflict(new: Flow, other: Flow) -> Optional[str]:
    """Why ``new`` (one module) would hide or be hidden by ``other`` (another module), or None.

    Same table only. A higher-priority flow whose match equals or contains a
    lower-priority one shadows it; the reverse makes the new flow dead; equal
    priorities with any overlap leave the switch to choose. A higher-priority
    *subset* is allowed: it carves an exception (enforce inside ratelimit).
    """
    if new.table != other.table:
        return None
    rel = classify(new.match, other.match)
    if rel is Rel.NONE:
        return None
    if new.priority == other.priority:
        return f"overlaps ({rel.value}) at the same priority {new.priority}"
    if new.priority > other.priority and rel in (Rel.SUPERSET, Rel.EQUAL):
        return f"would shadow it ({rel.value}, priority {new.priority} > {other.priority})"
    if new.priority < other.priority and rel in (Rel.SUBSET, Rel.EQUAL):
        return f"would be shadowed by it ({rel.value}, priority {new.priority} < {other.priority})"
    return None
