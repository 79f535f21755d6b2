"""Crafted traffic for the analyser tests: real Ethernet / IPv4 or IPv6 / TCP or UDP frames.

``frame`` builds one frame (either family, any source MAC and TTL, IPv6
extension headers, correct checksums); a ``Conn`` is one TCP connection
between a client and a server whose methods return frames
``(ts_ns, wire_len, data)`` with correct sequence numbers (SYN, SYN-ACK,
data, FIN...); ``Spoofer`` makes what an attacker on the LAN can send in a
victim's name. ``store_frames`` writes frames as batches the way the snooper
does (``store.batch_document`` + ``ins``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import random
import struct
import time

from appliance import store

S = 10**9
T0 = (int(time.time()) // 60 * 60 - 3600) * S  # frame time of the tests: an hour ago, well inside every retention
CLIENT_MAC, SERVER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
HOP, ROUTING, FRAGMENT, DSTOPTS = 0, 43, 44, 60


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _checksum(pseudo: bytes, l4: bytes) -> int:
    return (~_sum16(pseudo + l4)) & 0xFFFF or 0xFFFF


def ext_header(kind: int, next_header: int, *, offset: int = 0, more: bool = False) -> bytes:
    """One IPv6 extension header of 8 bytes (a fragment header with ``offset`` in 8-byte units)."""
    if kind == FRAGMENT:
        return struct.pack("!BBHI", next_header, 0, (offset << 3) | int(more), 0x1234)
    if kind == ROUTING:
        return struct.pack("!BBBB4x", next_header, 0, 0, 0)
    return struct.pack("!BB6x", next_header, 0)     # hop-by-hop / destination options: PadN to 8 bytes


def frame(src: str, sport: int, dst: str, dport: int, flags: int, payload: bytes = b"", seq: int = 1, ack: int = 0,
          proto: str = "tcp", mac: str = CLIENT_MAC, dst_mac: str = SERVER_MAC, ttl: int = 64, win: int = 65535,
          ext: tuple = (), options: bytes = b"") -> bytes:
    """One frame; IPv6 when ``src`` is an IPv6 address. ``ext``: IPv6 extension header kinds, in order."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    number = 17 if proto == "udp" else 6
    if proto == "udp":
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    else:
        options += b"\x00" * (-len(options) % 4)
        l4 = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                         (5 + len(options) // 4) << 4, flags, win, 0, 0) + options + payload
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, number, len(l4))
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(l4), number)
    ck = _checksum(pseudo, l4)
    at = 6 if proto == "udp" else 16
    l4 = l4[:at] + struct.pack("!H", ck) + l4[at + 2:]
    if s.version == 4:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, ttl, number, 0, s.packed, d.packed)
        head = head[:10] + struct.pack("!H", (~_sum16(head)) & 0xFFFF) + head[12:]
        etype, ip = 0x0800, head + l4
    else:
        chain = b""
        kinds = list(ext)
        for i, kind in enumerate(kinds):
            nxt = kinds[i + 1] if i + 1 < len(kinds) else number
            chain += ext_header(kind, nxt)
        first = kinds[0] if kinds else number
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(chain) + len(l4), first, ttl, s.packed, d.packed) + chain + l4
        etype = 0x86DD
    return bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(mac.replace(":", "")) + struct.pack("!H", etype) + ip


def icmp_unreachable(quoted: bytes, mac: str, ts: int) -> tuple:
    """The ICMP (ICMPv6) port unreachable the addressee of frame ``quoted`` answers it with, from ``mac``."""
    ip = quoted[14:]
    if quoted[12:14] == b"\x08\x00":
        src, dst = ip[16:20], ip[12:16]
        body = struct.pack("!BBHI", 3, 3, 0, 0) + ip[:28]
        body = body[:2] + struct.pack("!H", (~_sum16(body)) & 0xFFFF) + body[4:]
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 2, 0, 64, 1, 0, src, dst)
        head = head[:10] + struct.pack("!H", (~_sum16(head)) & 0xFFFF) + head[12:]
        etype, pkt = b"\x08\x00", head + body
    else:
        src, dst = ip[24:40], ip[8:24]
        body = struct.pack("!BBHI", 1, 4, 0, 0) + ip[:48]
        ck = _checksum(src + dst + struct.pack("!IxxxB", len(body), 58), body)
        body = body[:2] + struct.pack("!H", ck) + body[4:]
        etype, pkt = b"\x86\xdd", struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, 64, src, dst) + body
    data = quoted[6:12] + bytes.fromhex(mac.replace(":", "")) + etype + pkt
    return (ts, len(data), data)


def server_for(client: str) -> str:
    """The lab-style XMPP server of the client's family."""
    return "10.0.0.1" if ipaddress.ip_address(client).version == 4 else "2001:db8:5::1"


class Conn:
    """One TCP connection with correct sequence numbers; every method returns a list of frames."""

    def __init__(self, client: str, cport: int, server: str | None = None, sport: int = 5222, mac: str = CLIENT_MAC,
                 server_mac: str = SERVER_MAC, ttl: int = 64, isn: int = 1000, server_isn: int = 5000):
        self.c, self.cp, self.s, self.sp = client, cport, server or server_for(client), sport
        self.mac, self.smac, self.ttl = mac, server_mac, ttl
        self.cseq, self.sseq = isn, server_isn

    def _f(self, ts, to_server, flags, payload=b"", options=b""):
        if to_server:
            data = frame(self.c, self.cp, self.s, self.sp, flags, payload, self.cseq, self.sseq if flags & ACK else 0,
                         mac=self.mac, dst_mac=self.smac, ttl=self.ttl, options=options)
            self.cseq += len(payload) + (1 if flags & (SYN | FIN) else 0)
        else:
            data = frame(self.s, self.sp, self.c, self.cp, flags, payload, self.sseq, self.cseq,
                         mac=self.smac, dst_mac=self.mac, options=options)
            self.sseq += len(payload) + (1 if flags & (SYN | FIN) else 0)
        return (ts, len(data), data)

    def syn(self, ts):
        return [self._f(ts, True, SYN)]

    def synack(self, ts):
        return [self._f(ts, False, SYN | ACK)]

    def handshake(self, ts):
        return self.syn(ts) + self.synack(ts + 1_000_000) + [self._f(ts + 2_000_000, True, ACK)]

    def data(self, ts, payload=b"<presence/>", to_server=True):
        return [self._f(ts, to_server, ACK | PSH, payload)]

    def ack(self, ts, to_server=False):
        return [self._f(ts, to_server, ACK)]

    def rst(self, ts, to_server=True):
        return [self._f(ts, to_server, RST)]

    def fin(self, ts):
        return [self._f(ts, True, FIN | ACK), self._f(ts + 1_000_000, False, FIN | ACK),
                self._f(ts + 2_000_000, True, ACK)]


def steady(conn: Conn, start_ns: int, per_minute: float, seconds: float, handshake: bool = True,
           payload=b"<presence/>", replies: int = 0):
    """A client sending ``per_minute`` packets toward the server, evenly spaced, for ``seconds``.

    With ``replies`` the server answers every ``replies``-th packet with a data segment (acknowledging it).
    """
    out = conn.handshake(start_ns) if handshake else []
    gap = int(60 * S / per_minute)
    t = start_ns + 10_000_000
    end = start_ns + int(seconds * S)
    k = 0
    while t < end:
        out += conn.data(t, payload)
        k += 1
        if replies and k % replies == 0:
            out += conn.data(t + 200_000, b"<r/>", to_server=False)
        t += gap
    return out


ATTACKER_MAC = "02:00:00:00:00:66"


class Spoofer:
    """What a host on the LAN can send in a victim's name (its own MAC, the victim's address)."""

    def __init__(self, victim: str, victim_mac: str = CLIENT_MAC, mac: str = ATTACKER_MAC, server: str | None = None,
                 sport: int = 5222, seed: int = 1):
        self.victim, self.victim_mac, self.mac = victim, victim_mac, mac
        self.server, self.sport = server or server_for(victim), sport
        self.rnd = random.Random(seed)

    def syn_flood(self, start_ns: int, count: int, per_second: float = 200.0) -> list:
        """Spoofed SYNs from random source ports; the server answers each with a SYN-ACK, the victim with an RST."""
        out, gap = [], int(S / per_second)
        for i in range(count):
            t = start_ns + i * gap
            port = self.rnd.randint(1024, 65535)
            isn, s_isn = self.rnd.getrandbits(32), self.rnd.getrandbits(32)
            out.append(self._wire(t, frame(self.victim, port, self.server, self.sport, SYN, seq=isn, mac=self.mac)))
            out.append(self._wire(t + 300_000, frame(self.server, self.sport, self.victim, port, SYN | ACK, seq=s_isn,
                                                     ack=isn + 1, mac=SERVER_MAC, dst_mac=self.victim_mac)))
            out.append(self._wire(t + 600_000, frame(self.victim, port, self.server, self.sport, RST, seq=s_isn + 1,
                                                     mac=self.victim_mac)))
        return out

    def data_flood(self, start_ns: int, count: int, port: int, per_second: float = 200.0) -> list:
        """Data segments with made-up sequence and acknowledgement numbers on one client port."""
        out, gap = [], int(S / per_second)
        for i in range(count):
            out.append(self._wire(start_ns + i * gap, frame(
                self.victim, port, self.server, self.sport, ACK | PSH, b"<message>x</message>",
                seq=self.rnd.getrandbits(32), ack=self.rnd.getrandbits(32), mac=self.mac)))
        return out

    def forged_connection(self, start_ns: int, port: int, packets: int, gap_ns: int = 2_000_000,
                          answer_ns: int = 400_000) -> list:
        """Both sides of a connection forged (SYN, SYN-ACK, ACK, data acknowledged by a forged server), and what the
        real ends answer: the server's own SYN-ACK (another sequence number, ``answer_ns`` after the SYN) and its
        RST to the forged ACK."""
        c = Conn(self.victim, port, self.server, self.sport, mac=self.mac, server_mac=self.mac,
                 isn=self.rnd.getrandbits(32), server_isn=self.rnd.getrandbits(32))
        out = c.handshake(start_ns)
        real_isn = self.rnd.getrandbits(32)
        out.append(self._wire(start_ns + answer_ns, frame(self.server, self.sport, self.victim, port, SYN | ACK,
                                                        seq=real_isn, ack=c.cseq, mac=SERVER_MAC,
                                                        dst_mac=self.victim_mac)))
        out.append(self._wire(start_ns + answer_ns + 2_100_000, frame(self.server, self.sport, self.victim, port, RST,
                                                          seq=c.sseq, mac=SERVER_MAC, dst_mac=self.victim_mac)))
        t = start_ns + 3_000_000
        for _ in range(packets):
            out += c.data(t)
            out += c.ack(t + 100_000)
            t += gap_ns
        return sorted(out, key=lambda f: f[0])

    @staticmethod
    def _wire(ts, data):
        return (ts, len(data), data)


FLOOD_MAC = "02:00:00:00:0b:ad"


def rotating_flood(seed: int, start_ns: int, n: int, per_second: int) -> list:
    """A LAN host rotating its source addresses (IPv4 and IPv6) and ports: UDP datagrams and bare SYNs toward
    ports no server listens on, every frame a new 5-tuple."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        six = i % 3 == 0
        src = (str(ipaddress.IPv6Address((0x20010DB80099 << 80) | rnd.getrandbits(64))) if six
               else f"10.99.{rnd.randrange(256)}.{rnd.randrange(1, 255)}")
        dst = "2001:db8:ff::7" if six else "192.0.2.7"
        udp = i % 2 == 0
        data = frame(src, rnd.randint(1024, 65535), dst, 53 if udp else 80, 0 if udp else 0x02, b"x" * 20,
                     proto="udp" if udp else "tcp", mac=FLOOD_MAC, seq=rnd.getrandbits(32))
        out.append((start_ns + i * S // per_second, len(data), data))
    return out


def store_frames(db, frames, sensor: str = "pisnoop", run: str = "r1", batch_size: int = 100,
                 first_seq: int = 0) -> int:
    """Write frames (sorted by time) as snooper batches with ``ins``; return the next seq."""
    frames = sorted(frames, key=lambda f: f[0])
    seq = first_seq
    docs = []
    for i in range(0, len(frames), batch_size):
        doc = store.batch_document(sensor, run, seq, frames[i:i + batch_size])
        doc["ins"] = dt.datetime.now(dt.timezone.utc)
        docs.append(doc)
        seq += 1
    if docs:
        db[store.FRAMES].insert_many(docs)
    return seq
