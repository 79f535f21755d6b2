"""``pisnoop controller``: the project's own launcher for the os-ken app.

os-ken 4 ships no manager command, so this does what one would: validate the
plan against the target (exit 2 with one line if the target cannot hold it),
check the listen address, start the metrics endpoint, point os-ken's
OpenFlow listener at ``switch.controller``, run the app, tell systemd
READY=1 once the socket listens and STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time

import psutil

from appliance import service
from appliance.config import load as load_config_file
from appliance.errors import UsageError

from .core import Core
from .messages import Flow, Meter
from .targets import PlanRefused

log = logging.getLogger("pisnoop.controller")


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments of ``pisnoop controller``; ``appliance.cli`` calls this."""
    p.add_argument("--check", action="store_true", help="only validate the flow plan against the target and print it")
    p.set_defaults(func=cmd_controller)


def cmd_controller(args) -> int:
    cfg = load_config_file(args.config)
    core = Core(cfg)
    try:
        plan = core.plan(time.time())
    except PlanRefused as exc:
        print(f"pisnoop: {cfg.source}: the {cfg.switch.target} target cannot hold this plan: {exc}", file=sys.stderr)
        return 2
    if args.check:
        flows = [m for m in plan if isinstance(m, Flow)]
        meters = [m for m in plan if isinstance(m, Meter)]
        print(f"{cfg.source}: plan fits {cfg.switch.target}: {len(flows)} flows, {len(meters)} meters, "
              f"modules {', '.join(m.name for m in core.modules)}")
        for m in meters:
            print(f"  meter {m.meter_id}: {m.bands[0].rate} {m.unit}"
                  + (f" burst {m.bands[0].burst}" if m.burst else ""))
        for f in flows:
            print("  " + f.describe())
        return 0
    host, port = cfg.switch.controller.listen_host, cfg.switch.controller.listen_port
    _check_listen(host, port)
    service.setup_logging("controller", args.log_level)
    if args.log_level != "DEBUG":
        logging.getLogger("os_ken").setLevel(logging.WARNING)
    return run(cfg, core, host, port)


def _check_listen(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} (switch.controller): {exc.strerror}") from None


def _await_listening(port: int, timeout: float = 15.0) -> None:
    """READY=1 once os-ken's socket is in LISTEN (read from /proc, no probe connection)."""
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in me.net_connections(kind="tcp")):
            log.info("listening for the switch on port %d", port)
            service.notify("READY=1")
            return
        time.sleep(0.05)
    log.error("the OpenFlow listener did not come up on port %d within %.0f s", port, timeout)
    logging.shutdown()
    os._exit(1)


def run(cfg, core: Core, host: str, port: int) -> int:
    from . import metrics
    from .app import ControllerApp
    from .ryu_api import CONF, app_manager, install_datapath

    service.start_metrics(cfg.metrics, cfg.metrics.controller_port, log)
    CONF(args=[], project="pisnoop", default_config_files=[])
    CONF.set_override("ofp_listen_host", host)
    CONF.set_override("ofp_tcp_listen_port", port)
    install_datapath()
    ControllerApp.core = core
    ControllerApp.sensor_status_id = f"controller:{cfg.snooper.sensor}"
    apps: list = []
    metrics.register(lambda: apps[0].published if apps else {})

    def stop(signum, _frame):
        service.notify("STOPPING=1")
        log.info("stopping (signal %d)", signum)
        if apps:
            apps[0].watcher.stop()
        logging.shutdown()
        os._exit(0)       # os-ken's native hub threads cannot be joined from outside

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=_await_listening, args=(port,), daemon=True).start()
    mgr = app_manager.AppManager.get_instance()
    mgr.load_apps(["os_ken.controller.ofp_handler", __name__.rsplit(".", 1)[0] + ".app"])
    contexts = mgr.create_contexts()
    services = mgr.instantiate_apps(**contexts)
    apps.extend(a for a in mgr.applications.values() if isinstance(a, ControllerApp))
    log.info("controller for datapath %016x (%s), modules: %s", cfg.switch.datapath_id, core.profile.name,
             ", ".join(m.name for m in core.modules))
    from .ryu_api import hub
    hub.joinall(services)
    return 0
