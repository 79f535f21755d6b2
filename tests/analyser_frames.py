"""Crafted traffic for the analyser tests: real Ethernet/IPv4/TCP frames made with dpkt.

A ``Conn`` is one TCP connection between a client and a server; its methods
return frames ``(ts_ns, wire_len, data)`` with correct headers (SYN, SYN-ACK,
data, FIN...). ``store_frames`` writes frames as batches the way the snooper
does (``store.batch_document`` + ``ins``).
"""

from __future__ import annotations

import datetime as dt
import socket
import time

import dpkt

from appliance import store

S = 10**9
T0 = (int(time.time()) // 60 * 60 - 3600) * S  # frame time of the tests: an hour ago, well inside every retention


def frame(src: str, sport: int, dst: str, dport: int, flags: int, payload: bytes = b"", seq: int = 1, ack: int = 0,
          proto: str = "tcp") -> bytes:
    if proto == "udp":
        l4 = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
        l4.ulen = len(bytes(l4))
        p = dpkt.ip.IP_PROTO_UDP
    else:
        l4 = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, win=65535, data=payload)
        p = dpkt.ip.IP_PROTO_TCP
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=p, ttl=64, data=l4)
    ip.len = len(bytes(ip))
    eth = dpkt.ethernet.Ethernet(src=b"\x02\x00\x00\x00\x00\x01", dst=b"\x02\x00\x00\x00\x00\x02",
                                 type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    return bytes(eth)


class Conn:
    """One TCP connection; every method returns a list of frames."""

    def __init__(self, client: str, cport: int, server: str = "10.0.0.1", sport: int = 5222):
        self.c, self.cp, self.s, self.sp = client, cport, server, sport
        self.cseq, self.sseq = 1000, 5000

    def _f(self, ts, to_server, flags, payload=b""):
        if to_server:
            data = frame(self.c, self.cp, self.s, self.sp, flags, payload, self.cseq, self.sseq)
            self.cseq += len(payload)
        else:
            data = frame(self.s, self.sp, self.c, self.cp, flags, payload, self.sseq, self.cseq)
            self.sseq += len(payload)
        return (ts, len(data), data)

    def handshake(self, ts):
        T = dpkt.tcp
        return [self._f(ts, True, T.TH_SYN), self._f(ts + 1_000_000, False, T.TH_SYN | T.TH_ACK),
                self._f(ts + 2_000_000, True, T.TH_ACK)]

    def data(self, ts, payload=b"<presence/>", to_server=True):
        return [self._f(ts, to_server, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, payload)]

    def fin(self, ts):
        T = dpkt.tcp
        return [self._f(ts, True, T.TH_FIN | T.TH_ACK), self._f(ts + 1_000_000, False, T.TH_FIN | T.TH_ACK),
                self._f(ts + 2_000_000, True, T.TH_ACK)]


def steady(conn: Conn, start_ns: int, per_minute: float, seconds: float, handshake: bool = True,
           payload=b"<presence/>"):
    """A client sending ``per_minute`` packets toward the server, evenly spaced, for ``seconds``."""
    out = conn.handshake(start_ns) if handshake else []
    gap = int(60 * S / per_minute)
    t = start_ns + 10_000_000
    end = start_ns + int(seconds * S)
    while t < end:
        out += conn.data(t, payload)
        t += gap
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
