"""Frame -> packet tuple, fast.

``dpkt.ethernet.Ethernet(frame)`` costs ~6.7 µs per frame (docs/ARCHITECTURE.md, "Facts: capture"); the
common case (Ethernet [+802.1Q] / IPv4 / TCP or UDP) is read here with
``struct`` in well under a microsecond, and only the rest (IPv6, odd
encapsulations) goes to dpkt. A frame that cannot be read is reported as
malformed, never raised: one bad frame must not stop the loop.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

import dpkt

TCP, UDP = 6, 17
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

_H = struct.Struct("!H")
_IP4 = struct.Struct("!BxHHHBBH4s4s")      # ver/ihl, total len, id, frag, ttl, proto, csum, src, dst
_PORTS = struct.Struct("!HH")
_inet_ntoa = socket.inet_ntoa
MALFORMED = "malformed"
NOT_IP = "not_ip"


class Packet(NamedTuple):
    """What the analyser needs of one frame; ``poff``/``plen`` locate the L4 payload in ``data``."""
    ts_ns: int
    wire_len: int
    src: str
    dst: str
    proto: int
    sport: int
    dport: int
    tcp_flags: int
    poff: int
    plen: int
    data: bytes


def parse(ts_ns: int, wire_len: int, data: bytes):
    """A ``Packet``, or the string MALFORMED / NOT_IP saying why there is none."""
    try:
        if len(data) < 34:
            return _slow(ts_ns, wire_len, data)
        etype = (data[12] << 8) | data[13]
        off = 14
        if etype == 0x8100:
            etype = (data[16] << 8) | data[17]
            off = 18
        if etype != 0x0800:
            return _slow(ts_ns, wire_len, data)
        vihl, total, _id, frag, _ttl, proto, _cs, src, dst = _IP4.unpack_from(data, off)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or total < ihl:
            return MALFORMED
        l4 = off + ihl
        end = min(off + total, len(data))
        if frag & 0x1FFF:  # a later fragment carries no L4 header
            return Packet(ts_ns, wire_len, _inet_ntoa(src), _inet_ntoa(dst), proto, 0, 0, 0, end, 0, data)
        if proto == TCP:
            if end - l4 < 20:
                return MALFORMED
            sport, dport = _PORTS.unpack_from(data, l4)
            doff = (data[l4 + 12] >> 4) * 4
            if doff < 20 or l4 + doff > end:
                return MALFORMED
            poff = l4 + doff
            return Packet(ts_ns, wire_len, _inet_ntoa(src), _inet_ntoa(dst), TCP, sport, dport,
                          data[l4 + 13], poff, end - poff, data)
        if proto == UDP:
            if end - l4 < 8:
                return MALFORMED
            sport, dport = _PORTS.unpack_from(data, l4)
            return Packet(ts_ns, wire_len, _inet_ntoa(src), _inet_ntoa(dst), UDP, sport, dport, 0,
                          l4 + 8, end - l4 - 8, data)
        return Packet(ts_ns, wire_len, _inet_ntoa(src), _inet_ntoa(dst), proto, 0, 0, 0, l4, end - l4, data)
    except (struct.error, IndexError):
        return MALFORMED


def _slow(ts_ns: int, wire_len: int, data: bytes):
    """The uncommon frames: dpkt decodes them (IPv6, short frames, ...)."""
    try:
        eth = dpkt.ethernet.Ethernet(data)
    except (dpkt.UnpackError, struct.error, ValueError, IndexError):
        return MALFORMED
    ip = eth.data
    if isinstance(ip, dpkt.ip.IP):
        src, dst = _inet_ntoa(ip.src), _inet_ntoa(ip.dst)
    elif isinstance(ip, dpkt.ip6.IP6):
        src, dst = socket.inet_ntop(socket.AF_INET6, ip.src), socket.inet_ntop(socket.AF_INET6, ip.dst)
    else:
        return NOT_IP
    l4 = ip.data
    if isinstance(l4, dpkt.tcp.TCP):
        payload = bytes(l4.data)
        return Packet(ts_ns, wire_len, src, dst, TCP, l4.sport, l4.dport, l4.flags, 0, len(payload), payload)
    if isinstance(l4, dpkt.udp.UDP):
        payload = bytes(l4.data)
        return Packet(ts_ns, wire_len, src, dst, UDP, l4.sport, l4.dport, 0, 0, len(payload), payload)
    if isinstance(l4, (bytes, bytearray)) and getattr(ip, "p", getattr(ip, "nxt", 0)) in (TCP, UDP):
        return MALFORMED  # dpkt gave up on a truncated TCP/UDP header
    proto = getattr(ip, "p", None) or getattr(ip, "nxt", 0)
    return Packet(ts_ns, wire_len, src, dst, proto, 0, 0, 0, 0, 0, b"")


def payload(pkt: Packet) -> bytes:
    return pkt.data[pkt.poff:pkt.poff + pkt.plen]

