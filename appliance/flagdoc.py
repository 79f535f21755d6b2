"""The ``flags`` document: its one shape, built by the analyser, read by the controller and the commands.

A flag is the only thing the analyser tells the controller, so its shape is
defined here once: the field names and statuses, ``build`` (the document the
analyser writes), ``ended`` (the document after a release or expiry) and
``parse`` (a typed ``Flag``, or ``BadFlag`` naming the field that is wrong).
Also the ``IP`` / ``IP:PORT`` / ``[v6]:PORT`` client argument of ``flags release``.

Standard library only (and ``appliance.errors``): the controller's pure core
imports this and must stay free of pymongo and os-ken.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import BadInput

CLIENT_IP, CLIENT_PORT, SERVER_PORT = "client_ip", "client_port", "server_port"
CLASSIFIER, REASON, ACTION, EVIDENCE = "classifier", "reason", "action", "evidence"
OFFENCE, BAN_SECONDS, SENSOR, STATUS = "offence", "ban_seconds", "sensor", "status"
FLAGGED_AT, EXPIRES_AT, UPDATED_AT, RELEASED_AT = "flagged_at", "expires_at", "updated_at", "released_at"

FLAGGED, RELEASED, EXPIRED = "flagged", "released", "expired"
STATUSES = (FLAGGED, RELEASED, EXPIRED)
ACTIONS = ("drop", "limit")


class BadFlag(BadInput):
    """A flag document (or the arguments for one) that breaks the contract; ``str()`` names the field."""


class BadClient(BadInput):
    """A client argument that is neither ``IP`` nor ``IP:PORT``."""


@dataclass(frozen=True)
class Flag:
    """A parsed flag; dates are aware (UTC). ``client_port`` None means the whole client IP."""
    id: Any
    status: str
    client_ip: str
    client_port: Optional[int]
    server_port: int
    action: str
    classifier: str
    reason: str
    offence: int
    ban_seconds: int
    flagged_at: dt.datetime
    expires_at: dt.datetime
    updated_at: dt.datetime
    released_at: Optional[dt.datetime]
    sensor: str
    evidence: dict = field(hash=False)


def build(*, client_ip: str, client_port: Optional[int], server_port: int, classifier: str, reason: str,
          action: str, evidence: dict, offence: int, ban_seconds: int, flagged_at: dt.datetime, sensor: str) -> dict:
    """The document of a new flag: banning from ``flagged_at`` for ``ban_seconds``; BadFlag on a bad value."""
    computable = _is_int(ban_seconds) and isinstance(flagged_at, dt.datetime)
    doc = {
        CLIENT_IP: client_ip, CLIENT_PORT: client_port, SERVER_PORT: server_port,
        CLASSIFIER: classifier, REASON: reason, ACTION: action, EVIDENCE: evidence,
        OFFENCE: offence, BAN_SECONDS: ban_seconds, FLAGGED_AT: flagged_at, UPDATED_AT: flagged_at,
        EXPIRES_AT: flagged_at + dt.timedelta(seconds=ban_seconds) if computable else None,
        STATUS: FLAGGED, SENSOR: sensor,
    }
    parse(doc)  # checks ban_seconds and flagged_at before expires_at, so it names the argument that is wrong
    return doc


def ended(doc: dict, status: str, now: dt.datetime) -> dict:
    """The document of a flag that stops banning at ``now``: ``released`` (by a person) or ``expired``."""
    if status not in (RELEASED, EXPIRED):
        raise ValueError(f"a flag ends released or expired, not {status!r}")
    new = {**doc, STATUS: status, UPDATED_AT: now}
    if status == RELEASED:
        new[RELEASED_AT] = now
    return new


def parse(doc: dict, default_action: Optional[str] = None) -> Flag:
    """The typed flag of a stored document; BadFlag with a one-line reason when a field is wrong.

    ``default_action`` is what a document without ``action`` means (the
    controller passes its ``enforce.action``); without it the field is required.
    """
    g = doc.get
    _need(STATUS, g(STATUS), g(STATUS) in STATUSES, "one of " + ", ".join(STATUSES))
    port, sport = g(CLIENT_PORT), g(SERVER_PORT)
    _need(CLIENT_PORT, port, port is None or _is_port(port), "a port from 1 to 65535, or null (the whole IP)")
    _need(SERVER_PORT, sport, _is_port(sport), "a port from 1 to 65535")
    action = g(ACTION) or default_action
    _need(ACTION, g(ACTION), action in ACTIONS, "one of " + ", ".join(ACTIONS))
    for name in (CLASSIFIER, REASON, SENSOR):
        _need(name, g(name), isinstance(g(name), str), "a string")
    _need(CLASSIFIER, g(CLASSIFIER), bool(g(CLASSIFIER)), "a classifier name")
    _need(EVIDENCE, g(EVIDENCE), isinstance(g(EVIDENCE), dict), "a mapping")
    for name in (OFFENCE, BAN_SECONDS):
        _need(name, g(name), _is_int(g(name)) and g(name) >= 1, "a whole number, at least 1")
    released = g(RELEASED_AT)
    return Flag(
        id=g("_id"), status=g(STATUS), client_ip=_ip(g(CLIENT_IP)), client_port=port, server_port=sport,
        action=action, classifier=g(CLASSIFIER), reason=g(REASON), offence=g(OFFENCE), ban_seconds=g(BAN_SECONDS),
        flagged_at=_date(FLAGGED_AT, g(FLAGGED_AT)), expires_at=_date(EXPIRES_AT, g(EXPIRES_AT)),
        updated_at=_date(UPDATED_AT, g(UPDATED_AT)),
        released_at=None if released is None else _date(RELEASED_AT, released),
        sensor=g(SENSOR), evidence=g(EVIDENCE),
    )


def _need(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        shown = repr(value)
        raise BadFlag(f"{name} {shown if len(shown) <= 60 else shown[:57] + '...'}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_port(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= 65535


def _ip(value: Any) -> str:
    try:
        ip = ipaddress.ip_address(value) if isinstance(value, str) else None  # ip_address() would take an int too
    except ValueError:
        ip = None
    _need(CLIENT_IP, value, ip is not None, "an IPv4 or IPv6 address")
    return str(ip)


def _date(name: str, value: Any) -> dt.datetime:
    """Aware UTC: pymongo gives naive UTC datetimes unless its client is tz_aware."""
    _need(name, value, isinstance(value, dt.datetime), "a date")
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def parse_client(text: str) -> tuple[str, Optional[int]]:
    """``IP`` or ``IP:PORT`` (``[v6]:PORT``) -> (ip, port or None); BadClient when it is neither."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ip = str(ipaddress.ip_address(host))
        p = int(port) if port is not None else None
    except ValueError:
        raise BadClient(f"client {text!r}: expected an IP address or IP:PORT") from None
    if p is not None and not 1 <= p <= 65535:
        raise BadClient(f"client {text!r}: port must be from 1 to 65535")
    return ip, p


def client_text(ip: str, port: Optional[int]) -> str:
    """The client as ``parse_client`` reads it back."""
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
