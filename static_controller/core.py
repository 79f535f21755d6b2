"""The pure controller core: config in, OpenFlow plan out, no sockets.

On every switch connect it asks which meters exist, then pushes the whole
set: meters by ADD or MODIFY (so METER_EXISTS never happens), flows by ADD
(idempotent), then a barrier, timing features-reply -> barrier-reply. Every
flow a module emits is vetted as that module's: inside its declared
flowspace, not shadowing or shadowed by another module's flow, something the
target can hold. What fails is refused, logged and counted, never sent.
Replies are routed to the module that owns the cookie (or the request xid).

Once every module knows its full set (enforce: after its first flag
snapshot), the core reads the flow table back and deletes what nobody
installed, so a flow left by an older config or a flag released while the
controller was away does not linger.

Each connect starts from nothing the switch may have lost (a Zodiac FX wipes
its flows and meters on connect): installed flows, known meters, meter
drops, pending requests. Until the push is out no module sends anything:
flags and ticks then only keep module state. Meter statistics are polled
only where the target has them, after the push, and a refusal stops the
poll (one log line). Switch errors are judged by their OpenFlow names (the
glue reads them from os-ken's ofproto constants), never by numbers.
"""

from __future__ import annotations

import collections
import logging
from typing import Iterable, Optional

from appliance.config import Config

from . import modules as modules_pkg
from .config_view import View
from .flowspace import conflict
from .messages import (
    Barrier,
    BarrierReply,
    Error,
    Flags,
    Flow,
    FlowRemoved,
    FlowStats,
    FlowStatsRequest,
    Meter,
    MeterConfig,
    MeterConfigRequest,
    MeterStats,
    MeterStatsRequest,
    PacketIn,
    PacketOut,
    Tick,
)
from .modules.base import Module
from .targets import PlanRefused, Profile

log = logging.getLogger("pisnoop.controller.core")

# OpenFlow 1.3 errors the core reacts to, by name (``Error.name``; numbers: os_ken.ofproto.ofproto_v1_3)
METER_EXISTS, UNKNOWN_METER = "OFPMMFC_METER_EXISTS", "OFPMMFC_UNKNOWN_METER"
TABLE_FULL = "OFPFMFC_TABLE_FULL"
METER_POLL_SECONDS = 5.0
FLOW_POLL_SECONDS = 10.0      # the installed flows' counters, for the status document's switch table (the dashboard)


class Core:
    def __init__(self, cfg: Config):
        self.view = View(cfg)
        self.cfg = cfg
        self.profile: Profile = self.view.profile
        self._xid = 0x70000000
        self.modules: list[Module] = modules_pkg.build(self.view, self.next_xid)
        self.connected = False
        self.datapath_id: Optional[int] = None
        self.installed: dict[tuple, tuple[Module, Flow, Optional[float]]] = {}
        self.meters: dict[int, Meter] = {}
        self.meter_drops: dict[int, int] = {}
        self.owners: dict[int, object] = {}          # request xid -> module or "core:<what>"
        self._inventory: list = []
        self._stats_rows: list = []
        self.push_started: Optional[float] = None
        self.push_ms: Optional[float] = None
        self.pushing = False                          # the push is out: modules may send
        self.pushed = False                           # ... and its barrier reply came back
        self.reconciled = False
        self.next_meter_poll = 0.0
        self.meter_poll_off: Optional[str] = None     # why the meter-stats poll stopped, if it did
        self._meter_rows: dict[int, dict] = {}        # meter-stats reply pages by xid
        self.next_flow_poll = 0.0
        self.flow_counters: dict[tuple, tuple[int, int]] = {}    # installed flow key -> (packets, bytes), polled
        self.flow_counters_at: Optional[float] = None
        self._counter_rows: list = []
        self.disconnect_reasons = collections.Counter()
        self.counters = collections.Counter()
        self.refused = collections.Counter()          # (module, reason kind) -> n
        self.pushed_by_module = collections.Counter()
        self.planned = (0, 0)                         # (flows, meters) of the plan at start: `pisnoop status`

    # --- the plan -------------------------------------------------------------

    def next_xid(self) -> int:
        self._xid = self._xid + 1 if self._xid < 0x7FFFFFFF else 0x70000001
        return self._xid

    def owner_of_cookie(self, cookie: int) -> Optional[Module]:
        for m in self.modules:
            if m.flowspace.owns_cookie(cookie):
                return m
        return None

    def plan(self, now: float = 0.0) -> list:
        """The initial messages of every module, checked against the target: ``PlanRefused`` if it cannot hold them."""
        msgs = [msg for m in self.modules for msg in m.start(now)]
        flows = [f for f in msgs if isinstance(f, Flow)]
        meters = [x for x in msgs if isinstance(x, Meter)]
        self.profile.validate(flows, meters)
        for x in meters:
            if not any(x.meter_id in m.flowspace.meters_owned for m in self.modules):
                raise PlanRefused(f"meter {x.meter_id} is owned by no module")
        for f in flows:
            owner = self.owner_of_cookie(f.cookie)
            why = owner.flowspace.outside(f) if owner else "no module owns its cookie"
            if why:
                raise PlanRefused(f"flow {f.describe()}: {why}")
        self.planned = (len(flows), len(meters))
        return msgs

    # --- connect and push --------------------------------------------------------

    def connect(self, datapath_id: int, now: float) -> list:
        """A switch finished its handshake: ask which meters it has, then push (``on_meter_config``)."""
        if self.connected:                 # a new connection while the old one still looked alive
            self.disconnect("replaced by a new connection")
        self.connected, self.datapath_id = True, datapath_id
        self._forget()
        self.push_started, self.push_ms = now, None
        self.next_meter_poll = now             # first poll on the first tick after the push barrier's reply
        self.next_flow_poll = now + FLOW_POLL_SECONDS
        self.counters["connects"] += 1
        xid = self.next_xid()
        self.owners[xid] = "core:meters"
        return [MeterConfigRequest(xid)]

    def disconnect(self, reason: str = "connection ended") -> None:
        """The connection ended: nothing is known about the switch's state any more."""
        if not self.connected:
            return
        self.connected = False
        self._forget()
        self.counters["disconnects"] += 1
        self.disconnect_reasons[reason] += 1

    def _forget(self) -> None:
        """Per-connection state: what the switch holds and what it still owes an answer to."""
        self.installed.clear()
        self.owners.clear()
        self.meters.clear()
        self.meter_drops.clear()
        self._inventory = []
        self._stats_rows = []
        self._meter_rows = {}
        self.flow_counters, self.flow_counters_at, self._counter_rows = {}, None, []
        self.pushing = self.pushed = self.reconciled = False

    def _push(self, existing: dict, now: float) -> list:
        """The whole set: meters (ADD, MODIFY, or nothing when already right), flows by ADD, a barrier."""
        meters: list = []
        rest: list = []
        for m in self.modules:
            msgs = m.start(now)
            for x in msgs:
                if not isinstance(x, Meter):
                    continue
                if x.meter_id not in m.flowspace.meters_owned:
                    self._refuse(m.name, "outside", x, f"meter {x.meter_id} is not declared as owned")
                    continue
                self.meters[x.meter_id] = x
                have = existing.get(x.meter_id)
                if have is None or not x.same_config(*have):
                    meters.append(Meter(x.meter_id, x.unit, x.bands, "modify" if have is not None else "add"))
            rest += self.vet([x for x in msgs if not isinstance(x, Meter)], now, emitter=m)
        xid = self.next_xid()
        self.owners[xid] = "core:push"
        self.counters["pushes"] += 1
        self.pushing = True
        return meters + rest + [Barrier(xid)]

    # --- events from the switch and the clock ------------------------------------

    def handle(self, event, now: float) -> list:
        if isinstance(event, MeterConfig):
            return self._meter_config(event, now)
        if isinstance(event, BarrierReply):
            if self.owners.pop(event.xid, None) == "core:push":
                self.pushed = True
                self.push_ms = (now - self.push_started) * 1000.0
                log.info("full set pushed: %d flows, %d meters; features-reply -> barrier-reply %.1f ms",
                         len(self.installed), len(self.meters), self.push_ms)
            return []
        if isinstance(event, Error):
            return self._error(event, now)
        if isinstance(event, MeterStats):
            return self._meter_stats(event)
        if isinstance(event, FlowStats):
            owner = self.owners.get(event.xid)
            if not event.more:
                self.owners.pop(event.xid, None)
            if owner == "core:reconcile":
                return self._reconcile(event, now)
            if owner == "core:flow_counters":
                return self._flow_counters(event, now)
            return self._dispatch(owner, event, now) if isinstance(owner, Module) else []
        if isinstance(event, (PacketIn, FlowRemoved)):
            if isinstance(event, FlowRemoved):
                self.installed.pop((event.table, event.priority, event.match), None)
            return self._dispatch(self.owner_of_cookie(event.cookie), event, now)
        if isinstance(event, Tick):
            return self._tick(event, now)
        if isinstance(event, Flags):
            return self._broadcast("flags", event, now, send=self.pushing)
        return []

    def _meter_config(self, ev: MeterConfig, now: float) -> list:
        if self.owners.get(ev.xid) != "core:meters":
            return []
        self._inventory += list(ev.meters)
        if ev.more:
            return []
        self.owners.pop(ev.xid, None)
        return self._push({mid: (unit, bands) for mid, unit, bands in self._inventory}, now)

    def _meter_stats(self, ev: MeterStats) -> list:
        if self.owners.get(ev.xid) != "core:meter_stats":
            return []
        rows = self._meter_rows.setdefault(ev.xid, {})
        for meter_id, _packets, bands in ev.meters:
            rows[meter_id] = sum(bands)
        if not ev.more:
            self.owners.pop(ev.xid, None)
            self.meter_drops.update(self._meter_rows.pop(ev.xid))
        return []

    def _error(self, ev: Error, now: float) -> list:
        self.counters["errors"] += 1
        what = self.owners.pop(ev.xid, None)
        if what == "core:meters":     # no meter inventory: push with ADD, fix up on METER_EXISTS
            log.warning("switch refused the meter config request (%s): pushing meters by ADD", ev.describe())
            return self._push({}, now)
        if what == "core:meter_stats":
            self._meter_rows.pop(ev.xid, None)
            self.meter_poll_off = f"the switch refused it ({ev.describe()})"
            self.counters["meter_stats_refused"] += 1
            log.warning("switch refused the meter statistics request (%s): meter drops are not polled any more",
                        ev.describe())
            return []
        if ev.name == TABLE_FULL and ev.cookie is not None:
            return self._table_full(ev, now)
        if ev.meter_id in self.meters and ev.name in (METER_EXISTS, UNKNOWN_METER):
            m = self.meters[ev.meter_id]
            return [Meter(m.meter_id, m.unit, m.bands, "modify" if ev.name == METER_EXISTS else "add")]
        log.warning("switch error %s for a %s (cookie %s, meter %s)", ev.describe(),
                    ev.request or "message", f"{ev.cookie:#x}" if ev.cookie is not None else "-", ev.meter_id)
        owner = self.owner_of_cookie(ev.cookie) if ev.cookie is not None else None
        return self._dispatch(owner, ev, now) if owner else []

    def _table_full(self, ev: Error, now: float) -> list:
        """The switch had no room for a flow (the Zodiac's block pool fills before its 480 flows): the flow
        is not installed; counted and logged as refused, against the module whose cookie it carries."""
        gone = [k for k, (_m, f, _exp) in self.installed.items() if f.cookie == ev.cookie]
        owner = self.owner_of_cookie(ev.cookie)
        for key in gone:
            _m, f, _exp = self.installed.pop(key)
            if owner is not None:
                owner.refused(f, now)
        name = owner.name if owner else "?"
        self.refused[(name, "capacity")] += 1
        log.warning("refused %s flow (the switch's table is full: %s): cookie %#x; %d flows installed", name,
                    ev.describe(), ev.cookie, len(self.installed))
        return self._dispatch(owner, ev, now) if owner else []

    def _tick(self, ev: Tick, now: float) -> list:
        """Time for the modules, once the push is out; before that (or with no switch) nothing moves."""
        for key in [k for k, (_m, _f, exp) in self.installed.items() if exp is not None and exp <= now]:
            del self.installed[key]
        if not self.pushing:
            return []
        out = self._broadcast("tick", ev, now)
        if self.pushed and not self.reconciled and all(m.ready() for m in self.modules):
            self.reconciled = True
            xid = self.next_xid()
            self.owners[xid] = "core:reconcile"
            self._stats_rows = []
            out.append(FlowStatsRequest(xid))
        if self.pushed and self.meters and self.profile.meter_stats and not self.meter_poll_off \
                and now >= self.next_meter_poll and "core:meter_stats" not in self.owners.values():
            self.next_meter_poll = now + METER_POLL_SECONDS
            xid = self.next_xid()
            self.owners[xid] = "core:meter_stats"
            out.append(MeterStatsRequest(xid))
        if self.pushed and now >= self.next_flow_poll and "core:flow_counters" not in self.owners.values():
            self.next_flow_poll = now + FLOW_POLL_SECONDS
            xid = self.next_xid()
            self.owners[xid] = "core:flow_counters"
            self._counter_rows = []
            out.append(FlowStatsRequest(xid))
        return out

    def _flow_counters(self, ev: FlowStats, now: float) -> list:
        self._counter_rows += list(ev.entries)
        if not ev.more:
            self.flow_counters = {(e.table, e.priority, e.match): (e.packets, e.bytes) for e in self._counter_rows}
            self.flow_counters_at, self._counter_rows = now, []
        return []

    def _reconcile(self, ev: FlowStats, now: float) -> list:
        self._stats_rows += list(ev.entries)
        if ev.more:
            return []
        stale = [e for e in self._stats_rows if (e.table, e.priority, e.match) not in self.installed]
        self._stats_rows = []
        if stale:
            log.info("removing %d flows nobody installed (older config or lifted bans)", len(stale))
        self.counters["stale_removed"] += len(stale)
        return [Flow(e.table, e.priority, e.match, e.cookie, command="delete_strict") for e in stale]

    # --- dispatch and the flowspace check -------------------------------------------

    def _broadcast(self, topic: str, event, now: float, send: bool = True) -> list:
        """Every subscribed module's own messages, each list vetted as its module's, in module order.

        Without ``send`` (no switch) the modules still see the event, to keep their state current."""
        out: list = []
        for m in self.modules:
            if topic in m.subscriptions:
                mine = m.handle(event)
                if send:
                    out += self.vet(mine, now, emitter=m)
        return out

    def _dispatch(self, owner, event, now: float) -> list:
        topics = {PacketIn: "packet_in", FlowRemoved: "flow_removed", FlowStats: "flow_stats", Error: "error"}
        topic = topics[type(event)]
        if owner is None or topic not in owner.subscriptions:
            self.counters[f"unrouted_{topic}"] += 1
            return []
        return self.vet(owner.handle(event), now, emitter=owner)

    def _refuse(self, module: str, kind: str, f, why: str) -> None:
        self.refused[(module, kind)] += 1
        log.warning("refused %s flow (%s): %s", module, why, f.describe() if isinstance(f, Flow) else f)

    def vet(self, msgs: Iterable, now: float, emitter: Module) -> list:
        """Keep the messages of ``emitter`` that pass the checks; record its flows as installed.

        A refusal is counted against the emitter, never against whoever owns the cookie it used."""
        out = []
        for x in msgs:
            if isinstance(x, FlowStatsRequest):
                self.owners[x.xid] = emitter          # whatever cookie it asks about: the reply is the emitter's
            elif isinstance(x, PacketOut):
                bad = [a[1] for a in x.actions if a[0] == "output" and a[1] == self.profile.management_port]
                if bad:
                    self._refuse(emitter.name, "target", x, "packet-out to the management port")
                    continue
            elif isinstance(x, Flow):
                if not self._flow_ok(x, now, emitter):
                    if x.command == "add":
                        emitter.refused(x, now)
                    continue
            out.append(x)
        return out

    def _flow_ok(self, f: Flow, now: float, emitter: Module) -> bool:
        if self.owner_of_cookie(f.cookie) is not emitter:
            self._refuse(emitter.name, "outside", f, f"cookie {f.cookie:#x} is not {emitter.flowspace.cookie:#x}"
                         f"/{emitter.flowspace.cookie_mask:#x}")
            return False
        why = emitter.flowspace.outside(f)
        if why:
            self._refuse(emitter.name, "outside", f, why)
            return False
        if f.command == "delete_strict":
            mine = self.installed.get(f.key)
            if mine is not None and mine[0] is not emitter:
                self._refuse(emitter.name, "not_owner", f, f"the flow belongs to {mine[0].name}")
                return False
            self.installed.pop(f.key, None)
            return True
        why = self.profile.flow_problem(f)
        if why:
            self._refuse(emitter.name, "target", f, why)
            return False
        for key, (other_mod, other, _exp) in self.installed.items():
            if other_mod is emitter or other_mod.name in emitter.flowspace.may_shadow:
                continue
            why = conflict(f, other)
            if why:
                self._refuse(emitter.name, "overlap", f, f"{why} against {other_mod.name}'s {other.describe()}")
                return False
        if f.key not in self.installed and (self.profile.max_flows is not None or self.profile.pool):
            why = self.profile.room_problem([*(x for _m, x, _e in self.installed.values()), f],
                                            self.meters.values())
            if why:
                self._refuse(emitter.name, "capacity", f, f"{self.profile.name} has no room: it {why}")
                return False
        self.installed[f.key] = (emitter, f, now + f.hard_timeout if f.hard_timeout else None)
        self.pushed_by_module[emitter.name] += 1
        self.counters["flows_pushed"] += 1
        return True

    # --- what the status document and the metrics show --------------------------------

    def switch_table(self) -> dict:
        """The flows and meters this controller installed, by module, with their last polled counters (plain
        values, for the status document: the dashboard's switch page)."""
        flows = []
        for key, (module, f, _exp) in sorted(self.installed.items(), key=lambda kv: (kv[1][0].name, kv[0][:2])):
            packets, nbytes = self.flow_counters.get(key, (None, None))
            d = f.describe().split(" ", 4)
            flows.append({"module": module.name, "table": f.table, "priority": f.priority, "cookie": f"{f.cookie:#x}",
                          "match": d[4].split(" -> ")[0], "actions": d[4].split(" -> ")[-1], "packets": packets,
                          "bytes": nbytes})
        owner = {mid: m.name for m in self.modules for mid in m.flowspace.meters_owned}
        meters = [{"meter_id": mid, "module": owner.get(mid), "unit": m.unit,
                   "bands": ", ".join(f"rate {b.rate}" + (f" burst {b.burst}" if b.burst else "") for b in m.bands),
                   "drops": self.meter_drops.get(mid)} for mid, m in sorted(self.meters.items())]
        return {"flows": flows, "meters": meters, "counters_at": self.flow_counters_at}

    def snapshot(self) -> dict:
        out = {k: int(v) for k, v in self.counters.items()}
        out["flows_installed"] = len(self.installed)
        out["flows_planned"], out["meters_planned"] = self.planned
        out["meters_installed"] = len(self.meters) if self.pushed else 0
        out["refused"] = sum(self.refused.values())
        for (module, kind), n in self.refused.items():
            out[f"refused_{module}_{kind}"] = int(n)
        for m in self.modules:
            for k, v in m.counters().items():
                out[f"{m.name}_{k}"] = int(v)
        return out
