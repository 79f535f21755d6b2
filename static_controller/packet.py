"""Just enough frame parsing for packet-in handling (Ethernet, IPv4 or IPv6, TCP)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Optional

from appliance import l3l4

from .messages import IPPROTO_TCP


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
    """The headers of a frame, or None when it is too short to be Ethernet.

    IP and TCP are read by ``appliance.l3l4`` (the one header reader): a
    segment behind VLAN tags or IPv6 extension headers, which Open vSwitch
    matches as TCP and sends in, is read as TCP here too.
    """
    if len(frame) < 14:
        return None
    eth_type = struct.unpack_from("!H", frame, 12)[0]
    off = 14
    while eth_type in (0x8100, 0x88A8, 0x9100) and len(frame) >= off + 4:
        eth_type = struct.unpack_from("!H", frame, off + 2)[0]
        off += 4
    base = dict(eth_dst=mac(frame[0:6]), eth_src=mac(frame[6:12]), eth_type=eth_type)
    got = l3l4.read(frame)
    if not isinstance(got, tuple):
        return Headers(**base)
    version, src, dst, proto, sport, dport = got[:6]
    if version == 6:
        ip = dict(ipv6_src=socket.inet_ntop(socket.AF_INET6, src), ipv6_dst=socket.inet_ntop(socket.AF_INET6, dst))
    else:
        ip = dict(ipv4_src=socket.inet_ntoa(src), ipv4_dst=socket.inet_ntoa(dst))
    if proto == IPPROTO_TCP and got[10] != got[11]:     # a TCP header was read (a later fragment has none)
        return Headers(**base, **ip, ip_proto=proto, tcp_src=sport, tcp_dst=dport)
    return Headers(**base, **ip, ip_proto=proto)
