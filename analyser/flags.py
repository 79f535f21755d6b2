"""Flags: the verdicts the controller enforces (the document is ``appliance.flagdoc``).

A verdict becomes a flag unless an active flag already covers the client (the
same connection, or the whole IP). The ban length comes from
``bans.ban_seconds`` with the client's earlier offences inside
``escalation.memory_seconds``; ``expires_at`` is wall-clock at flag time.
Two backends with one interface: MongoDB (the service) and memory
(``analyse --pcap`` and one-shot ranges, which must not touch the store).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Optional

from appliance import bans, flagdoc, store, timespec
from appliance.flagdoc import CLIENT_IP, CLIENT_PORT, EXPIRED, EXPIRES_AT, FLAGGED, FLAGGED_AT, RELEASED, STATUS

from .classifiers import Verdict

SLACK = dt.timedelta(seconds=1)
REFUSALS_LOGGED = 3   # verdicts a flag document refuses come per packet: log the first few, count them all

log = logging.getLogger("pisnoop.analyser.flags")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class MemoryFlags:
    """Flags in a list: nothing is written anywhere."""

    def __init__(self):
        self.docs: list[dict] = []

    def insert(self, doc: dict) -> None:
        self.docs.append(doc)

    def offences_since(self, ip: str, since: dt.datetime) -> int:
        return sum(1 for d in self.docs if d[CLIENT_IP] == ip and d[FLAGGED_AT] >= since)

    def active(self, now: dt.datetime) -> list[dict]:
        return [d for d in self.docs if d[STATUS] == FLAGGED and d[EXPIRES_AT] > now]

    def expire(self, now: dt.datetime) -> int:
        due = [d for d in self.docs if d[STATUS] == FLAGGED and d[EXPIRES_AT] <= now]
        for d in due:
            d.update(flagdoc.ended(d, EXPIRED, now))
        return len(due)

    def all(self) -> list[dict]:
        return list(self.docs)


class MongoFlags:
    """Flags in the ``flags`` collection (its indexes: ``appliance.indexes``)."""

    def __init__(self, db):
        self.coll = db[store.FLAGS]

    def insert(self, doc: dict) -> None:
        self.coll.insert_one(doc)

    def offences_since(self, ip: str, since: dt.datetime) -> int:
        return self.coll.count_documents({CLIENT_IP: ip, FLAGGED_AT: {"$gte": since}})

    # Date bounds a second wider, then exact in Python: nx-27017 compares dates at whole seconds.
    def active(self, now: dt.datetime) -> list[dict]:
        docs = self.coll.find({STATUS: FLAGGED, EXPIRES_AT: {"$gte": now - SLACK}})
        return [d for d in docs if d[EXPIRES_AT] > now]

    def expire(self, now: dt.datetime) -> int:
        due = [d for d in self.coll.find({STATUS: FLAGGED, EXPIRES_AT: {"$lt": now + SLACK}}) if d[EXPIRES_AT] <= now]
        return sum(self._end(d, EXPIRED, now) for d in due)

    def _end(self, doc: dict, status: str, now: dt.datetime) -> int:
        """Replace the whole document, only if its status did not change meanwhile.

        Not ``$set``: nx-27017 stores a datetime given to ``$set`` on an
        existing document as a string, which would break the controller's
        ``updated_at`` query; a replacement keeps it a date (also on MongoDB).
        """
        new = flagdoc.ended(doc, status, now)
        return self.coll.replace_one({"_id": doc["_id"], STATUS: doc[STATUS]}, new).modified_count

    def all(self, since: Optional[dt.datetime] = None) -> list[dict]:
        query = {FLAGGED_AT: {"$gte": since - SLACK}} if since else {}
        return [d for d in self.coll.find(query).sort(FLAGGED_AT, 1) if since is None or d[FLAGGED_AT] >= since]

    def release(self, ip: str, port: Optional[int], now: dt.datetime) -> int:
        query = {CLIENT_IP: ip}
        if port is not None:
            query[CLIENT_PORT] = port
        return len(self.release_where(query, now))

    def release_where(self, query: dict, now: dt.datetime) -> list:
        """Release the active flags ``query`` selects (by id, address, prefix or MAC); the ids released."""
        return [d["_id"] for d in self.coll.find({**query, STATUS: FLAGGED}) if self._end(d, RELEASED, now)]


class FlagBook:
    """Turns verdicts into flags: de-duplication against active flags, escalation, expiry."""

    def __init__(self, cfg, backend, sensor: str = ""):
        self.enforce = cfg.enforce
        self.backend = backend
        self.sensor = sensor
        self.covering: dict[tuple, dt.datetime] = {}  # (ip, port|None) -> expires_at
        self.raised = 0
        self.refused = 0
        self.refresh()

    def refresh(self, now: Optional[dt.datetime] = None) -> None:
        """Reload the active flags (another process may have released some)."""
        self.covering = {(d[CLIENT_IP], d[CLIENT_PORT]): d[EXPIRES_AT] for d in self.backend.active(now or now_utc())}

    def covers(self, ip: str, port: Optional[int], now: dt.datetime) -> bool:
        """Whether an active flag already holds this client: its connection or its whole IP."""
        cov = self.covering
        if not cov:
            return False
        for key in ((ip, None), (ip, port)):
            exp = cov.get(key)
            if exp is not None:
                if exp > now:
                    return True
                del cov[key]
        return False

    def offer(self, verdict: Verdict, classifier, now: Optional[dt.datetime] = None) -> Optional[dict]:
        """Write a flag for ``verdict`` unless one is active or it makes no valid flag; return the flag written."""
        now = now or now_utc()
        if self.covers(verdict.client_ip, verdict.client_port, now):
            return None
        memory = dt.timedelta(seconds=self.enforce.escalation.memory_seconds)
        previous = self.backend.offences_since(verdict.client_ip, now - memory)
        try:
            doc = flagdoc.build(
                client_ip=verdict.client_ip, client_port=verdict.client_port, server_ports=[verdict.server_port],
                classifier=verdict.classifier or classifier.name, reason=verdict.reason,
                action=verdict.action or classifier.action or self.enforce.action,
                evidence=self._evidence(verdict.evidence), offence=previous + 1,
                ban_seconds=bans.ban_seconds(self.enforce, previous), flagged_at=now, sensor=self.sensor)
        except flagdoc.BadFlag as exc:  # a custom classifier's verdict: the analyser goes on
            self.refused += 1
            if self.refused <= REFUSALS_LOGGED:
                log.warning("verdict of %s not flagged: %s", classifier.name, exc)
            return None
        self.backend.insert(doc)
        self.covering[(doc[CLIENT_IP], doc[CLIENT_PORT])] = doc[EXPIRES_AT]
        self.raised += 1
        return doc

    @staticmethod
    def _evidence(ev: dict) -> dict:
        out = dict(ev)
        for k in ("first_packet_ns", "last_packet_ns"):
            if isinstance(out.get(k), int):
                out[k.replace("_ns", "")] = timespec.utc(out[k])
        return out

    def expire(self, now: Optional[dt.datetime] = None) -> int:
        return self.backend.expire(now or now_utc())

