"""The thin os-ken glue: switch events in, core decisions out.

Everything that decides lives in ``core`` and the modules; this file only
decodes os-ken events (``glue``), calls the core from the app's single event
thread, sends what the core returns through the target's pacer, and
publishes counters for the metrics endpoint, the status document and the
systemd watchdog. A connection's end reaches it at once (``ryu_api.Datapath``)
and is counted and logged with its reason.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time

from appliance import service

from . import glue
from .core import Core
from .flagwatch import FlagWatcher
from .messages import BarrierReply, Tick
from .pacer import Pacer
from .ryu_api import (
    CONFIG_DISPATCHER,
    DEAD_DISPATCHER,
    MAIN_DISPATCHER,
    OFP_VERSION,
    EventBase,
    RyuApp,
    ofp_event,
    set_ev_cls,
)

log = logging.getLogger("pisnoop.controller")

TICK_SECONDS = 0.2
BOTH = [CONFIG_DISPATCHER, MAIN_DISPATCHER]
# What a reload (SIGHUP) changes in a running controller: the never-ban list and a flag's default action, the
# flowstats IDS's threshold and ban length, retention; the plan (ports, mirror, meters, forwarding, server ports),
# the switch, the listen address, the poll interval and the store need a restart.
LIVE = ("enforce.never_ban", "enforce.never_ban_servers", "enforce.action", "flowstats_ids.threshold_ppm",
        "flowstats_ids.drop_seconds", "mongodb.retention")


def survives(handler):
    """Log a handler's exception and carry on: with the native hub, os-ken's event loop re-raises any
    exception (its ``TaskExit`` is ``Exception``) and the app would stop hearing events, silently."""
    @functools.wraps(handler)
    def guarded(self, ev):
        try:
            handler(self, ev)
        except Exception:
            self.handler_errors += 1
            log.exception("%s failed on %s (the controller goes on)", handler.__name__, type(ev).__name__)
    return guarded


class EventTick(EventBase):
    pass


class EventFlags(EventBase):
    def __init__(self, flags):
        super().__init__()
        self.flags = flags


class ControllerApp(RyuApp):
    OFP_VERSIONS = [OFP_VERSION]
    # set by the launcher before os-ken instantiates the app
    core: Core = None
    sensor_status_id = "controller:pisnoop"
    reloader: service.Reloader | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = "pisnoop_controller"
        self.cfg = self.core.cfg
        self.dp = None
        self.connected_at = 0.0
        self.pacer = Pacer(None, len, self.core.next_xid)
        self.disconnects = collections.Counter()      # reason -> n
        self.last_disconnect: str | None = None
        self.of_messages = collections.Counter()
        self.of_errors = collections.Counter()
        self.ignored_datapaths = 0
        self.handler_errors = 0
        self.published: dict = {}
        self.watchdog = service.Watchdog()
        self.watcher = FlagWatcher(self.cfg, lambda flags: self.send_event(self.name, EventFlags(flags)),
                                   self.sensor_status_id)
        self._stop = threading.Event()

    def start(self):
        thread = super().start()
        self.watcher.start()
        threading.Thread(target=self._ticker, name="pisnoop-tick", daemon=True).start()
        return thread

    def stop(self):
        self._stop.set()
        self.watcher.stop()
        super().stop()

    def _ticker(self) -> None:
        """The periodic task: a tick through the event loop (so the watchdog proves the loop runs)."""
        while not self._stop.wait(TICK_SECONDS):
            self.send_event(self.name, EventTick())

    # --- sending ---------------------------------------------------------------

    def _send(self, msgs) -> None:
        """What the core decided, through the target's pacer."""
        self._write(self.pacer.send(msgs))

    def _write(self, msgs) -> None:
        dp = self.dp
        if dp is None:
            return
        for msg in msgs:
            ofp = glue.to_ofp(dp, msg)
            dp.send_msg(ofp)
            self.of_messages[("sent", type(ofp).__name__)] += 1

    def _mine(self, ev) -> bool:
        self.of_messages[("received", type(ev.msg).__name__)] += 1
        return self.dp is not None and ev.msg.datapath is self.dp

    def _core(self, event) -> None:
        self._send(self.core.handle(event, time.time()))

    # --- switch events ------------------------------------------------------------

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    @survives
    def on_features(self, ev):
        dp = ev.msg.datapath
        self.of_messages[("received", "OFPSwitchFeatures")] += 1
        if dp.id != self.cfg.switch.datapath_id:
            self.ignored_datapaths += 1
            log.warning("ignoring datapath %016x: this controller drives only %016x (switch.datapath_id)",
                        dp.id, self.cfg.switch.datapath_id)
            return
        old = self.dp
        if old is not None:                 # the switch came back before its old connection was seen to end
            self._lost(old, "replaced by a new connection")
            old.close("replaced by a new connection")
        log.info("switch %016x connected from %s: pushing the full set", dp.id, dp.address)
        self.dp, self.connected_at = dp, time.monotonic()
        self.pacer = Pacer(self.core.profile.window_bytes, lambda msg: glue.encoded_len(dp, msg), self.core.next_xid)
        self._send(self.core.connect(dp.id, time.time()))
        self.watcher.request_snapshot()

    @set_ev_cls(ofp_event.EventOFPStateChange, [MAIN_DISPATCHER, DEAD_DISPATCHER])
    @survives
    def on_state(self, ev):
        if ev.state == DEAD_DISPATCHER and ev.datapath is self.dp and self.dp is not None:
            self._lost(self.dp, getattr(self.dp, "end_reason", None) or "connection ended")
            self.dp = None

    def _lost(self, dp, reason: str) -> None:
        """One connection of our switch ended: count it, say why and what the switch does meanwhile."""
        self.disconnects[reason] += 1
        self.last_disconnect = reason
        self.pacer.reset()
        self.core.disconnect(reason)
        profile = self.core.profile
        meanwhile = ("it keeps its flows (secure fail mode)" if profile.keeps_flows else
                     f"the {profile.name} wipes its flows and drops every packet until it reconnects")
        log.warning("switch %016x disconnected (%s) after %.1f s; %s", dp.id, reason,
                    time.monotonic() - self.connected_at, meanwhile)

    @set_ev_cls(ofp_event.EventOFPMeterConfigStatsReply, BOTH)
    @survives
    def on_meter_config(self, ev):
        if self._mine(ev):
            self._core(glue.meter_config(ev.msg))

    @set_ev_cls(ofp_event.EventOFPMeterStatsReply, BOTH)
    @survives
    def on_meter_stats(self, ev):
        if self._mine(ev):
            self._core(glue.meter_stats(ev.msg))

    @set_ev_cls(ofp_event.EventOFPFlowStatsReply, BOTH)
    @survives
    def on_flow_stats(self, ev):
        if self._mine(ev):
            self._core(glue.flow_stats(ev.msg))

    @set_ev_cls(ofp_event.EventOFPBarrierReply, BOTH)
    @survives
    def on_barrier(self, ev):
        if self._mine(ev):
            self._core(BarrierReply(ev.msg.xid))
            self._write(self.pacer.reply(ev.msg.xid))

    @set_ev_cls(ofp_event.EventOFPErrorMsg, BOTH)
    @survives
    def on_error(self, ev):
        if self._mine(ev):
            err = glue.error(ev.msg)
            self.of_errors[(err.type, err.code)] += 1
            self._core(err)

    @set_ev_cls(ofp_event.EventOFPFlowRemoved, BOTH)
    @survives
    def on_flow_removed(self, ev):
        if self._mine(ev):
            self._core(glue.flow_removed(ev.msg))

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    @survives
    def on_packet_in(self, ev):
        if self._mine(ev):
            self._core(glue.packet_in(ev.msg))

    # --- our own events ---------------------------------------------------------------

    @set_ev_cls(EventFlags)
    @survives
    def on_flags(self, ev):
        self._core(ev.flags)

    @set_ev_cls(EventTick)
    @survives
    def on_tick(self, ev):
        if self.reloader is not None:
            self.reloader.check()     # here, on the event thread: the core and the modules are never read meanwhile
        self._core(Tick(time.time()))
        self._publish()
        self.watchdog.kick()

    def apply(self, cfg) -> list[str]:
        """A reloaded config (``service.Reloader``): the core and its modules read it from now on; a fresh snapshot
        of the flags goes through enforcement, so that a changed never-ban list applies to the active bans."""
        self.cfg = self.core.cfg = cfg
        for m in self.core.modules:
            m.cfg = cfg
        self.watcher.configure(cfg)            # the retention TTLs ensured again, alerts re-aimed: at the next poll
        self.watcher.request_snapshot()
        return ["active flags read again"]

    def _publish(self) -> None:
        core = self.core
        snap = core.snapshot()
        snap.update(ignored_datapaths=self.ignored_datapaths, store_outages=self.watcher.outages,
                    handler_errors=self.handler_errors)
        self.published = {
            "of_messages": dict(self.of_messages), "of_errors": dict(self.of_errors),
            "pushed": dict(core.pushed_by_module), "refused": dict(core.refused),
            "meter_drops": dict(core.meter_drops), "store_outages": self.watcher.outages,
            "store_up": int(self.watcher.up), "connected": int(core.connected),
            "flows_installed": len(core.installed), "push_ms": core.push_ms,
            "connects": core.counters["connects"], "disconnects": dict(self.disconnects),
            "paced_chunks": self.pacer.chunks, "held_messages": self.pacer.held,
        }
        self.watcher.status_doc = {
            "component": "controller", "sensor": self.cfg.snooper.sensor, "counters": snap,
            "connected": core.connected,
            "datapath_id": f"{self.cfg.switch.datapath_id:016x}", "target": core.profile.name,
            "last_push_ms": core.push_ms, "modules": [m.name for m in core.modules],
            "disconnect_reasons": dict(self.disconnects), "last_disconnect": self.last_disconnect,
            "refused": {f"{mod}/{kind}": n for (mod, kind), n in core.refused.items()},
            "meter_poll": core.meter_poll_off or ("on" if core.profile.meter_stats else "no meter stats on the target"),
            "switch": core.switch_table(),
        }
