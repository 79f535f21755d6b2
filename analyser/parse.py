"""Frame -> packet tuple, fast.

Headers are read by ``appliance.l3l4.read`` (``struct``, both IP families,
VLAN tags, IPv6 extension headers), shared with ``export-pcap``'s filter; this
module only turns its answer into the ``Packet`` the analyser works on. A
frame that cannot be read is reported as malformed, never raised: one bad
frame must not stop the loop.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from appliance.l3l4 import MALFORMED, NOT_IP, TCP, UDP, read

__all__ = ["MALFORMED", "NOT_IP", "TCP", "UDP", "Packet", "address_raw", "address_text", "parse", "payload",
           "mac_text"]

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_inet_ntoa = socket.inet_ntoa
_inet_ntop = socket.inet_ntop
_inet_pton = socket.inet_pton
_inet_aton = socket.inet_aton
_AF6 = socket.AF_INET6
_new = tuple.__new__


def address_text(v6: bool, raw: bytes) -> str:
    """An address as a ``Packet`` (and so a flow key) writes it: dotted quad, or RFC 5952 text for IPv6."""
    return _inet_ntop(_AF6, raw) if v6 else _inet_ntoa(raw)


def address_raw(text: str) -> bytes:
    """The address bytes of ``address_text``'s text (4 or 16)."""
    return _inet_pton(_AF6, text) if ":" in text else _inet_aton(text)


class Packet(NamedTuple):
    """What the analyser needs of one frame; ``poff``/``plen`` locate the L4 payload in ``data``.

    ``mac`` is the frame's source MAC (6 bytes), ``ttl`` the TTL or hop
    limit, ``seq``/``ack``/``win`` the TCP header's (0 for other protocols),
    ``l4`` the offset of the TCP/UDP header, ``v6`` whether it is IPv6.
    """
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
    ttl: int = 0
    seq: int = 0
    ack: int = 0
    win: int = 0
    l4: int = 0
    v6: bool = False

    @property
    def mac(self) -> bytes:
        """The frame's source MAC (read when needed: most packets only compare it, with ``data.startswith``)."""
        return self.data[6:12]


def parse(ts_ns: int, wire_len: int, data: bytes):
    """A ``Packet``, or the string MALFORMED / NOT_IP saying why there is none."""
    h = read(data)
    if h.__class__ is str:
        return h
    version, src, dst, proto, sport, dport, flags, seq, ack, win, l4, poff, end, ttl = h
    v6 = version != 4
    # tuple.__new__ with the fields in order: the NamedTuple's own __new__ parses arguments, ~0.2 µs more
    return _new(Packet, (ts_ns, wire_len, address_text(v6, src), address_text(v6, dst), proto, sport, dport, flags,
                         poff, end - poff, data, ttl, seq, ack, win, l4, v6))


def payload(pkt: Packet) -> bytes:
    return pkt.data[pkt.poff:pkt.poff + pkt.plen]


def mac_text(mac: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff`` (the flag document's form)."""
    return mac.hex(":")
