"""The never-ban list: the addresses and prefixes no flag may ban, whoever raised it.

Entries come from four places, each named in the exemption it causes:
``enforce.never_ban`` (the config), ``flags allow`` (the ``never_ban``
collection, whose document shape is owned here), the XMPP servers the
analyser saw answering (``enforce.never_ban_servers``) and this machine's own
and its controller's addresses (``enforce.never_ban_self``). A flag whose
subject overlaps an entry (either contains the other: a /64 ban holding the
admin's address is as harmful as banning the admin) is recorded as
``exempt`` and installs no flow. A MAC subject is checked through the
addresses the host was seen with.

A stored entry is ``fleet`` (every appliance sharing the store honours it)
or ``local`` (only the appliance whose ``sensor`` wrote it: ``flags allow
--local``). An entry stored before scopes is read as ``fleet``: before, every
controller and analyser honoured every entry, and an exemption is the side
that harms no one; ``applies_to(sensor)`` is the store filter. A fleet entry's
``_id`` is the network (one per network, as before), a local one's
``NETWORK@SENSOR``, so the same network can be local to two sites.

Pure apart from ``own_addresses`` and ``OwnAddresses`` (psutil, imported
there): the controller's core imports this. This machine's addresses change
(DHCP, SLAAC's temporary addresses every day): the analyser and the
controller read them again at every refresh (``OwnAddresses``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from typing import Iterable, Optional

from .errors import BadInput
from .flagdoc import Network

log = logging.getLogger("pisnoop.neverban")

NETWORK, REASON, ADDED_AT = "_id", "reason", "added_at"   # _id is the canonical network: one entry per network
NET, SCOPE, SENSOR = "network", "scope", "sensor"         # the network again (a local entry's _id adds @sensor)
LOCAL, FLEET = "local", "fleet"
CONFIG, ALLOWED, SERVER, SELF = "enforce.never_ban", "flags allow", "an XMPP server seen answering", "this appliance"


class BadEntry(BadInput):
    """A never-ban entry (argument or stored document) that is not an address or prefix."""


@dataclass(frozen=True)
class Entry:
    network: Network
    source: str         # CONFIG, ALLOWED, SERVER or SELF
    reason: str = ""

    def describe(self) -> str:
        net = self.network
        text = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        return f"{text} ({self.source}{': ' + self.reason if self.reason else ''})"


def network(text: str) -> Network:
    """``ADDR`` or ``ADDR/LEN`` without host bits; BadEntry otherwise."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except (ValueError, TypeError):
        raise BadEntry(f"never-ban entry {text!r}: expected an IPv4 or IPv6 address or a prefix ADDR/LEN "
                       "without host bits") from None


def entry_id(net: Network, sensor: Optional[str] = None) -> str:
    """A fleet entry's ``_id`` (its network) or a local one's (``NETWORK@SENSOR``)."""
    return str(net) if sensor is None else f"{net}@{sensor}"


def entry_doc(text: str, reason: str, now: dt.datetime, sensor: Optional[str] = None) -> dict:
    """The stored document of a ``flags allow`` entry: fleet-wide, or local to ``sensor``."""
    net = network(text)
    doc = {NETWORK: entry_id(net, sensor), NET: str(net), REASON: reason, ADDED_AT: now,
           SCOPE: FLEET if sensor is None else LOCAL}
    if sensor is not None:
        doc[SENSOR] = sensor
    return doc


def parse_entry(doc: dict) -> Entry:
    where = "" if doc.get(SCOPE) != LOCAL else f" on {doc.get(SENSOR)} only"
    return Entry(network(doc.get(NET, doc.get(NETWORK))), ALLOWED + where, str(doc.get(REASON) or ""))


def applies_to(sensor: str) -> dict:
    """The store filter of the ``never_ban`` entries ``sensor`` honours: the fleet's (and the old ones) and its own."""
    return {"$or": [{SCOPE: {"$ne": LOCAL}}, {SENSOR: sensor}]}


class NeverBan:
    """The entries in force; ``exempts`` names the one a subject overlaps."""

    def __init__(self, entries: Iterable[Entry] = ()):
        self.entries = tuple(entries)

    @classmethod
    def of(cls, cfg, stored: Iterable[dict] = (), servers: Iterable[str] = (), own: Iterable[str] = ()) -> "NeverBan":
        """The list for ``cfg``: its ``never_ban``, stored entries, and servers / own addresses where enabled.

        A stored document that is not an entry is skipped (the caller counts it
        through ``parse_entry`` if it wants to); the config's entries were
        validated with the config.
        """
        out = [Entry(ipaddress.ip_network(t), CONFIG) for t in cfg.enforce.never_ban]
        for doc in stored:
            try:
                out.append(parse_entry(doc))
            except BadEntry:
                continue
        if cfg.enforce.never_ban_servers:
            out += [Entry(ipaddress.ip_network(a), SERVER) for a in servers]
        if cfg.enforce.never_ban_self:
            out += [Entry(ipaddress.ip_network(a), SELF) for a in own]
        return cls(out)

    def exempts(self, net: Optional[Network], addresses: Iterable[str] = ()) -> Optional[str]:
        """The entry ``net`` (or, for a MAC subject, any of ``addresses``) overlaps, described; None if none."""
        nets = [net] if net is not None else []
        nets += [ipaddress.ip_network(a) for a in addresses]
        for e in self.entries:
            for n in nets:
                if n.version == e.network.version and (n.subnet_of(e.network) or e.network.subnet_of(n)):
                    return e.describe()
        return None


def own_addresses(cfg) -> list[str]:
    """This machine's unicast addresses (not loopback, not link-local) and the controller's listen address
    (only that one, with a warning, when the interfaces cannot be read)."""
    interfaces, failure = _interfaces()
    if failure is not None:
        _cannot_read(failure)
    return _own(cfg, interfaces)


def _interfaces() -> tuple[dict, Optional[OSError]]:
    import psutil
    try:
        return psutil.net_if_addrs(), None        # getifaddrs: needs AF_NETLINK (the units allow it)
    except OSError as exc:
        return {}, exc


def _cannot_read(exc: OSError) -> None:
    log.warning("cannot read this machine's addresses (%s): never_ban_self covers the controller's listen "
                "address only; list the others in enforce.never_ban", exc)


def _own(cfg, interfaces: dict) -> list[str]:
    import socket
    out = set()
    for addrs in interfaces.values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    ip = ipaddress.ip_address(a.address.split("%")[0])
                except ValueError:
                    continue
                if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
                    out.add(str(ip))
    host = ipaddress.ip_address(cfg.switch.controller.listen_host)
    if not (host.is_loopback or host.is_unspecified):
        out.add(str(host))
    return sorted(out)


class OwnAddresses:
    """``own_addresses`` read again at each ``current(cfg)`` (a refresh), as a tuple; empty when
    ``enforce.never_ban_self`` is off. A change is logged (the addresses gained and lost); a failure to read
    the interfaces is warned once, until they can be read again."""

    def __init__(self):
        self.last: Optional[tuple] = None
        self.failing = False

    def current(self, cfg) -> tuple:
        """Under ``cfg``, the config in force (a reload may turn ``never_ban_self`` off or on)."""
        if not cfg.enforce.never_ban_self:
            return ()
        interfaces, failure = _interfaces()
        if failure is not None and not self.failing:
            _cannot_read(failure)
        self.failing = failure is not None
        now = tuple(_own(cfg, interfaces))
        if self.last is not None and now != self.last:
            gained, lost = sorted(set(now) - set(self.last)), sorted(set(self.last) - set(now))
            log.info("this machine's addresses changed (never_ban_self): %s", " ".join(
                [f"+{a}" for a in gained] + [f"-{a}" for a in lost]))
        self.last = now
        return now
