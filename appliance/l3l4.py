"""The one reader of Ethernet / IPv4 / IPv6 / TCP / UDP headers, with ``struct``.

The analyser's parser (every frame it analyses) and ``export-pcap``'s
host/port filter read frames through ``read``: one place that knows VLAN
tags (802.1Q, 802.1ad), IPv4 options and fragments, and the IPv6 extension
headers a packet may carry before its TCP/UDP header (hop-by-hop, routing,
destination options, fragment, AH). Only the first fragment carries ports; a
later one is reported with ports 0. ``dpkt`` costs ~6.7 µs a frame, this
well under one (docs/ARCHITECTURE.md, "Facts: capture"). Standard library
only: the snooper imports it.
"""

from __future__ import annotations

import struct

TCP, UDP = 6, 17
MALFORMED = "malformed"
NOT_IP = "not_ip"

_IP4 = struct.Struct("!BxHxxHBBxx4s4s")       # ver/ihl, total length, flags+fragment offset, ttl, proto, src, dst
_IP6 = struct.Struct("!4xHBB16s16s")          # payload length, next header, hop limit, src, dst
_TCP = struct.Struct("!HHIIBBH")              # ports, seq, ack, data offset, flags, window
_PORTS = struct.Struct("!HH")
_VLAN = (0x8100, 0x88A8, 0x9100)
_HOP, _ROUTING, _FRAGMENT, _AH, _DSTOPTS = 0, 43, 44, 51, 60
_EXT6 = (_HOP, _ROUTING, _FRAGMENT, _AH, _DSTOPTS)
MAX_EXT6 = 8                                  # more extension headers than this: not a packet worth reading


def read(data: bytes):
    """``(version, src, dst, proto, sport, dport, tcp_flags, seq, ack, win, l4, poff, end, ttl)`` or MALFORMED/NOT_IP.

    ``src``/``dst`` are packed addresses (4 or 16 bytes); ``l4`` is the
    offset of the TCP/UDP header, ``poff`` of its payload and ``end`` of the
    IP packet inside ``data`` (Ethernet padding excluded); ``ttl`` is the TTL
    or hop limit. Non-TCP packets have flags, seq, ack and win 0; a packet
    that is neither TCP nor UDP (or a later fragment) has ports 0 and its
    payload starts at ``l4``.
    """
    try:
        n = len(data)
        if n < 14:
            return MALFORMED
        etype = (data[12] << 8) | data[13]
        off = 14
        while etype in _VLAN:
            etype = (data[off + 2] << 8) | data[off + 3]
            off += 4
        if etype == 0x0800:
            vihl, total, frag, ttl, proto, src, dst = _IP4.unpack_from(data, off)
            ihl = (vihl & 0x0F) * 4
            if vihl >> 4 != 4 or ihl < 20 or total < ihl:
                return MALFORMED
            l4 = off + ihl
            end = off + total
            if frag & 0x1FFF:                 # a later fragment carries no L4 header
                return 4, src, dst, proto, 0, 0, 0, 0, 0, 0, l4, l4, min(end, n), ttl
            version = 4
        elif etype == 0x86DD:
            plen, proto, ttl, src, dst = _IP6.unpack_from(data, off)
            if data[off] >> 4 != 6:
                return MALFORMED
            l4 = off + 40
            end = l4 + plen
            hops = 0
            while proto in _EXT6:
                hops += 1
                if hops > MAX_EXT6 or l4 + 8 > n:
                    return MALFORMED
                nxt = data[l4]
                if proto == _FRAGMENT:
                    if ((data[l4 + 2] << 8) | data[l4 + 3]) & 0xFFF8:   # a later fragment
                        return 6, src, dst, nxt, 0, 0, 0, 0, 0, 0, l4 + 8, l4 + 8, min(end, n), ttl
                    l4 += 8
                elif proto == _AH:
                    l4 += (data[l4 + 1] + 2) * 4
                else:
                    l4 += (data[l4 + 1] + 1) * 8
                proto = nxt
            version = 6
        else:
            return NOT_IP
        if end > n:
            end = n                           # cut by the snap length: read what there is
        if proto == TCP:
            if end - l4 < 20:
                return MALFORMED
            sport, dport, seq, ack, doff, flags, win = _TCP.unpack_from(data, l4)
            doff = (doff >> 4) * 4
            if doff < 20 or l4 + doff > end:
                return MALFORMED
            return version, src, dst, TCP, sport, dport, flags, seq, ack, win, l4, l4 + doff, end, ttl
        if proto == UDP:
            if end - l4 < 8:
                return MALFORMED
            sport, dport = _PORTS.unpack_from(data, l4)
            return version, src, dst, UDP, sport, dport, 0, 0, 0, 0, l4, l4 + 8, end, ttl
        if l4 > end:
            return MALFORMED
        return version, src, dst, proto, 0, 0, 0, 0, 0, 0, l4, l4, end, ttl
    except (struct.error, IndexError):
        return MALFORMED


def tcp_window_scale(data: bytes, l4: int, poff: int) -> int | None:
    """The window scale option of a SYN's TCP header (None when absent), capped at 14 as RFC 7323 says."""
    i = l4 + 20
    while i < poff:
        kind = data[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= poff:
            break
        size = data[i + 1]
        if kind == 3 and size == 3 and i + 2 < poff:
            return min(data[i + 2], 14)
        if size < 2:
            break
        i += size
    return None
