"""Flags: the verdicts the controller enforces (the ``flags`` contract in README).

A verdict becomes a flag unless an active flag already covers the client (the
same connection, or the whole IP). The ban length comes from
``bans.ban_seconds`` with the client's earlier offences inside
``escalation.memory_seconds``; ``expires_at`` is wall-clock at flag time.
Two backends with one interface: MongoDB (the service) and memory
(``analyse --pcap`` and one-shot ranges, which must not touch the store).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Optional

from appliance import bans, store
from appliance.errors import BadInput
from .classifiers import Verdict

ACTIVE = "flagged"
SLACK = dt.timedelta(seconds=1)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class BadClient(BadInput):
    """A client argument that is neither ``IP`` nor ``IP:PORT``."""


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


class MemoryFlags:
    """Flags in a list: nothing is written anywhere."""

    def __init__(self):
        self.docs: list[dict] = []

    def insert(self, doc: dict) -> None:
        self.docs.append(doc)

    def offences_since(self, ip: str, since: dt.datetime) -> int:
        return sum(1 for d in self.docs if d["client_ip"] == ip and d["flagged_at"] >= since)

    def active(self, now: dt.datetime) -> list[dict]:
        return [d for d in self.docs if d["status"] == ACTIVE and d["expires_at"] > now]

    def expire(self, now: dt.datetime) -> int:
        due = [d for d in self.docs if d["status"] == ACTIVE and d["expires_at"] <= now]
        for d in due:
            d.update(status="expired", updated_at=now)
        return len(due)

    def all(self) -> list[dict]:
        return list(self.docs)


class MongoFlags:
    """Flags in the ``flags`` collection, indexed for the controller's two queries."""

    def __init__(self, db):
        self.coll = db[store.FLAGS]
        self.coll.create_index("updated_at")
        self.coll.create_index([("status", 1), ("expires_at", 1)])
        self.coll.create_index([("client_ip", 1), ("flagged_at", 1)])

    def insert(self, doc: dict) -> None:
        self.coll.insert_one(doc)

    def offences_since(self, ip: str, since: dt.datetime) -> int:
        return self.coll.count_documents({"client_ip": ip, "flagged_at": {"$gte": since}})

    # Date bounds a second wider, then exact in Python: nx-27017 compares dates at whole seconds.
    def active(self, now: dt.datetime) -> list[dict]:
        docs = self.coll.find({"status": ACTIVE, "expires_at": {"$gte": now - SLACK}})
        return [d for d in docs if d["expires_at"] > now]

    def expire(self, now: dt.datetime) -> int:
        due = [d for d in self.coll.find({"status": ACTIVE, "expires_at": {"$lt": now + SLACK}}) if d["expires_at"] <= now]
        return sum(self._change(d, status="expired", updated_at=now) for d in due)

    def _change(self, doc: dict, **changes) -> int:
        """Replace the whole document, only if its status did not change meanwhile.

        Not ``$set``: nx-27017 stores a datetime given to ``$set`` on an
        existing document as a string, which would break the controller's
        ``updated_at`` query; a replacement keeps it a date (also on MongoDB).
        """
        new = {**doc, **changes}
        return self.coll.replace_one({"_id": doc["_id"], "status": doc["status"]}, new).modified_count
    def all(self, since: Optional[dt.datetime] = None) -> list[dict]:
        query = {"flagged_at": {"$gte": since - SLACK}} if since else {}
        return [d for d in self.coll.find(query).sort("flagged_at", 1) if since is None or d["flagged_at"] >= since]

    def release(self, ip: str, port: Optional[int], now: dt.datetime) -> int:
        query = {"status": ACTIVE, "client_ip": ip}
        if port is not None:
            query["client_port"] = port
        return sum(self._change(d, status="released", updated_at=now, released_at=now) for d in self.coll.find(query))


class FlagBook:
    """Turns verdicts into flags: de-duplication against active flags, escalation, expiry."""

    def __init__(self, cfg, backend, sensor: str = ""):
        self.enforce = cfg.enforce
        self.backend = backend
        self.sensor = sensor
        self.covering: dict[tuple, dt.datetime] = {}  # (ip, port|None) -> expires_at
        self.raised = 0
        self.refresh()

    def refresh(self, now: Optional[dt.datetime] = None) -> None:
        """Reload the active flags (another process may have released some)."""
        self.covering = {(d["client_ip"], d["client_port"]): d["expires_at"] for d in self.backend.active(now or now_utc())}

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
        """Write a flag for ``verdict`` unless one is active; return the flag written."""
        now = now or now_utc()
        if self.covers(verdict.client_ip, verdict.client_port, now):
            return None
        previous = self.backend.offences_since(verdict.client_ip, now - dt.timedelta(seconds=self.enforce.escalation.memory_seconds))
        seconds = bans.ban_seconds(self.enforce, previous)
        doc = {
            "client_ip": verdict.client_ip, "client_port": verdict.client_port, "server_port": verdict.server_port,
            "classifier": verdict.classifier or classifier.name, "reason": verdict.reason,
            "action": verdict.action or classifier.action or self.enforce.action,
            "evidence": self._evidence(verdict.evidence), "offence": previous + 1, "ban_seconds": seconds,
            "flagged_at": now, "expires_at": now + dt.timedelta(seconds=seconds), "updated_at": now,
            "status": ACTIVE, "sensor": self.sensor,
        }
        self.backend.insert(doc)
        self.covering[(doc["client_ip"], doc["client_port"])] = doc["expires_at"]
        self.raised += 1
        return doc

    @staticmethod
    def _evidence(ev: dict) -> dict:
        out = dict(ev)
        for k in ("first_packet_ns", "last_packet_ns"):
            if isinstance(out.get(k), int):
                out[k.replace("_ns", "")] = dt.datetime.fromtimestamp(out[k] / 1e9, tz=dt.timezone.utc)
        return out

    def expire(self, now: Optional[dt.datetime] = None) -> int:
        return self.backend.expire(now or now_utc())


def client_text(ip: str, port: Optional[int]) -> str:
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
