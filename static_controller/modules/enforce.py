"""enforce: turn the analyser's flags into per-client drop or limit flows.

Pure: flag documents (``appliance.flagdoc``) come in as ``Flags`` events (the
store is polled by ``flagwatch`` in its own thread), flows go out. A flag names a client IP and
optionally its TCP source port; its flow sits above the ratelimit band in the
policy table, drops the client's XMPP traffic or sends it through the shared
penalty meter, and has ``hard_timeout`` = the ban time left, so the switch
lifts the ban by itself even if the controller is gone. A released or
expired flag removes the flow at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
from dataclasses import dataclass
from typing import Optional

from appliance import flagdoc
from appliance.flagdoc import BadFlag

from ..flowspace import Flowspace, Slice
from ..messages import Flags, Flow, FlowRemoved, Tick, flow
from .base import COOKIE_MASK, T_FORWARD, T_POLICY, Module
from .ratelimit import PENALTY_METER

log = logging.getLogger("pisnoop.controller.enforce")

P_IP, P_CONN = 310, 320
MAX_TIMEOUT = 65535


@dataclass(frozen=True)
class Active:
    flag_id: str
    ip: str
    port: Optional[int]
    server_port: int
    action: str
    expires_at: float          # epoch seconds

    @property
    def key(self) -> tuple:
        return (self.ip, self.port, self.server_port)


def parse_flag(doc: dict, default_action: str) -> tuple[str, Optional[Active]]:
    """(flag id, Active or None when the flag no longer bans anybody); BadFlag on a malformed document."""
    fid = str(doc.get("_id"))
    f = flagdoc.parse(doc, default_action)
    if f.status != flagdoc.FLAGGED:
        return fid, None
    if ipaddress.ip_address(f.client_ip).version != 4:
        raise BadFlag(f"client_ip {f.client_ip!r} is not an IPv4 address")
    return fid, Active(fid, f.client_ip, f.client_port, f.server_port, f.action, f.expires_at.timestamp())


class Enforce(Module):
    name = "enforce"
    module_id = 3
    subscriptions = frozenset({"flags", "tick", "flow_removed"})

    def __init__(self, view):
        super().__init__(view)
        self.flags: dict[str, Active] = {}
        self.installed: dict[tuple, tuple[Flow, Active]] = {}    # ban key -> (its flow, the flag behind it)
        self.bad: set[str] = set()
        self.snapshot_seen = False
        self.stats = {"flags_active": 0, "flags_bad": 0, "bans_installed": 0, "bans_removed": 0}

    def declare(self) -> Flowspace:
        return Flowspace(self.cookie, COOKIE_MASK, (Slice.of(T_POLICY, 300, 399, self.view.xmpp_match()),),
                         meters_used=frozenset({PENALTY_METER}))

    def ready(self) -> bool:
        """After the first full snapshot; the incremental poll keeps the cache right across reconnects."""
        return self.snapshot_seen

    def counters(self) -> dict:
        return {**self.stats, "flags_active": len(self.flags)}

    # --- the flow for one ban -------------------------------------------------

    def _flow(self, a: Active, now: float) -> Flow:
        match = {**self.view.xmpp_match(), "ipv4_src": a.ip, "tcp_dst": a.server_port}
        if a.port is not None:
            match["tcp_src"] = a.port
        cookie = self.cookie | (int(ipaddress.IPv4Address(a.ip)) << 16) | (a.port or 0)
        left = max(1, min(MAX_TIMEOUT, math.ceil(a.expires_at - now)))
        kw = {"meter": PENALTY_METER, "goto": T_FORWARD} if a.action == "limit" else {}
        return flow(T_POLICY, P_CONN if a.port is not None else P_IP, match, cookie,
                    hard_timeout=left, send_flow_removed=True, **kw)

    def _desired(self, now: float) -> dict[tuple, Active]:
        """One ban per (ip, port, server port): the longest; drop wins over limit."""
        out: dict[tuple, Active] = {}
        for a in self.flags.values():
            if a.expires_at <= now:
                continue
            cur = out.get(a.key)
            if cur is None or (a.action == "drop", a.expires_at) > (cur.action == "drop", cur.expires_at):
                out[a.key] = a
        return out

    def _sync(self, now: float) -> list:
        want = self._desired(now)
        msgs = []
        for key, a in want.items():
            old = self.installed.get(key)
            # re-push when the action changed or the ban was extended (hard timeouts only count down)
            if old is None or old[1].action != a.action or abs(old[1].expires_at - a.expires_at) > 1:
                f = self._flow(a, now)
                msgs.append(f)
                self.installed[key] = (f, a)
                self.stats["bans_installed"] += 1
                log.info("ban %s:%s -> %s for %d s", a.ip, a.port or "*", a.action, f.hard_timeout)
        for key in [k for k in self.installed if k not in want]:
            f, a = self.installed.pop(key)
            if a.expires_at > now:            # released early: remove it now (else the switch already did)
                msgs.append(dataclasses.replace(f, command="delete_strict"))
                self.stats["bans_removed"] += 1
                log.info("ban %s:%s lifted", a.ip, a.port or "*")
        return msgs

    # --- the module API ---------------------------------------------------------

    def start(self, now: float) -> list:
        self.installed = {}
        return self._sync(now)

    def handle(self, event) -> list:
        if isinstance(event, Flags):
            self._take(event)
            return self._sync(event.now)
        if isinstance(event, Tick):
            for fid in [f for f, a in self.flags.items() if a.expires_at <= event.now]:
                del self.flags[fid]
            return self._sync(event.now)
        if isinstance(event, FlowRemoved):
            for key, (f, _a) in list(self.installed.items()):
                if f.cookie == event.cookie and f.match == event.match:
                    del self.installed[key]
        return []

    def _take(self, ev: Flags) -> None:
        if ev.snapshot:
            self.flags = {}
            self.snapshot_seen = True
        for doc in ev.docs:
            try:
                fid, active = parse_flag(doc, self.cfg.enforce.action)
            except BadFlag as exc:
                fid = str(doc.get("_id"))
                if fid not in self.bad:
                    self.bad.add(fid)
                    self.stats["flags_bad"] += 1
                    log.warning("flag %s ignored: %s", fid, exc)
                continue
            if active is None or active.expires_at <= ev.now:
                self.flags.pop(fid, None)
            else:
                self.flags[fid] = active
