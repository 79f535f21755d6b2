"""What every long-running pisnoop service shares: systemd, logs, metrics, health.

* ``notify()`` speaks sd_notify through systemd-python (READY=1, WATCHDOG=1,
  STOPPING=1, STATUS=...); a no-op when NOTIFY_SOCKET is not set.
* ``Watchdog.kick()`` is cheap enough to call from a hot loop: it sends
  WATCHDOG=1 at most every half of WatchdogSec.
* ``setup_logging()`` logs to journald (with the service's identifier) when
  running under systemd, to stderr otherwise.
* ``health()`` is the psutil snapshot that goes into each status document.
* ``tune_gc()`` sets the cyclic collector for a service that allocates per
  frame (see its docstring for the measurement).
* ``Reloader`` is SIGHUP (``systemctl reload``, ``ExecReload=``): the config
  file read again, what the service can change while running applied, one
  log line saying what changed and what waits for a restart; a bad file
  keeps the config in force.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterable, Optional

import psutil

from . import config as config_mod
from .errors import BadInput, Failure
from .redact import redact

try:
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # systemd-python is a dependency; this keeps `check-config` usable without it
    _sd_daemon = None
    _sd_journal = None


def notify(message: str, fds: list[int] | None = None) -> bool:
    """Send one sd_notify message (with ``fds`` for FDSTORE=1); return whether it was sent."""
    if not os.environ.get("NOTIFY_SOCKET") or _sd_daemon is None:
        return False
    if fds:
        return bool(_sd_daemon.notify(message, fds=fds))
    return bool(_sd_daemon.notify(message))


GC_THRESHOLD = (50_000, 20, 20)


def tune_gc() -> None:
    """Young collections every 50,000 allocations instead of Python's 700, and what is alive at the start
    (modules, config, policy) frozen out of every collection. The analyser's step makes tens of thousands of
    short-lived lists and tuples, so the default ran a collection every few hundred frames over a table of
    long-lived flows: 25-30% of its CPU on the uplink traffic (bench/analyser.py prints both). Cycles are still
    collected, a few MB later."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


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
    handler.addFilter(RedactFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger(f"pisnoop.{component}")


class RedactFilter(logging.Filter):
    """Every log line through ``redact``: a MongoDB URI's password never reaches the journal, whoever logged it
    (pymongo's own messages and exceptions included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "://" in text:
            record.msg, record.args = redact(text), None
        if record.exc_info and record.exc_info[1] is not None and "://" in str(record.exc_info[1]):
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


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


# --- reload ------------------------------------------------------------------------------------


def flat(cfg) -> dict:
    """A config as ``{"xmpp.threshold_ppm": 100, ...}`` (lists are values, not sections)."""
    out = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(config_mod.to_dict(cfg), "")
    return out


def changed_keys(old, new) -> list[str]:
    a, b = flat(old), flat(new)
    return [k for k in b if a.get(k) != b[k]]


def merged(old, new, keys: Iterable[str]):
    """``old`` with the values of ``keys`` taken from ``new``, validated again (cross-checks) as one config."""
    data, fresh = config_mod.to_dict(old), flat(new)
    for key in keys:
        *sections, leaf = key.split(".")
        d = data
        for s in sections:
            d = d[s]
        d[leaf] = fresh[key]
    return config_mod.from_dict(data, new.source)


def _shown(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class Reloader:
    """SIGHUP re-reads the config file; ``apply(cfg)`` takes what this service changes while running.

    ``live`` names the keys (or sections, ``"enforce"``) the service applies;
    any other changed key is kept as it was and named in the log line as
    needing a restart, so the config in force (``cfg``) is always one the
    service runs. ``apply`` gets the merged config and may refuse it with a
    ``BadInput`` (a bad policy file, say): then nothing changes. It may
    return notes for the log line (``"policy re-read"``). The signal only
    sets ``requested``; ``check()`` does the work on the service's own
    thread (its loop, or ``watch()``'s thread).
    """

    def __init__(self, cfg, live: tuple[str, ...], apply: Callable, log: logging.Logger,
                 path: Optional[str] = None):
        self.cfg, self.live, self.apply, self.log = cfg, live, apply, log
        self.path = path or cfg.source
        self.requested = threading.Event()
        self.reloads = 0           # successful reloads
        self.refused = 0

    def install(self) -> "Reloader":
        signal.signal(signal.SIGHUP, lambda *_: self.requested.set())
        return self

    def check(self) -> bool:
        """Reload when a SIGHUP came since the last check; return whether one did."""
        if not self.requested.is_set():
            return False
        self.requested.clear()
        self.reload()
        return True

    def watch(self, stop: threading.Event, every: float = 0.2) -> threading.Thread:
        """A thread that checks until ``stop`` is set, for a service whose main loop is not pisnoop's."""
        def loop() -> None:
            while not stop.is_set():
                if self.requested.wait(every):
                    self.check()
        t = threading.Thread(target=loop, name="pisnoop-reload", daemon=True)
        t.start()
        return t

    def reload(self):
        """Read the file and apply it; return the config now in force, or None when the file was refused."""
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return self._reload()
        finally:
            notify("READY=1")

    def _reload(self):
        try:
            new = config_mod.load(self.path)
            changed = changed_keys(self.cfg, new)
            applied = [k for k in changed if any(k == p or k.startswith(p + ".") for p in self.live)]
            restart = [k for k in changed if k not in applied]
            cfg = merged(self.cfg, new, applied)
            notes = list(self.apply(cfg) or ())
        except BadInput as exc:
            self.refused += 1
            self.log.error("reload refused, the config in force is unchanged: %s", exc)
            return None
        except Exception as exc:   # a fault in applying must not end the service: it goes on as it was
            self.refused += 1
            self.log.error("reload failed, the config in force is unchanged: %s: %s", exc.__class__.__name__,
                           str(exc)[:200])
            return None
        old = flat(self.cfg)
        self.cfg = cfg
        self.reloads += 1
        fresh = flat(new)
        parts = [("applied " + ", ".join(f"{k} {_shown(old[k])} -> {_shown(fresh[k])}" for k in applied))
                 if applied else "nothing changed" if not restart else "nothing applied"]
        parts += notes
        if restart:
            parts.append("needs a restart: " + ", ".join(f"{k} {_shown(fresh[k])}" for k in restart))
        self.log.info("reload of %s: %s", self.path, "; ".join(parts))
        return cfg
