"""Flow records: one per connection, kept in memory, written incrementally.

Client and server are *verified* when the flow was seen from its SYN (the
sender of a bare SYN is the client) or SYN-ACK (its receiver is); a flow
picked up mid-stream is marked ``unverified`` and the side on the lower port
is taken as the server. Counts and intervals are kept per direction
(``c2s`` / ``s2c``).

Restart safety: every write of a flow carries the analyser step that wrote it
and the ids of the batches of that step which touched it. A step whose flows
were written but whose resume point was not (a kill in between) is read
again after a restart; a flow loaded from the store then skips the batches it
already holds, so no packet is counted twice and none is lost.
"""

from __future__ import annotations

from typing import Iterable, Optional

from appliance import timespec

from .parse import ACK, FIN, PSH, RST, SYN, TCP, URG, Packet

FLAG_BITS = ((SYN, "SYN"), (ACK, "ACK"), (FIN, "FIN"), (RST, "RST"), (PSH, "PSH"), (URG, "URG"))
IDLE_NS = 300 * 10**9          # a flow quiet this long (frame time) is written and dropped from memory
CLOSED_IDLE_NS = 10 * 10**9    # a closed flow is dropped sooner


def flow_key(p: Packet) -> tuple:
    """Canonical 5-tuple: the same for both directions."""
    a, b = (p.src, p.sport), (p.dst, p.dport)
    return (p.proto, a, b) if a <= b else (p.proto, b, a)


def key_text(key: tuple) -> str:
    proto, (a, ap), (b, bp) = key
    return f"{proto} {a} {ap} {b} {bp}"


class Flow:
    """The context of one connection; ``c2s`` index 0, ``s2c`` index 1."""

    __slots__ = ("key", "id", "proto", "client", "cport", "server", "sport", "verified", "first_ns", "last_ns",
                 "pkts", "bytes", "max_size", "last_dir_ns", "iat_min", "iat_max", "flags", "closed",
                 "batches", "skip", "dirty")

    def __init__(self, key: tuple, p: Packet):
        self.key = key
        self.proto = p.proto
        syn = p.tcp_flags & (SYN | ACK) if p.proto == TCP else 0
        if syn == SYN:
            self.verified, client_is_src = True, True
        elif syn == SYN | ACK:
            self.verified, client_is_src = True, False
        else:
            self.verified, client_is_src = False, p.sport >= p.dport
        if client_is_src:
            self.client, self.cport, self.server, self.sport = p.src, p.sport, p.dst, p.dport
        else:
            self.client, self.cport, self.server, self.sport = p.dst, p.dport, p.src, p.sport
        self.first_ns = self.last_ns = p.ts_ns
        self.id = f"{key_text(key)} @{p.ts_ns}"
        self.pkts = [0, 0]
        self.bytes = [0, 0]
        self.max_size = 0
        self.last_dir_ns = [None, None]
        self.iat_min = [None, None]
        self.iat_max = [None, None]
        self.flags = dict.fromkeys((n for _, n in FLAG_BITS), 0)
        self.closed = False
        self.batches: set = set()
        self.skip: frozenset = frozenset()
        self.dirty = True

    def add(self, p: Packet, batch_id: str) -> int:
        """Count one packet; return its direction (0 client->server, 1 server->client)."""
        d = 0 if (p.src == self.client and p.sport == self.cport) else 1
        ts = p.ts_ns
        self.pkts[d] += 1
        self.bytes[d] += p.wire_len
        if p.wire_len > self.max_size:
            self.max_size = p.wire_len
        last = self.last_dir_ns[d]
        if last is not None:
            iat = ts - last
            if self.iat_min[d] is None or iat < self.iat_min[d]:
                self.iat_min[d] = iat
            if self.iat_max[d] is None or iat > self.iat_max[d]:
                self.iat_max[d] = iat
        self.last_dir_ns[d] = ts
        if ts > self.last_ns:
            self.last_ns = ts
        if ts < self.first_ns:
            self.first_ns = ts
        f = p.tcp_flags
        if f:
            fl = self.flags
            for bit, name in FLAG_BITS:
                if f & bit:
                    fl[name] += 1
            if f & (FIN | RST):
                self.closed = True
        self.batches.add(batch_id)
        self.dirty = True
        return d

    def document(self, sensor: str, step: int) -> dict:
        both = lambda v: {"c2s": v[0], "s2c": v[1]}  # noqa: E731
        return {
            "_id": self.id, "key": key_text(self.key), "sensor": sensor, "proto": self.proto,
            "client_ip": self.client, "client_port": self.cport, "server_ip": self.server, "server_port": self.sport,
            "direction": "verified" if self.verified else "unverified",
            "first_ns": self.first_ns, "last_ns": self.last_ns,
            "first_seen": timespec.utc(self.first_ns), "last_seen": timespec.utc(self.last_ns),
            "packets": both(self.pkts), "bytes": both(self.bytes), "max_size": self.max_size,
            "iat_min_ns": both(self.iat_min), "iat_max_ns": both(self.iat_max),
            "last_packet_ns": both(self.last_dir_ns), "tcp_flags": dict(self.flags), "closed": self.closed,
            "step": step, "step_batches": sorted(self.batches),
        }

    @classmethod
    def from_document(cls, doc: dict, committed_step: int) -> "Flow":
        f = cls.__new__(cls)
        proto, a, ap, b, bp = doc["key"].split(" ")
        f.key = (int(proto), (a, int(ap)), (b, int(bp)))
        f.id, f.proto = doc["_id"], doc["proto"]
        f.client, f.cport, f.server, f.sport = (doc["client_ip"], doc["client_port"],
                                                doc["server_ip"], doc["server_port"])
        f.verified = doc["direction"] == "verified"
        f.first_ns, f.last_ns = doc["first_ns"], doc["last_ns"]
        pair = lambda d: [d["c2s"], d["s2c"]]  # noqa: E731
        f.pkts, f.bytes, f.max_size = pair(doc["packets"]), pair(doc["bytes"]), doc["max_size"]
        f.iat_min, f.iat_max, f.last_dir_ns = (pair(doc["iat_min_ns"]), pair(doc["iat_max_ns"]),
                                               pair(doc["last_packet_ns"]))
        f.flags, f.closed = dict(doc["tcp_flags"]), doc["closed"]
        # Written by a step that never committed its resume point: those batches are in already.
        f.skip = frozenset(doc.get("step_batches", ())) if doc.get("step", 0) > committed_step else frozenset()
        f.batches, f.dirty = set(), False
        return f


class FlowTable:
    """The live flows; ``sink`` stores their documents (MongoDB or memory)."""

    def __init__(self, sink, sensor: str, committed_step: int = 0):
        self.sink = sink
        self.sensor = sensor
        self.committed_step = committed_step
        self.flows: dict[tuple, Flow] = {}
        self.newest_ns = 0

    def prefetch(self, packets: Iterable[Packet]) -> None:
        """Load, in one query, the stored flows of keys not in memory (after a restart or an eviction)."""
        flows = self.flows
        missing = {k for k in map(flow_key, packets) if k not in flows}
        if missing:
            for doc in self.sink.latest(key_text(k) for k in missing):
                f = Flow.from_document(doc, self.committed_step)
                flows[f.key] = f

    def update(self, p: Packet, batch_id: str) -> tuple[Optional[Flow], int]:
        """Count ``p`` in its flow; (None, 0) when the flow already holds this batch."""
        key = flow_key(p)
        f = self.flows.get(key)
        if f is None or self._new_connection(f, p):
            f = self.flows[key] = Flow(key, p)
        elif f.skip and batch_id in f.skip:
            return None, 0
        if p.ts_ns > self.newest_ns:
            self.newest_ns = p.ts_ns
        return f, f.add(p, batch_id)

    @staticmethod
    def _new_connection(f: Flow, p: Packet) -> bool:
        """A bare SYN on a closed, idle or mid-stream flow starts a new connection on the same 5-tuple."""
        if p.proto != TCP or p.tcp_flags & (SYN | ACK) != SYN:
            return False
        if f.skip and p.ts_ns <= f.last_ns:
            return False  # a replayed packet of a flow that already holds it
        return f.closed or not f.verified or p.ts_ns - f.last_ns > IDLE_NS

    def flush(self, step: int) -> int:
        """Write every changed flow, then forget the idle ones; return how many were written."""
        dirty = [f for f in self.flows.values() if f.dirty]
        if dirty:
            self.sink.write([f.document(self.sensor, step) for f in dirty])
        for f in dirty:
            f.dirty = False
            f.batches = set()
            f.skip = frozenset()
        now = self.newest_ns
        idle = [k for k, f in self.flows.items()
                if now - f.last_ns > (CLOSED_IDLE_NS if f.closed else IDLE_NS)]
        for k in idle:
            del self.flows[k]
        return len(dirty)


def latest_per_key(docs: Iterable[dict]) -> list[dict]:
    """The newest connection of each 5-tuple (a port can be reused by a later connection)."""
    best: dict[str, dict] = {}
    for d in docs:
        b = best.get(d["key"])
        if b is None or d["first_ns"] > b["first_ns"]:
            best[d["key"]] = d
    return list(best.values())


class MongoFlows:
    """Flow documents in the ``flows`` collection, written with upserts of whole records."""

    def __init__(self, db):
        from appliance import store
        self.coll = db[store.FLOWS]

    def latest(self, keys) -> list[dict]:
        return latest_per_key(self.coll.find({"key": {"$in": list(keys)}}))

    def write(self, docs: list[dict]) -> None:
        from pymongo import ReplaceOne
        self.coll.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs], ordered=False)


class MemoryFlows:
    """Flow documents kept in a dict (``analyse --pcap``, one-shot ranges)."""

    def __init__(self):
        self.docs: dict[str, dict] = {}

    def latest(self, keys) -> list[dict]:
        wanted = set(keys)
        return latest_per_key(d for d in self.docs.values() if d["key"] in wanted)

    def write(self, docs: list[dict]) -> None:
        for d in docs:
            self.docs[d["_id"]] = d

    def all(self) -> list[dict]:
        return list(self.docs.values())
