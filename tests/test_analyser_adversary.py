"""The analyser against an attacker, pcap-replay style: spoofed sources, forged handshakes, rotated addresses,
routers, never-ban entries and policies that could not be enforced (frames from tests/analyser_frames.py)."""

from __future__ import annotations

import logging

import pytest
import yaml

from analyser import policy as policy_mod
from analyser import report
from analyser.offline import Offline
from appliance import config, pcapfile
from tests.analyser_frames import (
    ATTACKER_MAC,
    CLIENT_MAC,
    T0,
    Conn,
    S,
    Spoofer,
    frame,
    icmp_unreachable,
    server_for,
    steady,
)
from tests.conftest import pisnoop

VICTIM, FLOODER = "10.0.0.20", "10.0.0.30"
LAN6 = "2001:db8:1::"
HOST_MAC, BENIGN_MAC, ROUTER_MAC = "02:00:00:00:00:aa", "02:00:00:00:00:bb", "02:00:00:00:00:ee"


def analyse(frames, policy=None, **sections) -> Offline:
    data = {"enforce": {"never_ban_self": False}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    off = Offline(config.from_dict(data), policy or policy_mod.load(None))
    frames = sorted(frames, key=lambda f: f[0])
    for i in range(0, len(frames), 1000):
        off.run([(f"b{i // 1000}", 0, frames[i:i + 1000])])
    return off


def flags(off) -> list[tuple]:
    return [(f["client_ip"], f["client_mac"], f["client_port"], f["status"]) for f in off.book.backend.all()]


def chat(client, port, start=T0, seconds=120, mac=CLIENT_MAC, ttl=64, per_minute=30):
    """A benign client: 30 messages a minute, each answered by the server."""
    return steady(Conn(client, port, mac=mac, ttl=ttl), start, per_minute, seconds, replies=1)


# --- spoofed sources -----------------------------------------------------------------------------------------

def test_a_spoofed_syn_flood_and_made_up_data_segments_never_flag_the_victim():
    spoof = Spoofer(VICTIM)
    victim = chat(VICTIM, 40000)
    syns = spoof.syn_flood(T0 + 5 * S, 3000, per_second=100)          # 3,000 SYNs in 30 s, random ports
    data = spoof.data_flood(T0 + 10 * S, 2000, port=40000, per_second=100)   # on the victim's own connection
    data += spoof.data_flood(T0 + 10 * S, 2000, port=45555, per_second=100)  # and on a port it does not use
    off = analyse(victim + syns + data)
    assert flags(off) == []
    # every spoofed packet toward the server is counted as unverified traffic of the claimed source
    spoofed_c2s = 3000 * 2 + 4000                                    # SYN + the victim's RST, and the data
    assert dict(off.engine.unverified) == {VICTIM: spoofed_c2s}
    victim_c2s = sum(1 for f in victim if f[2][6:12] == bytes.fromhex(CLIENT_MAC.replace(":", "")))
    flow = next(d for d in off.flow_docs.all() if d["client_port"] == 40000)
    assert flow["verified_packets"]["c2s"] == victim_c2s and flow["packets"]["c2s"] - victim_c2s == 2000
    text = report.render_text(off.report("t"))
    assert f"{VICTIM}" in text and "shared XMPP meter" in text and f"{spoofed_c2s} packets" in text


def test_the_same_volume_from_a_real_connection_is_flagged():
    """The control of the test above: verification does not just count nothing."""
    off = analyse(steady(Conn(FLOODER, 40000), T0, 6000, 30))
    assert flags(off) == [(FLOODER, None, 40000, "flagged")]
    ev = off.book.backend.all()[0]["evidence"]
    assert ev["count"] == 101 and ev["scope"] == "connection"


@pytest.mark.parametrize("answer_ns", [400_000, 2_600_000, 300_000_000, 700_000_000])
def test_a_forged_handshake_is_contradicted_by_the_real_ends_and_never_counts(answer_ns):
    """The real server's SYN-ACK comes before the forged one, after the forged ACK, a long round trip later, or
    after the default settling time (xmpp.settle_seconds is then set above the server's round trip)."""
    spoof = Spoofer(VICTIM)
    frames = []
    for k in range(30):                                          # 30 forged connections of 300 packets each
        frames += spoof.forged_connection(T0 + k * S, 50000 + k, 300, gap_ns=1_000_000, answer_ns=answer_ns)
    late = answer_ns > 500_000_000          # a server further away than the default settling time
    off = analyse(frames + chat(VICTIM, 40000), xmpp={"settle_seconds": 1.0} if late else {})
    assert flags(off) == []
    assert off.engine.counters["connections_contradicted"] == 30
    assert off.engine.counters["connections_verified"] == 1          # the victim's own


def test_a_short_connection_closed_by_its_clients_rst_before_it_settled_still_counts():
    """A client that sends and closes with unread data (Linux then sends an RST at its next sequence number)."""
    frames = []
    for k in range(12):
        c = Conn(FLOODER, 41000 + k)
        t = T0 + k * 300_000_000
        frames += c.handshake(t) + [f for j in range(30) for f in c.data(t + 3_000_000 + j * 4_000_000, b" ")]
        frames += c.data(t + 130_000_000, b"<stream/>", to_server=False) + c.rst(t + 140_000_000)
    off = analyse(frames + chat(VICTIM, 40000, seconds=10))          # the chat goes on past the last settling
    assert off.engine.counters["connections_verified"] == 13 and off.engine.counters["connections_contradicted"] == 0
    assert flags(off) == [(FLOODER, None, None, "flagged")]          # 12 x (33 + 10) packets in 3.6 s
    # an RST that is not at the sender's next sequence number is not its own: the connection never counts
    c = Conn(VICTIM, 40000)
    stray = frame(VICTIM, 40000, "10.0.0.1", 5222, 0x04, seq=1001 + 7, mac=CLIENT_MAC)
    off = analyse(c.handshake(T0) + c.data(T0 + 3_000_000) + [(T0 + 4_000_000, len(stray), stray)]
                  + c.data(T0 + S))
    assert off.engine.counters["connections_contradicted"] == 1 and off.engine.counters["verified"] == 0


def test_a_connection_picked_up_mid_stream_is_verified_after_exchanges_both_ways():
    c = Conn(FLOODER, 40000)
    c.handshake(T0 - 60 * S)                                     # before the analyser started: not captured
    frames = []
    t = T0
    for _ in range(400):                                         # 400 stanzas, each answered and acknowledged
        frames += c.data(t) + c.data(t + 1_000_000, b"<r/>", to_server=False) + c.ack(t + 2_000_000, True)
        t += 50_000_000
    off = analyse(frames)
    assert flags(off) == [(FLOODER, None, 40000, "flagged")]
    doc = off.flow_docs.all()[0]
    assert doc["verified_by"] == "exchanges" and doc["direction"] == "unverified"
    # one-way segments (nobody answers them) never verify
    lone = [frame(FLOODER, 40001, "10.0.0.1", 5222, 0x18, b"<m/>", seq=1000 + 4 * k, ack=7) for k in range(500)]
    off = analyse([(T0 + k * 10_000_000, len(d), d) for k, d in enumerate(lone)])
    assert flags(off) == [] and off.engine.unverified[FLOODER] == 500


def test_udp_counts_once_the_server_answered():
    policy = policy_mod.from_dict({"xmpp_abuse": {"enabled": False}, "bandwidth_hog": {
        "enabled": True, "bytes_per_second": 2000, "window_seconds": 5, "protocol": "udp", "server_port": 3478}})
    one_way = [(T0 + k * 10_000_000, 0, frame(VICTIM, 40000, "10.0.0.1", 3478, 0, b"x" * 200, proto="udp"))
               for k in range(400)]
    one_way = [(t, len(d), d) for t, _, d in one_way]
    off = analyse(one_way, policy)
    assert flags(off) == [] and off.engine.unverified[VICTIM] == 400
    answer = frame("10.0.0.1", 3478, VICTIM, 40000, 0, b"ok", proto="udp", mac="02:00:00:00:00:02")
    off = analyse(one_way[:1] + [(T0 + 5_000_000, len(answer), answer)] + one_way[1:], policy)
    docs = off.book.backend.all()
    assert flags(off) == [(VICTIM, None, None, "flagged")]
    assert (docs[0]["protocol"], docs[0]["server_ports"], docs[0]["direction"]) == ("udp", [3478], "outbound")


@pytest.mark.parametrize("victim", [VICTIM, "2001:db8:1::20"])
def test_udp_sent_in_a_victims_name_is_disowned_by_the_victims_icmp_unreachable(victim):
    """The server answers the spoofed packets (to the victim), the victim's host refuses the answers."""
    policy = policy_mod.from_dict({"xmpp_abuse": {"enabled": False}, "bandwidth_hog": {
        "enabled": True, "bytes_per_second": 2000, "window_seconds": 5, "protocol": "udp", "server_port": 3478}})
    server = server_for(victim)

    def run(refuser_mac):
        frames = []
        for k in range(400):
            t = T0 + k * 10_000_000
            spoofed = frame(victim, 40000, server, 3478, 0, b"x" * 200, proto="udp", mac=ATTACKER_MAC)
            answer = frame(server, 3478, victim, 40000, 0, b"ok", proto="udp", mac="02:00:00:00:00:02")
            frames += [(t, len(spoofed), spoofed), (t + 1_000_000, len(answer), answer)]
            if k == 0:
                frames.append(icmp_unreachable(answer, refuser_mac, t + 2_000_000))
        return analyse(frames, policy)
    off = run(CLIENT_MAC)                     # the real host behind the address says: not mine
    assert flags(off) == [] and off.engine.counters["udp_disowned"] == 1
    off = run(ATTACKER_MAC)                   # the sender "refusing" its own answers disowns nothing
    assert flags(off) == [(victim, None, None, "flagged")] and off.engine.counters["udp_disowned"] == 0


# --- aggregation -----------------------------------------------------------------------------------------

def rotating(prefix, mac, count=40, ttl=64, start=T0, per_conn=90, spacing_ns=3 * S):
    """A client using a new address of ``prefix`` for each connection, each one under every per-address line."""
    out = []
    for i in range(count):
        c = Conn(f"{prefix}{0x1000 + i:x}", 41000 + i, mac=mac, ttl=ttl)
        out += steady(c, start + i * spacing_ns, 60 * per_conn / 1.8, 1.8)
    return out


def test_a_host_rotating_privacy_addresses_is_flagged_as_its_mac_and_its_neighbour_is_not():
    frames = rotating(LAN6, HOST_MAC) + chat(f"{LAN6}b", 40000, mac=BENIGN_MAC, seconds=150)
    off = analyse(frames)
    docs = off.book.backend.all()
    assert flags(off) == [(None, HOST_MAC, None, "flagged")]
    ev = docs[0]["evidence"]
    assert ev["scope"] == "host" and ev["threshold"] == 600 and docs[0]["server_ports"] == [5222]
    assert "ip" not in docs[0]["reason"] or HOST_MAC in docs[0]["reason"]
    # no address of it crossed the per-address line, and the LAN's /64 is shared: never a subject
    assert off.engine.neighbours.describe()["shared_prefixes"] == ["2001:db8:1::/64"]


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_released_rotating_host_is_counted_from_its_release_on_and_flagged_again_as_its_mac(engine):
    """The host's flag is released at T0 + 60 s of capture while the analyser has read only to T0 + 30 s: what
    it sent before the release (every address of it) is forgiven, also in the windows a new address's host
    window is seeded from; rotating on after the release, it is flagged again once its packets since the
    release cross the host line. The neighbour on the same LAN is never flagged."""
    from appliance import timespec
    frames = sorted(rotating(LAN6, HOST_MAC) + chat(f"{LAN6}b", 40000, mac=BENIGN_MAC, seconds=150),
                    key=lambda f: f[0])
    off = Offline(config.from_dict({"enforce": {"never_ban_self": False}, "analyser": {"engine": engine}}),
                  policy_mod.load(None))
    released = T0 + 60 * S
    head = [f for f in frames if f[0] < T0 + 30 * S]
    off.run([("b0", 0, head)])
    assert flags(off) == [(None, HOST_MAC, None, "flagged")]
    assert off.book.backend.release_where({"client_mac": HOST_MAC}, timespec.utc(released))
    off.book.refresh()
    rest = frames[len(head):]
    for i in range(0, len(rest), 500):
        off.run([(f"b{i + 1}", 0, rest[i:i + 500])])
    assert flags(off) == [(None, HOST_MAC, None, "released"), (None, HOST_MAC, None, "flagged")]
    ev = off.book.backend.all()[1]["evidence"]
    mine = [f[0] for f in rest if f[0] >= released and f[2][6:12] == bytes.fromhex("0200000000aa")
            and f[2][54 + 2:54 + 4] == (5222).to_bytes(2, "big")]
    assert ev["first_packet_ns"] == mine[0] and ev["count"] == 601, ev
    host = bytes.fromhex("0200000000aa")          # its flows' packets both ways (its SYN-ACKs too)
    forgiven = [f for f in rest if f[0] < released and host in (f[2][0:6], f[2][6:12])]
    assert off.engine.counters["forgiven"] == len(forgiven) > 0


def test_behind_a_router_the_rotating_prefix_is_flagged_and_the_other_prefix_and_the_router_are_not():
    frames = rotating("2001:db8:a::", ROUTER_MAC, ttl=63) + chat("2001:db8:b::1", 40000, mac=ROUTER_MAC, ttl=63,
                                                                  seconds=150)
    off = analyse(frames, xmpp={"per_prefix_threshold_ppm": 1200})
    assert flags(off) == [("2001:db8:a::/64", None, None, "flagged")]
    assert off.book.backend.all()[0]["evidence"]["scope"] == "prefix"
    assert off.engine.neighbours.describe()["routers"] == [ROUTER_MAC]


def test_the_same_rotation_through_a_router_with_one_prefix_never_bans_the_router_mac():
    off = analyse(rotating("2001:db8:a::", ROUTER_MAC, ttl=63))
    assert flags(off) == [("2001:db8:a::/64", None, None, "flagged")]


def test_reconnect_spam_is_caught_with_the_default_thresholds():
    from tests.test_analyser import short_connections
    spam = short_connections(FLOODER, 20, 41000, T0, 2 * S)     # 20 connections of 10 packets in 40 s
    calm = short_connections(VICTIM, 5, 42000, T0, 10 * S)
    off = analyse(spam + calm)
    docs = off.book.backend.all()
    assert flags(off) == [(FLOODER, None, None, "flagged")]
    assert docs[0]["evidence"]["threshold"] == 300 and "a new connection counts 11" in docs[0]["reason"]


# --- never-ban ---------------------------------------------------------------------------------------------

def test_a_never_ban_address_is_recorded_exempt_once_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, "pisnoop.analyser.flags")
    off = analyse(steady(Conn(FLOODER, 40000), T0, 6000, 30), enforce={"never_ban": ["10.0.0.0/24"]})
    assert flags(off) == [(FLOODER, None, 40000, "exempt")]
    doc = off.book.backend.all()[0]
    assert doc["exempt_reason"] == "10.0.0.0/24 (enforce.never_ban)"
    assert off.engine.counters["flags_exempt"] == 1 and off.engine.counters["flags"] == 0
    assert sum("never-ban" in r.message for r in caplog.records) == 1
    assert "Exempt: flagged but never banned, on the never-ban list (1)" in report.render_text(off.report("t"))


def test_the_xmpp_server_seen_answering_is_exempt_but_an_address_seen_as_a_client_is_not():
    server = "10.0.0.5"
    honest = Conn(VICTIM, 40010, server=server)
    answered = honest.handshake(T0) + honest.data(T0 + S, b"<r/>", to_server=False) + chat(VICTIM, 40000)
    hog = policy_mod.from_dict({"bandwidth_hog": {"enabled": True, "bytes_per_second": 2000, "window_seconds": 5,
                                                  "server_port": 443}})
    # the server itself downloads on 443: a bandwidth_hog verdict against it is recorded exempt
    download = Conn(server, 40030, server="10.0.0.9", sport=443)
    frames = download.handshake(T0 + 2 * S)
    for k in range(100):
        frames += download.data(T0 + 3 * S + k * 20_000_000, b"d" * 1000, to_server=False)
    off = analyse(answered + frames, hog)
    assert off.book.servers.addresses() == ["10.0.0.1", server]
    assert flags(off) == [(server, None, None, "exempt")]
    assert off.book.backend.all()[0]["exempt_reason"] == f"{server} (an XMPP server seen answering)"
    # an attacker answering forged SYNs in its own name looks like a server until it talks to the real one
    flood = steady(Conn(server, 40020, server="10.0.0.1", mac=ATTACKER_MAC), T0 + 2 * S, 6000, 20)
    off = analyse(answered + flood)
    assert flags(off) == [(server, None, 40020, "flagged")]
    assert server not in off.book.servers.addresses()


# --- every verdict enforceable --------------------------------------------------------------------------------

@pytest.mark.parametrize("policy,key,name", [
    ({"payload_match": [{"name": "pings", "pattern": "x", "protocol": "icmp"}]}, "payload_match[0].protocol", "pings"),
    ({"bandwidth_hog": {"enabled": True, "scope": "host"}}, "bandwidth_hog.scope", "bandwidth_hog"),
    ({"bandwidth_hog": {"enabled": True, "flag_direction": "both"}}, "bandwidth_hog.flag_direction",
     "bandwidth_hog"),
])
def test_a_policy_that_could_not_be_enforced_is_refused_at_load(tmp_path, policy, key, name):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"analyser": {"policy_file": str(path)}, "mongodb": {"uri": "mongodb://127.0.0.1:9"}}))
    for cmd in (["analyse", "--pcap", "/dev/null", "--policy", str(path)], ["--config", str(cfg), "analyser"]):
        r = pisnoop(*cmd)
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and key in line and f"classifier {name}" in line, line


def test_a_custom_classifier_that_would_flag_icmp_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "pings.py").write_text("class Pings:\n    protocol = 'icmp'\n    def classify(self, ctx):\n"
                                             "        return 'ping'\n")
    (tmp_path / "p.yaml").write_text("custom_dir: c\n")
    r = pisnoop("analyse", "--pcap", "/dev/null", "--policy", str(tmp_path / "p.yaml"))
    assert r.returncode == 2 and "classifier Pings" in r.stderr and "protocol" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_ipv6_flooder_through_analyse_pcap(tmp_path):
    frames = sorted(steady(Conn("2001:db8:1::10", 40000), T0, 600, 60)
                    + chat("2001:db8:1::11", 40001, mac=BENIGN_MAC, seconds=60) + chat("10.0.0.11", 40002))
    cap = tmp_path / "v6.pcap"
    with open(cap, "wb") as fh:
        w = pcapfile.Writer(fh, nano=True)
        for f in frames:
            w.write(*f)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("enforce: {never_ban_self: false}\n")
    r = pisnoop("--config", str(cfg), "analyse", "--pcap", str(cap))
    assert r.returncode == 0, r.stderr
    assert "[2001:db8:1::10]:40000" in r.stdout and "IPv6 2 flows" in r.stdout and "IPv4 1 flows" in r.stdout
    assert "Flagged clients (1)" in r.stdout and "connection" in r.stdout


def test_a_flow_document_written_before_verification_is_picked_up_mid_stream():
    from analyser.flows import NONE, Flow, FlowTable, MemoryFlows
    from analyser.parse import parse
    c = Conn(FLOODER, 40000)
    frames = c.handshake(T0) + c.data(T0 + S)
    table = FlowTable(MemoryFlows(), "s")
    for f in frames:
        table.update(parse(*f), "b1")
    doc = next(iter(table.flows.values())).document("s", 1)
    for key in ("tcp", "verified_packets", "verified_by", "client_mac", "client_ttl", "family"):
        doc.pop(key)
    old = Flow.from_document(doc, 1)
    assert (old.tcp, old.counted, old.mac) == (NONE, [0, 0], b"")
    assert old.pkts == [3, 1] and old.client == FLOODER
