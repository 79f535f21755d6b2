"""Small test helpers for the wire: a raw listener on a host of the virtual appliance."""

from __future__ import annotations

import socket
import struct
import time

from appliance import netns

ETH_P_ALL = 0x0003


class Listener:
    """Counts frames arriving on an interface inside a namespace (raw AF_PACKET, no snooper)."""

    def __init__(self, ns: str, ifname: str):
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
            if addr[2] == socket.PACKET_OUTGOING:
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
