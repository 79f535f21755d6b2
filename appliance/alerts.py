"""Alerts: one greppable log line per event, and a JSON POST to each configured webhook.

``Alerter.emit`` is what the places where events happen call (a flag raised,
released or expired; a service down, the store unreachable, capture drops):
it logs ``pisnoop-alert: <event> key=value ...`` at once (journald/syslog
under systemd, stderr otherwise) and puts the alert on a bounded queue. It
never blocks and never raises: a full queue counts the alert in
``dropped_queue_full``. One thread of the alerter's own posts each alert
to every webhook in order, retrying a webhook that fails with a back-off
that doubles up to ``alerts.retry_max_seconds``, for ``alerts.retry_seconds``
at most (then ``dropped_gave_up``). Every failed attempt is counted in
``failed_attempts``; ``counters`` is what the status documents carry.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

PREFIX = "pisnoop-alert:"
# the fields of the log line, in this order (the webhook's JSON carries everything)
LINE_FIELDS = ("subject", "scope", "classifier", "action", "status", "service", "reason", "id", "counters", "seconds")
FIRST_DELAY = 0.5

log = logging.getLogger("pisnoop.alerts")


def plain(value: Any) -> Any:
    """A value as JSON carries it: dates as ISO 8601, ids and other objects as their text."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return str(value)


def log_line(event: str, fields: dict) -> str:
    """``pisnoop-alert: flag_raised subject=10.0.0.66 scope=address ...``: values without spaces or quotes."""
    parts = [PREFIX, event]
    for k in LINE_FIELDS:
        v = fields.get(k)
        if v is None or v == "":
            continue
        if isinstance(v, dict):
            v = ",".join(f"{a}:{b}" for a, b in v.items())
        text = str(v)
        quoted = " " in text or '"' in text
        parts.append(f"{k}={json.dumps(text) if quoted else text}")
    return " ".join(parts)


def command_logger(component: str) -> logging.Logger:
    """For a short command (``pisnoop flags``): its alert lines to the journal, or syslog, not to the terminal
    (the command says what it did there in its own words); nowhere when neither is on this machine."""
    import logging.handlers
    import os

    from . import service
    logger = logging.getLogger(f"pisnoop.alerts.{component}")
    logger.propagate = False
    if not logger.handlers:
        if service._sd_journal is not None and os.path.exists("/run/systemd/journal/socket"):
            handler: logging.Handler = service._sd_journal.JournalHandler(SYSLOG_IDENTIFIER=f"pisnoop-{component}")
        elif os.path.exists("/dev/log"):
            handler = logging.handlers.SysLogHandler("/dev/log")
            handler.ident = f"pisnoop-{component}: "
        else:
            handler = logging.NullHandler()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def flag_fields(doc: dict) -> dict:
    """A flag document as an alert: the line's subject, scope, classifier and id; the whole flag (its evidence
    also at the top, ``emit``) for the webhook."""
    from .flagdoc import BadFlag, parse
    try:
        f = parse(doc)
        subject, scope = f.subject, f.scope
    except BadFlag:
        subject, scope = doc.get("client_mac") or doc.get("client_ip"), None
    return {"subject": subject, "scope": scope, "classifier": doc.get("classifier"), "action": doc.get("action"),
            "status": doc.get("status"), "id": str(doc.get("_id")), "reason": doc.get("reason"),
            "flag": doc}


class Alerter:
    """The one sender of a process; ``close()`` at the end (it waits at most the given time)."""

    def __init__(self, acfg, sensor: str = "", post=None, logger: Optional[logging.Logger] = None):
        self.cfg = acfg
        self.log = logger or log
        self.sensor = sensor
        self.webhooks = tuple(acfg.webhooks)
        self.post = post or self._post
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.busy = False
        self.counters = {"events": 0, "queued": 0, "sent": 0, "failed_attempts": 0, "dropped_queue_full": 0,
                         "dropped_gave_up": 0}
        self.thread: Optional[threading.Thread] = None
        if self.webhooks:
            self.thread = threading.Thread(target=self._run, name="pisnoop-alerts", daemon=True)
            self.thread.start()

    def configure(self, acfg) -> None:
        """A reloaded ``alerts`` section: new webhooks, timeouts and bounds from the next alert on (what is queued
        stays queued); the sender thread starts when the first webhook appears."""
        with self.cond:
            self.cfg = acfg
            self.webhooks = tuple(acfg.webhooks)
            start = self.webhooks and self.thread is None and not self.stopping
            if start:
                self.thread = threading.Thread(target=self._run, name="pisnoop-alerts", daemon=True)
        if start:
            self.thread.start()

    def emit(self, event: str, **fields) -> dict:
        """Log the event's line and queue its JSON for the webhooks; never blocks, never raises."""
        alert = {"event": event, "sensor": self.sensor, "at": dt.datetime.now(dt.timezone.utc).isoformat(),
                 **{k: plain(v) for k, v in fields.items()}}
        if isinstance(alert.get("flag"), dict):         # a flag's evidence at the top too, converted once
            alert.setdefault("evidence", alert["flag"].get("evidence") or {})
        self.counters["events"] += 1
        self.log.warning("%s", log_line(event, alert))
        if not self.webhooks:
            return alert
        with self.cond:
            if len(self.queue) >= self.cfg.queue_size:
                self.counters["dropped_queue_full"] += 1
                if self.counters["dropped_queue_full"] == 1 or self.counters["dropped_queue_full"] % 100 == 0:
                    log.warning("alert queue full (%d): %d alert(s) dropped so far", self.cfg.queue_size,
                                self.counters["dropped_queue_full"])
                return alert
            self.queue.append(alert)
            self.counters["queued"] += 1
            self.cond.notify()
        return alert

    def pending(self) -> int:
        with self.cond:
            return len(self.queue) + (1 if self.busy else 0)

    def close(self, wait: float = 0.0) -> None:
        """Stop the sender after at most ``wait`` seconds of delivering what is queued; the rest is dropped."""
        deadline = time.monotonic() + wait
        while self.thread is not None and self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.cond:
            self.stopping = True
            left = len(self.queue)
            self.queue.clear()
            self.counters["dropped_gave_up"] += left
            self.cond.notify_all()
        if left:
            log.warning("%d alert(s) not delivered at exit", left)
        if self.thread is not None:
            self.thread.join(timeout=self.cfg.timeout_seconds + 1)

    # --- the sender thread --------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                alert = self.queue.popleft()
                self.busy = True
            try:
                body = json.dumps(alert).encode()
                for url in self.webhooks:
                    if not self._deliver(url, body):
                        self.counters["dropped_gave_up"] += 1
                        log.warning("alert %s not delivered to %s within %.0f s: dropped", alert["event"], url,
                                    self.cfg.retry_seconds)
            finally:
                with self.cond:
                    self.busy = False

    def _deliver(self, url: str, body: bytes) -> bool:
        """POST until it is taken (2xx), back-off doubling between tries; False after retry_seconds or at stop."""
        give_up = time.monotonic() + self.cfg.retry_seconds
        delay = FIRST_DELAY
        while True:
            error = self.post(url, body, self.cfg.timeout_seconds)
            if error is None:
                self.counters["sent"] += 1
                return True
            self.counters["failed_attempts"] += 1
            if self.counters["failed_attempts"] == 1 or self.counters["failed_attempts"] % 50 == 0:
                log.warning("webhook %s failed (%s); retrying with back-off (%d failed attempts so far)", url,
                            error, self.counters["failed_attempts"])
            wait = min(delay, max(0.0, give_up - time.monotonic()))
            with self.cond:
                if self.stopping or wait <= 0 or self.cond.wait_for(lambda: self.stopping, wait):
                    return False
            delay = min(delay * 2, self.cfg.retry_max_seconds)

    @staticmethod
    def _post(url: str, body: bytes, timeout: float) -> Optional[str]:
        """One POST; None when the webhook took it, else why not (one short text)."""
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "pisnoop-alerts"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read(1024)
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            return f"{exc.__class__.__name__}: {str(exc)[:80]}"
