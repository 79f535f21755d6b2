"""Just enough frame parsing for packet-in handling (Ethernet, IPv4 or IPv6, TCP)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Optional

from .messages import ETH_IPV4, ETH_IPV6, IPPROTO_TCP


@dataclass(frozen=True)
class Headers:
    eth_src: str
    eth_dst: str
    eth_type: int
    ipv4_src: Optional[str] = None
    ipv4_dst: Optional[str] = None
    ip_proto: Optional[int] = None
    tcp_src: Optional[int] = None
    tcp_dst: Optional[int] = None
    ipv6_src: Optional[str] = None
    ipv6_dst: Optional[str] = None

    @property
    def ip_src(self) -> Optional[str]:
        return self.ipv4_src or self.ipv6_src


def mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse(frame: bytes) -> Optional[Headers]:
    """The headers of a frame, or None when it is too short to be Ethernet."""
    if len(frame) < 14:
        return None
    eth_type = struct.unpack_from("!H", frame, 12)[0]
    off = 14
    if eth_type == 0x8100 and len(frame) >= 18:
        eth_type = struct.unpack_from("!H", frame, 16)[0]
        off = 18
    base = dict(eth_dst=mac(frame[0:6]), eth_src=mac(frame[6:12]), eth_type=eth_type)
    if eth_type == ETH_IPV6 and len(frame) >= off + 40:
        # the fixed header only: a TCP segment behind extension headers is read as "not TCP"
        proto = frame[off + 6]
        ip = dict(ipv6_src=socket.inet_ntop(socket.AF_INET6, frame[off + 8:off + 24]),
                  ipv6_dst=socket.inet_ntop(socket.AF_INET6, frame[off + 24:off + 40]), ip_proto=proto)
        l4 = off + 40
    elif eth_type == ETH_IPV4 and len(frame) >= off + 20:
        proto = frame[off + 9]
        ip = dict(ipv4_src=socket.inet_ntoa(frame[off + 12:off + 16]),
                  ipv4_dst=socket.inet_ntoa(frame[off + 16:off + 20]), ip_proto=proto)
        l4 = off + (frame[off] & 0x0F) * 4
    else:
        return Headers(**base)
    if proto == IPPROTO_TCP and len(frame) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        return Headers(**base, **ip, tcp_src=sport, tcp_dst=dport)
    return Headers(**base, **ip)
