"""The XMPP lab: a real Prosody on the upstream host, real slixmpp clients on the inside host."""

from __future__ import annotations

import signal
import socket
import time

from lab import xmpplab
from tests.netutil import Listener


def test_messages_cross_the_bridge_and_are_counted_at_the_server(va):
    va.ofctl("add-flow", "in_port=1,actions=output:2,output:3")
    va.ofctl("add-flow", "in_port=3,actions=output:2,output:1")
    va.exec("inside", ["ip", "addr", "add", "10.0.0.11/24", "dev", "eth0"])
    up = va.hosts["upstream"]
    srv = xmpplab.ProsodyServer(va.run_dir / "xmpp", up.netns, up.ip)
    srv.start(["sink", "alice", "bob"])
    mirror = Listener(va.hosts["mirror"].netns, va.hosts["mirror"].ifname)
    try:
        sink_report = va.run_dir / "sink.json"
        sink = va.popen("upstream", xmpplab.client_command("sink", f"sink@{xmpplab.DOMAIN}", up.ip, 5222,
                                                           duration=60, report=sink_report))
        xmpplab.wait_online(sink_report)
        clients = [
            va.popen("inside", xmpplab.client_command("chat", f"{name}@{xmpplab.DOMAIN}", up.ip, 5222, source_ip=src,
                                                      to=f"sink@{xmpplab.DOMAIN}", rate=rate, duration=5,
                                                      report=va.run_dir / f"{name}.json"))
            for name, src, rate in (("alice", "10.0.0.10", 2), ("bob", "10.0.0.11", 10))
        ]
        for p in clients:
            assert p.wait(timeout=60) == 0
        time.sleep(2)  # what was sent is on its way to the sink
        sink.send_signal(signal.SIGTERM)  # the sink writes its exact final report and stops
        assert sink.wait(timeout=30) == 0
        got = xmpplab.read_report(sink_report)["received"]
        sent = {n: xmpplab.read_report(va.run_dir / f"{n}.json")["sent"] for n in ("alice", "bob")}
        assert sent["alice"] > 0 and sent["bob"] > sent["alice"]
        assert got == {f"{n}@{xmpplab.DOMAIN}": sent[n] for n in ("alice", "bob")}
        # each client used its own source address: the mirror saw both toward port 5222
        frames = mirror.drain(quiet=0.3)
        sources = {socket.inet_ntoa(f[26:30]) for f in frames
                   if len(f) >= 38 and f[12:14] == b"\x08\x00" and f[23] == 6 and f[36:38] == b"\x14\x66"}
        assert sources == {"10.0.0.10", "10.0.0.11"}
    finally:
        mirror.close()
        srv.stop()
