"""Flags: the verdicts the controller enforces (the document is ``appliance.flagdoc``).

A verdict becomes a flag unless an active flag already covers its subject
(the same connection, address, host MAC or a prefix holding the address, for
the same protocol and server port). Before it is written the never-ban list
(``appliance.neverban``: the config's entries, the stored ``never_ban``
entries, the XMPP servers seen answering, this appliance's own addresses) is
asked: a subject it holds is recorded with status ``exempt`` and the entry
that exempts it, logged once per subject, and never bans. The ban length
comes from ``bans.ban_seconds`` with the subject's earlier offences inside
``escalation.memory_seconds`` (exempt records are no offence);
``expires_at`` is wall-clock at flag time. Two backends with one interface:
MongoDB (the service) and memory (``analyse --pcap`` and one-shot ranges,
which must not touch the store).

A release forgives what its subject sent before it (``Releases``): the
engine counts no packet of a released address, MAC or prefix captured
before the release, and the classifiers drop such packets from their
windows, so an analyser behind the wire, or a window still full of the
flood, does not flag the client again at once from the evidence a person
has just forgiven. What it sends after the release counts from zero.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from typing import Iterable, Optional

from appliance import bans, flagdoc, neverban, store, timespec
from appliance.flagdoc import (
    CLIENT_IP,
    CLIENT_MAC,
    CLIENT_PORT,
    EXEMPT,
    EXPIRED,
    EXPIRES_AT,
    FLAGGED,
    FLAGGED_AT,
    PROTOCOL,
    RELEASED,
    RELEASED_AT,
    SERVER_PORT,
    SERVER_PORTS,
    STATUS,
    UPDATED_AT,
)

from .classifiers import Verdict
from .neighbours import Servers

SLACK = dt.timedelta(seconds=1)
REFUSALS_LOGGED = 3   # verdicts a flag document refuses come per packet: log the first few, count them all
ACTIVE = (FLAGGED, EXEMPT)

log = logging.getLogger("pisnoop.analyser.flags")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def subject_query(doc_or_verdict) -> dict:
    """The flags of the same subject (a MAC, or an address/prefix: every connection of an address included)."""
    g = doc_or_verdict.get if isinstance(doc_or_verdict, dict) else lambda k: getattr(doc_or_verdict, k)
    return {CLIENT_MAC: g(CLIENT_MAC)} if g(CLIENT_MAC) else {CLIENT_IP: g(CLIENT_IP)}


def subject_key(doc: dict) -> str:
    if doc.get(CLIENT_MAC):
        return doc[CLIENT_MAC]
    return doc[CLIENT_IP] if doc.get(CLIENT_PORT) is None else f"{doc[CLIENT_IP]}|{doc[CLIENT_PORT]}"


class MemoryFlags:
    """Flags in a list: nothing is written anywhere."""

    def __init__(self):
        self.docs: list[dict] = []

    def insert(self, doc: dict) -> None:
        self.docs.append(doc)

    def offences_since(self, query: dict, since: dt.datetime) -> int:
        (k, v), = query.items()
        return sum(1 for d in self.docs if d.get(k) == v and d[FLAGGED_AT] >= since and d[STATUS] != EXEMPT)

    def active(self, now: dt.datetime) -> list[dict]:
        return [d for d in self.docs if d[STATUS] == FLAGGED and d[EXPIRES_AT] > now]

    def covering(self, now: dt.datetime) -> list[dict]:
        """The flags that hold their subject now: banning, or recorded exempt (not recorded again meanwhile)."""
        return [d for d in self.docs if d[STATUS] in ACTIVE and d[EXPIRES_AT] > now]

    def never_ban(self) -> list[dict]:
        return []

    def expire(self, now: dt.datetime) -> list[dict]:
        """The flags past their time, now ``expired``: their new documents."""
        due = [d for d in self.docs if d[STATUS] == FLAGGED and d[EXPIRES_AT] <= now]
        for d in due:
            d.update(flagdoc.ended(d, EXPIRED, now))
        return due

    def all(self) -> list[dict]:
        return list(self.docs)

    def release_where(self, query: dict, now: dt.datetime) -> list[dict]:
        """Release the active flags whose fields equal ``query``'s (``MongoFlags.release_where`` in memory)."""
        due = [d for d in self.docs if d[STATUS] == FLAGGED and all(d.get(k) == v for k, v in query.items())]
        for d in due:
            d.update(flagdoc.ended(d, RELEASED, now))
        return due

    def released_since(self, since: dt.datetime) -> list[dict]:
        return [d for d in self.docs if d[STATUS] == RELEASED and d[RELEASED_AT] >= since]


class MongoFlags:
    """Flags in the ``flags`` collection (its indexes: ``appliance.indexes``)."""

    def __init__(self, db, sensor: Optional[str] = None):
        self.coll = store.flags(db)
        self.allowed = db[store.NEVER_BAN]
        self.sensor = sensor
        # sensor given: only the flags that sensor's controller enforces count (flagdoc.applies_to); None: all
        self.mine = flagdoc.applies_to(sensor) if sensor is not None else {}

    def insert(self, doc: dict) -> None:
        self.coll.insert_one(doc)

    def offences_since(self, query: dict, since: dt.datetime) -> int:
        return self.coll.count_documents(flagdoc.within(self.mine, {**query, FLAGGED_AT: {"$gte": since},
                                                                     STATUS: {"$ne": EXEMPT}}))

    # Date bounds a second wider, then exact in Python: nx-27017 compares dates at whole seconds.
    def active(self, now: dt.datetime) -> list[dict]:
        docs = self.coll.find(flagdoc.within(self.mine, {STATUS: FLAGGED, EXPIRES_AT: {"$gte": now - SLACK}}))
        return [d for d in docs if d[EXPIRES_AT] > now]

    def covering(self, now: dt.datetime) -> list[dict]:
        docs = self.coll.find(flagdoc.within(self.mine, {STATUS: {"$in": list(ACTIVE)},
                                                         EXPIRES_AT: {"$gte": now - SLACK}}))
        return [d for d in docs if d[EXPIRES_AT] > now]

    def never_ban(self) -> list[dict]:
        """The operator's entries (``flags allow``) for this sensor (``neverban.applies_to``), re-read at every
        refresh."""
        return list(self.allowed.find(neverban.applies_to(self.sensor) if self.sensor is not None else {}))

    def expire(self, now: dt.datetime) -> list[dict]:
        """The flags past their time, now ``expired`` (by this call, not by another process): their new documents."""
        found = self.coll.find(flagdoc.within(self.mine, {STATUS: FLAGGED, EXPIRES_AT: {"$lt": now + SLACK}}))
        due = [d for d in found if d[EXPIRES_AT] <= now]      # the flags that apply to this sensor: one alert each
        return [new for new in (self._end(d, EXPIRED, now) for d in due) if new]

    def _end(self, doc: dict, status: str, now: dt.datetime) -> Optional[dict]:
        """Replace the whole document, only if its status did not change meanwhile; the new document, or None.

        Not ``$set``: nx-27017 stores a datetime given to ``$set`` on an
        existing document as a string, which would break the controller's
        ``updated_at`` query; a replacement keeps it a date (also on MongoDB).
        """
        new = flagdoc.ended(doc, status, now)
        return new if self.coll.replace_one({"_id": doc["_id"], STATUS: doc[STATUS]}, new).modified_count else None

    def all(self, since: Optional[dt.datetime] = None) -> list[dict]:
        query = flagdoc.within(self.mine, {FLAGGED_AT: {"$gte": since - SLACK}} if since else {})
        return [d for d in self.coll.find(query).sort(FLAGGED_AT, 1) if since is None or d[FLAGGED_AT] >= since]

    def released_since(self, since: dt.datetime) -> list[dict]:
        """The flags released at or after ``since`` that apply here (a released flag changes no more, so its
        ``updated_at`` is its ``released_at``: the query takes the ``updated_at`` indexes)."""
        docs = self.coll.find(flagdoc.within(self.mine, {STATUS: RELEASED, UPDATED_AT: {"$gte": since - SLACK}}))
        return [d for d in docs if (d.get(RELEASED_AT) or d[UPDATED_AT]) >= since]

    def release(self, ip: str, port: Optional[int], now: dt.datetime) -> int:
        query = {CLIENT_IP: ip}
        if port is not None:
            query[CLIENT_PORT] = port
        return len(self.release_where(query, now))

    def release_where(self, query: dict, now: dt.datetime) -> list[dict]:
        """Release the active flags ``query`` selects (by id, address, prefix or MAC); their new documents."""
        found = self.coll.find(flagdoc.within(self.mine, {**query, STATUS: FLAGGED}))
        return [new for new in (self._end(d, RELEASED, now) for d in found) if new]


def _ns(when: dt.datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return (when - timespec.EPOCH) // dt.timedelta(microseconds=1) * 1000


class Releases:
    """When each released subject was last released (ns since the epoch, capture time's clock).

    A packet of an address, a MAC or an address inside a prefix captured
    before that subject's latest release is forgiven: no classifier counts it
    (``forgives``, asked by the engine only for packets older than
    ``newest_ns``, so the cost is one comparison a packet once the analyser has
    caught up). A connection's release forgives its address: the flags of an
    address are released together (``flags release ADDR``), and a window of
    the address holds the connection's packets. A stored document that is no
    valid flag forgives nothing (counted in ``unreadable``).
    """

    def __init__(self, docs: Iterable[dict] = ()):
        self.addresses: dict = {}                # ip_address -> ns
        self.macs: dict[bytes, int] = {}
        self.prefixes: dict = {}                 # ip_network -> ns
        self.unreadable = 0
        for d in docs:
            try:
                f = flagdoc.parse(d)
            except flagdoc.BadFlag:
                self.unreadable += 1
                continue
            ns = _ns(f.released_at or f.updated_at)
            if f.client_mac:
                into, key = self.macs, bytes.fromhex(f.client_mac.replace(":", ""))
            elif f.scope == "prefix":
                into, key = self.prefixes, f.client_net
            else:
                into, key = self.addresses, f.client_net.network_address
            into[key] = max(ns, into.get(key, 0))
        self.newest_ns = max([0, *self.addresses.values(), *self.macs.values(), *self.prefixes.values()])

    def __eq__(self, other) -> bool:
        return isinstance(other, Releases) and (self.addresses, self.macs, self.prefixes) == (
            other.addresses, other.macs, other.prefixes)

    def __bool__(self) -> bool:
        return self.newest_ns > 0

    def address_ns(self, ip: Optional[str]) -> int:
        """The latest release of ``ip``: of the address itself or of a prefix holding it (0: none)."""
        if not ip or not (self.addresses or self.prefixes):
            return 0
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return 0
        ns = self.addresses.get(addr, 0)
        for net, at in self.prefixes.items():
            if at > ns and addr.version == net.version and addr in net:
                ns = at
        return ns

    def mac_ns(self, mac: Optional[bytes]) -> int:
        return self.macs.get(mac, 0) if mac else 0

    def prefix_ns(self, prefix: Optional[str]) -> int:
        """The latest release of exactly the prefix ``prefix`` (a window kept by prefix)."""
        try:
            return self.prefixes.get(ipaddress.ip_network(prefix), 0) if prefix and self.prefixes else 0
        except ValueError:
            return 0

    def forgives(self, client: str, mac: Optional[bytes], ts_ns: int) -> bool:
        """Whether a packet of ``client`` (from ``mac``) captured at ``ts_ns`` was sent before its release."""
        return ts_ns < self.newest_ns and (ts_ns < self.mac_ns(mac) or ts_ns < self.address_ns(client))


class FlagBook:
    """Turns verdicts into flags: de-duplication against active flags, never-ban, escalation, expiry.

    ``servers`` holds the XMPP server addresses seen answering (the engine
    records them) and ``own`` this appliance's addresses; both only matter
    when ``enforce.never_ban_servers`` / ``never_ban_self`` are on.
    """

    def __init__(self, cfg, backend, sensor: str = "", own: Iterable[str] = ()):
        self.cfg = cfg
        self.enforce = cfg.enforce
        self.backend = backend
        self.sensor = sensor
        self.servers, self.own = Servers(), tuple(own)
        self.stored: list = []
        self.servers_gen = -1
        self.covering: dict[str, list] = {}       # subject key -> [(protocol, ports, expires_at)]
        self.prefixes: list = []                  # (network, key) of active prefix flags
        self.raised = self.refused = self.exempt = 0
        self.exempt_logged: set = set()
        self.never = neverban.NeverBan()
        self.gen = 0                              # changes whenever a flag may cover more than before
        self.releases = Releases()                # changes (a new object) whenever a release is learned
        self.refresh()

    def refresh(self, now: Optional[dt.datetime] = None) -> None:
        """Reload the active flags (another process may have released some), the releases of the escalation
        memory (what the engine forgives) and the never-ban list.

        The releases are read after the covering flags: a release between the two reads is then known as
        both (still covering until the next refresh, and forgiven), never as neither."""
        now = now or now_utc()
        self.covering, self.prefixes = {}, []
        for d in self.backend.covering(now):
            self._cover(d)
        memory = dt.timedelta(seconds=self.enforce.escalation.memory_seconds)
        releases = Releases(self.backend.released_since(now - memory))
        if releases != self.releases:
            self.releases = releases
        self.stored = self.backend.never_ban()
        self._never()

    def _never(self) -> None:
        self.never = neverban.NeverBan.of(self.cfg, self.stored, self.servers.addresses(), self.own)
        self.servers_gen = self.servers.gen

    def _cover(self, d: dict) -> None:
        self.gen += 1
        key = subject_key(d)
        ports = d.get(SERVER_PORTS) or [d.get(SERVER_PORT)]
        self.covering.setdefault(key, []).append((d.get(PROTOCOL, "tcp"), frozenset(ports), d[EXPIRES_AT]))
        ip = d.get(CLIENT_IP)
        if ip and "/" in ip:
            self.prefixes.append((ipaddress.ip_network(ip), key))

    def covers(self, ip: str, port: Optional[int], now: dt.datetime, mac: str = "", protocol: str = "tcp",
               server_port: Optional[int] = None) -> bool:
        """Whether an active flag already holds this client for this protocol and server port (None: any):
        its connection, its address, its host or a prefix holding the address."""
        cov = self.covering
        if not cov:
            return False
        keys = [ip, f"{ip}|{port}"]
        if mac:
            keys.append(mac)
        if self.prefixes:
            addr = ipaddress.ip_address(ip)
            keys += [k for net, k in self.prefixes if addr.version == net.version and addr in net]
        for key in keys:
            entries = cov.get(key)
            if not entries:
                continue
            live = [e for e in entries if e[2] > now]
            if len(live) != len(entries):
                cov[key] = live
            for proto, ports, _exp in live:
                if proto == protocol and (server_port is None or server_port in ports):
                    return True
        return False

    def offer(self, verdict: Verdict, classifier, now: Optional[dt.datetime] = None) -> Optional[dict]:
        """Write a flag (or an exempt record) for ``verdict`` unless one is active or it makes no valid flag;
        return the document written."""
        now = now or now_utc()
        protocol = verdict.protocol or "tcp"
        ports = verdict.ports
        if self._covered(verdict, protocol, ports, now):
            return None
        if self.servers_gen != self.servers.gen:
            self._never()
        net = None
        if verdict.client_ip is not None:
            try:
                net = ipaddress.ip_network(verdict.client_ip)
            except ValueError:
                net = None                        # flagdoc.build names it below
        exempt = self.never.exempts(net, verdict.addresses) if (net is not None or verdict.client_mac) else None
        memory = dt.timedelta(seconds=self.enforce.escalation.memory_seconds)
        previous = 0 if exempt else self.backend.offences_since(subject_query(verdict), now - memory)
        try:
            doc = flagdoc.build(
                client_ip=verdict.client_ip, client_mac=verdict.client_mac, client_port=verdict.client_port,
                protocol=protocol, server_ports=ports, direction=verdict.direction or flagdoc.OUTBOUND,
                classifier=verdict.classifier or classifier.name, reason=verdict.reason,
                action=verdict.action or classifier.action or self.enforce.action,
                evidence=self._evidence(verdict.evidence), offence=previous + 1,
                ban_seconds=bans.ban_seconds(self.enforce, previous), flagged_at=now, sensor=self.sensor,
                exempt_reason=exempt, scope=getattr(classifier, "flag_scope", None) or flagdoc.LOCAL)
        except (flagdoc.BadFlag, TypeError) as exc:  # a custom classifier's verdict: the analyser goes on
            self.refused += 1
            if self.refused <= REFUSALS_LOGGED:
                log.warning("verdict of %s not flagged: %s", classifier.name, exc)
            return None
        self.backend.insert(doc)
        self._cover(doc)
        if exempt:
            self.exempt += 1
            key = subject_key(doc)
            if key not in self.exempt_logged:
                self.exempt_logged.add(key)
                log.warning("not banned: %s is on the never-ban list (%s); recorded as exempt", key, exempt)
        else:
            self.raised += 1
        return doc

    def _covered(self, v: Verdict, protocol: str, ports: list, now: dt.datetime) -> bool:
        if v.client_mac:
            entries = [e for e in self.covering.get(v.client_mac, ()) if e[2] > now]
            return any(e[0] == protocol and set(ports) <= e[1] for e in entries)
        if v.client_ip is None:
            return False
        if "/" in v.client_ip:
            entries = [e for e in self.covering.get(v.client_ip, ()) if e[2] > now]
            return any(e[0] == protocol and set(ports) <= e[1] for e in entries)
        return all(self.covers(v.client_ip, v.client_port, now, protocol=protocol, server_port=p) for p in ports)

    @staticmethod
    def _evidence(ev: dict) -> dict:
        out = dict(ev)
        for k in ("first_packet_ns", "last_packet_ns"):
            if isinstance(out.get(k), int):
                out[k.replace("_ns", "")] = timespec.utc(out[k])
        return out

    def expire(self, now: Optional[dt.datetime] = None) -> list[dict]:
        """End the flags past their time; the documents of those this call expired (one alert each)."""
        return self.backend.expire(now or now_utc())
