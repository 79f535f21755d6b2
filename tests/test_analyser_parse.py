"""The fast parser agrees with dpkt, and odd frames take the dpkt path or are counted, never raised."""

from __future__ import annotations

import socket

import dpkt
import pytest

from analyser.parse import MALFORMED, NOT_IP, TCP, UDP, Packet, parse, payload
from tests.analyser_frames import frame


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


def test_ipv6_goes_through_dpkt():
    tcp = dpkt.tcp.TCP(sport=40000, dport=5222, flags=dpkt.tcp.TH_SYN, data=b"")
    ip6 = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, "fd00::10"),
                       dst=socket.inet_pton(socket.AF_INET6, "fd00::1"),
                       nxt=dpkt.ip.IP_PROTO_TCP, hlim=64, data=tcp, plen=len(bytes(tcp)))
    data = bytes(dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP6, data=ip6))
    p = parse(1, len(data), data)
    assert (p.src, p.dst, p.proto, p.sport, p.dport, p.tcp_flags) == ("fd00::10", "fd00::1", TCP, 40000, 5222, 2)


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

