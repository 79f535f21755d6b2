"""Enforcement on the real virtual appliance, both families: flags of every scope dropped at the switch, still
mirrored, benign neighbours untouched; exempt and never-ban flags install nothing; ``flags ban``/``release``.

The virtual appliance turns IPv6 off in its hosts, so each test turns it on in the inside and upstream
namespaces (never the mirror's) and adds a neighbour host: a macvlan on the inside wire, in a namespace of
its own, with its own MAC, in the same IPv4 /24 and IPv6 /64 as the inside host.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import struct
import subprocess
import sys
import time

from appliance import config as config_mod
from appliance import flagdoc, neverban, store
from lab.virtual import VirtualAppliance
from tests.conftest import assert_gone, pisnoop
from tests.ctlutil import ControllerProcess, flows_matching, wait_for
from tests.netutil import Listener

NET1, NET2 = "fd70:6973:6e00:1::", "fd70:6973:6e00:2::"       # two /64s, neither this machine's own
IN4, NB4, UP4 = "10.0.0.10", "10.0.0.11", "10.0.0.1"
IN6, IN6B, NB6 = NET1 + "10", NET2 + "10", NET1 + "11"
UP6, UP6B = NET1 + "1", NET2 + "1"

SERVER = r"""
import socket, socketserver, sys, threading
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        if isinstance(self.request, tuple):
            self.request[1].sendto(self.request[0], self.client_address)
            return
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass
class TCP(socketserver.ThreadingTCPServer):
    address_family, allow_reuse_address, daemon_threads = socket.AF_INET6, True, True
class UDP(socketserver.ThreadingUDPServer):
    address_family, allow_reuse_address, daemon_threads = socket.AF_INET6, True, True
for cls, ports in ((TCP, sys.argv[1]), (UDP, sys.argv[2])):
    for port in map(int, filter(None, ports.split(","))):
        srv = cls(("::", port), Echo, bind_and_activate=False)
        srv.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # both families on one socket
        srv.server_bind()
        srv.server_activate()
        threading.Thread(target=srv.serve_forever, daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""

CLIENT = r"""
import json, socket, sys
proto, src, dst, port, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
fam = socket.AF_INET6 if ":" in src else socket.AF_INET
out = {"ok": 0, "error": None}
try:
    c = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    c.settimeout(1.5 if proto == "tcp" else 0.5)
    c.bind((src, 0)); c.connect((dst, port))
    for i in range(n):
        msg = b"<m%06d/>" % i
        if proto == "tcp":
            c.sendall(msg); got = b""
            while len(got) < len(msg):
                d = c.recv(len(msg) - len(got))
                if not d: raise OSError("closed")
                got += d
            out["ok"] += 1
        else:
            c.send(msg)
            try:
                out["ok"] += c.recv(100) == msg
            except socket.timeout:
                pass
except OSError as e:
    out["error"] = f"{e.__class__.__name__}: {e}"
print(json.dumps(out), flush=True)
"""


def sh(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=check, timeout=60)


class DualStack:
    """The appliance's hosts with IPv6 on, a neighbour host on the inside wire, a dual-stack echo server."""

    def __init__(self, va: VirtualAppliance, tcp_ports=(5222,), udp_ports=()):
        self.va = va
        self.ns = {"inside": va.hosts["inside"].netns, "upstream": va.hosts["upstream"].netns,
                   "neighbour": f"{va.prefix}-nb"}
        va.state["namespaces"].append(self.ns["neighbour"])      # the appliance's teardown removes it too
        va._save()
        subprocess.run(["ip", "netns", "add", self.ns["neighbour"]], check=True)
        sh(self.ns["inside"], "ip", "link", "add", "nb0", "link", "eth0", "type", "macvlan", "mode", "bridge")
        sh(self.ns["inside"], "ip", "link", "set", "nb0", "netns", self.ns["neighbour"])
        for role, addrs in (("inside", [IN6, IN6B]), ("upstream", [UP6, UP6B]), ("neighbour", [NB6])):
            ns, dev = self.ns[role], "nb0" if role == "neighbour" else "eth0"
            sh(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
               f"net.ipv6.conf.{dev}.disable_ipv6=0")
            for a in addrs:
                sh(ns, "ip", "-6", "addr", "add", f"{a}/64", "dev", dev, "nodad")
        sh(self.ns["neighbour"], "ip", "addr", "add", f"{NB4}/24", "dev", "nb0")
        sh(self.ns["neighbour"], "ethtool", "-K", "nb0", "tx", "off", check=False)
        sh(self.ns["neighbour"], "ip", "link", "set", "lo", "up")
        sh(self.ns["neighbour"], "ip", "link", "set", "nb0", "up")
        self.mac = {role: sh(self.ns[role], "cat", f"/sys/class/net/{dev}/address").stdout.strip()
                    for role, dev in (("inside", "eth0"), ("neighbour", "nb0"))}
        self.server = subprocess.Popen(["ip", "netns", "exec", self.ns["upstream"], sys.executable, "-c", SERVER,
                                        ",".join(map(str, tcp_ports)), ",".join(map(str, udp_ports))],
                                       stdout=subprocess.PIPE, text=True)
        assert self.server.stdout.readline().strip() == "listening"

    def talk(self, role: str, src: str, port: int = 5222, n: int = 10, proto: str = "tcp") -> int:
        """How many of ``n`` messages from ``src`` (on host ``role``) came back from the server."""
        dst = (UP6B if src.startswith(NET2) else UP6) if ":" in src else UP4
        res = sh(self.ns[role], sys.executable, "-c", CLIENT, proto, src, dst, str(port), str(n), check=False)
        return json.loads(res.stdout.strip().splitlines()[-1])["ok"]

    def close(self) -> None:
        self.server.kill()
        self.server.wait()
        subprocess.run(["ip", "netns", "del", self.ns["neighbour"]], check=False)


@contextlib.contextmanager
def dual_stack(tcp_ports=(5222,), udp_ports=(), **over):
    va = VirtualAppliance(config_mod.from_dict(over, "<test>"))
    with va:
        ds = DualStack(va, tcp_ports, udp_ports)
        db = store.database(va.config.mongodb)
        try:
            with ControllerProcess(va) as ctl:
                ctl.wait_pushed()
                yield ds, db, ctl
        finally:
            db.client.close()
            ds.close()
    assert_gone(va)


def flag_doc(**kw):
    args = dict(server_ports=[5222], classifier="test", reason="test", action="drop", evidence={}, offence=1,
                ban_seconds=120, sensor="test", scope="fleet", flagged_at=dt.datetime.now(dt.timezone.utc))
    return flagdoc.build(**{**args, **kw})


def release(db, fid) -> None:
    doc = db[store.FLAGS].find_one({"_id": fid})
    db[store.FLAGS].replace_one({"_id": fid}, flagdoc.ended(doc, flagdoc.RELEASED, dt.datetime.now(dt.timezone.utc)))


def ban_flows(va) -> list[str]:
    """The enforce module's flows on the switch (cookie 0x3...)."""
    return [line for line in va.ofctl("dump-flows").splitlines() if line.strip().startswith("cookie=0x3")]


def tcp6_to(frames, src: str, port: int) -> list[bytes]:
    want = socket.inet_pton(socket.AF_INET6, src)
    return [f for f in frames if len(f) >= 58 and f[12:14] == b"\x86\xdd" and f[20] == 6 and f[22:38] == want
            and struct.unpack_from("!H", f, 56)[0] == port]


def test_an_ipv6_client_banned_is_dropped_and_still_mirrored_benign_v4_and_v6_pass():
    with dual_stack() as (ds, db, ctl):
        va = ds.va
        assert [ds.talk("inside", IN6), ds.talk("inside", IN4), ds.talk("neighbour", NB6)] == [10, 10, 10]
        t0 = time.monotonic()
        db[store.FLAGS].insert_one(flag_doc(client_ip=IN6))
        assert wait_for(lambda: flows_matching(va, f"ipv6_src={IN6}", "tp_dst=5222", "actions=drop"), 2.0), \
            f"no IPv6 ban flow within 2 s: {ban_flows(va)}"
        assert time.monotonic() - t0 <= 2.0
        mirror = Listener(va.hosts["mirror"].netns, "mirror0")
        try:
            assert ds.talk("inside", IN6, n=5) == 0, "the banned IPv6 client still reaches the server"
            seen = tcp6_to(mirror.drain(), IN6, 5222)
        finally:
            mirror.close()
        assert len(seen) >= 2, "the banned client's SYNs must still be copied to the mirror"
        assert [ds.talk("inside", IN4, n=40), ds.talk("neighbour", NB6, n=40), ds.talk("neighbour", NB4, n=40)] == \
            [40, 40, 40]
        assert len(ban_flows(va)) == 1


def test_a_prefix_ban_and_a_mac_ban_spare_the_neighbours():
    with dual_stack() as (ds, db, ctl):
        va = ds.va
        fid = db[store.FLAGS].insert_one(flag_doc(client_ip=NET2 + "/64")).inserted_id
        assert wait_for(lambda: flows_matching(va, f"ipv6_src={NET2}/64"), 2.0), ban_flows(va)
        assert ds.talk("inside", IN6B, n=5) == 0
        assert [ds.talk("inside", IN6), ds.talk("inside", IN4), ds.talk("neighbour", NB6)] == [10, 10, 10]
        release(db, fid)
        assert wait_for(lambda: not ban_flows(va), 5.0)
        assert ds.talk("inside", IN6B) == 10
        db[store.FLAGS].insert_one(flag_doc(client_mac=ds.mac["inside"]))
        assert wait_for(lambda: len(flows_matching(va, f"dl_src={ds.mac['inside']}", "actions=drop")) == 2, 2.0), \
            ban_flows(va)
        assert [ds.talk("inside", IN4, n=5), ds.talk("inside", IN6, n=5), ds.talk("inside", IN6B, n=5)] == [0, 0, 0]
        # the neighbour shares the /24 and the /64, not the MAC
        assert [ds.talk("neighbour", NB4, n=40), ds.talk("neighbour", NB6, n=40)] == [40, 40]


def test_a_udp_flag_and_a_tcp_flag_on_another_port_drop_exactly_that_traffic():
    with dual_stack(tcp_ports=(5222, 8080), udp_ports=(5353, 5354)) as (ds, db, ctl):
        va = ds.va
        db[store.FLAGS].insert_one(flag_doc(client_ip=IN4, protocol="udp", server_ports=[5353]))
        db[store.FLAGS].insert_one(flag_doc(client_ip=IN6, server_ports=[8080], classifier="bandwidth_hog"))
        assert wait_for(lambda: len(ban_flows(va)) == 2, 2.0), ban_flows(va)
        assert flows_matching(va, "udp", f"nw_src={IN4}", "tp_dst=5353", "actions=drop")
        assert flows_matching(va, "tcp6", f"ipv6_src={IN6}", "tp_dst=8080", "actions=drop")
        assert ds.talk("inside", IN4, 5353, n=5, proto="udp") == 0
        assert ds.talk("inside", IN6, 8080, n=5) == 0
        assert ds.talk("inside", IN4, 5354, n=10, proto="udp") == 10        # the next UDP port
        assert ds.talk("inside", IN6, 5353, n=10, proto="udp") == 10        # the other family
        assert [ds.talk("inside", IN4, 5222), ds.talk("inside", IN6, 5222), ds.talk("neighbour", NB6, 8080)] == \
            [10, 10, 10]


def test_exempt_and_never_ban_flags_install_no_flow():
    with dual_stack(enforce={"never_ban": [IN4]}) as (ds, db, ctl):
        va = ds.va
        db[store.NEVER_BAN].insert_one(neverban.entry_doc(NET1 + "/64", "the lab's servers",
                                                          dt.datetime.now(dt.timezone.utc)))
        time.sleep(2 * va.config.enforce.poll_interval + 0.5)
        db[store.FLAGS].insert_one(flag_doc(client_ip=IN6B, exempt_reason="by hand"))      # status exempt
        db[store.FLAGS].insert_one(flag_doc(client_ip=IN4))                               # config entry
        db[store.FLAGS].insert_one(flag_doc(client_ip=IN6))                               # stored entry
        db[store.FLAGS].insert_one(flag_doc(client_ip=NB6, client_port=40000))            # inside it
        ctl.wait_log("on the never-ban list", count=3)
        db[store.FLAGS].insert_one(flag_doc(client_ip=NB4))        # a control: the flags above were all seen
        assert wait_for(lambda: flows_matching(va, f"nw_src={NB4}"), 2.0)
        assert len(ban_flows(va)) == 1, ban_flows(va)
        assert [ds.talk("inside", IN4), ds.talk("inside", IN6), ds.talk("inside", IN6B)] == [10, 10, 10]
        assert ctl.log.count("on the never-ban list") == 3


def test_flags_ban_then_release_blocks_then_restores_at_the_switch():
    with dual_stack() as (ds, db, ctl):
        va = ds.va
        for subject, src in ((IN6, IN6), (IN4, IN4)):
            t0 = time.monotonic()
            r = pisnoop("--config", str(va.config_path), "flags", "ban", subject, "--for", "5m")
            assert r.returncode == 0, r.stderr
            needle = f"ipv6_src={subject}" if ":" in subject else f"nw_src={subject}"
            assert wait_for(lambda: flows_matching(va, needle, "actions=drop"), 2.0), ban_flows(va)
            hard = int(flows_matching(va, needle)[0].split("hard_timeout=")[1].split(",")[0])
            assert 295 <= hard <= 300 and time.monotonic() - t0 < 5
            assert ds.talk("inside", src, n=5) == 0
            assert ds.talk("neighbour", NB6 if ":" in subject else NB4) == 10
            r = pisnoop("--config", str(va.config_path), "flags", "release", subject)
            assert r.returncode == 0, r.stderr
            assert wait_for(lambda: not ban_flows(va), 5.0), ban_flows(va)
            assert ds.talk("inside", src) == 10
