"""Flow records: one per connection, kept in memory, written incrementally; and which packets are *verified*.

Sides: the client is the sender of a bare SYN (the receiver of a SYN-ACK);
a flow picked up mid-stream takes the side on one of ``server_ports`` as the
server, else the side on the lower port, and is marked ``unverified``
(``direction``). Counts and intervals are kept per direction (``c2s`` /
``s2c``).

Verified packets (docs/ARCHITECTURE.md, "Verified traffic"): only they count
toward a classifier's thresholds, because any LAN host can send packets with
another's source address. A TCP connection is verified when the mirror saw
its handshake complete both ways (SYN; SYN-ACK acknowledging it; the client's
ACK acknowledging the server's sequence, from the SYN's source MAC) and then
``xmpp.settle_seconds`` of frame time passed without a contradiction (a second SYN-ACK
with another sequence number, an RST that is not exactly at its sender's next sequence
number): the real server and
the real client answer a forged handshake within a round trip, a forger
cannot stop them. A connection picked up mid-stream is verified after
``PICKUP_EXCHANGES`` exchanges each way (a segment of one side acknowledged
exactly by the other), then the same settling. Until then its packets are
*held*: counted as unverified and handed to the classifiers when the
connection settles (with their own timestamps), dropped from the count if it
does not. After that a packet counts only when its sequence number (and
acknowledgement) fit the connection's windows, as the receiving TCP would
check; an out-of-window segment is one the server's TCP discards anyway.
A UDP packet counts once the other side has answered on the same 5-tuple.
Everything else is unverified: counted per claimed source, never a ban.

Restart safety: every write of flows carries the analyser step that wrote
them, and before it the resume point names that step and the ids of the
batches read since it was last written (``pending``, analyser/reader.py).
Batches whose flows were written but whose resume point was not (a kill in
between) are read again after a restart; a flow loaded from the store with
the pending step skips them (it holds them already), a flow written before
counts them, so no packet is counted twice and none is lost (documents of
older versions name their batches themselves, ``step_batches``). Held packets
are not stored: a connection still settling when the analyser stops is
verified from its next packet on.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Optional

from appliance import timespec
from appliance.l3l4 import tcp_window_scale

from .parse import ACK, FIN, PSH, RST, SYN, TCP, UDP, URG, Packet

FLAG_BITS = ((SYN, "SYN"), (ACK, "ACK"), (FIN, "FIN"), (RST, "RST"), (PSH, "PSH"), (URG, "URG"))
FLAG_NAMES = tuple(tuple(n for bit, n in FLAG_BITS if f & bit) for f in range(64))   # flags byte -> its names
IDLE_NS = 300 * 10**9          # a flow quiet this long (frame time) is written and dropped from memory
CLOSED_IDLE_NS = 10 * 10**9    # a closed or never verified flow is dropped sooner, and so is UDP never answered
UNTRACKED = -1                 # FlowTable.update: a new flow the full table did not take
SETTLE_NS = 500_000_000        # handshake -> verified (xmpp.settle_seconds): longer than the round trip to the server
PICKUP_EXCHANGES = 2           # exact acknowledgements each way that verify a connection picked up mid-stream
PICKUP_SCALE = 8               # window scale assumed when the SYNs were not seen (Linux 7, Windows 8)
SLACK = 1 << 16                # sequence slack beyond the windows (frames the mirror lost, late retransmissions)
HELD_MAX = 4096                # held packets per settling connection; beyond it they stay unverified
MOD, HALF = 1 << 32, 1 << 31

# TCP verification states; the packet verdicts of Flow.add
NONE, SYN_SEEN, SYNACK_SEEN, SETTLING, VERIFIED, SPOOFED, RESET = range(7)
STATE_NAMES = ("none", "syn", "syn-ack", "settling", "verified", "contradicted", "reset")   # the stored "tcp"[0]
NO, OK, HELD = 0, 1, 2


def flow_key(p: Packet) -> tuple:
    """Canonical 5-tuple: the same for both directions."""
    return canonical_key(p.proto, (p.src, p.sport), (p.dst, p.dport))


def canonical_key(proto: int, a: tuple, b: tuple) -> tuple:
    """The flow key of a packet between ends ``a`` and ``b`` ((address text, port)), whichever sent it."""
    return (proto, a, b) if a <= b else (proto, b, a)


def key_text(key: tuple) -> str:
    proto, (a, ap), (b, bp) = key
    return f"{proto} {a} {ap} {b} {bp}"


def _signed(d: int) -> int:
    d &= 0xFFFFFFFF
    return d - MOD if d >= HALF else d


class Flow:
    """The context of one connection; ``c2s`` index 0, ``s2c`` index 1."""

    __slots__ = ("key", "id", "proto", "client", "cport", "server", "sport", "verified", "first_ns", "last_ns",
                 "pkts", "bytes", "max_size", "last_dir_ns", "iat_min", "iat_max", "flags", "closed",
                 "skip", "dirty", "mac", "tcp", "isn", "nxt", "win", "ws", "conf", "ends", "settle_ns",
                 "verified_by", "held", "counted", "status", "v6", "agg", "agg_gen", "ttl", "queued", "cov_gen",
                 "settle_after", "reset")

    def __init__(self, key: tuple, p: Packet, server_ports=(), settle_after: int = SETTLE_NS, sensor: str = ""):
        self.key = key
        self.settle_after = settle_after
        self.proto = p.proto
        syn = p.tcp_flags & (SYN | ACK) if p.proto == TCP else 0
        if syn == SYN:
            self.verified, client_is_src = True, True
        elif syn == SYN | ACK:
            self.verified, client_is_src = True, False
        elif p.dport in server_ports or p.sport in server_ports:
            self.verified, client_is_src = False, p.dport in server_ports
        else:
            self.verified, client_is_src = False, p.sport >= p.dport
        if client_is_src:
            self.client, self.cport, self.server, self.sport = p.src, p.sport, p.dst, p.dport
            self.mac, self.ttl = p.mac, p.ttl
        else:
            self.client, self.cport, self.server, self.sport = p.dst, p.dport, p.src, p.sport
            self.mac, self.ttl = b"", 0
        self.first_ns = self.last_ns = p.ts_ns
        # the sensor in the id: two sites see the same private 5-tuples, and a pcap imported at two sensors has the
        # same first packet at the same time (a document read back keeps the id it was stored with)
        self.id = f"{sensor} {key_text(key)} @{p.ts_ns}" if sensor else f"{key_text(key)} @{p.ts_ns}"
        self.pkts = [0, 0]
        self.bytes = [0, 0]
        self.max_size = 0
        self.last_dir_ns = [None, None]
        self.iat_min = [None, None]
        self.iat_max = [None, None]
        self.flags = dict.fromkeys((n for _, n in FLAG_BITS), 0)
        self.closed = False
        self.skip: frozenset = frozenset()
        self.dirty = True
        self.tcp = NONE
        self.isn = [0, 0]
        self.nxt = [0, 0]
        self.win = [0, 0]
        self.ws = [None, None]
        self.conf = [0, 0]
        self.ends: tuple = ([], [])
        self.settle_ns = 0
        self.verified_by: Optional[str] = None
        self.held: list = []
        self.counted = [0, 0]      # verified packets per direction
        self.status = NO
        self.v6 = p.v6
        self.agg, self.agg_gen = None, -1
        self.queued = False
        self.cov_gen = -1
        self.reset = False

    def add(self, p: Packet) -> int:
        """Count one packet; return its direction (0 client->server, 1 server->client); ``status`` says whether
        it is verified (OK), held until its connection settles (HELD) or unverified (NO)."""
        d = 0 if (p.sport == self.cport and p.src == self.client) else 1
        ts = p.ts_ns
        wl = p.wire_len
        self.pkts[d] += 1
        self.bytes[d] += wl
        if wl > self.max_size:
            self.max_size = wl
        last = self.last_dir_ns[d]
        if last is not None:
            iat = ts - last
            lo = self.iat_min[d]
            if lo is None or iat < lo:
                self.iat_min[d] = iat
            hi = self.iat_max[d]
            if hi is None or iat > hi:
                self.iat_max[d] = iat
        self.last_dir_ns[d] = ts
        if ts > self.last_ns:
            self.last_ns = ts
        elif ts < self.first_ns:
            self.first_ns = ts
        f = p.tcp_flags
        if f:
            fl = self.flags
            for name in FLAG_NAMES[f & 0x3F]:
                fl[name] += 1
        self.dirty = True
        if self.tcp == VERIFIED and not f & 0x06 and (d or p.data.startswith(self.mac, 6)):  # no SYN, no RST
            # the common case, inline: the window test of _fits and the advance of _advance
            nxt, win = self.nxt, self.win
            room = win[1 - d] + SLACK
            ds = (p.seq - nxt[d]) & 0xFFFFFFFF
            if ds > room and ds < MOD - room:
                self.status = NO
                return d
            if f & ACK:
                da = (p.ack - nxt[1 - d]) & 0xFFFFFFFF
                if da > SLACK and da < MOD - win[d] - SLACK:
                    self.status = NO
                    return d
            if ds < HALF:
                end = ds + p.plen + (f & FIN)
                if end:
                    nxt[d] = (nxt[d] + end) & 0xFFFFFFFF
            win[d] = p.win << (self.ws[d] or 0)
            if f & FIN:
                self.closed = True
            self.counted[d] += 1
            self.status = OK
            return d
        if d == 0 and not self.mac:
            self.mac, self.ttl = p.mac, p.ttl
        if self.proto == TCP:
            st = self.status = self._tcp(p, d, f)
        elif self.proto == UDP:
            st = self.status = OK if self.pkts[1 - d] and self.tcp != SPOOFED else NO   # SPOOFED: refused (ICMP)
        else:
            st = self.status = NO
        if st == OK:
            self.counted[d] += 1
        return d

    # --- TCP verification -------------------------------------------------------------------------------------

    def _tcp(self, p: Packet, d: int, f: int) -> int:
        st = self.tcp
        if st == VERIFIED:
            if f & SYN:
                if d == 1 and p.seq != self.isn[1] and self.verified_by == "handshake":
                    return self._contradicted()     # the real server's SYN-ACK, a long round trip late
                return NO
            if not self._fits(p, d) or (d == 0 and p.mac != self.mac):
                return NO
            self._advance(p, d)
            if f & RST:
                self.tcp = RESET                    # nothing after an accepted RST belongs to the connection
            if f & (FIN | RST):
                self.closed = True
            return OK
        if st >= SPOOFED:
            return NO
        if st == SETTLING:
            if f & SYN and p.seq != self.isn[d]:
                return self._contradicted()
            if self.reset or f & SYN or not self._fits(p, d) or len(self.held) >= HELD_MAX or (
                    d == 0 and p.mac != self.mac):
                return NO
            if f & RST:
                if p.seq != self.nxt[d]:
                    return self._contradicted()     # not the end's own RST (RFC 5961: exactly its next sequence)
                self.reset = self.closed = True     # a client closing with unread data: nothing after it counts
                return HELD
            self._advance(p, d)
            if f & FIN:
                self.closed = True
            return HELD
        if f & SYN:
            return self._syn(p, d, f, st)
        if st == SYNACK_SEEN:
            if f & RST:
                return self._contradicted()     # an end refused the SYN-ACK: the SYN was not its own
            if (d == 0 and f & ACK and p.ack == self.nxt[1] and p.seq == self.nxt[0] and p.mac == self.mac):
                self._advance(p, 0)
                return self._settling(p, "handshake")
            return NO
        if st == SYN_SEEN:
            if f & RST and d == 1:
                return self._contradicted()     # the server refused the SYN (a closed port)
            return NO
        return self._pickup(p, d, f)

    def _syn(self, p: Packet, d: int, f: int, st: int) -> int:
        if d == 0 and not f & ACK:
            if st == SYN_SEEN and p.seq != self.isn[0]:
                return self._contradicted()     # two SYNs with different sequence numbers
            if st not in (NONE, SYN_SEEN) or (self.mac and p.mac != self.mac):
                return NO
            self.tcp, self.mac, self.isn[0] = SYN_SEEN, p.mac, p.seq
            self.nxt[0], self.win[0] = (p.seq + 1) % MOD, p.win
            self.ws[0] = tcp_window_scale(p.data, p.l4, p.poff)
            return HELD if len(self.held) < 4 else NO
        if d == 1 and f & ACK:
            if st == SYN_SEEN and p.ack == self.nxt[0]:
                self.tcp, self.isn[1] = SYNACK_SEEN, p.seq
                self.nxt[1], self.win[1] = (p.seq + 1) % MOD, p.win
                ws = tcp_window_scale(p.data, p.l4, p.poff)
                self.ws = [self.ws[0], ws] if ws is not None and self.ws[0] is not None else [0, 0]
                return HELD
            if st == SYNACK_SEEN and p.seq != self.isn[1]:
                return self._contradicted()     # a second SYN-ACK with another sequence number: one is forged
        return NO

    def _settling(self, p: Packet, how: str) -> int:
        self.tcp, self.verified_by, self.settle_ns = SETTLING, how, p.ts_ns + self.settle_after
        return HELD

    def _contradicted(self) -> int:
        self.tcp, self.closed, self.held = SPOOFED, True, []
        return NO

    def _fits(self, p: Packet, d: int) -> bool:
        """RFC 793's acceptance test, as the receiver would run it (with SLACK for frames the mirror lost)."""
        room = self.win[1 - d] + SLACK
        if not -room <= _signed(p.seq - self.nxt[d]) <= room:
            return False
        if p.tcp_flags & ACK:
            return -(self.win[d] + SLACK) <= _signed(p.ack - self.nxt[1 - d]) <= SLACK
        return True

    def _advance(self, p: Packet, d: int) -> None:
        end = p.seq + p.plen + (1 if p.tcp_flags & (SYN | FIN) else 0)
        if _signed(end - self.nxt[d]) > 0:
            self.nxt[d] = end % MOD
        self.win[d] = p.win << (self.ws[d] or 0)

    def _pickup(self, p: Packet, d: int, f: int) -> int:
        """Mid-stream: verified after PICKUP_EXCHANGES exact acknowledgements each way, then settling."""
        if f & (RST | FIN):
            self.conf, self.closed = [0, 0], True
            return NO
        if d == 0 and p.mac != self.mac:
            return NO
        ends = self.ends
        if p.plen:
            mine = ends[d]
            mine.append((p.seq + p.plen) % MOD)
            if len(mine) > 4:
                del mine[0]
        if f & ACK and p.ack in ends[1 - d]:
            self.conf[d] += 1
            if self.conf[0] >= PICKUP_EXCHANGES and self.conf[1] >= PICKUP_EXCHANGES:
                self.ws = [PICKUP_SCALE, PICKUP_SCALE]
                self.nxt = [max(ends[0], key=lambda e: _signed(e - ends[0][-1])),
                            max(ends[1], key=lambda e: _signed(e - ends[1][-1]))]
                self.win[d] = p.win << PICKUP_SCALE
                self.win[1 - d] = max(self.win[1 - d], 0xFFFF << PICKUP_SCALE)
                self.ends = ([], [])
                return self._settling(p, "exchanges")
        return NO

    def settle(self) -> bool:
        """The settling time passed: verified unless contradicted meanwhile; return whether it is verified."""
        if self.tcp != SETTLING:
            return False
        self.tcp = RESET if self.reset else VERIFIED
        return True

    @property
    def new_connection(self) -> bool:
        """Verified from its handshake: a connection the server had to set up (its cost counts, see xmpp)."""
        return self.verified_by == "handshake"

    def document(self, sensor: str, step: int) -> dict:
        pk, by, n = self.pkts, self.bytes, self.counted
        doc = {
            "_id": self.id, "key": key_text(self.key), "sensor": sensor, "proto": self.proto,
            "family": 6 if self.v6 else 4,
            "client_ip": self.client, "client_port": self.cport, "server_ip": self.server, "server_port": self.sport,
            "client_mac": self.mac.hex(":") if self.mac else None, "client_ttl": self.ttl,
            "direction": "verified" if self.verified else "unverified",
            "first_ns": self.first_ns, "last_ns": self.last_ns,
            "first_seen": timespec.utc(self.first_ns), "last_seen": timespec.utc(self.last_ns),
            "packets": {"c2s": pk[0], "s2c": pk[1]}, "bytes": {"c2s": by[0], "s2c": by[1]}, "max_size": self.max_size,
            "verified_packets": {"c2s": n[0], "s2c": n[1]}, "verified_by": self.verified_by,
            "iat_min_ns": {"c2s": self.iat_min[0], "s2c": self.iat_min[1]},
            "iat_max_ns": {"c2s": self.iat_max[0], "s2c": self.iat_max[1]},
            "last_packet_ns": {"c2s": self.last_dir_ns[0], "s2c": self.last_dir_ns[1]},
            "tcp_flags": dict(self.flags), "closed": self.closed,
            "step": step,
        }
        if self.proto == TCP:       # state (STATE_NAMES), verified_by, isn, nxt, win, ws: to go on after a restart
            doc["tcp"] = [self.tcp, self.verified_by, *self.isn, *self.nxt, *self.win, *self.ws]
        return doc

    @classmethod
    def from_document(cls, doc: dict, committed_step: int, pending: Optional[dict] = None) -> "Flow":
        """The flow of a stored document; ``pending``: step -> batch ids of the writes whose resume point was not
        written (analyser/reader.py): a document of such a step holds those batches already."""
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
        f.counted = pair(doc.get("verified_packets") or {"c2s": 0, "s2c": 0})
        f.iat_min, f.iat_max, f.last_dir_ns = (pair(doc["iat_min_ns"]), pair(doc["iat_max_ns"]),
                                               pair(doc["last_packet_ns"]))
        f.flags, f.closed = dict(doc["tcp_flags"]), doc["closed"]
        f.mac = bytes.fromhex(doc["client_mac"].replace(":", "")) if doc.get("client_mac") else b""
        f.v6, f.ttl = ":" in f.client, doc.get("client_ttl", 0)
        t = doc.get("tcp")
        if not (isinstance(t, list) and len(t) == 10 and t[0] in range(len(STATE_NAMES))):
            t = [NONE, None, 0, 0, 0, 0, 0, 0, None, None]       # written before verification: picked up anew
        f.tcp = VERIFIED if t[0] == SETTLING else t[0]          # its held packets were not stored
        f.verified_by = t[1]
        f.isn, f.nxt, f.win, f.ws = list(t[2:4]), list(t[4:6]), list(t[6:8]), list(t[8:10])
        f.conf, f.ends, f.settle_ns, f.held, f.status = [0, 0], ([], []), 0, [], NO
        f.agg, f.agg_gen, f.queued, f.cov_gen, f.settle_after, f.reset = None, -1, False, -1, SETTLE_NS, False
        # Written by a step that never committed its resume point: those batches are in already.
        step = doc.get("step", 0)
        f.skip, f.dirty = frozenset(), False
        if step > committed_step and pending and step in pending:
            f.skip = pending[step]
            f.dirty = True                      # written again with the next step: it holds them from then on
        elif step > committed_step:
            f.skip = frozenset(doc.get("step_batches", ()))
        return f


class FlowTable:
    """The live flows; ``sink`` stores their documents (MongoDB or memory)."""

    def __init__(self, sink, sensor: str, committed_step: int = 0, server_ports=(), settle_ns: int = SETTLE_NS,
                 pending: Optional[dict] = None):
        self.sink = sink
        self.server_ports = frozenset(server_ports)
        self.settle_ns = settle_ns
        self.sensor = sensor
        self.committed_step = committed_step
        self.pending = pending                # step -> frozenset of batch ids: see Flow.from_document
        self.flows: dict[tuple, Flow] = {}
        self.replaced: list[Flow] = []      # earlier connections of a reused 5-tuple, written at the next flush
        self.newest_ns = 0
        self.max_flows = 1 << 62             # the engine sets analyser.max_flows
        self.entered: Optional[list] = None  # a reader keeping its own index of the keys sets a list: each key that
        #                                      enters the table is appended, and the reader empties it

    def full(self) -> bool:
        return len(self.flows) >= self.max_flows

    def vital(self, key: tuple) -> bool:
        """A flow toward or from a server port is tracked past ``max_flows`` (up to twice that): the classifiers
        need it, and the switch's XMPP meter bounds how fast new ones come; any other new flow waits for room."""
        ports = self.vital_ports()
        return key[1][1] in ports or key[2][1] in ports

    def vital_ports(self) -> frozenset:
        """The ports that keep a new flow tracked now (``vital``): the server ports, until twice ``max_flows``."""
        return self.server_ports if len(self.flows) < 2 * self.max_flows else frozenset()

    def prefetch(self, keys: Iterable[tuple]) -> list[Flow]:
        """Load, in one query, the stored flows of keys (``flow_key``) not in memory (after a restart or an
        eviction)."""
        flows = self.flows
        missing = {k for k in keys if k not in flows}
        room = self.max_flows - len(flows)
        if len(missing) > room:                   # no more than the table takes, besides the vital ones
            vital = {k for k in missing if self.vital(k)}
            missing = vital | set(heapq.nsmallest(max(room, 0), missing - vital))   # the same after a restart
        loaded = []
        if missing:
            for doc in self.sink.latest(key_text(k) for k in missing):
                f = Flow.from_document(doc, self.committed_step, self.pending)
                flows[f.key] = f
                loaded.append(f)
            if self.entered is not None:
                self.entered += [f.key for f in loaded]
        return loaded

    def update(self, p: Packet, batch_id: str) -> tuple[Optional[Flow], int]:
        """Count ``p`` in its flow; (None, 0) when the flow already holds this batch, (None, UNTRACKED) when it is
        a new flow and the table is full (``vital``)."""
        key = flow_key(p)
        f = self.flows.get(key)
        if f is None and len(self.flows) >= self.max_flows and not self.vital(key):
            if p.ts_ns > self.newest_ns:        # its time still ages the flows out (the table makes room)
                self.newest_ns = p.ts_ns
            return None, UNTRACKED
        if f is None or self._new_connection(f, p):
            if f is not None and f.dirty:
                self.replaced.append(f)
            elif f is None and self.entered is not None:
                self.entered.append(key)
            f = self.flows[key] = Flow(key, p, self.server_ports, self.settle_ns, self.sensor)
        elif f.skip and batch_id in f.skip:
            return None, 0
        if p.ts_ns > self.newest_ns:
            self.newest_ns = p.ts_ns
        return f, f.add(p)

    @staticmethod
    def _new_connection(f: Flow, p: Packet) -> bool:
        """A bare SYN on a closed, idle or mid-stream flow starts a new connection on the same 5-tuple."""
        if p.proto != TCP or p.tcp_flags & (SYN | ACK) != SYN:
            return False
        if f.skip and p.ts_ns <= f.last_ns:
            return False  # a replayed packet of a flow that already holds it
        return f.closed or (not f.verified and f.tcp < SETTLING) or p.ts_ns - f.last_ns > IDLE_NS

    def flush(self, step: int) -> int:
        """Write every changed flow, then forget the idle ones; return how many were written."""
        dirty = self.replaced + [f for f in self.flows.values() if f.dirty]
        self.replaced = []
        if dirty:
            self.sink.write([f.document(self.sensor, step) for f in dirty])
        for f in dirty:
            f.dirty = False
            f.skip = frozenset()
        now = self.newest_ns
        idle = [k for k, f in self.flows.items()
                if now - f.last_ns > (CLOSED_IDLE_NS if f.closed or (f.tcp < SETTLING if f.proto == TCP else
                                                                     not f.pkts[1]) else IDLE_NS)]
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
        self.by_key: dict[str, dict[str, dict]] = {}     # key -> its documents by _id (latest: not a scan of all)

    def latest(self, keys) -> list[dict]:
        by_key = self.by_key
        return latest_per_key(d for k in set(keys) for d in by_key.get(k, {}).values())

    def write(self, docs: list[dict]) -> None:
        for d in docs:
            self.docs[d["_id"]] = d
            self.by_key.setdefault(d["key"], {})[d["_id"]] = d

    def all(self) -> list[dict]:
        return list(self.docs.values())
