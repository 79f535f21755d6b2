"""The virtual appliance against the real OVS userspace datapath and the embedded store."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading

import pytest
from bson import Binary

from lab.virtual import ADDRESSES, MIRROR_IF, VirtualAppliance
from tests.conftest import REPO, assert_gone, pisnoop
from tests.netutil import Listener, icmp6_echo, icmp_echo

UP = ADDRESSES["upstream"]


def test_bridge_is_secure_with_ports_1_2_3(va):
    assert va.vsctl("get-fail-mode", va.bridge).strip() == "secure"
    assert va.vsctl("get", "bridge", va.bridge, "datapath_type").strip() == "netdev"
    assert "OpenFlow13" in va.vsctl("get", "bridge", va.bridge, "protocols")
    ports = {int(va.vsctl("get", "interface", f"{va.prefix}-p{n}", "ofport")) for n in (1, 2, 3)}
    assert ports == {1, 2, 3}
    assert va.vsctl("get-controller", va.bridge).strip() == "tcp:127.0.0.1:6653"
    assert va.vsctl("get", "controller", va.bridge, "max_backoff").strip() == "1000"
    dpid = va.vsctl("get", "bridge", va.bridge, "datapath_id").strip().strip('"')
    assert int(dpid, 16) == va.config.switch.datapath_id
    # the mirror host has a link-local address and nothing else
    addrs = va.exec("mirror", ["ip", "-4", "-o", "addr", "show", "dev", MIRROR_IF]).stdout
    assert "169.254." in addrs and "10.0.0" not in addrs


def test_no_controller_no_forwarding_then_flows_forward_and_mirror(va):
    assert not va.ping("inside", UP, count=2), "secure fail mode must not forward without flows"
    # requests queued behind the unresolved ARP entry would be sent later: drop them
    va.exec("inside", ["ip", "neigh", "flush", "all"])
    va.ofctl("add-flow", "in_port=1,actions=output:2,output:3")
    va.ofctl("add-flow", "in_port=3,actions=output:2,output:1")
    mirror = Listener(va.hosts["mirror"].netns, MIRROR_IF)
    try:
        assert va.ping("inside", UP, count=5)
        frames = mirror.drain()
    finally:
        mirror.close()
    assert len(icmp_echo(frames, 8)) == 5, "every echo request is copied to the mirror"
    assert len(icmp_echo(frames, 0)) == 5, "every echo reply is copied to the mirror"


def test_dual_stack_hosts_and_a_mirror_that_sends_nothing(va):
    """Inside and upstream talk IPv4 and IPv6 (a per-run ULA /64); the mirror gets copies of both families
    and, over seconds of that traffic, not one frame leaves its interface (no RS, DAD, MLD, ARP)."""
    assert va.ula.subnet_of(ipaddress.IPv6Network("fd00::/8")) and va.ula.prefixlen == 48
    inside, up, mirror = va.hosts["inside"], va.hosts["upstream"], va.hosts["mirror"]
    for h in (inside, up):
        assert ipaddress.IPv6Address(h.ip6) in va.lan6
        assert f"{h.ip6}/64" in va.exec(h.role, ["ip", "-6", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert va.exec("mirror", ["ip", "-6", "-o", "addr", "show"]).stdout.strip() == "", "no IPv6 address at all"
    va.ofctl("add-flow", "in_port=1,actions=output:2,output:3")
    va.ofctl("add-flow", "in_port=3,actions=output:2,output:1")
    copies = Listener(mirror.netns, MIRROR_IF)
    sent_by_mirror = Listener(mirror.netns, MIRROR_IF, outgoing=True)
    into_switch = Listener(va.sw_ns, f"{va.prefix}-p{mirror.ofport}")      # the switch's end of the mirror wire
    try:
        # the mirror's link comes up, the hosts resolve neighbours both ways: the moments a host would speak
        va.exec("mirror", ["ip", "link", "set", MIRROR_IF, "down"])
        va.exec("mirror", ["ip", "link", "set", MIRROR_IF, "up"])
        pings = [threading.Thread(target=va.ping, args=(src, dst, 10)) for src, dst in
                 (("inside", up.ip), ("inside", up.ip6), ("upstream", inside.ip6))]
        for t in pings:
            t.start()
        for t in pings:
            t.join()
        frames = copies.drain(quiet=1.0)
        sent = sent_by_mirror.drain(quiet=1.0) + into_switch.drain(quiet=0.2)
    finally:
        for lis in (copies, sent_by_mirror, into_switch):
            lis.close()
    assert len(icmp_echo(frames, 8)) == 10 and len(icmp_echo(frames, 0)) == 10
    assert len(icmp6_echo(frames, 128)) == 20 and len(icmp6_echo(frames, 129)) == 20
    assert sent == [], f"the mirror host sent {len(sent)} frames: {[f[:20].hex() for f in sent[:5]]}"


def test_store_round_trip(store_db):
    store_db.t.insert_one({"_id": "x", "blob": Binary(b"\x00\x01frame")})
    assert bytes(store_db.t.find_one({"_id": "x"})["blob"]) == b"\x00\x01frame"


def test_teardown_after_a_failing_body():
    appliance = VirtualAppliance()
    with pytest.raises(RuntimeError, match="boom"):
        with appliance:
            assert appliance.run_dir.exists()
            raise RuntimeError("boom")
    assert_gone(appliance)


def test_two_appliances_at_once_do_not_clash():
    a, b = VirtualAppliance(), VirtualAppliance()
    with a, b:
        for v in (a, b):
            v.ofctl("add-flow", "in_port=1,actions=output:3")
            v.ofctl("add-flow", "in_port=3,actions=output:1")
        assert a.ping("inside", UP, count=2) and b.ping("inside", UP, count=2)
        assert a.store.uri != b.store.uri
        assert "in_port=1" in a.ofctl("dump-flows")
        b.ofctl("del-flows")
        assert "in_port=1" in a.ofctl("dump-flows"), "flows of one run are not touched by the other"
    assert_gone(a)
    assert_gone(b)


def test_sigterm_tears_down(tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\n"
        "from lab.virtual import VirtualAppliance\n"
        "va = VirtualAppliance()\n"
        "with va:\n"
        "    print(va.prefix, va.run_dir, flush=True)\n"
        "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        prefix, run_dir = proc.stdout.readline().split()
        assert os.path.isdir(run_dir)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not os.path.exists(run_dir)
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(prefix)]


def test_cli_up_status_down():
    res = pisnoop("virtual", "up", "--json")
    assert res.returncode == 0, res.stderr
    import json
    st = json.loads(res.stdout)
    prefix = st["prefix"]
    try:
        assert st["bridge"]["fail_mode"] == "secure"
        assert all(d["alive"] for d in st["daemons"].values())
        res = pisnoop("virtual", "status", prefix)
        assert prefix in res.stdout and "secure" in res.stdout
        assert pisnoop("check-config", st["config"]).returncode == 0
    finally:
        res = pisnoop("virtual", "down", prefix)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(st["run_dir"])
    assert pisnoop("virtual", "down", prefix).returncode == 2


def test_teardown_ends_a_store_restarted_behind_its_back():
    appliance = VirtualAppliance()
    with appliance:
        old = appliance.store.pid
        appliance.store.stop()
        appliance.store.start()  # a new PID that state.json does not know
        assert appliance.store.pid != old
        restarted = appliance.store.pid
    assert_gone(appliance)
    assert not os.path.exists(f"/proc/{restarted}") or \
        open(f"/proc/{restarted}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_free_ports_are_below_the_ephemeral_range_never_twice_and_never_one_held():
    """The controller lost its listen port to another process's outgoing connection in CI: a lab port
    is drawn below ``ip_local_port_range`` (where connect() never takes one), once per process."""
    import random
    import socket

    from lab import procs
    floor = procs._ephemeral_floor()
    assert floor == int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [procs.free_port() for _ in range(300)]
    assert len(set(ports)) == 300
    assert all(procs.FREE_PORT_FLOOR <= p < floor for p in ports)
    first = random.Random(7).randrange(procs.FREE_PORT_FLOOR, floor)
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        got = procs.free_port(rng=random.Random(7))
    assert got != first and procs.FREE_PORT_FLOOR <= got < floor
    procs._handed_out.discard(first)
    assert procs.free_port(rng=random.Random(7)) == first, "a port nobody holds is handed out"
