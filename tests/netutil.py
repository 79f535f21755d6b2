"""Small test helpers for the wire: a raw listener on a host of the virtual appliance."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import secrets
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

import dpkt

from appliance import netns

ETH_P_ALL = 0x0003


class Listener:
    """Counts frames arriving on an interface inside a namespace (raw AF_PACKET, no snooper)."""

    def __init__(self, ns: str, ifname: str, outgoing: bool = False):
        """``outgoing``: count the frames the host sends on ``ifname`` instead of those it receives."""
        self.outgoing = outgoing
        with netns.enter(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((ifname, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []

    def drain(self, quiet: float = 0.5, limit: float = 10.0) -> list[bytes]:
        """Read until the wire has been quiet for ``quiet`` seconds."""
        end = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() < end and time.monotonic() - last < quiet:
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError as exc:      # the link went down and up under us: reported once, then it reads on
                if exc.errno != errno.ENETDOWN:
                    raise
                continue
            if (addr[2] == socket.PACKET_OUTGOING) != self.outgoing:
                continue
            self.frames.append(data)
            last = time.monotonic()
        return self.frames

    def close(self) -> None:
        self.sock.close()


def icmp_echo(frames: list[bytes], type_: int) -> list[bytes]:
    """IPv4 ICMP echo requests (8) or replies (0) among raw Ethernet frames."""
    out = []
    for f in frames:
        if len(f) >= 34 and struct.unpack_from("!H", f, 12)[0] == 0x0800 and f[23] == 1:
            ihl = (f[14] & 0x0F) * 4
            if f[14 + ihl] == type_:
                out.append(f)
    return out


def icmp6_echo(frames: list[bytes], type_: int) -> list[bytes]:
    """ICMPv6 echo requests (128) or replies (129) among raw Ethernet frames (no extension headers)."""
    return [f for f in frames if len(f) >= 55 and f[12:14] == b"\x86\xdd" and f[20] == 58 and f[54] == type_]


@dataclass(frozen=True)
class Segment:
    """One TCP segment of a frame, either family."""
    eth_src: str
    src: str
    dst: str
    sport: int
    dport: int
    flags: int
    seq: int
    payload: bytes


def tcp_segments(frames: list[bytes]) -> list[Segment]:
    """The TCP segments among raw Ethernet frames, IPv4 and IPv6."""
    out = []
    for f in frames:
        eth = dpkt.ethernet.Ethernet(f)
        ip = eth.data
        if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) or not isinstance(ip.data, dpkt.tcp.TCP):
            continue
        t = ip.data
        out.append(Segment(eth.src.hex(":"), str(ipaddress.ip_address(ip.src)), str(ipaddress.ip_address(ip.dst)),
                           t.sport, t.dport, t.flags, t.seq, bytes(t.data)))
    return out


@contextlib.contextmanager
def address_of_this_machine(addr: str):
    """``addr`` (/32 or /128: no route beyond itself) on a veth of this test's own in the root namespace, left
    down, so that this machine has it, as after a DHCP lease or a new temporary address; the pair goes
    afterwards. A link that is down sends nothing. (Not a dummy link: the kernel here has no dummy module.)"""
    link = "ps" + secrets.token_hex(2) + "own"
    bits = 32 if ipaddress.ip_address(addr).version == 4 else 128
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", link + "p"], check=True,
                   capture_output=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{addr}/{bits}", "dev", link] + (["nodad"] if bits == 128 else []),
                       check=True, capture_output=True)
        yield link
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
