"""Benign uplink traffic for the benchmarks: chat beside bulk, as on a busy LAN's uplink, in 64-byte frames.

One frame in 64 is XMPP (TCP 5222) from one of ``CHATTERS`` hosts in 10.2.0.0/16, each with its own MAC: at
148,810 pps (100 Mb/s) ~68 packets a minute each, under the per-connection, per-address and per-host
thresholds. The rest is bulk from ``BULK`` hosts in 10.3.0.0/24, each one HTTPS (TCP 443) and one QUIC (UDP 443)
flow. All of it goes one way, to 10.0.0.1, picked up mid-stream: what the analyser never verifies (its quiet
path, analyser/fast.py). ``UNIQUE`` frames differ from each other, so none repeats within the dedupe window.
"""

from __future__ import annotations

import struct
from typing import Iterator

CHATTERS = 2048
BULK = 64
UNIQUE = 400_000


def frame(i: int) -> bytes:
    """The ``i``-th frame (60 bytes, without the FCS)."""
    if i % 64 == 0:
        host = (i // 64) % CHATTERS
        src, mac, dport, tcp = b"\x0a\x02" + struct.pack("!H", host), struct.pack("!H", host), 5222, True
    else:
        host = i % BULK
        src, mac, dport, tcp = b"\x0a\x03\x00" + bytes([host]), b"\xff" + bytes([host]), 443, i % 3 != 0
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x0a\x02" + mac + b"\x08\x00"
    sport = 20_000 + host
    if tcp:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, i, 1, 0x50, 0x18, 512, 0, 0) + struct.pack("!Q", i)[2:]
    else:
        l4 = struct.pack("!HHHH", sport, dport, 26, 0) + struct.pack("!Q", i) + bytes(10)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), i & 0xFFFF, 0, 64, 6 if tcp else 17, 0, src,
                     b"\x0a\x00\x00\x01")
    return eth + ip + l4


def frames(count: int = UNIQUE) -> Iterator[bytes]:
    for i in range(count):
        yield frame(i)
