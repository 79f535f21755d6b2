"""The fast engine: the same analysis as ``engine.Engine``, with the steady state counted in bulk (numpy).

Most frames are segments of connections already verified: nothing about
them changes the state machine of ``analyser/flows.py`` but their flow's
counters, windows and sequence numbers. A step is read as one array: the
record offsets of its packed batches (``<qII`` headers, appliance/framebatch.py),
then the header fields of every frame at fixed offsets (Ethernet + IPv4
without options, or Ethernet + IPv6, + TCP). A flow is counted in bulk (a
*bulk flow*) when it was verified before the step, every one of its packets
in the step was read that way without SYN or RST and from the client's MAC,
each fits the windows the packet before it left (the speculation "every
segment is accepted and advances its side's sequence" is checked for each
packet against the state it implies) and no classifier window it feeds
crosses its threshold in the step.

A *quiet* flow is counted in bulk too: one whose packets in the step change nothing but its counters, because
none of them is verified (a connection contradicted or reset, one picked up mid-stream that no packet of the step
confirms, seen one way) or it is UDP (verified once answered). Such packets reach no classifier window, neighbour or
flag; what they do change (the unverified sources' counts, a mid-stream connection's last segment ends) is counted
as ``Flow.add`` does, and a quiet flow goes the reference way whenever a packet of the step could change that (its
own slow packets, an ICMP refusal of it, the settling of a connection of its client, a source not yet named).
Without it, one-way, spoofed and UDP traffic of flows already seen would take the slow path at every step (a new
flow's first step still does).

Every other packet (a handshake, an RST, an out-of-window or spoofed
segment, ICMP, VLAN tags, a short or odd frame) goes through the
reference engine's own code, in frame order, with the settling of held
connections at the times of the bulk packets between them. The two never
share state: a flow with one packet of the second kind is wholly in the
second, and so is every flow sharing a subject with it (its client address,
its MAC, its unshared prefix, the addresses its MAC carries, the MACs of its
unshared prefix), since classifier windows, neighbours and flags are kept
per subject. So flow records, flags and counters are the reference
engine's (``tests/test_analyser_fast.py`` compares both on random captures).

Policies with classifiers other than ``xmpp_abuse``, and observers other
than the report's series, are analysed by the reference engine whole.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections import Counter, defaultdict, deque

import numpy as np

from appliance import framebatch
from appliance.framebatch import CorruptBatch

from .classifiers import SAMPLES
from .classifiers.builtin import XmppAbuse
from .engine import Engine
from .flows import OK, RESET, SLACK, SPOOFED, VERIFIED, canonical_key, flow_key
from .gather import Records, gather, group
from .parse import ACK, FIN, PSH, TCP, UDP, URG, Packet, address_raw, address_text, parse

log = logging.getLogger("pisnoop.analyser")
M32 = 0xFFFFFFFF
HALF = 1 << 31
MAX_CUTS = 16                 # cuts of a step at crossings (each costs an analysis of the rest of its part)
PART = 8192                   # frames analysed together when handshakes are spread over a step
REL_BITS = 43                 # frame-time span (ns, ~2.4 h) of one step's window entries, beside a key number
U = np.uint64
_SEG = {"seq": (4, 4), "ack": (8, 4), "win": (14, 2)}     # _Frames.seg: TCP header offset and size


def _stable_order(keys):
    """``argsort(keys, kind="stable")``, as a radix sort when the keys fit in 16 bits (numpy's stable sort of
    small integers)."""
    if len(keys) and 0 <= keys.min() and keys.max() < (1 << 15):
        keys = keys.astype(np.int16)
    return np.argsort(keys, kind="stable")


def _mix(x):
    """splitmix64's finaliser: a hash to group endpoints (groups are then compared byte for byte)."""
    x = (x ^ (x >> U(30))) * U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> U(27))) * U(0x94D049BB133111EB)
    return x ^ (x >> U(31))


class _Frames:
    """The step's frames as arrays: record headers, and the first bytes of every frame as a matrix (gather.HEAD)."""

    shape = groups = ends = more = None  # what _bulk_shape, _groups, _endpoints, seg read, kept (cut with the parts)

    def __init__(self, rec: Records):
        """``rec``: the step's records (analyser/gather.py)."""
        self.buf, self.offs, self.ts, self.wl = rec.buf, rec.offs, rec.ts, rec.wl
        self.cap, self.head = rec.cap, rec.head
        self.shape, self.ends, self.more = rec.shape, rec.ends, rec.more   # from the gather when it made them
        self.parsed: dict = {}      # frame offset -> its parse (Packet is immutable): the step's parts share it

    def col(self, at: int, size: int = 1, rows=None):
        """The big-endian ``size``-byte field (1, 2, 4, 6 or 8) at byte ``at`` of each frame (or of ``rows``)."""
        h = self.head if rows is None else self.head[rows]
        if size == 1:
            return h[:, at].astype(np.uint64)
        if size == 6:
            return np.ascontiguousarray(h[:, at - 2:at + 6]).view(">u8")[:, 0] & U(0xFFFFFFFFFFFF)
        return np.ascontiguousarray(h[:, at:at + size]).view(f">u{size}")[:, 0].astype(np.uint64)

    def seg(self, name: str, v6, rows):
        """The TCP ``seq``, ``ack`` or ``win`` (int64) or the source ``mac`` (uint64) of frames ``rows`` (``v6``:
        of those rows), as the C gather made them, else read from the heads."""
        if self.more is not None:
            return self.more[name][rows]
        if name == "mac":
            return self.col(6, 6, rows)
        at, size = _SEG[name]
        return self.tcp(v6, at, size, rows).astype(np.int64)

    def tcp(self, v6, at: int, size: int = 1, rows=None):
        """A TCP header field (``at`` from the TCP header's start) of frames whose IP header is IPv4 without
        options (the TCP header at 34) or IPv6 (at 54)."""
        return np.where(v6, self.col(54 + at, size, rows), self.col(34 + at, size, rows))

    def part(self, lo: int, hi: int) -> "_Frames":
        """Frames lo..hi-1 (views of these arrays)."""
        if lo == 0 and hi == len(self.ts):
            return self
        p = _Frames.__new__(_Frames)
        p.buf, p.parsed = self.buf, self.parsed
        p.offs, p.ts, p.wl, p.cap, p.head = (a[lo:hi] for a in (self.offs, self.ts, self.wl, self.cap, self.head))
        if self.shape is not None:
            p.shape = tuple(a[lo:hi] for a in self.shape)
        if self.ends is not None:
            p.ends = {k: v[lo:hi] for k, v in self.ends.items()}
        if self.more is not None:
            p.more = {k: v[lo:hi] for k, v in self.more.items()}
        return p

    def packet(self, j: int):
        """Frame ``j`` parsed (once a step: a frame of a new flow is looked at up to four times)."""
        o = int(self.offs[j])
        p = self.parsed.get(o)
        if p is None:
            p = self.parsed[o] = parse(int(self.ts[j]), int(self.wl[j]), self.buf[o + 16:o + 16 + int(self.cap[j])])
        return p


def _bulk_shape(fr: _Frames):
    """Frames of the shape read in bulk (Ethernet + IPv4 without options or IPv6 without extension headers,
    then TCP without SYN or RST, or UDP, as appliance/l3l4.py reads them) and their offsets; ``udp`` marks the
    UDP ones (their ``tflags`` are 0 and ``doff`` 8, the UDP header); ``synrst`` the TCP frames of that shape
    but for their SYN or RST bit (``_untracked_shape``)."""
    got = getattr(fr, "shape", None)
    if got is None:
        got = fr.shape = _read_shape(fr)
    return got


def _read_shape(fr: _Frames):
    v6, l4, end, doff, tflags, udp, whole = _read_headers(fr)
    odd = (tflags & 0x06) != 0
    return whole & ~odd, v6, l4, end, doff, tflags, udp, whole & odd


def _untracked_shape(fr: _Frames):
    """TCP frames of the bulk shape but for their SYN or RST bit: the table full, a new flow's are untracked
    whatever their flags (``FastEngine._untracked_odd``), as a rotating flood's bare SYNs are."""
    return _bulk_shape(fr)[7]


def _read_headers(fr: _Frames):
    """The headers as appliance/l3l4.py reads them, for the frames of one IP header without options or
    extensions and a whole TCP or UDP header (``whole``)."""
    cap = fr.cap
    etype = fr.col(12, 2)
    b14 = fr.col(14)
    p4, p6 = fr.col(23), fr.col(20)
    ip4 = (etype == 0x0800) & (b14 == 0x45) & ((fr.col(20, 2) & U(0x1FFF)) == 0)
    ip6 = (etype == 0x86DD) & ((b14 >> U(4)) == 6)
    tot4 = fr.col(16, 2).astype(np.int64)
    ip4 &= tot4 >= 20
    v6 = ip6 & ((p6 == TCP) | (p6 == UDP))
    v4 = ip4 & ((p4 == TCP) | (p4 == UDP))
    udp = (v4 & (p4 == UDP)) | (v6 & (p6 == UDP))
    l4 = np.where(v6, 54, 34)
    end = np.minimum(np.where(v6, 54 + fr.col(18, 2).astype(np.int64), 14 + tot4), cap)
    doff = np.where(udp, 8, (fr.tcp(v6, 12) >> U(4)).astype(np.int64) * 4)
    tflags = np.where(udp, 0, fr.tcp(v6, 13).astype(np.int64))
    tcp_ok = (end - l4 >= 20) & (doff >= 20) & (l4 + doff <= end)
    whole = (cap > 0) & (v4 | v6) & np.where(udp, end - l4 >= 8, tcp_ok)
    return v6, l4, end, doff, tflags, udp, whole


class _Family:
    """One family of sliding windows of a classifier (``classifiers.Windows``) fed by the bulk packets: the
    total after each new entry, the flows (groups) whose entry crosses ``limit``, and the final deques."""

    def __init__(self, windows, limit, klist: list, kid, t, w, j, gi):
        self.windows, self.klist, self.ok, self.crossing, self.first = windows, klist, True, set(), {}
        use = np.flatnonzero(kid >= 0)
        self.n = len(use)
        if not self.n:
            return
        order = use[_stable_order(kid[use])]
        self.k, self.t, self.w, self.j, self.gi = kid[order], t[order], w[order], j[order], gi[order]
        k, t = self.k, self.t
        cut = np.flatnonzero(k[1:] != k[:-1]) + 1
        self.starts = np.concatenate(([0], cut))
        self.stops = np.append(cut, self.n)
        span = windows.span_ns
        ex, exw = [], []
        for key in klist:
            win = windows.get(key)
            if win is not None and win.times:
                ex.append(np.fromiter(win.times, dtype=np.int64, count=len(win.times)))
                exw.append(np.fromiter(win.weights, dtype=np.int64, count=len(win.weights)))
            else:
                ex.append(None)
                exw.append(None)
        self.ex, self.exw = ex, exw
        sizes = np.array([0 if e is None else len(e) for e in ex], dtype=np.int64)
        some = [e for e in ex if e is not None]
        et = np.concatenate(some) if some else np.zeros(0, dtype=np.int64)
        ewt = np.concatenate([e for e in exw if e is not None]) if some else np.zeros(0, dtype=np.int64)
        ek = np.repeat(np.arange(len(klist)), sizes)
        base = min(int(t.min()), int(et.min()) if len(et) else int(t.min()))
        top = max(int(t.max()), int(et.max()) if len(et) else 0) - base
        if top + span >= (1 << REL_BITS) or len(klist) >= (1 << (62 - REL_BITS)):
            self.ok = False
            return
        same = k[1:] == k[:-1]
        if (same & (np.diff(t) < 0)).any() or (len(et) > 1 and ((ek[1:] == ek[:-1]) & (np.diff(et) < 0)).any()):
            self.ok = False                           # not in time order: the deque's popping is not a search
            return
        last_ex = np.full(len(klist), np.iinfo(np.int64).min)
        if len(et):
            ends = np.cumsum(sizes) - 1
            has = sizes > 0
            last_ex[has] = et[ends[has]]
        if (last_ex[k[self.starts]] > t[self.starts]).any():
            self.ok = False
            return
        nv = (k << REL_BITS) + (t - base) + span      # shifted by span so that nv - span >= the key's own start
        kstart = np.repeat(self.starts, self.stops - self.starts)
        lo = np.maximum(np.searchsorted(nv, nv - span, side="right"), kstart)
        ncs = np.concatenate(([0], np.cumsum(self.w)))
        total = ncs[np.arange(self.n) + 1] - ncs[lo]
        if len(et):
            ev = (ek << REL_BITS) + (et - base) + span
            ecs = np.concatenate(([0], np.cumsum(ewt)))
            kend = np.cumsum(sizes)
            e_lo = np.searchsorted(ev, nv - span, side="right")
            total += ecs[kend[k]] - ecs[np.minimum(e_lo, kend[k])]
        over = total > limit
        if over.any():
            self.crossing = set(self.gi[over].tolist())
            for x, j in zip(self.gi[over].tolist(), self.j[over].tolist()):
                if j < self.first.get(x, j + 1):
                    self.first[x] = j                     # group -> the frame (of the part) of its first crossing

    def apply(self, gflow, cand, owner, index, bids) -> None:
        """The windows as the reference leaves them: the entries of the last ``span`` (times in order), their
        total, the last samples."""
        if not self.n:
            return
        windows = self.windows
        span = windows.span_ns
        for s, e in zip(self.starts.tolist(), self.stops.tolist()):
            if id(gflow[int(self.gi[s])]) not in cand:
                continue
            kk = int(self.k[s])
            key = self.klist[kk]
            win = windows.get(key)
            if win is None:
                win = windows.get_window(key)
            t, w = self.t[s:e], self.w[s:e]
            edge = int(t[-1]) - span
            ex = self.ex[kk]
            if ex is not None:
                keep = np.searchsorted(ex, edge, side="right")
                t = np.concatenate((ex[keep:], t))
                w = np.concatenate((self.exw[kk][keep:], w))
            keep = np.searchsorted(t, edge, side="right")
            t, w = t[keep:], w[keep:]
            win.times = deque(t.tolist())
            win.weights = deque(w.tolist())
            win.total = int(w.sum())
            win.refs.extend((bids[owner[x]], int(index[x])) for x in self.j[max(s, e - SAMPLES):e].tolist())


def _groups(fr: _Frames):
    """The bulk-shaped frames (``_bulk_shape``) grouped by connection: a 64-bit hash of each side (address,
    port, family), both sides in one order; ``same``: the frame has its group's first frame's endpoints, byte
    for byte (a frame of a colliding hash is not in bulk)."""
    got = getattr(fr, "groups", None)
    if got is None:
        got = fr.groups = _read_groups(fr)
    return got


# An end of a connection as three 64-bit lanes: the address (IPv4 in the first lane's top 32 bits, the second 0;
# IPv6 across both), then ``_end_tag``. Frames get them in bulk (``_endpoints``, and the C gather, which
# test_gather holds to it), flow keys one by one (``_key_lanes``), and ``_lanes_key`` reads a key back from them.
def _end_tag(port, family, proto):
    """An end's third lane: its port, its family (4 or 6) and the protocol; ints or uint64 arrays."""
    return port | family << 16 | proto << 24


def _endpoints(fr: _Frames) -> dict:
    """Per frame: both ends as lanes (the address, then ``_end_tag``) and their hashes (kept per step, cut with
    its parts)."""
    got = getattr(fr, "ends", None)
    if got is not None:
        return got
    _, v6, *_ = _bulk_shape(fr)
    four = ~v6

    def lanes(a4: int, a6: int):
        return (np.where(four, fr.col(a4, 4) << U(32), fr.col(a6, 8)), np.where(four, U(0), fr.col(a6 + 8, 8)))
    sh, sl = lanes(26, 22)
    dh, dl = lanes(30, 38)
    sport, dport = fr.tcp(v6, 0, 2), fr.tcp(v6, 2, 2)
    fam, proto = np.where(v6, U(6), U(4)), np.where(_bulk_shape(fr)[6], U(UDP), U(TCP))
    sx, dx = _end_tag(sport, fam, proto), _end_tag(dport, fam, proto)
    fr.ends = {"sh": sh, "sl": sl, "dh": dh, "dl": dl, "sx": sx, "dx": dx, "sport": sport, "dport": dport,
               "hs": _end_hash(sh, sl, sx), "hd": _end_hash(dh, dl, dx)}
    return fr.ends


def _key_lanes(proto: int, end: tuple) -> tuple[int, int, int]:
    """The lanes of one end of a flow key (``flow_key``: address text, port), as its frames have them."""
    addr, port = end
    raw = address_raw(addr)
    if len(raw) == 4:
        return int.from_bytes(raw, "big") << 32, 0, _end_tag(port, 4, proto)
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big"), _end_tag(port, 6, proto)


def _lanes_address(hi: int, lo: int, x: int) -> str:
    """An end's address text from its lanes (the inverse of ``_key_lanes``'s first two)."""
    if (x >> 16) & 0xFF == 4:
        return address_text(False, (hi >> 32).to_bytes(4, "big"))
    return address_text(True, hi.to_bytes(8, "big") + lo.to_bytes(8, "big"))


def _end_hash(hi, lo, x):
    """One end's hash from its lanes (``_endpoints``)."""
    return _mix(_mix(_mix(hi) ^ lo) ^ x)


def _pair_hash(hs, hd):
    """A connection's hash from its ends' (``_end_hash``), whichever sent the frame."""
    swap = hs > hd
    return _mix(np.where(swap, hd, hs) ^ _mix(np.where(swap, hs, hd)))


def _read_groups(fr: _Frames):
    bulk, v6, l4, end, doff, tflags, udp, _ = _bulk_shape(fr)
    bi = np.flatnonzero(bulk)
    e = {k: v[bi] for k, v in _endpoints(fr).items()}
    sh, sl, dh, dl, sx, dx, hs, hd = (e[k] for k in ("sh", "sl", "dh", "dl", "sx", "dx", "hs", "hd"))
    swap = hs > hd
    rep, inv = group(_pair_hash(hs, hd))
    lo = np.stack([np.where(swap, dh, sh), np.where(swap, dl, sl), np.where(swap, dx, sx)])
    hi = np.stack([np.where(swap, sh, dh), np.where(swap, sl, dl), np.where(swap, sx, dx)])
    r = rep[inv]
    same = (lo == lo[:, r]).all(0) & (hi == hi[:, r]).all(0) & (hs != hd)
    return bulk, v6, l4, end, doff, tflags, bi, inv, rep, same, hs, hd, e["sport"], e["dport"], udp


_LANES = ("sh", "sl", "sx", "dh", "dl", "dx")     # a frame's two ends (_endpoints): source, then destination


def _lanes_key(lanes: tuple) -> tuple:
    """``flow_key`` of a frame from its ends' lanes (``_endpoints``), without a parse; and its source end."""
    sh, sl, sx, dh, dl, dx = lanes
    src = (_lanes_address(sh, sl, sx), sx & 0xFFFF)       # the port and protocol where _end_tag puts them
    return canonical_key((sx >> 24) & 0xFF, src, (_lanes_address(dh, dl, dx), dx & 0xFFFF)), src


_NO_ROWS = np.zeros(0, dtype=np.int64)


def _no_flow(gany: list):
    """Per group: it has no flow in memory (``_group_flows``)."""
    return np.fromiter((f is None for f in gany), dtype=bool, count=len(gany))


def _key_hashes(keys: list):
    """``_pair_hash`` of flow keys, as their frames' lanes give it (``_endpoints``)."""
    if not keys:
        return np.zeros(0, dtype=np.uint64)
    a = np.array([_key_lanes(proto, end) for proto, *ends in keys for end in ends], dtype=np.uint64)
    s, d = a[0::2], a[1::2]            # each key's first end, then its second
    return _pair_hash(_end_hash(s[:, 0], s[:, 1], s[:, 2]), _end_hash(d[:, 0], d[:, 1], d[:, 2]))


def _holds(sorted_a, h):
    """Per value of ``h``: it is in the sorted array."""
    if not len(sorted_a):
        return np.zeros(len(h), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_a, h), len(sorted_a) - 1)
    return sorted_a[i] == h


class _KeyIndex:
    """The connection hashes (``_pair_hash``) of the flow table's keys while it is full, so that a group or frame
    whose hash is not among them is known to have no flow without its key being made (``_lanes_key``: two address
    texts, what a rotating flood's frames cost most). Built when the table fills; keys that entered since
    (``FlowTable.entered``) are added as they come. A flow that left leaves its hash behind, which only sends its
    frames the usual way: built again at a step's start once a fifth of the hashes are such (a build of 100,000
    keys took 86 ms here, too much for every step). Dropped at a step that starts with room."""

    def __init__(self, table):
        self.table = table
        table.entered = []
        self.built = False
        self.of: dict = {}                          # key -> hash, of the keys in the table when last built
        self.hashes = self.recent = np.zeros(0, dtype=np.uint64)   # sorted: at the build, entered since

    def step(self) -> None:
        """At a bulk step's start: kept while the table is full (built again when stale), else dropped."""
        t = self.table
        if not t.full():
            self.drop()
        elif self.built and len(self.hashes) + len(self.recent) + len(t.entered) > 1.25 * len(t.flows) + 1024:
            self._build()

    def drop(self) -> None:
        """Not built (``entered`` emptied: it must not grow while nothing reads it, as in a reference step)."""
        self.table.entered.clear()
        self.built = False

    def _build(self) -> None:
        t = self.table
        t.entered.clear()
        of = self.of
        of = self.of = {k: of[k] for k in t.flows if k in of}
        new = [k for k in t.flows if k not in of]
        if new:
            of.update(zip(new, _key_hashes(new).tolist()))
        self.hashes = np.sort(np.fromiter(of.values(), dtype=np.uint64, count=len(of)))
        self.recent = np.zeros(0, dtype=np.uint64)
        self.built = True

    def absent(self, hs, hd):
        """Per connection (its ends' ``_end_hash``): no flow of the table has its hash."""
        if not self.built:
            self._build()
        t = self.table
        if t.entered:
            new, t.entered = t.entered, []
            got = _key_hashes(new)
            self.of.update(zip(new, got.tolist()))
            self.recent = np.sort(np.concatenate((self.recent, got)))
            if len(self.recent) > 4096 and 8 * len(self.recent) > len(self.hashes):
                self.hashes, self.recent = np.sort(np.concatenate((self.hashes, self.recent))), self.recent[:0]
        h = _pair_hash(hs, hd)
        return ~(_holds(self.hashes, h) | _holds(self.recent, h))


class FastEngine(Engine):
    """``Engine`` counting verified steady-state TCP segments in bulk (see the module's docstring)."""

    bulk_packets = 0              # packets counted in bulk (not a counter of the reference: the tests' proof)
    quiet_packets = 0             # besides them, unverified or UDP packets counted in bulk (``_quiet_candidates``)
    TALLIES = ("bulk_packets", "quiet_packets")
    _quiet_jts = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._subject_cache: dict = {}
        self._flow_cache: dict = {}     # both ends' lanes (_endpoints, one order) -> (flow, sent by its client)
        self._misses: set = set()       # this step's ends no flow holds, the table full (_group_flows)
        self._keys: dict = {}           # this step's ends -> (flow_key, source end) (_lanes_key, once each)
        self._index = _KeyIndex(self.flows)

    def bulk_possible(self) -> bool:
        from .report import XmppSeries
        return (all(type(cl) is XmppAbuse for cl in self.classifiers)
                and all(type(o) is XmppSeries for o in self.observers))

    def run_step(self, batches, step: int, persistent: bool = True, flush: bool = True) -> int:
        if not self.bulk_possible():
            try:
                return super().run_step(batches, step, persistent, flush)
            finally:
                self._index.drop()
        from .flags import now_utc
        self._now = now_utc()
        self.forgive()
        try:
            return self._bulk_step(batches, step, persistent, flush)
        finally:
            self._misses, self._keys = set(), {}    # for this step only: its flush may make room

    def _bulk_step(self, batches, step: int, persistent: bool, flush: bool) -> int:
        c = self.counters
        self._index.step()
        blobs, bids, starts, damage = [], [], [], []
        for bid, start, frames in batches:
            blob = getattr(frames, "blob", None)
            damaged = None
            if blob is None:                        # frames as tuples: packed here (an empty one stays empty)
                kept = []
                try:
                    for fr in frames:
                        kept.append(fr)
                except CorruptBatch as exc:
                    damaged = exc
                blob = framebatch.pack(kept)
            blobs.append(blob)
            bids.append(bid)
            starts.append(start)
            damage.append(damaged)
            c["batches"] += 1
        rec = gather(blobs)
        for bid, damaged, err in zip(bids, damage, rec.errors):
            for why in (damaged, err):
                if why is not None:
                    c["corrupt_batches"] += 1
                    log.warning("batch %s: %s; its remaining frames are skipped", bid, why)
        n = len(rec.offs)
        c["frames"] += n
        if n:
            owner_a = rec.owner
            rank = np.arange(n) - np.searchsorted(owner_a, owner_a)
            index = np.asarray(starts, dtype=np.int64)[owner_a] + rank
            whole = _Frames(rec)
            if persistent:
                self._prefetch_step(whole)
            parts = deque(self._parts(whole))
            cuts = 0
            while parts:
                lo, hi = parts.popleft()
                if self.settling:             # connections settling: a part of their own until they have settled
                    hit = np.flatnonzero(whole.ts[lo:hi] >= max(e[0] for e in self.settling))
                    if len(hit) and lo + int(hit[0]) + 1 < hi:
                        parts.appendleft((lo + int(hit[0]) + 1, hi))
                        hi = lo + int(hit[0]) + 1
                self._frames = whole.part(lo, hi)
                at = self._step(self._frames, owner_a[lo:hi], index[lo:hi], bids, cuts < MAX_CUTS)
                if isinstance(at, int):       # the table fills at lo + at: from there on its new flows are untracked
                    parts.extendleft([(lo + at, hi), (lo, lo + at)])
                elif at is not None:          # bulk flows cross a threshold at lo + at[k]: their flags, then bulk
                    cuts += 1
                    pieces, a = [], lo
                    for k in at:
                        pieces += [(a, lo + k), (lo + k, lo + k + 1)]
                        a = lo + k + 1
                    pieces.append((a, hi))
                    parts.extendleft(reversed([(x, y) for x, y in pieces if y > x]))
            self._frames = None
        self._end_step(step, flush)
        if len(self._subject_cache) > 2 * len(self.flows.flows) + 1024:
            self._subject_cache.clear()         # it holds flows: no more than about the live ones
        if len(self._flow_cache) > 4 * len(self.flows.flows) + 1024:
            self._flow_cache.clear()
        return n

    def _prefetch_step(self, fr: _Frames) -> None:
        """Load the stored flows of the step's keys not in memory, all at once before any is counted, as the
        reference engine does (a flow verified before a restart teaches the neighbours at the step's start)."""
        bulk, _, _, _, _, _, bi, inv, rep, same, _, _, sport, dport, _ = _groups(fr)
        odd = (fr.cap > 0) & ~bulk
        odd[bi[~same]] = True
        odd[self._untracked_odd(fr, odd)] = False     # not loaded: the table full (FlowTable.prefetch)
        gany, _ = self._group_flows(fr, bi, rep)
        e = _endpoints(fr)
        rj = bi[rep]
        none = _no_flow(gany)
        want = none & ~self._untracked_groups(none, rep, sport, dport)  # those FlowTable.prefetch would not load
        known = self._keys                            # (_group_flows made them just now)
        keys = [(known.get(lanes) or _lanes_key(lanes))[0] for lanes in zip(*(e[k][rj[want]].tolist() for k in _LANES))]
        keys += [flow_key(p) for p in map(fr.packet, np.flatnonzero(odd).tolist()) if p.__class__ is Packet]
        if keys:
            self._prefetch(keys)

    def _group_flows(self, fr: _Frames, bi, rep) -> tuple:
        """Per group its flow in memory (or None) and whether its first frame came from the flow's client: from
        the cache of the groups' ends when it still names a live flow, else by the key of those ends. While the
        table is full, only the groups whose hash its index holds (``_KeyIndex``) are looked at."""
        table = self.flows.flows
        cache = self._flow_cache
        full = self.flows.full()
        misses = self._misses if full else ()   # ends with no flow while the table is full: none while it stays so
        keys = self._keys
        rj = bi[rep]
        e = _endpoints(fr)
        gany: list = [None] * len(rep)
        gd0 = np.zeros(len(rep), dtype=bool)
        look = np.flatnonzero(~self._index.absent(e["hs"][rj], e["hd"][rj])) if full else np.arange(len(rep))
        for g, lanes in zip(look.tolist(), zip(*(e[k][rj[look]].tolist() for k in _LANES))):
            hit = cache.get(lanes)
            if hit is not None and table.get(hit[0].key) is hit[0]:
                f, d0 = hit
            elif lanes in misses:
                continue
            else:
                got = keys.get(lanes)
                if got is None:
                    got = keys[lanes] = _lanes_key(lanes)
                key, src = got
                f = table.get(key)
                if f is None:
                    if full and not self.flows.vital(key):
                        misses.add(lanes)
                    continue
                d0 = src == (f.client, f.cport)
                cache[lanes] = (f, d0)
                cache[lanes[3:] + lanes[:3]] = (f, not d0)
            gany[g] = f
            gd0[g] = d0
        return gany, gd0

    def _parts(self, fr: _Frames):
        """Where to cut the step: a flow that goes the reference way does so for its whole part, so when the
        packets that must (handshakes...) all come early, they are a part of their own and the rest is counted in
        bulk (run_step also cuts where settling connections have settled, and where a bulk flow crosses a
        threshold). Any cut gives the same results; these are for speed."""
        n = len(fr.ts)
        lo = 0
        odd = np.flatnonzero((fr.cap > 0) & ~_bulk_shape(fr)[0])
        end = int(odd[-1]) + 1 if len(odd) else 0
        if end > n // 2:                  # spread over the step: parts of PART frames, each flow slow in its own only
            lo = (n - 1) // PART * PART
            for k in range(0, lo, PART):
                yield k, k + PART
        elif end:
            yield 0, end
            lo = end
        yield lo, n

    # --- reading the step -------------------------------------------------------------------------------------

    def _step(self, fr: _Frames, owner, index, bids: list, cut: bool):
        """Analyse and count one part; with ``cut``, return instead the frames where bulk flows would cross a
        threshold (nothing counted yet), so that the part is cut there; or the frame where the flow table fills
        (an int: ``_fills_at``)."""
        c = self.counters
        table = self.flows.flows
        self._where = (owner, index, bids)            # the batch id and index of each frame of the part
        bulk, v6, l4, end, doff, tflags, bi, inv, rep, same, hs, hd, sport, dport, udp = _groups(fr)
        nonempty = fr.cap > 0
        G = len(rep)
        gflow: list = [None] * G                      # the groups' flows when verified (counted in bulk)
        good = np.zeros(G, dtype=bool)
        gany, gd0 = self._group_flows(fr, bi, rep)    # the groups' flows, whatever their state; sent by the client
        none = _no_flow(gany)
        fill = self._fills_at(fr, none, bi, rep)
        if fill is not None:
            return fill
        for g, f in enumerate(gany):
            if f is None or f.tcp != VERIFIED or not f.mac or f.skip or f.held:
                continue
            gflow[g], good[g] = f, True
        ok = same & good[inv]
        # every frame's direction in its flow (meaningful where the group's frames are all ``same``)
        d_all = (hs != np.where(gd0[inv], hs[rep[inv]], hd[rep[inv]])).astype(np.int64)
        qk = self._quiet_candidates(fr, gany, good, inv, same, bi, d_all, udp, tflags, v6)
        qok = qk[inv] if G else np.zeros(0, dtype=bool)
        uok = self._untracked_groups(none, rep, sport, dport)[inv] & same
        slow_ids: set = {id(gflow[g]) for g in np.unique(inv[~ok]).tolist() if gflow[g] is not None}
        slow_mask = nonempty.copy()
        slow_mask[bi[ok | qok | uok]] = False
        sj = self._untracked_odd(fr, slow_mask)
        slow_mask[sj] = False
        slow: list = []                               # (frame number, Packet) in frame order
        odd: Counter = Counter()                      # malformed, not_ip: counted once the part is counted
        for j in np.flatnonzero(slow_mask).tolist():
            p = fr.packet(j)
            if p.__class__ is Packet:
                slow.append((j, p))
            else:
                odd[p] += 1
        qok = self._quiet_guard(fr, gany, qk, inv, bi, d_all, slow)
        for _, p in slow:
            f = table.get(flow_key(p))
            if f is not None:
                slow_ids.add(id(f))
        qi = np.flatnonzero(qok)
        ui = np.sort(np.concatenate((bi[uok], sj))) if len(sj) else bi[uok]
        qj = np.sort(np.concatenate((bi[qi], ui))) if len(ui) else bi[qi]
        self._quiet_jts = (qj, fr.ts[qj])             # their times settle held connections as any packet's do
        # the bulk candidates: per packet its group, direction and fields, in frame order
        bk = np.flatnonzero(ok)
        j = bi[bk]
        g = inv[bk]
        pk = {
            "j": j, "g": g, "d": d_all[bk], "ts": fr.ts[j], "wl": fr.wl[j],
            "flags": tflags[j], "seq": fr.seg("seq", v6[j], j), "ack": fr.seg("ack", v6[j], j),
            "win": fr.seg("win", v6[j], j), "plen": end[j] - l4[j] - doff[j], "mac": fr.seg("mac", v6[j], j),
            "v6": v6[j],
            "sport": sport[bk], "dport": dport[bk],
        }
        at = self._bulk(pk, gflow, slow, slow_ids, cut)
        if at is None:
            c.update(odd)
            self._count_quiet(fr, gany, qi, bi, inv, d_all, udp, tflags, l4, end, doff, v6)
            if len(ui):
                self._tally(fr.ts[ui], v6[ui], 0)
                c["untracked"] += len(ui)
                self._table_full(len(ui))
        return at

    def _fills_at(self, fr: _Frames, none, bi, rep):
        """Where the table would fill in this part (the first frame of the first new flow past its room), to cut
        the part there (None: it does not fill, or fills at once): past that frame the new flows are untracked and
        counted in bulk (``_untracked_groups``), where otherwise the whole part would go the reference way. An estimate
        (not every new group makes a flow): a part that does not fill after all is looked at again."""
        table = self.flows
        room = table.max_flows - len(table.flows)
        if room <= 0 or len(none) <= room:
            return None
        firsts = bi[rep][none]
        if len(firsts) <= room:
            return None
        cut = int(np.partition(firsts, room)[room])
        return cut if 0 < cut < len(fr.ts) else None

    def _untracked_odd(self, fr: _Frames, rows):
        """Of frames ``rows`` (a mask), the SYN and RST ones (``_untracked_shape``) of new flows the full table
        does not take, as ``_untracked_groups`` finds the bulk-shaped ones: without a parse, by their ends' key."""
        table = self.flows
        if not table.full():
            return _NO_ROWS
        cand = np.flatnonzero(rows & _untracked_shape(fr))
        if not len(cand):
            return cand
        e = _endpoints(fr)
        cand = cand[~self._vital(e["sport"][cand], e["dport"][cand])]
        absent = self._index.absent(e["hs"][cand], e["hd"][cand])
        new = cand[absent].tolist()
        cand = cand[~absent]
        flows, keys = table.flows, self._keys
        for j, lanes in zip(cand.tolist(), zip(*(e[k][cand].tolist() for k in _LANES))):
            got = keys.get(lanes)
            if got is None:
                got = keys[lanes] = _lanes_key(lanes)
            if got[0] not in flows:
                new.append(j)
        return np.sort(np.array(new, dtype=np.int64))

    def _untracked_groups(self, none, rep, sport, dport):
        """The groups (``none``: no flow in memory) of new flows the full table does not take
        (``FlowTable.update``, ``vital_ports``). With the table full when the part starts it stays so (flows leave
        it only when written), and such a packet changes nothing but the counters and the newest time: what a
        flood of rotating addresses sends is counted in bulk."""
        if not len(none) or not self.flows.full():
            return np.zeros(len(none), dtype=bool)
        return none & ~self._vital(sport[rep], dport[rep])

    def _vital(self, sport, dport):
        """Per pair of ports: a new flow between them is tracked past the cap (``FlowTable.vital_ports``)."""
        vital = self.flows.vital_ports()
        ports = np.fromiter(vital, dtype=np.uint64, count=len(vital))
        return np.isin(sport, ports) | np.isin(dport, ports)

    # --- quiet flows: every packet unverified (or a UDP packet), counted in bulk ------------------------------

    def _quiet_candidates(self, fr: _Frames, gany, good, inv, same, bi, d_all, udp, tflags, v6):
        """Per group: the flow's packets in the part change nothing but its counters (and the unverified
        counts, and a mid-stream connection's last segment ends): a connection contradicted or reset, one
        picked up mid-stream that no segment of the part acknowledges, UDP (OK once answered).

        ``Flow.add`` and ``Flow._pickup`` say why: such a packet is NO (or UDP's OK) whatever its fields, and
        reaches no classifier window, neighbour or flag."""
        G = len(gany)
        qk = np.zeros(G, dtype=bool)
        if not G:
            return qk
        settling = {id(f) for _, _, f in self.settling}
        n_g = np.bincount(inv, minlength=G)
        d0 = (np.bincount(inv, weights=d_all == 0, minlength=G) > 0).tolist()
        d1 = (np.bincount(inv, weights=d_all == 1, minlength=G) > 0).tolist()
        fin = (np.bincount(inv, weights=(tflags[bi] & FIN) != 0, minlength=G) > 0).tolist()
        n_udp = np.bincount(inv, weights=udp[bi], minlength=G)
        all_udp, no_udp = (n_udp == n_g).tolist(), (n_udp == 0).tolist()
        clash = np.zeros(G, dtype=bool)
        clash[inv[~same]] = True                      # a hash shared by two connections: not in bulk
        clash = clash.tolist()
        other: dict = {}                              # mid-stream candidates: the other side's recorded ends
        for g, f in enumerate(gany):
            if (f is None or clash[g] or good[g] or f.skip or f.held
                    or not (all_udp[g] if f.proto == UDP else no_udp[g])
                    or (f.tcp == SPOOFED and not f.queued) or id(f) in settling or (d0[g] and not f.mac)):
                continue                              # (contradicted, not yet counted so: Engine._classify counts it)
            if f.proto == UDP or f.tcp == SPOOFED or f.tcp == RESET:
                qk[g] = True
            elif f.proto == TCP and f.tcp == 0:
                # picked up mid-stream (Flow._pickup): one direction, no FIN, no acknowledgement of the other
                # side's last segment ends, so no exchange is confirmed
                if not (d0[g] and d1[g]) and not fin[g]:
                    qk[g] = True
                    e = f.ends[1 if d0[g] else 0]
                    if e:
                        other[g] = e[-4:]
        if other:
            ends = np.full((G, 4), -1, dtype=np.int64)
            for g, e in other.items():
                ends[g, :len(e)] = e
            fi = np.flatnonzero(qk[inv] & ((tflags[bi] & ACK) != 0) & ~udp[bi])
            if len(fi):
                g, j = inv[fi], bi[fi]
                hit = (ends[g] == fr.seg("ack", v6[j], j)[:, None]).any(1)
                qk[np.unique(g[hit])] = False
        return qk

    def _quiet_guard(self, fr: _Frames, gany, qk, inv, bi, d_all, slow: list):
        """The quiet frames (per frame of ``bi``) once no slow packet can change what they count: a packet of
        the same flow, the settling of a connection of the same client (its held packets leave the unverified
        counts), an ICMP refusal of the flow's packet (it can disown a UDP flow), a client not yet among the
        unverified sources (who enters first when the table is full is decided in frame order). Groups that
        fail go back to ``slow`` (in frame order)."""
        from .engine import ICMP_ERRORS
        table = self.flows.flows
        unverified = self.unverified
        settling_clients = {f.client for _, _, f in self.settling}
        back: list = []
        while True:
            ids, addrs = set(), set()
            for _, p in slow:
                if p.proto in ICMP_ERRORS:
                    f = self.icmp_refused(p)
                else:
                    f = table.get(flow_key(p))
                    if p.proto == TCP:                # settling and held packets are TCP's
                        addrs.add(p.src)
                        addrs.add(p.dst)
                if f is not None:
                    ids.add(id(f))
            qok = qk[inv] if len(inv) else np.zeros(0, dtype=bool)
            fi = np.flatnonzero(qok)
            d0 = set(inv[fi][d_all[fi] == 0].tolist()) if len(fi) else set()
            drop = []
            for x in np.flatnonzero(qk).tolist():
                f = gany[x]
                # its client's packets reach the unverified counts (a UDP flow's until it is answered)
                unv = x in d0 and (f.proto == TCP or f.tcp == SPOOFED or not f.pkts[1])
                if id(f) in ids or (unv and (
                        f.client in addrs or f.client in settling_clients or f.client not in unverified)):
                    drop.append(x)
            if not drop:
                break
            qk[drop] = False
            dropped = np.isin(inv, drop)
            got = [(j, fr.packet(j)) for j in bi[dropped].tolist()]
            back += got
            slow.extend(got)
        if back:
            slow.sort(key=lambda e: e[0])
        return qk[inv] if len(inv) else np.zeros(0, dtype=bool)

    def _count_quiet(self, fr: _Frames, gany, qi, bi, inv, d_all, udp, tflags, l4, end, doff, v6) -> None:
        """Count the quiet frames (positions ``qi`` of ``bi``) as ``Flow.add`` and ``Engine._classify`` do."""
        if not len(qi):
            return
        key2 = inv[qi] * 2 + d_all[qi]
        o = _stable_order(key2)                       # frame order within each flow and direction
        k2, j = key2[o], bi[qi][o]
        g, d = k2 >> 1, k2 & 1
        n = len(k2)
        G = len(gany)
        # per group: the other direction's packets before the part, contradicted, mid-stream, the client's MAC
        p0 = np.zeros(G, dtype=np.int64)
        p1 = np.zeros(G, dtype=np.int64)
        spoofed = np.zeros(G, dtype=bool)
        mid = np.zeros(G, dtype=bool)
        gmac = np.zeros(G, dtype=np.uint64)
        for x in np.unique(g).tolist():
            f = gany[x]
            p0[x], p1[x], spoofed[x] = f.pkts[0], f.pkts[1], f.tcp == SPOOFED
            if f.proto == TCP and f.tcp == 0:
                mid[x] = True
                gmac[x] = int.from_bytes(f.mac, "big")
        isudp = udp[j]
        ok = np.zeros(n, dtype=bool)
        if isudp.any():
            # UDP (Flow.add): OK once the other direction has a packet, before this one (so counted first)
            fo = np.argsort(g * (1 << 40) + j)     # by flow, then frame
            gg, dd = g[fo], d[fo]
            first = np.concatenate(([True], gg[1:] != gg[:-1]))
            run_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
            c0 = np.cumsum(dd == 0) - (dd == 0)     # packets of each direction before this one, in the part
            c1 = np.cumsum(dd == 1) - (dd == 1)
            c0, c1 = c0 - c0[run_start], c1 - c1[run_start]
            other = np.where(dd == 0, p1[gg] + c1, p0[gg] + c0)
            ok[fo] = isudp[fo] & (other > 0) & ~spoofed[gg]
        starts, ends = self._count_runs(gany, k2, fr.ts[j], fr.wl[j], tflags[j])
        nok = np.add.reduceat(ok, starts)
        tcp = ~isudp
        # a mid-stream connection's side: the ends (seq + length) of its last four segments with data, the client's
        # from the client's MAC only (Flow._pickup)
        new_ends: dict = {}
        if mid.any():
            plen = end[j] - l4[j] - doff[j]
            valid = mid[g] & (plen > 0)
            if valid.any():
                valid &= (d == 1) | (fr.seg("mac", v6[j], j) == gmac[g])
                vi = np.flatnonzero(valid)
                ri = np.searchsorted(starts, vi, side="right") - 1
                last = np.searchsorted(ri, ri, side="right") - 1 - np.arange(len(ri))
                keep = last < 4
                vk = vi[keep]
                endv = (fr.seg("seq", v6[j[vk]], j[vk]) + plen[vk]) & M32
                for r, v in zip(ri[keep].tolist(), endv.tolist()):
                    new_ends.setdefault(r, []).append(v)
        unverified = self.unverified
        for r, (k, m, nn, last_ok) in enumerate(zip(k2[starts].tolist(), nok.tolist(), (ends - starts + 1).tolist(),
                                                    ok[ends].tolist())):
            f = gany[k >> 1]
            dd = k & 1
            if m:
                f.counted[dd] += m
            f.status = OK if last_ok else 0
            if dd == 0 and nn > m:
                unverified[f.client] += nn - m            # the client is there already (_quiet_guard)
            got = new_ends.get(r)
            if got:
                mine = f.ends[dd]
                mine.extend(got)
                del mine[:-4]
        if self.observers and tcp.any():
            self._series(self.observers, gany, k2[tcp], fr.ts[j][tcp])
        self.quiet_packets += n
        self._tally(fr.ts[j], v6[j], int(ok.sum()))

    # --- which flows are counted in bulk ----------------------------------------------------------------------

    def _subjects(self, f) -> list:
        """What the flow's windows, neighbours and flags are kept by: its address, its MAC, its prefix unless
        shared (kept per flow until the neighbours change)."""
        nb = self.neighbours
        cache = self._subject_cache
        got = cache.get(id(f))
        if got is not None and got[0] is f and got[1] == nb.gen and got[2] == f.mac:
            return got[3]
        out = [("ip", f.client), ("mac", f.mac)]
        seg = nb._segment(f.client)[0] if f.client else None
        if seg is not None and not nb.shared(seg):
            out.append(("seg", seg))
        cache[id(f)] = (f, nb.gen, f.mac, out)
        return out

    def _expand(self, subject) -> list:
        """Subjects whose windows or verdicts a change of ``subject`` can reach (neighbours' known links)."""
        nb = self.neighbours
        kind, v = subject
        if kind == "mac":
            return [("ip", a) for a in nb.addresses(v)]
        if kind == "seg":
            return [("mac", m) for m in nb.segment_macs.get(v, ())]
        return []

    def _taint(self, flows: dict, tainted: set, seeds: list) -> None:
        """Remove from ``flows`` (id -> flow) every flow sharing a subject, directly or through neighbours,
        with ``seeds``; ``tainted`` collects the subjects."""
        if not seeds or not flows:
            return
        by_subject = defaultdict(list)
        for fid, f in flows.items():
            for s in self._subjects(f):
                by_subject[s].append(fid)
        todo = [s for s in seeds if s not in tainted]
        tainted.update(todo)
        while todo:
            s = todo.pop()
            more = self._expand(s)
            for fid in by_subject.get(s, ()):
                f = flows.pop(fid, None)
                if f is not None:
                    more.extend(self._subjects(f))
            for m in more:
                if m not in tainted:
                    tainted.add(m)
                    todo.append(m)

    def _bulk(self, pk, gflow, slow, slow_ids, cut: bool):
        """Choose the bulk flows and count the part; with ``cut``, the frame where one would cross instead."""
        book = self.flagbook
        ts = self._frames.ts
        if len(ts) and int(ts.min()) < book.releases.newest_ns:
            return self._reference(slow, pk, None)   # frames from before a release: each asks Releases.forgives
        cand = {id(f): f for f in gflow if f is not None and id(f) not in slow_ids}
        seeds = []
        slow_flows = {}
        table = self.flows.flows
        for _, p in slow:
            if p.proto != TCP:      # UDP and ICMP reach no xmpp_abuse window, no neighbour, no flag of TCP flows
                continue
            seeds += [("ip", p.src), ("ip", p.dst), ("mac", p.mac)]
            f = table.get(flow_key(p))
            if f is not None:
                slow_flows[id(f)] = f
        for f in gflow:
            if f is not None and id(f) in slow_ids:
                slow_flows[id(f)] = f
        for _, _, f in self.settling:               # settling meanwhile: learns, judges its held packets
            slow_flows[id(f)] = f
        for f in slow_flows.values():
            seeds += self._subjects(f)
        tainted: set = set()
        self._taint(cand, tainted, seeds)
        if not cand:
            return self._reference(slow, pk, None)
        # order by flow, then frame; check each flow's segments against the state the ones before leave
        g = pk["g"]
        keep = np.array([gflow[x] is not None and id(gflow[x]) in cand for x in range(len(gflow))], dtype=bool)
        sel = keep[g] if len(g) else np.zeros(0, dtype=bool)
        order = np.flatnonzero(sel)
        order = order[_stable_order(g[order])]
        q = {k: v[order] for k, v in pk.items()}
        bad_groups = self._check_tcp(q, gflow)
        for x in bad_groups:
            f = gflow[x]
            if id(f) in cand:
                self._taint(cand, tainted, self._subjects(f))
        covered = self._covered(cand, book)
        entries = self._windows(q, gflow, cand, covered)
        if entries is None:
            self._taint(cand, tainted, [s for f in list(cand.values()) for s in self._subjects(f)])
        else:
            first = sorted(set(entries.pop("first").values()))
            if cut and first and (first[0] > 0 or self._frames.ts.size > 1):
                return first
            for f in entries.pop("crossing"):
                if id(f) in cand:
                    self._taint(cand, tainted, self._subjects(f))
        self._reference(slow, pk, cand, q=q, gflow=gflow, covered=covered, entries=entries)
        return None

    def _check_tcp(self, q, gflow) -> set:
        """Groups with a segment the reference would not count inline (out of window, a retransmission, another
        MAC): they go the reference way."""
        n = len(q["g"])
        if not n:
            return set()
        g, d = q["g"], q["d"]
        groups, gstart = np.unique(g, return_index=True)
        start = np.repeat(gstart, np.diff(np.append(gstart, n)))
        init_nxt = np.zeros((len(gflow), 2), dtype=np.int64)
        init_win = np.zeros((len(gflow), 2), dtype=np.int64)
        ws = np.zeros((len(gflow), 2), dtype=np.int64)
        mac = np.zeros(len(gflow), dtype=np.uint64)
        for x in groups.tolist():
            f = gflow[x]
            init_nxt[x] = f.nxt
            init_win[x] = f.win
            ws[x] = [f.ws[0] or 0, f.ws[1] or 0]
            mac[x] = int.from_bytes(f.mac, "big")
        fin = q["flags"] & FIN
        endseq = (q["seq"] + q["plen"] + fin) & M32
        wv = q["win"] << ws[g, d]
        ar = np.arange(n)
        last0 = np.maximum.accumulate(np.where(d == 0, ar, -1))
        last1 = np.maximum.accumulate(np.where(d == 1, ar, -1))
        prev0 = np.concatenate(([-1], last0[:-1]))
        prev1 = np.concatenate(([-1], last1[:-1]))
        own = np.where(d == 0, prev0, prev1)
        oth = np.where(d == 0, prev1, prev0)
        has_own, has_oth = own >= start, oth >= start
        own_c, oth_c = np.maximum(own, 0), np.maximum(oth, 0)
        nxt_own = np.where(has_own, endseq[own_c], init_nxt[g, d])
        nxt_oth = np.where(has_oth, endseq[oth_c], init_nxt[g, 1 - d])
        win_own = np.where(has_own, wv[own_c], init_win[g, d])
        win_oth = np.where(has_oth, wv[oth_c], init_win[g, 1 - d])
        ds = (q["seq"] - nxt_own) & M32
        fits = (ds < HALF) & (ds <= win_oth + SLACK)
        da = (q["ack"] - nxt_oth) & M32
        fits &= ~(((q["flags"] & ACK) != 0) & (da > SLACK) & (da < (1 << 32) - win_own - SLACK))
        fits &= (d == 1) | (q["mac"] == mac[g])
        q["endseq"], q["wv"], q["start"] = endseq, wv, start
        return set(np.unique(g[~fits]).tolist())

    def _covered(self, cand: dict, book) -> set:
        """Ids of bulk flows an active flag holds (their packets count as verified and reach no classifier)."""
        from .engine import PROTO_NAMES
        from .parse import mac_text
        if not book.covering:
            return set()
        now = self._now
        return {fid for fid, f in cand.items() if f.cov_gen != book.gen and book.covers(
            f.client, f.cport, now, mac_text(f.mac) if f.mac else "", PROTO_NAMES.get(f.proto, ""), f.sport)}

    def _windows(self, q, gflow, cand, covered):
        """The window entries of the bulk packets per classifier and window; None when they cannot be counted in
        bulk (unsorted times, a span too long); ``crossing``: flows whose windows would cross a threshold."""
        g = q["g"]
        n = len(g)
        out: dict = {"crossing": set(), "first": {}}
        if not n or not self.classifiers:
            return out
        live = np.array([gflow[x] is not None and id(gflow[x]) in cand and id(gflow[x]) not in covered
                         for x in range(len(gflow))], dtype=bool)
        nb = self.neighbours
        for ci, cl in enumerate(self.classifiers):
            ports = np.array(sorted(cl.ports), dtype=np.int64)
            # XmppAbuse.packet: client -> server, toward one of its ports, TCP
            gport = np.array([gflow[x].sport if live[x] else -1 for x in range(len(gflow))], dtype=np.int64)
            m = live[g] & (q["d"] == 0) & np.isin(gport[g], ports)
            idx = np.flatnonzero(m)
            if not len(idx):
                continue
            idx = idx[np.argsort(q["j"][idx])]        # frame order (frames are unique): the windows' order
            gi = g[idx]
            # the weight: a new connection's first counted packet carries its cost
            _, firsts = np.unique(gi, return_index=True)
            wt = np.ones(len(idx), dtype=np.int64)
            for k in firsts.tolist():
                f = gflow[gi[k]]
                if f.counted[0] == 0 and f.new_connection:
                    wt[k] = 1 + cl.cost
            keyed = {"conns": {}, "ips": {}, "hosts": {}, "prefixes": {}}
            for x in np.unique(gi).tolist():
                f = gflow[x]
                if f.agg_gen != nb.gen:
                    f.agg, f.agg_gen = nb.keys(f.mac, f.client), nb.gen
                host, pfx = f.agg
                if host is not None and host not in cl.hosts:
                    out["crossing"].add(f)            # its host window is seeded from its addresses': not in bulk
                keyed["conns"][x], keyed["ips"][x] = (f.client, f.cport), f.client
                keyed["hosts"][x], keyed["prefixes"][x] = host, pfx
            t, jj = q["ts"][idx], q["j"][idx]
            ones = np.ones_like(wt)
            for name, limit, weights in (("conns", cl.limit, ones), ("ips", cl.ip_limit, wt),
                                         ("hosts", cl.host_limit, wt), ("prefixes", cl.prefix_limit, wt)):
                klist: list = []
                kd: dict = {}
                gk = np.full(len(gflow), -1, dtype=np.int64)
                for x, k in keyed[name].items():
                    if k is not None:
                        gk[x] = kd.setdefault(k, len(klist))
                        if gk[x] == len(klist):
                            klist.append(k)
                fam = _Family(getattr(cl, name), limit, klist, gk[gi], t, weights, jj, gi)
                if not fam.ok:
                    return None
                out["crossing"].update(gflow[x] for x in fam.crossing)
                for x, j in fam.first.items():
                    if j < out["first"].get(x, j + 1):
                        out["first"][x] = j
                out[(ci, name)] = fam
        return out

    # --- counting -----------------------------------------------------------------------------------------

    def _reference(self, slow, pk, cand, q=None, gflow=None, covered=(), entries=None) -> None:
        """The reference engine's loop over the other packets in frame order (settling held connections at the
        bulk packets' times between them), then the bulk flows' counts."""
        book = self.flagbook
        now = self._now
        owner, index, bids = self._where
        if cand:
            inb = np.array([gflow[x] is not None and id(gflow[x]) in cand for x in range(len(gflow))], dtype=bool)
            in_bulk = inb[pk["g"]] if len(pk["g"]) else np.zeros(0, dtype=bool)
        else:
            in_bulk = np.zeros(len(pk["g"]), dtype=bool)
        fr = self._frames
        back = [(j, fr.packet(j)) for j in pk["j"][~in_bulk].tolist()]
        if back:
            slow = sorted(slow + back, key=lambda e: e[0])
        bj = pk["j"][in_bulk]
        bts = pk["ts"][in_bulk]
        qj, qts = self._quiet_jts
        if len(qj):                                   # the quiet packets' times too (their frames, in order)
            bj, bts = np.concatenate((bj, qj)), np.concatenate((bts, qts))
            o = np.argsort(bj, kind="stable")
            bj, bts = bj[o], bts[o]
        timeline = [(-1, book.gen, bool(book.covering))]     # (frame, flag book's gen, covering) from that frame on
        heap = self.settling
        a = 0                                                 # next bulk packet to pass
        run: list = []

        def flush_run():
            if run:
                self._classify(run, now)
                run.clear()
                if book.gen != timeline[-1][1]:
                    timeline.append((last_j[0], book.gen, bool(book.covering)))
        last_j = [-1]
        for j, p in slow:
            b = int(np.searchsorted(bj, j)) if len(bj) else 0
            if b > a:
                flush_run()
                if heap:
                    self._settle_gap(bts, bj, a, b, now, timeline)
                a = b
            run.append((p, bids[owner[j]], int(index[j])))
            last_j[0] = j
        flush_run()
        if heap and a < len(bj):
            self._settle_gap(bts, bj, a, len(bj), now, timeline)
        if cand:
            self._apply(q, gflow, cand, covered, entries, timeline, owner, index, bids)

    def _settle_gap(self, bts, bj, a: int, b: int, now, timeline) -> None:
        """What the reference does before each bulk packet in [a, b): settle the connections due by its time."""
        heap = self.settling
        book = self.flagbook
        while heap and a < b:
            hit = np.flatnonzero(bts[a:b] >= heap[0][0])
            if not len(hit):
                return
            k = a + int(hit[0])
            self._settle_due(int(bts[k]), now)
            if book.gen != timeline[-1][1]:
                timeline.append((int(bj[k]) - 1, book.gen, bool(book.covering)))
            a = k + 1

    def _apply(self, q, gflow, cand, covered, entries, timeline, owner, index, bids) -> None:
        series = self.observers
        g, d = q["g"], q["d"]
        ing = np.array([f is not None and id(f) in cand for f in gflow], dtype=bool)
        sel = ing[g] if len(g) else np.zeros(0, dtype=bool)
        if not sel.all():
            q = {k: v[sel] for k, v in q.items() if hasattr(v, "__len__") and len(v) == len(sel)}
            g, d = q["g"], q["d"]
        n = len(g)
        if not n:
            return
        key2 = g * 2 + d
        o = _stable_order(key2)
        k2, ts = key2[o], q["ts"][o]
        starts, ends = self._count_runs(gflow, k2, ts, q["wl"][o], q["flags"][o])
        endseq, wv, fl = q["endseq"][o], q["wv"][o], q["flags"][o]
        fin_any = np.maximum.reduceat(fl & FIN, starts)
        for e, k, nn, fa in zip(ends.tolist(), k2[starts].tolist(), (ends - starts + 1).tolist(), fin_any.tolist()):
            f = gflow[k >> 1]
            dd = k & 1
            f.nxt[dd] = int(endseq[e])
            f.win[dd] = int(wv[e])
            if fa:
                f.closed = True
            f.counted[dd] += nn
            f.status = OK
        if series:
            self._series(series, gflow, k2, ts)
        self.bulk_packets += n
        self._tally(q["ts"], q["v6"], n)
        self._apply_windows(entries, gflow, cand, owner, index, bids)
        # the flag book's gen as each flow's last packet saw it (Engine._judge's cache)
        positions = [t[0] for t in timeline]
        lastj = {}
        for x, j in zip(g.tolist(), q["j"].tolist()):
            lastj[x] = j
        for x, j in lastj.items():
            f = gflow[x]
            if id(f) in covered:
                continue
            _, gen, cov = timeline[bisect_right(positions, j - 1) - 1] if positions else (0, 0, False)
            if cov and f.cov_gen != gen:
                f.cov_gen = gen

    def _tally(self, ts, v6, verified: int) -> None:
        """The engine's counters for packets counted in bulk (``Engine._classify``'s), and the newest frame time."""
        c = self.counters
        n, nv6 = len(ts), int(v6.sum())
        c["packets"] += n
        c["packets_v6"] += nv6
        c["packets_v4"] += n - nv6
        c["verified"] += verified
        newest = int(ts.max())
        if newest > self.flows.newest_ns:
            self.flows.newest_ns = newest

    @staticmethod
    def _count_runs(gf, k2, ts, wl, fl):
        """What ``Flow.add`` counts of every packet, per run of packets of one flow and direction (``k2`` is
        group * 2 + direction, sorted, frame order within a run; ``gf`` the groups' flows): packets, bytes,
        largest size, intervals, first and last times, flag bits. Returns the runs' first and last positions."""
        n = len(k2)
        starts = np.flatnonzero(np.concatenate(([True], k2[1:] != k2[:-1])))
        ends = np.append(starts[1:], n) - 1
        cnt = np.diff(np.append(starts, n))
        sum_wl = np.add.reduceat(wl, starts)
        max_wl = np.maximum.reduceat(wl, starts)
        min_ts = np.minimum.reduceat(ts, starts)
        max_ts = np.maximum.reduceat(ts, starts)
        dt = np.diff(ts)
        inner = np.ones(max(n - 1, 0), dtype=bool)
        inner[ends[:-1]] = False                          # no interval across two runs
        BIG = np.iinfo(np.int64).max
        dmin = np.where(inner, dt, BIG)
        dmax = np.where(inner, dt, -BIG)
        seg_min = np.minimum.reduceat(np.append(dmin, BIG), starts) if n > 1 else np.full(len(starts), BIG)
        seg_max = np.maximum.reduceat(np.append(dmax, -BIG), starts) if n > 1 else np.full(len(starts), -BIG)
        bits = [(name, np.add.reduceat((fl & bit) != 0, starts).tolist()) for bit, name in
                ((ACK, "ACK"), (FIN, "FIN"), (PSH, "PSH"), (URG, "URG"))]
        bits = [(name, counts) for name, counts in bits if any(counts)]
        for ri, (k, nn, sw, mw, t0, t1, first_t, last_t, lo, hi) in enumerate(zip(
                k2[starts].tolist(), cnt.tolist(), sum_wl.tolist(), max_wl.tolist(), min_ts.tolist(),
                max_ts.tolist(), ts[starts].tolist(), ts[ends].tolist(), seg_min.tolist(), seg_max.tolist())):
            f = gf[k >> 1]
            dd = k & 1
            f.pkts[dd] += nn
            f.bytes[dd] += sw
            if mw > f.max_size:
                f.max_size = mw
            prev = f.last_dir_ns[dd]
            if prev is not None:
                iat = first_t - prev
                lo = min(lo, iat)
                hi = max(hi, iat)
            if lo != BIG:
                if f.iat_min[dd] is None or lo < f.iat_min[dd]:
                    f.iat_min[dd] = lo
                if f.iat_max[dd] is None or hi > f.iat_max[dd]:
                    f.iat_max[dd] = hi
            f.last_dir_ns[dd] = last_t
            if t1 > f.last_ns:
                f.last_ns = t1
            if t0 < f.first_ns:
                f.first_ns = t0
            f.dirty = True
            for name, counts in bits:
                v = counts[ri]
                if v:
                    f.flags[name] += v
        return starts, ends

    @staticmethod
    def _series(series, gflow, k2, ts) -> None:
        """The report's packets per client per second (report.XmppSeries), for the bulk packets."""
        sec = ts // 1_000_000_000
        s0 = int(sec.min())
        width = int(sec.max()) - s0 + 1
        uk, cnt = np.unique(k2 * width + (sec - s0), return_counts=True)
        for kk, m in zip(uk.tolist(), cnt.tolist()):
            k, s_ = divmod(kk, width)
            s_ += s0
            f = gflow[k >> 1]
            src, port = (f.client, f.sport) if k & 1 == 0 else (f.server, f.cport)
            for obs in series:
                if port in obs.ports:
                    obs.counts[src][s_] += m

    def _apply_windows(self, entries, gflow, cand, owner, index, bids) -> None:
        if not entries:
            return
        for fam in entries.values():
            fam.apply(gflow, cand, owner, index, bids)


