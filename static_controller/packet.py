"""Just enough frame parsing for packet-in handling (Ethernet, IPv4, TCP)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Optional

from .messages import ETH_IPV4, IPPROTO_TCP


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
    if eth_type != ETH_IPV4 or len(frame) < off + 20:
        return Headers(**base)
    ihl = (frame[off] & 0x0F) * 4
    proto = frame[off + 9]
    ip = dict(ipv4_src=socket.inet_ntoa(frame[off + 12:off + 16]), ipv4_dst=socket.inet_ntoa(frame[off + 16:off + 20]),
              ip_proto=proto)
    l4 = off + ihl
    if proto == IPPROTO_TCP and len(frame) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        return Headers(**base, **ip, tcp_src=sport, tcp_dst=dport)
    return Headers(**base, **ip)
