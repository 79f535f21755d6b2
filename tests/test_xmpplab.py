"""The XMPP lab: a real Prosody on the upstream host, real slixmpp clients on the inside host, TLS on both families."""

from __future__ import annotations

import signal
import sys
import time

from lab import tlscert, xmpplab
from tests.netutil import Listener, tcp_segments


def _forward(va) -> None:
    va.ofctl("add-flow", "in_port=1,actions=output:2,output:3")
    va.ofctl("add-flow", "in_port=3,actions=output:2,output:1")


def test_messages_cross_the_bridge_encrypted_on_both_families_and_ports(va):
    _forward(va)
    inside, up = va.hosts["inside"], va.hosts["upstream"]
    second6 = va.addr6(0, 0x11)
    va.exec("inside", ["ip", "addr", "add", "10.0.0.11/24", "dev", "eth0"])
    va.exec("inside", ["ip", "-6", "addr", "add", f"{second6}/64", "dev", "eth0", "nodad"])
    srv = xmpplab.ProsodyServer(va.run_dir / "xmpp", up.netns, up.ip, ip6=up.ip6)
    srv.start(["sink", "alice", "bob", "carol", "dave"])
    # (name, server address, port, direct TLS, source, rate)
    plan = (("alice", up.ip, 5222, False, inside.ip, 2), ("bob", up.ip6, 5223, True, inside.ip6, 10),
            ("carol", up.ip6, 5222, False, second6, 3), ("dave", up.ip, 5223, True, "10.0.0.11", 4))
    mirror = Listener(va.hosts["mirror"].netns, va.hosts["mirror"].ifname)
    try:
        sink_report = va.run_dir / "sink.json"
        sink = va.popen("upstream", xmpplab.client_command("sink", f"sink@{xmpplab.DOMAIN}", up.ip6, 5223,
                                                           cafile=srv.cert, direct_tls=True, duration=60,
                                                           report=sink_report))
        xmpplab.wait_online(sink_report)
        clients = [
            va.popen("inside", xmpplab.client_command("chat", f"{name}@{xmpplab.DOMAIN}", server, port,
                                                      cafile=srv.cert, direct_tls=direct, source_ip=src,
                                                      to=f"sink@{xmpplab.DOMAIN}", rate=rate, duration=5,
                                                      report=va.run_dir / f"{name}.json"))
            for name, server, port, direct, src, rate in plan
        ]
        for p in clients:
            assert p.wait(timeout=60) == 0
        time.sleep(2)  # what was sent is on its way to the sink
        sink.send_signal(signal.SIGTERM)  # the sink writes its exact final report and stops
        assert sink.wait(timeout=30) == 0
        got = xmpplab.read_report(sink_report)["received"]
        reports = {n: xmpplab.read_report(va.run_dir / f"{n}.json") for n, *_ in plan}
        assert all(r["sent"] > 0 and r["encrypted"] and r["sessions"] == 1 for r in reports.values()), reports
        assert reports["bob"]["sent"] > reports["alice"]["sent"]
        assert got == {f"{n}@{xmpplab.DOMAIN}": reports[n]["sent"] for n, *_ in plan}
        # each client used its own source address and port: the mirror saw each toward its server port
        segs = tcp_segments(mirror.drain(quiet=0.3))
        seen = {(s.src, s.dport) for s in segs if s.dport in (5222, 5223)}
        assert seen == {(src, port) for _n, _s, port, _d, src, _r in plan}
        # and nothing readable crossed the wire: no message body, and TLS records after the stream header
        assert not [s for s in segs if b"hello #" in s.payload]
        direct = [s for s in segs if s.dport == 5223 and s.payload]
        assert direct and all(s.payload[0] in (0x14, 0x15, 0x16, 0x17) for s in direct)
    finally:
        mirror.close()
        srv.stop()


def test_a_client_trusts_only_the_pinned_certificate(va, tmp_path):
    """A certificate the server does not hold (another throwaway one for the same name) never gets a session up."""
    _forward(va)
    up = va.hosts["upstream"]
    srv = xmpplab.ProsodyServer(va.run_dir / "xmpp", up.netns, up.ip, ip6=up.ip6)
    srv.start(["alice"])
    try:
        stranger = tlscert.make(tmp_path / "other", xmpplab.DOMAIN)
        for port, direct in ((5222, False), (5223, True)):
            report = tmp_path / f"alice-{port}.json"
            proc = va.popen("inside", xmpplab.client_command("chat", f"alice@{xmpplab.DOMAIN}", up.ip, port,
                                                             cafile=stranger.cert, direct_tls=direct,
                                                             to=f"alice@{xmpplab.DOMAIN}", duration=4, report=report))
            assert proc.wait(timeout=30) == 0
            r = xmpplab.read_report(report)
            assert r["sessions"] == 0 and r["sent"] == 0 and not r["encrypted"], r
    finally:
        srv.stop()


def test_the_server_refuses_a_plaintext_login(va):
    """c2s_require_encryption: a bare stream is offered STARTTLS only, never SASL."""
    _forward(va)
    up = va.hosts["upstream"]
    srv = xmpplab.ProsodyServer(va.run_dir / "xmpp", up.netns, up.ip, ip6=up.ip6)
    srv.start([])
    try:
        script = ("import socket, sys, time\n"
                  "s = socket.create_connection((sys.argv[1], 5222), timeout=5)\n"
                  "s.sendall(b\"<?xml version='1.0'?><stream:stream to='pisnoop.test' version='1.0' "
                  "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>\")\n"
                  "buf = b''\n"
                  "end = time.time() + 5\n"
                  "while b'</stream:features>' not in buf and time.time() < end:\n"
                  "    buf += s.recv(4096)\n"
                  "print(buf.decode())\n")
        out = va.exec("inside", [sys.executable, "-c", script, up.ip6]).stdout
        assert "urn:ietf:params:xml:ns:xmpp-tls" in out and "<required" in out
        assert "urn:ietf:params:xml:ns:xmpp-sasl" not in out
    finally:
        srv.stop()
