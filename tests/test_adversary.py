"""The appliance against a real adversary on the virtual appliance: real traffic through OVS, TLS, both families.

Each attack of ``lab/scenario.py`` runs end to end (controller, snooper and
analyser as services, Prosody, slixmpp clients, raw-socket generators), with
the default thresholds. Every test prints what the lead needs (``pytest -s``):
the detection-to-block latency per target, from the captured frame that
crossed the threshold to the install of the flow that enforces the flag.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import sys
import time

import pytest

from appliance import config, flagdoc, store
from lab import scenario, tlscert, xmpplab
from lab.virtual import VirtualAppliance
from tests.conftest import assert_gone, pisnoop
from tests.netutil import Listener


def run_attack(tmp_path, attack: str, **kw) -> tuple[scenario.Result, VirtualAppliance]:
    opts = scenario.Options(attack=attack, benign=3, warmup=4, after_block=4, timeout=60, spoof_seconds=12,
                            out_dir=tmp_path / "out", **kw)
    return scenario.run(opts)


def report_latencies(result: scenario.Result) -> None:
    for label, tr in result.targets.items():
        lat = "not blocked" if tr.latency is None else f"{tr.latency:.3f} s"
        print(f"\n[latency] {result.attack}: {label} {tr.target.value}: threshold-crossing frame -> enforcing flow "
              f"{lat}; scenario saw the flag {_since(result, tr.flagged_at)} and the block "
              f"{_since(result, tr.blocked_at)} after the attack began")


def _since(result, t) -> str:
    return "never" if t is None else f"{t - result.timeline['flood_start']:.2f} s"


def assert_benign_unharmed(result: scenario.Result) -> None:
    assert not result.banned_protected, [(f.get("client_ip") or f.get("client_mac"), f.get("reason"))
                                         for f in result.banned_protected]
    for jid in result.benign_jids:
        assert result.sent[jid] > 0 and result.received.get(jid) == result.sent[jid], (jid, result.sent,
                                                                                       result.received)
        assert result.client_reports[jid.split("@")[0]]["encrypted"], jid
    assert result.unaccounted == 0, result.snooper


def assert_attack_stopped(result: scenario.Result, keeps_sending: bool = True) -> None:
    """Blocked, the drop flow hit, nothing delivered after the block; ``keeps_sending``: and the attacker went on
    (a client that logs in again per session cannot: once its TCP is dropped it sends nothing more)."""
    assert result.blocked, (result.errors, {k: (t.flag or {}).get("reason") for k, t in result.targets.items()})
    for tr in result.targets.values():
        assert tr.drop_packets > 0, tr.target
    for jid, at_block in result.received_at_block.items():
        assert result.received.get(jid, 0) == at_block, f"{jid}'s messages reached the server after the block"
        if keeps_sending:
            assert result.sent[jid] > at_block


def test_ipv6_flooder_dropped_within_2s_while_ipv4_and_ipv6_clients_chat(tmp_path):
    result, va = run_attack(tmp_path, "ipv6")
    try:
        report_latencies(result)
        assert_attack_stopped(result)
        tr = result.targets["IPv6 flooder"]
        assert tr.flag["client_ip"] == tr.target.value and ":" in tr.target.value
        assert tr.latency is not None and tr.latency <= 2.0, tr.latency
        assert_benign_unharmed(result)
        families = {":" in c.source for c in scenario.plan("ipv6", va, scenario.Options()).benign}
        assert families == {True, False}, "an IPv4 and an IPv6 benign client"
        # the mirror copied both families: the store holds frames of each
        assert result.frames_by_family[4] > 0 and result.frames_by_family[6] > 0, result.frames_by_family
    finally:
        assert not va.down()


def test_rotating_privacy_addresses_caught_as_the_host_on_the_lan_and_as_the_prefix_behind_the_router(tmp_path):
    result, va = run_attack(tmp_path, "rotate")
    try:
        report_latencies(result)
        for name, rep in result.generators.items():
            assert len(rep["addresses"]) >= 1 and rep["connections"] >= 1, (name, rep)
        assert_attack_stopped(result)
        host, prefix = result.targets["rotating host"], result.targets["rotating prefix"]
        assert host.flag["client_mac"] == va.mac("neighbour")
        assert prefix.flag["client_ip"] == str(va.prefix6(1))
        # every address stayed under the per-address line: no single address was what got banned
        per_address = [f for f in result.flags if f.get("client_ip") and "/" not in f["client_ip"]
                       and f.get("status") != "exempt"]
        assert not per_address, per_address
        # the benign host in the same LAN /64 (another MAC) and the client of the router's other prefix chat on
        assert_benign_unharmed(result)
        assert any(c.host == "client2" for c in scenario.plan("rotate", va, scenario.Options()).benign)
    finally:
        assert not va.down()


def test_a_spoofed_syn_flood_and_spoofed_segments_never_get_the_victim_banned(tmp_path):
    result, va = run_attack(tmp_path, "spoof")
    try:
        sent = result.generators["spoofer"]["sent"]
        print(f"\n[spoof] spoofed SYNs {sent['syn']}, data segments {sent['data']} in the names of {result.victims}; "
              f"flags: {[(f.get('client_ip') or f.get('client_mac'), f['status']) for f in result.flags]}")
        assert sent["syn"] > 1000 and sent["data"] > 200, sent
        assert_benign_unharmed(result)       # the victim's addresses are among the protected ones
        report = (tmp_path / "out" / "report.txt").read_text()
        unverified = [line for line in report.splitlines() if "unverified" in line.lower()]
        assert any(v in line for v in result.victims for line in unverified), report[-2000:]
        assert any(w in report.lower() for w in ("defence", "defense")), "the report names the flood defence"
    finally:
        assert not va.down()


def test_reconnect_spam_is_caught_with_the_default_thresholds(tmp_path):
    result, va = run_attack(tmp_path, "reconnect")
    try:
        report_latencies(result)
        defaults = config.Config().xmpp
        assert (va.config.xmpp.threshold_ppm, va.config.xmpp.per_ip_threshold_ppm) == \
            (defaults.threshold_ppm, defaults.per_ip_threshold_ppm)
        assert_attack_stopped(result, keeps_sending=False)
        flag = result.targets["reconnecting client"].flag
        assert flag["client_ip"] == scenario.RECONNECT_IP and flag["client_port"] is None, flag
        assert result.client_reports["mallory"]["sessions"] >= 5, result.client_reports["mallory"]
        db = store.database(va.config.mongodb)
        try:
            flows = list(db[store.FLOWS].find({"client_ip": scenario.RECONNECT_IP}))
        finally:
            db.client.close()
        assert len(flows) >= 5 and all(f["packets"]["c2s"] <= defaults.threshold_ppm for f in flows), \
            [f["packets"] for f in flows]
        assert_benign_unharmed(result)
    finally:
        assert not va.down()


# --- verdicts on the switch: any protocol and port, never-ban, the flags commands ---------------------------

EXEMPT_IP = "10.0.0.30"


@pytest.fixture(scope="module")
def stage():
    """One appliance with services, Prosody and a sink for the flag tests; ``EXEMPT_IP`` on the never-ban list."""
    va = VirtualAppliance(scenario.service_config(settings={"enforce": {"never_ban": [EXEMPT_IP]}}))
    va.up()
    st = None
    try:
        st = scenario.Stage(va, ["benign", "exempt"], duration=300).start()
        yield st
    finally:
        if st is not None:
            st.close()
        va.down()
    assert_gone(va)


def cli(st, *args: str):
    return pisnoop("--config", str(st.va.config_path), *args)


def wait_for(pred, timeout: float = 10.0, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(step)
    return pred()


def insert_flag(st, **fields) -> None:
    """A classifier's flag, built and stored exactly as the analyser stores one."""
    now = dt.datetime.now(dt.timezone.utc)
    doc = flagdoc.build(reason="test verdict", action="drop", evidence={"count": 1}, offence=1, ban_seconds=60,
                        flagged_at=now, sensor=st.va.config.snooper.sensor, **fields)
    st.db[store.FLAGS].insert_one(doc)


SEND = r"""
import socket, sys, time
proto, src, dst, port, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
for i in range(n):
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, 0)); s.sendto(b"x" * 32, (dst, port))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.setblocking(False); s.bind((src, 0))
        try:
            s.connect((dst, port))
        except BlockingIOError:
            pass
    time.sleep(0.01)
    s.close()
"""


def delivered(st, proto: str, port: int, n: int = 40) -> int:
    """Send ``n`` UDP datagrams (or TCP SYNs) inside -> upstream:port; how many reached the upstream host."""
    va = st.va
    lis = Listener(va.hosts["upstream"].netns, "eth0")
    try:
        va.exec("inside", [sys.executable, "-c", SEND, proto, va.hosts["inside"].ip, va.hosts["upstream"].ip,
                           str(port), str(n)])
        frames = lis.drain(quiet=0.5)
    finally:
        lis.close()
    p = 17 if proto == "udp" else 6
    return sum(1 for f in frames if len(f) >= 38 and f[12:14] == b"\x08\x00" and f[23] == p
               and int.from_bytes(f[36:38], "big") == port)


@pytest.mark.parametrize("classifier,protocol,port", [("bandwidth_hog", "udp", 9999), ("payload_match", "tcp", 8080)])
def test_a_classifier_flag_on_udp_or_another_tcp_port_drops_that_traffic_at_the_switch(stage, classifier, protocol,
                                                                                        port):
    ip = stage.va.hosts["inside"].ip
    assert delivered(stage, protocol, port) == 40, "before the flag everything passes"
    t0 = time.monotonic()
    insert_flag(stage, client_ip=ip, protocol=protocol, server_ports=[port], classifier=classifier)
    flows = wait_for(lambda: [f for f in scenario.ban_flows(stage.va, ip) if f"tp_dst={port}" in f
                              or f"{protocol}_dst={port}" in f])
    print(f"\n[latency] {classifier} {protocol}/{port} flag -> flow on the switch {time.monotonic() - t0:.2f} s")
    assert flows, stage.va.ofctl("dump-flows")
    assert delivered(stage, protocol, port) == 0, "after the flag nothing of it passes"
    assert scenario.drop_packets(stage.va, ip) >= 40
    st = stage.db[store.FLAGS]
    st.update_many({"client_ip": ip, "status": "flagged"}, {"$set": {"status": "released"}})
    assert wait_for(lambda: not scenario.ban_flows(stage.va, ip)), "a released flag's flow goes"


def test_a_flag_against_a_never_ban_address_installs_no_flow_and_flags_ban_records_it_exempt(stage):
    """A real flood from a never-ban address: no flow on the switch, its messages flow; ``flags ban`` refuses it
    in one line and records the flag as exempt."""
    st, va = stage, stage.va
    up = va.hosts["upstream"]
    st.client(scenario.Client("exempt", "inside", EXEMPT_IP, up.ip, per_second=20.0), wait=True)
    assert wait_for(lambda: st.db[store.FLAGS].find_one({"client_ip": EXEMPT_IP}), timeout=30, step=0.5)
    res = cli(st, "flags", "ban", EXEMPT_IP)
    assert res.returncode == 2 and "never-ban" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    listed = [json.loads(line) for line in cli(st, "flags", "list", "--all", "--json").stdout.splitlines()]
    manual = [d for d in listed if d.get("client_ip") == EXEMPT_IP and d.get("origin") == flagdoc.MANUAL]
    assert [d["status"] for d in manual] == [flagdoc.EXEMPT] and EXEMPT_IP in manual[0]["exempt_reason"], manual
    time.sleep(1.5)      # several controller polls: a flow would be there by now
    assert scenario.ban_flows(va, EXEMPT_IP) == [], "a flag against a never-ban address installs no flow"
    before = st.received().get(st.jid("exempt"), 0)
    time.sleep(2.5)
    assert st.received().get(st.jid("exempt"), 0) > before + 20, "its messages keep reaching the server"


def test_the_analyser_records_its_flag_against_a_never_ban_address_as_exempt(stage):
    """Runs after the flood above: every analyser flag for the never-ban address is exempt."""
    flags = wait_for(lambda: list(stage.db[store.FLAGS].find({"client_ip": EXEMPT_IP, "origin": {"$ne": "manual"}})))
    assert flags and all(f["status"] == flagdoc.EXEMPT and EXEMPT_IP in f["exempt_reason"] for f in flags), flags


def test_flags_ban_then_release_blocks_then_restores_a_client_at_the_switch(stage):
    st, va = stage, stage.va
    up = va.hosts["upstream"]
    ip = va.addr6(0, 0x31)
    st.client(scenario.Client("benign", "inside", ip, up.ip6, per_second=2.0), wait=True)
    jid = st.jid("benign")
    assert wait_for(lambda: st.received().get(jid, 0) >= 2, timeout=10)
    t0 = time.monotonic()
    res = cli(st, "flags", "ban", ip, "--reason", "test")
    assert res.returncode == 0, res.stderr
    assert wait_for(lambda: scenario.drop_packets(va, ip) > 0, timeout=10), va.ofctl("dump-flows")
    print(f"\n[latency] flags ban -> first packet dropped at the switch {time.monotonic() - t0:.2f} s")
    time.sleep(2.5)                    # what was past the switch has arrived
    at_ban = st.received().get(jid, 0)
    time.sleep(3)
    assert st.received().get(jid, 0) == at_ban, "nothing of a banned client reaches the server"
    res = cli(st, "flags", "release", ip)
    assert res.returncode == 0, res.stderr
    assert wait_for(lambda: not scenario.ban_flows(va, ip), timeout=10), "release removes the flow"
    # TCP retransmits what the switch dropped: the stream comes back and new messages arrive
    assert wait_for(lambda: st.received().get(jid, 0) > at_ban + 2, timeout=30, step=0.5), st.received()


def test_the_lab_clients_trust_exactly_one_certificate_and_no_ca_store(tmp_path):
    made = tlscert.make(tmp_path, xmpplab.DOMAIN)
    ctx = tlscert.client_context(made.cert)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", xmpplab.DOMAIN),),)]
