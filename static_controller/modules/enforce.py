"""enforce: turn flags (the analyser's and ``pisnoop flags ban``'s) into per-client drop or limit flows.

Pure: flag documents (``appliance.flagdoc``) and the never-ban list come in
as ``Flags`` events (the store is polled by ``flagwatch`` in its own thread),
flows go out. Every flag is enforceable: its subject (an address, a prefix, a
connection or a MAC), protocol (tcp/udp), server ports and direction give
one flow per family and server port, in the policy table above ratelimit's
band (table 0 has already copied the frame to the mirror, so a banned
client's traffic is still seen). Drop flows sit above limit flows, so where
a drop and a limit overlap the drop wins. Each flow's ``hard_timeout`` is the
ban time left, so the switch lifts the ban by itself even if the controller
is gone; a released, expired or exempt flag removes its flows at once.

A flag whose subject is on the never-ban list (``appliance.neverban``: the
config, the ``never_ban`` collection, this machine's addresses) installs
nothing, is counted ``flags_exempt`` and logged once: the analyser marks such
flags exempt first, this is the second line. A flow the target cannot match
(IPv6 on the Zodiac FX) is left out, counted ``flags_unenforceable`` and
logged once per flag.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
from typing import Optional

from appliance import flagdoc, neverban
from appliance.flagdoc import BadFlag, Flag

from ..config_view import ETH_TYPES, View
from ..flowspace import Flowspace, Slice
from ..messages import Flags, Flow, FlowRemoved, Tick, flow
from .base import COOKIE_MASK, T_FORWARD, T_POLICY, Module, digest
from .ratelimit import PENALTY_METER

log = logging.getLogger("pisnoop.controller.enforce")

P_LIMIT, P_DROP = 310, 320
BAND = (300, 399)
MAX_TIMEOUT = 65535
RETRY_SECONDS = 30.0       # a ban refused for want of room is pushed again after this long

# The cookie of a ban: module 3 in bits 56-63, the subject's kind in 52-55, the subject in 0-51. IPv4 and MAC
# subjects are there whole (``decode_cookie`` gives them back); an IPv6 subject, which cannot fit, is a 52-bit
# digest of its text (the flow's match holds the address itself).
KIND_SHIFT, VALUE_BITS = 52, 52
K_V4, K_V4_PREFIX, K_V6, K_MAC = 1, 2, 3, 4
SRC_FIELD = {4: "ipv4_src", 6: "ipv6_src"}


def ban_cookie(module_cookie: int, f: Flag) -> int:
    if f.client_mac is not None:
        kind, value = K_MAC, int(f.client_mac.replace(":", ""), 16)
    elif f.client_net.version == 4:
        addr = int(f.client_net.network_address) << 16
        kind, value = (K_V4, addr | (f.client_port or 0)) if f.scope != "prefix" else \
            (K_V4_PREFIX, addr | f.client_net.prefixlen)
    else:
        kind, value = K_V6, digest(f.subject, VALUE_BITS)
    return module_cookie | (kind << KIND_SHIFT) | value


def decode_cookie(cookie: int) -> str:
    """What a ban cookie read back from the switch is about: ``10.0.0.5:40000``, ``10.0.1.0/24``, a MAC, or
    ``ipv6 #<digest>``."""
    kind, value = (cookie >> KIND_SHIFT) & 0xF, cookie & ((1 << VALUE_BITS) - 1)
    if kind == K_MAC:
        return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))
    if kind in (K_V4, K_V4_PREFIX):
        addr, low = ipaddress.IPv4Address(value >> 16), value & 0xFFFF
        if kind == K_V4_PREFIX:
            return f"{addr}/{low}"
        return f"{addr}:{low}" if low else str(addr)
    return f"ipv6 #{value:013x}" if kind == K_V6 else f"unknown kind {kind}"


def source_match(f: Flag) -> dict:
    """The subject as match fields: ``eth_src``, or the address (a masked pair for a prefix) and the client port."""
    if f.client_mac is not None:
        return {"eth_src": f.client_mac}
    net = f.client_net
    value = str(net.network_address) if f.scope != "prefix" else (str(net.network_address), str(net.netmask))
    out = {SRC_FIELD[net.version]: value}
    if f.client_port is not None:
        out[f"{f.protocol}_src"] = f.client_port
    return out


def ban_matches(view: View, f: Flag) -> list[dict]:
    """One match per family and server port: the client's packets toward the server ports, arriving on the inside
    port (outbound) or the upstream port (inbound). A MAC subject covers both families."""
    in_port = view.ports.inside if f.direction == flagdoc.OUTBOUND else view.ports.upstream
    versions = tuple(ETH_TYPES) if f.client_mac is not None else (f.client_net.version,)
    src = source_match(f)
    return [{**view.l4_match(in_port, v, f.protocol, p), **src} for v in versions for p in f.server_ports]


def subject_addresses(f: Flag) -> list[str]:
    """The addresses a MAC subject was seen with (``evidence.addresses``), for the never-ban check."""
    seen = f.evidence.get("addresses") if f.client_mac is not None else None
    out = []
    for a in seen if isinstance(seen, (list, tuple)) else ():
        try:
            out.append(str(ipaddress.ip_address(a)))
        except (ValueError, TypeError):
            continue
    return out


class Enforce(Module):
    name = "enforce"
    module_id = 3
    subscriptions = frozenset({"flags", "tick", "flow_removed"})

    def __init__(self, view):
        super().__init__(view)
        self.flags: dict[str, Flag] = {}                           # flag id -> a flag that bans
        self.installed: dict[tuple, tuple[Flow, str, float]] = {}  # (priority, match) -> (flow, flag id, expires)
        self.never = neverban.NeverBan.of(self.cfg)
        self.bad: set[str] = set()
        self.verdicts: dict[str, Optional[str]] = {}    # flag id -> the never-ban entry it is on, or None
        self.exempt: set[str] = set()          # flag ids refused as exempt (counted and logged once)
        self.unenforceable: set[str] = set()
        self.retry_at: dict[tuple, float] = {}  # ban key -> when to push it again after a refusal for room
        self.snapshot_seen = False
        self.stats = {"flags_active": 0, "flags_bad": 0, "flags_exempt": 0, "flags_unenforceable": 0,
                      "bans_installed": 0, "bans_removed": 0, "bans_refused": 0}

    def declare(self) -> Flowspace:
        """Any flow arriving on a data port, in the policy table's band above ratelimit's."""
        return Flowspace(self.cookie, COOKIE_MASK,
                         tuple(Slice.of(T_POLICY, *BAND, {"in_port": p}) for p in self.view.data_ports),
                         meters_used=frozenset({PENALTY_METER}),
                         may_shadow=frozenset({"flowstats_ids"}))   # a ban wins over the client's allow flow

    def ready(self) -> bool:
        """After the first full snapshot; the incremental poll keeps the cache right across reconnects."""
        return self.snapshot_seen

    def counters(self) -> dict:
        return {**self.stats, "flags_active": len(self.flags)}

    # --- the flows of one flag -------------------------------------------------

    def _flows(self, fid: str, f: Flag, now: float) -> list[Flow]:
        left = max(1, min(MAX_TIMEOUT, math.ceil(f.expires_at.timestamp() - now)))
        cookie = ban_cookie(self.cookie, f)
        kw = {"meter": PENALTY_METER, "goto": T_FORWARD} if f.action == "limit" else {}
        matches = ban_matches(self.view, f)
        problems = [why for why in map(self.view.profile.match_problem, matches) if why]
        if problems and fid not in self.unenforceable:
            self.unenforceable.add(fid)
            self.stats["flags_unenforceable"] += 1
            log.warning("flag %s (%s): %d of its %d flows not enforced on %s: %s", fid, f.subject, len(problems),
                        len(matches), self.view.profile.name, problems[0])
        return [flow(T_POLICY, P_DROP if f.action == "drop" else P_LIMIT, m, cookie, hard_timeout=left,
                     send_flow_removed=True, **kw) for m in matches if not self.view.profile.match_problem(m)]

    def _exempt(self, fid: str, f: Flag) -> bool:
        """Whether the never-ban list holds the subject (worked out once per flag and list: this runs every tick)."""
        if fid not in self.verdicts:
            self.verdicts[fid] = self.never.exempts(f.client_net, subject_addresses(f))
        why = self.verdicts[fid]
        if why and fid not in self.exempt:
            self.exempt.add(fid)
            self.stats["flags_exempt"] += 1
            log.warning("flag %s (%s) not enforced: on the never-ban list, %s", fid, f.subject, why)
        return why is not None

    def _desired(self, now: float) -> dict[tuple, tuple[Flow, str, float]]:
        """One flow per (priority, match): the longest ban; drop and limit differ in priority."""
        out: dict[tuple, tuple[Flow, str, float]] = {}
        for fid, f in self.flags.items():
            expires = f.expires_at.timestamp()
            if expires <= now or self._exempt(fid, f):
                continue
            for fl in self._flows(fid, f, now):
                key = (fl.priority, fl.match)
                if key not in out or out[key][2] < expires:
                    out[key] = (fl, fid, expires)
        return out

    def _sync(self, now: float) -> list:
        want = self._desired(now)
        msgs = []
        for key, (fl, fid, expires) in want.items():
            if self.retry_at.get(key, 0.0) > now:
                continue                  # refused for want of room: tried again later, not on every poll
            self.retry_at.pop(key, None)
            old = self.installed.get(key)
            # re-push when new or the ban was extended (hard timeouts only count down)
            if old is None or abs(old[2] - expires) > 1:
                msgs.append(fl)
                self.installed[key] = (fl, fid, expires)
                self.stats["bans_installed"] += 1
                log.info("ban %s: %s for %d s", fid, fl.describe(), fl.hard_timeout)
        for key in [k for k in self.installed if k not in want]:
            fl, fid, expires = self.installed.pop(key)
            if expires > now:            # released, exempt or replaced early: remove it now (else the switch did)
                msgs.append(dataclasses.replace(fl, command="delete_strict"))
                self.stats["bans_removed"] += 1
                log.info("ban %s lifted: %s", fid, fl.describe())
        return msgs

    # --- the module API ---------------------------------------------------------

    def start(self, now: float) -> list:
        self.installed, self.retry_at = {}, {}        # a new connection: a wiped table has room again
        return self._sync(now)

    def handle(self, event) -> list:
        if isinstance(event, Flags):
            self._take(event)
            return self._sync(event.now)
        if isinstance(event, Tick):
            for fid in [fid for fid, f in self.flags.items() if f.expires_at.timestamp() <= event.now]:
                del self.flags[fid]
                self.verdicts.pop(fid, None)
            return self._sync(event.now)
        if isinstance(event, FlowRemoved):
            for key, (fl, _fid, _exp) in list(self.installed.items()):
                if fl.cookie == event.cookie and fl.match == event.match:
                    del self.installed[key]
        return []

    def refused(self, f, now: float) -> None:
        """A ban the core or the switch had no room for: forget it, so the next sync after RETRY_SECONDS
        pushes it again (room frees as other bans end); the rest stays."""
        for key, (fl, _fid, _exp) in list(self.installed.items()):
            if fl.cookie == f.cookie and fl.match == f.match and fl.priority == f.priority:
                del self.installed[key]
                self.retry_at[key] = now + RETRY_SECONDS
                self.stats["bans_refused"] += 1

    def _take(self, ev: Flags) -> None:
        if ev.never_ban is not None:
            self.never = neverban.NeverBan.of(self.cfg, ev.never_ban, (), ev.own)
            self.verdicts = {}
        if ev.snapshot:
            self.flags = {}
            self.snapshot_seen = True
        for doc in ev.docs:
            fid = str(doc.get("_id"))
            try:
                f = flagdoc.parse(doc, self.cfg.enforce.action)
            except BadFlag as exc:
                if fid not in self.bad:
                    self.bad.add(fid)
                    self.stats["flags_bad"] += 1
                    log.warning("flag %s ignored: %s", fid, exc)
                continue
            self.verdicts.pop(fid, None)
            if f.status != flagdoc.FLAGGED or f.expires_at.timestamp() <= ev.now:
                self.flags.pop(fid, None)
            else:
                self.flags[fid] = f
