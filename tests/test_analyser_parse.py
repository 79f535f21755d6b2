"""The fast header reader (appliance/l3l4.py) agrees with dpkt for both families, skips IPv6 extension headers,
and odd frames are counted, never raised; export-pcap's filter reads through the same reader."""

from __future__ import annotations

import socket

import dpkt
import pytest

from analyser.parse import MALFORMED, NOT_IP, TCP, UDP, Packet, parse, payload
from appliance import l3l4
from snooper import pcap
from tests.analyser_frames import DSTOPTS, FRAGMENT, HOP, ROUTING, frame


def dpkt_view(data: bytes):
    eth = dpkt.ethernet.Ethernet(data)
    ip = eth.data
    if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, (dpkt.tcp.TCP, dpkt.udp.UDP)):
        l4 = ip.data
        flags = l4.flags if isinstance(l4, dpkt.tcp.TCP) else 0
        return socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst), ip.p, l4.sport, l4.dport, flags, bytes(l4.data)
    return None


@pytest.mark.parametrize("proto,flags,body", [
    ("tcp", 0x02, b""), ("tcp", 0x12, b""), ("tcp", 0x18, b"<message to='x'>hello</message>"),
    ("tcp", 0x11, b""), ("udp", 0, b"dns?"), ("udp", 0, b""),
])
def test_fast_path_matches_dpkt(proto, flags, body):
    data = frame("10.0.0.10", 40000, "10.0.0.1", 5222 if proto == "tcp" else 53, flags, body, proto=proto)
    p = parse(1, len(data), data)
    assert isinstance(p, Packet)
    assert (p.src, p.dst, p.proto, p.sport, p.dport, p.tcp_flags, payload(p)) == dpkt_view(data)


def test_vlan_tagged_and_padded_frames():
    data = frame("10.0.0.10", 40000, "10.0.0.1", 5222, 0x10)
    tagged = data[:12] + b"\x81\x00\x00\x05" + data[12:]
    p = parse(1, len(tagged), tagged)
    assert (p.src, p.dport, p.proto) == ("10.0.0.10", 5222, TCP)
    padded = data + b"\x00" * 6  # Ethernet minimum-size padding is not payload
    assert parse(1, len(padded), padded).plen == 0


def dpkt_view6(data: bytes):
    ip = dpkt.ethernet.Ethernet(data).data
    l4 = ip.data
    flags = l4.flags if isinstance(l4, dpkt.tcp.TCP) else 0
    return (socket.inet_ntop(socket.AF_INET6, ip.src), socket.inet_ntop(socket.AF_INET6, ip.dst), ip.p, l4.sport,
            l4.dport, flags, bytes(l4.data))


@pytest.mark.parametrize("proto,flags,body,ext", [
    ("tcp", 0x02, b"", ()), ("tcp", 0x18, b"<message/>", ()), ("udp", 0, b"q", ()),
    ("tcp", 0x18, b"<message/>", (HOP,)), ("tcp", 0x10, b"x" * 30, (HOP, ROUTING, DSTOPTS)),
    ("udp", 0, b"dns?", (DSTOPTS,)), ("tcp", 0x18, b"first", (FRAGMENT,)),
])
def test_ipv6_fast_path_skips_extension_headers_and_matches_dpkt(proto, flags, body, ext):
    data = frame("2001:db8:1::10", 40000, "2001:db8:5::1", 5222, flags, body, seq=77, ack=99, proto=proto, ext=ext,
                 ttl=63)
    p = parse(1, len(data), data)
    assert isinstance(p, Packet) and p.v6 and p.ttl == 63 and p.mac == bytes.fromhex("020000000001")
    view = (p.src, p.dst, p.proto, p.sport, p.dport, p.tcp_flags, payload(p))
    if not ext:
        assert view == dpkt_view6(data)
    assert view == ("2001:db8:1::10", "2001:db8:5::1", TCP if proto == "tcp" else UDP, 40000, 5222, flags, body)
    if proto == "tcp":
        assert (p.seq, p.ack, p.win) == (77, 99, 65535)
    host = socket.inet_pton(socket.AF_INET6, "2001:db8:5::1")
    assert pcap.matches(data, host, 5222) and pcap.matches(data, None, 40000) and not pcap.matches(data, host, 80)
    assert not pcap.matches(data, socket.inet_pton(socket.AF_INET6, "2001:db8:5::2"), None)


def test_a_later_ipv6_fragment_has_no_ports_and_a_bad_chain_is_malformed():
    data = bytearray(frame("2001:db8:1::10", 40000, "2001:db8:5::1", 5222, 0x18, b"x" * 16, ext=(FRAGMENT,)))
    at = 14 + 40 + 2
    data[at:at + 2] = (3 << 3).to_bytes(2, "big")              # offset 3 (x 8 bytes): not the first fragment
    p = parse(1, len(data), bytes(data))
    assert (p.proto, p.sport, p.dport, p.v6) == (TCP, 0, 0, True)
    assert not pcap.matches(bytes(data), None, 5222)             # no ports: no port matches
    looped = frame("2001:db8:1::10", 1, "2001:db8:5::1", 2, 0x02, ext=(HOP,) * 9)
    assert parse(1, len(looped), looped) == MALFORMED             # more extension headers than any real packet
    cut = frame("2001:db8:1::10", 1, "2001:db8:5::1", 2, 0x02, ext=(ROUTING,))[:14 + 40 + 4]
    assert parse(1, len(cut), cut) == MALFORMED
    qinq = data[:12] + b"\x88\xa8\x00\x07\x81\x00\x00\x05" + data[12:]
    p = parse(1, len(qinq), bytes(qinq))
    assert p.v6 and p.src == "2001:db8:1::10"


def test_tcp_window_scale_option_is_read():
    data = frame("10.0.0.10", 40000, "10.0.0.1", 5222, 0x02, options=b"\x02\x04\x05\xb4\x01\x03\x03\x07")
    p = parse(1, len(data), data)
    assert l3l4.tcp_window_scale(p.data, p.l4, p.poff) == 7
    plain = frame("10.0.0.10", 40000, "10.0.0.1", 5222, 0x02)
    p = parse(1, len(plain), plain)
    assert l3l4.tcp_window_scale(p.data, p.l4, p.poff) is None


def test_later_fragment_has_no_ports_and_bad_frames_are_named():
    data = bytearray(frame("10.0.0.10", 40000, "10.0.0.1", 53, 0, b"x" * 20, proto="udp"))
    data[20:22] = (0x2000 | 3).to_bytes(2, "big")  # fragment offset 3
    p = parse(1, len(data), bytes(data))
    assert (p.proto, p.sport, p.dport) == (UDP, 0, 0)
    assert parse(1, 10, b"\x00" * 10) == MALFORMED
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\x00" * 28
    assert parse(1, 42, arp) == NOT_IP
    good = frame("10.0.0.10", 40000, "10.0.0.1", 5222, 0x18, b"abc")
    assert parse(1, 40, good[:40]) == MALFORMED           # TCP header cut
    bad_doff = bytearray(good)
    bad_doff[14 + 20 + 12] = 0xF0                        # data offset beyond the frame
    assert parse(1, len(good), bytes(bad_doff)) == MALFORMED

