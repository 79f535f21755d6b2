"""The ``flags`` document: its one shape, built by the analyser and ``pisnoop flags ban``, read by the controller.

A flag is the only thing the analyser (or an operator) tells the controller,
so its shape is defined here once: the field names and statuses, ``build``
(a new flag), ``ended`` (after a release or expiry) and ``parse`` (a typed
``Flag``, or ``BadFlag`` naming the field that is wrong).

A flag says what it is about, so that every flag can be enforced:

* the subject, exactly one of ``client_ip`` (an address, or a prefix
  ``ADDR/LEN``) and ``client_mac`` (a host on the inside segment, whatever
  addresses it uses); ``client_port`` narrows an address to one connection;
* ``protocol`` (tcp or udp) and ``server_ports`` (1 to 8 destination ports);
* ``direction``: ``outbound`` (the client is on the inside, its packets
  toward the server ports are banned) or ``inbound`` (the client is on the
  upstream side);
* ``status``: ``flagged`` (banning), ``exempt`` (never banned: the subject is
  on the never-ban list, ``exempt_reason`` says which entry), ``released``
  or ``expired``; ``origin``: ``analyser`` or ``manual``;
* ``scope``: who enforces it when several appliances share one store:
  ``local`` (only the controller of ``sensor``, the appliance that raised it)
  or ``fleet`` (every controller). ``applies_to(sensor)`` is the one store
  filter for "the flags this sensor enforces".

Documents written before these fields (one ``server_port``, no protocol,
direction, origin or scope) parse as TCP, outbound, from the analyser, and
``local``. Before scopes every controller enforced every flag; an old
document is read as local all the same because a ban acts against a client:
it reaches further only when someone chose so (the policy's ``flag_scope``,
``flags ban --fleet``). With one appliance per store (where old documents
come from) both readings are the same; old flags end within their ban time
anyway; and "missing means local" is what the store filter says by itself
(a document without ``scope`` never equals ``fleet``), so no migration runs.

Also the ``IP`` / ``IP:PORT`` / ``[v6]:PORT`` / ``IP/LEN`` / MAC argument of
the ``flags`` commands. Standard library only (and ``appliance.errors``): the
controller's pure core imports this and must stay free of pymongo and os-ken.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import BadInput

CLIENT_IP, CLIENT_MAC, CLIENT_PORT = "client_ip", "client_mac", "client_port"
PROTOCOL, SERVER_PORTS, DIRECTION = "protocol", "server_ports", "direction"
SERVER_PORT = "server_port"     # documents written before server_ports: read, never written
CLASSIFIER, REASON, ACTION, EVIDENCE = "classifier", "reason", "action", "evidence"
OFFENCE, BAN_SECONDS, SENSOR, STATUS, ORIGIN = "offence", "ban_seconds", "sensor", "status", "origin"
SCOPE = "scope"
EXEMPT_REASON = "exempt_reason"
FLAGGED_AT, EXPIRES_AT, UPDATED_AT, RELEASED_AT = "flagged_at", "expires_at", "updated_at", "released_at"

FLAGGED, EXEMPT, RELEASED, EXPIRED = "flagged", "exempt", "released", "expired"
STATUSES = (FLAGGED, EXEMPT, RELEASED, EXPIRED)
ACTIONS = ("drop", "limit")
PROTOCOLS = ("tcp", "udp")
OUTBOUND, INBOUND = "outbound", "inbound"
DIRECTIONS = (OUTBOUND, INBOUND)
ANALYSER, MANUAL = "analyser", "manual"
ORIGINS = (ANALYSER, MANUAL)
LOCAL, FLEET = "local", "fleet"
SCOPES = (LOCAL, FLEET)
MAX_SERVER_PORTS = 8
# The widest prefix a flag may name: a ban wider than this is a firewall rule, not a verdict about a client.
MIN_PREFIX = {4: 16, 6: 32}

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class BadFlag(BadInput):
    """A flag document (or the arguments for one) that breaks the contract; ``str()`` names the field."""


class BadClient(BadInput):
    """A client argument that is none of ``IP``, ``IP:PORT``, ``IP/LEN`` or a MAC address."""


@dataclass(frozen=True)
class Flag:
    """A parsed flag; dates are aware (UTC).

    ``client_net`` is the subject's network (a /32 or /128 for one address),
    None for a MAC subject; ``client_port`` None means every connection.
    """
    id: Any
    status: str
    client_ip: Optional[str]
    client_net: Optional[Network]
    client_mac: Optional[str]
    client_port: Optional[int]
    protocol: str
    server_ports: tuple
    direction: str
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
    origin: str
    exempt_reason: Optional[str]
    evidence: dict = field(hash=False)
    reach: str = LOCAL          # the document's ``scope``: local or fleet (``scope`` here is the subject's kind)

    def applies_to(self, sensor: str) -> bool:
        """Whether the controller of ``sensor`` enforces this flag (``applies_to(sensor)``, in Python)."""
        return self.reach == FLEET or self.sensor == sensor

    @property
    def scope(self) -> str:
        """``host`` (a MAC), ``prefix``, ``connection`` (an address and port) or ``address``."""
        if self.client_mac is not None:
            return "host"
        if self.client_net.prefixlen < self.client_net.max_prefixlen:
            return "prefix"
        return "connection" if self.client_port is not None else "address"

    @property
    def subject(self) -> str:
        """The subject as ``parse_client`` reads it back (MAC, ADDR/LEN, ADDR or ADDR:PORT)."""
        return self.client_mac or client_text(self.client_ip, self.client_port)


def build(*, client_ip: Optional[str] = None, client_mac: Optional[str] = None, client_port: Optional[int] = None,
          protocol: str = "tcp", server_ports, direction: str = OUTBOUND, classifier: str, reason: str,
          action: str, evidence: dict, offence: int, ban_seconds: int, flagged_at: dt.datetime, sensor: str,
          origin: str = ANALYSER, exempt_reason: Optional[str] = None, scope: str = LOCAL) -> dict:
    """The document of a new flag: banning from ``flagged_at`` for ``ban_seconds`` (``exempt_reason``: recorded,
    never banning); subjects and ports come out canonical (``FD00::0001`` -> ``fd00::1``); BadFlag on a bad value."""
    computable = _is_int(ban_seconds) and isinstance(flagged_at, dt.datetime)
    doc = {
        CLIENT_IP: _canonical_ip(client_ip), CLIENT_MAC: client_mac.lower() if isinstance(client_mac, str) else
        client_mac, CLIENT_PORT: client_port, PROTOCOL: protocol,
        SERVER_PORTS: sorted(server_ports) if isinstance(server_ports, (list, tuple)) else server_ports,
        DIRECTION: direction, CLASSIFIER: classifier, REASON: reason, ACTION: action, EVIDENCE: evidence,
        OFFENCE: offence, BAN_SECONDS: ban_seconds, FLAGGED_AT: flagged_at, UPDATED_AT: flagged_at,
        EXPIRES_AT: flagged_at + dt.timedelta(seconds=ban_seconds) if computable else None,
        STATUS: EXEMPT if exempt_reason is not None else FLAGGED, SENSOR: sensor, ORIGIN: origin, SCOPE: scope,
    }
    if exempt_reason is not None:
        doc[EXEMPT_REASON] = exempt_reason
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
    ip, mac, port = g(CLIENT_IP), g(CLIENT_MAC), g(CLIENT_PORT)
    _need(CLIENT_IP, ip, (ip is None) != (mac is None), f"an address or prefix, or null with {CLIENT_MAC} set "
          "(exactly one subject)")
    net = None if ip is None else _net(ip)
    if mac is not None:
        _need(CLIENT_MAC, mac, isinstance(mac, str) and bool(_MAC.match(mac)), "a MAC address aa:bb:cc:dd:ee:ff")
    _need(CLIENT_PORT, port, port is None or _is_port(port), "a port from 1 to 65535, or null (every connection)")
    if port is not None:
        _need(CLIENT_PORT, port, net is not None and net.prefixlen == net.max_prefixlen,
              "null for a prefix or MAC subject (a port narrows one address)")
    protocol, direction, origin = g(PROTOCOL, "tcp"), g(DIRECTION, OUTBOUND), g(ORIGIN, ANALYSER)
    _need(PROTOCOL, protocol, protocol in PROTOCOLS, "one of " + ", ".join(PROTOCOLS))
    _need(DIRECTION, direction, direction in DIRECTIONS, "one of " + ", ".join(DIRECTIONS))
    _need(ORIGIN, origin, origin in ORIGINS, "one of " + ", ".join(ORIGINS))
    reach = g(SCOPE, LOCAL)
    _need(SCOPE, reach, reach in SCOPES, "one of " + ", ".join(SCOPES))
    sports = g(SERVER_PORTS) if SERVER_PORTS in doc else [g(SERVER_PORT)]
    name = SERVER_PORTS if SERVER_PORTS in doc else SERVER_PORT
    _need(name, g(name), isinstance(sports, (list, tuple)) and 1 <= len(sports) <= MAX_SERVER_PORTS
          and all(_is_port(p) for p in sports) and len(set(sports)) == len(sports),
          f"1 to {MAX_SERVER_PORTS} different ports from 1 to 65535")
    if mac is not None:
        _need(DIRECTION, direction, direction == OUTBOUND, f"{OUTBOUND} for a MAC subject (a host on the inside)")
    action = g(ACTION) or default_action
    _need(ACTION, g(ACTION), action in ACTIONS, "one of " + ", ".join(ACTIONS))
    for key in (CLASSIFIER, REASON, SENSOR):
        _need(key, g(key), isinstance(g(key), str), "a string")
    _need(CLASSIFIER, g(CLASSIFIER), bool(g(CLASSIFIER)), "a classifier name")
    _need(EVIDENCE, g(EVIDENCE), isinstance(g(EVIDENCE), dict), "a mapping")
    for key in (OFFENCE, BAN_SECONDS):
        _need(key, g(key), _is_int(g(key)) and g(key) >= 1, "a whole number, at least 1")
    exempt = g(EXEMPT_REASON)
    _need(EXEMPT_REASON, exempt, (exempt is None and g(STATUS) != EXEMPT) or isinstance(exempt, str),
          f"a string naming the never-ban entry when {STATUS} is {EXEMPT}")
    released = g(RELEASED_AT)
    return Flag(
        id=g("_id"), status=g(STATUS), client_ip=None if net is None else _text(net), client_net=net,
        client_mac=mac, client_port=port, protocol=protocol, server_ports=tuple(sorted(sports)), direction=direction,
        action=action, classifier=g(CLASSIFIER), reason=g(REASON), offence=g(OFFENCE), ban_seconds=g(BAN_SECONDS),
        flagged_at=_date(FLAGGED_AT, g(FLAGGED_AT)), expires_at=_date(EXPIRES_AT, g(EXPIRES_AT)),
        updated_at=_date(UPDATED_AT, g(UPDATED_AT)),
        released_at=None if released is None else _date(RELEASED_AT, released),
        sensor=g(SENSOR), origin=origin, exempt_reason=exempt, evidence=g(EVIDENCE), reach=reach,
    )


def applies_to(sensor: str) -> dict:
    """The store filter of the flags the controller of ``sensor`` enforces: its own and the fleet's.

    Indexes leading with ``sensor`` and with ``scope`` (``appliance/indexes.py``)
    serve each clause of the ``$or``, so a controller reads its share, not the
    whole collection.
    """
    return {"$or": [{SENSOR: sensor}, {SCOPE: FLEET}]}


def within(scope: dict, query: dict) -> dict:
    """``query`` narrowed by a filter such as ``applies_to(sensor)`` ({} : no narrowing), each condition its own
    ``$and`` item: nx-27017 drops conditions beside an ``$or`` when there are two or more and one is a range
    (docs/ARCHITECTURE.md, "Facts: MongoDB and nx-27017"); MongoDB reads both forms the same."""
    if not scope:
        return dict(query)
    return {"$and": [scope, *({k: v} for k, v in query.items())]}


def _need(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        shown = repr(value)
        raise BadFlag(f"{name} {shown if len(shown) <= 60 else shown[:57] + '...'}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_port(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= 65535


def _net(value: Any) -> Network:
    """An address (``/32``, ``/128``) or a prefix without host bits, no wider than ``MIN_PREFIX``."""
    try:
        net = ipaddress.ip_network(value, strict=True) if isinstance(value, str) else None  # not an int either
    except ValueError:
        net = None
    _need(CLIENT_IP, value, net is not None, "an IPv4 or IPv6 address, or a prefix ADDR/LEN without host bits")
    _need(CLIENT_IP, value, net.prefixlen >= MIN_PREFIX[net.version],
          f"a prefix of at least /{MIN_PREFIX[net.version]} for IPv{net.version}")
    return net


def _text(net: Network) -> str:
    """An address as ``fd00::1``, a prefix as ``fd00::/64``."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _canonical_ip(value: Any) -> Any:
    try:
        return _text(ipaddress.ip_network(value, strict=True)) if isinstance(value, str) else value
    except ValueError:
        return value        # parse() names it


def _date(name: str, value: Any) -> dt.datetime:
    """Aware UTC: pymongo gives naive UTC datetimes unless its client is tz_aware."""
    _need(name, value, isinstance(value, dt.datetime), "a date")
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def parse_mac(text: str) -> Optional[str]:
    """``aa:bb:cc:dd:ee:ff`` (or with ``-``, any case) in the canonical form, or None when ``text`` is no MAC."""
    mac = text.strip().lower().replace("-", ":")
    return mac if _MAC.match(mac) else None


def parse_subject(text: str) -> tuple[Optional[str], Optional[str], Optional[int]]:
    """A ``flags`` command's subject -> (ip or prefix, mac, port): ``IP``, ``IP:PORT``, ``[v6]:PORT``, ``IP/LEN``
    or a MAC address; BadClient when it is none of them."""
    mac = parse_mac(text)
    if mac is not None:
        return None, mac, None
    if "/" in text:
        try:
            net = _net(text)
        except BadFlag:
            raise BadClient(f"client {text!r}: expected a prefix ADDR/LEN without host bits, at least "
                            f"/{MIN_PREFIX[4]} (IPv4) or /{MIN_PREFIX[6]} (IPv6)") from None
        return _text(net), None, None
    ip, port = parse_client(text)
    return ip, None, port


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
