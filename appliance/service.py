"""What every long-running pisnoop service shares: systemd, logs, metrics, health.

* ``notify()`` speaks sd_notify through systemd-python (READY=1, WATCHDOG=1,
  STOPPING=1, STATUS=...); a no-op when NOTIFY_SOCKET is not set.
* ``Watchdog.kick()`` is cheap enough to call from a hot loop: it sends
  WATCHDOG=1 at most every half of WatchdogSec.
* ``setup_logging()`` logs to journald (with the service's identifier) when
  running under systemd, to stderr otherwise.
* ``health()`` is the psutil snapshot that goes into each status document.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import psutil

from .errors import Failure

try:
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # systemd-python is a dependency; this keeps `check-config` usable without it
    _sd_daemon = None
    _sd_journal = None


def notify(message: str) -> bool:
    """Send one sd_notify message; return whether it was sent."""
    if not os.environ.get("NOTIFY_SOCKET") or _sd_daemon is None:
        return False
    return bool(_sd_daemon.notify(message))


class Watchdog:
    """Rate-limited WATCHDOG=1: call ``kick()`` as often as you like."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        enabled = bool(usec) and (not pid or pid == str(os.getpid()))
        self.interval = int(usec) / 2e6 if enabled else None
        self._next = 0.0

    def kick(self, now: float | None = None) -> None:
        if self.interval is None:
            if os.environ.get("NOTIFY_SOCKET"):  # no WatchdogSec: still tell a listener we are alive, rarely
                now = time.monotonic() if now is None else now
                if now >= self._next:
                    notify("WATCHDOG=1")
                    self._next = now + 5.0
            return
        now = time.monotonic() if now is None else now
        if now >= self._next:
            notify("WATCHDOG=1")
            self._next = now + self.interval


def under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def setup_logging(component: str, level: str = "INFO") -> logging.Logger:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if under_systemd() and _sd_journal is not None:
        handler: logging.Handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER=f"pisnoop-{component}")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s pisnoop-" + component
                                               + " %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger(f"pisnoop.{component}")


class MetricsUnavailable(Failure):
    """The Prometheus endpoint could not listen (its port taken, its address not here)."""


def start_metrics(metrics_cfg, port: int, log: logging.Logger | None = None):
    """Start the Prometheus endpoint for one service; None when metrics are off; MetricsUnavailable if it cannot."""
    if not metrics_cfg.enabled:
        return None
    from prometheus_client import start_http_server
    try:
        server, _thread = start_http_server(port, addr=metrics_cfg.listen_host)
    except OSError as exc:
        raise MetricsUnavailable(f"metrics endpoint {metrics_cfg.listen_host}:{port}: {exc.strerror}") from None
    if log:
        log.info("metrics on http://%s:%d/metrics", metrics_cfg.listen_host, port)
    return server


_PROC = None


def health() -> dict:
    """Process and machine health for a status document."""
    global _PROC
    if _PROC is None:
        _PROC = psutil.Process()
        _PROC.cpu_percent(None)
    with _PROC.oneshot():
        mem = _PROC.memory_info()
        out = {
            "pid": _PROC.pid,
            "rss_bytes": mem.rss,
            "cpu_percent": _PROC.cpu_percent(None),
            "threads": _PROC.num_threads(),
        }
    vm = psutil.virtual_memory()
    out["host"] = {"load1": os.getloadavg()[0], "mem_available_bytes": vm.available, "mem_percent": vm.percent}
    return out
