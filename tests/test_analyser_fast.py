"""The fast engine (analyser/fast.py) against the reference engine (analyser/engine.py) on the same frames:
the same flow records, flags, counters, unverified sources, neighbours and report series, exactly.

The captures are random mixes of what the analyser meets (both families, handshakes seen and not, spoofed
SYNs, RSTs in and out of sequence, out-of-window segments, FINs, UDP answered or not, ICMP unreachables,
VLAN tags, cut and garbage frames, clients crossing thresholds, hosts rotating addresses, routers), cut
into random batches and steps, plus the adversary tests' own scenarios.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from analyser import flags as flags_mod
from analyser import policy as policy_mod
from analyser import report
from analyser.engine import Engine
from analyser.fast import FastEngine
from analyser.flows import FlowTable, MemoryFlows
from analyser.offline import Offline
from analyser.packed import Packed
from appliance import config, flagdoc, framebatch, timespec
from tests.analyser_frames import (
    ACK,
    FIN,
    PSH,
    RST,
    T0,
    Conn,
    S,
    Spoofer,
    frame,
    icmp_unreachable,
    rotating_flood,
    server_for,
    steady,
)

WALL_CLOCK = ("flagged_at", "expires_at", "created_at", "updated_at")     # the flag book's own times, not the frames'


def _wire(ts, data):
    return (ts, len(data), data)


def _vlan(fr):
    ts, wl, data = fr
    data = data[:12] + b"\x81\x00\x00\x07" + data[12:]
    return (ts, wl + 4, data)


def _bare(fr, mac: str):
    """The segment as an on-path forger sends it just before the real one: same sequence numbers, no payload,
    its own MAC (the analyser must not count it: not the client's MAC)."""
    ts, _, data = fr
    if data[12:14] == b"\x08\x00":
        data = data[:16] + struct.pack("!H", 40) + data[18:54]
    else:
        data = data[:18] + struct.pack("!H", 20) + data[20:74]
    data = data[:6] + bytes.fromhex(mac.replace(":", "")) + data[12:]
    return (ts - 1, len(data), data)


def capture(seed: int, n_clients: int = 50, seconds: int = 300, odd: int = 60) -> list:
    """A random capture of ``n_clients`` clients for ``seconds`` of frame time (mostly in time order)."""
    rnd = random.Random(seed)
    out: list = []
    router_mac = "02:00:00:00:00:ee"
    for i in range(n_clients):
        six = rnd.random() < 0.4
        host = i % 7 == 3                                      # a host rotating its addresses (one MAC)
        behind_router = i % 11 == 5
        client = (f"2001:db8:{1 + (i % 3 if behind_router else 0)}::{(i if not host else 1000) + rnd.randint(0, 3):x}"
                  if six else f"10.{i % 3}.0.{10 + i}")
        mac = router_mac if behind_router else f"02:00:00:00:{i // 256:02x}:{i % 256:02x}"
        ttl = 63 if behind_router else rnd.choice((64, 64, 128))
        start = T0 + rnd.randint(0, 30 * S)
        port = 30000 + i
        rate = rnd.choice((20, 40, 90, 200, 400))              # some cross the per-connection or per-address line
        kind = rnd.random()
        conn = Conn(client, port, mac=mac, ttl=ttl, isn=rnd.getrandbits(32), server_isn=rnd.getrandbits(32))
        secs = rnd.randint(60, seconds - 30)
        if kind < 0.55:                                        # handshake seen, steady chat with answers
            out += steady(conn, start, rate, secs, replies=rnd.choice((0, 1, 3)))
        elif kind < 0.7:                                       # picked up mid-stream: both sides talk
            t = start
            while t < start + secs * S:
                out += conn.data(t)
                out += conn.data(t + 300_000, b"<r/>", to_server=False)
                t += int(60 * S / rate)
        elif kind < 0.8:                                       # a short connection closed by FIN, then a new one
            out += steady(conn, start, rate, 5)
            out += conn.fin(start + 6 * S)
            again = Conn(client, port, mac=mac, ttl=ttl, isn=rnd.getrandbits(32), server_isn=rnd.getrandbits(32))
            out += steady(again, start + 8 * S, rate, secs)
        elif kind < 0.88:                                      # spoofed in the client's name
            sp = Spoofer(client, victim_mac=mac, seed=seed + i)
            out += steady(conn, start, rate, secs, replies=1)
            out += sp.syn_flood(start + S, rnd.randint(20, 200), per_second=100)
            out += sp.data_flood(start + 2 * S, rnd.randint(20, 200), port=port, per_second=100)
        elif kind < 0.94:                                      # RSTs: the end's own, and made-up ones
            out += steady(conn, start, rate, secs // 2)
            out += conn.rst(start + (secs // 2) * S + rnd.choice((0, 1)), to_server=rnd.random() < 0.5)
            out.append(_wire(start + 3 * S, frame(client, port, server_for(client), 5222, RST,
                                                  seq=rnd.getrandbits(32), mac=mac)))
        else:                                                  # forged both sides, answered by the real ends
            sp = Spoofer(client, victim_mac=mac, seed=seed + 100 + i)
            out += sp.forged_connection(start, port + 1000, rnd.randint(20, 120), answer_ns=rnd.choice(
                (400_000, 800_000_000)))
            out += steady(conn, start + S, rate, secs)
        if rnd.random() < 0.3:                                 # UDP, answered or not, or refused by ICMP
            srv = server_for(client)
            for k in range(rnd.randint(5, 60)):
                t = start + k * 200_000_000
                q = _wire(t, frame(client, 5000 + i, srv, 5222, 0, b"q", proto="udp", mac=mac))
                out.append(q)
                r = rnd.random()
                if r < 0.5:
                    out.append(_wire(t + 1_000_000, frame(srv, 5222, client, 5000 + i, 0, b"a", proto="udp",
                                                          mac="02:00:00:00:00:02")))
                elif r < 0.7:
                    out.append(icmp_unreachable(q[2], rnd.choice((mac, "02:00:00:00:00:99")), t + 2_000_000))
    # segments out of the windows on real connections, SYN retransmissions, odd frames
    for _ in range(odd):
        victim = rnd.choice(out)
        ts, _, data = victim
        if rnd.random() < 0.5 and len(data) > 54 and data[12:14] == b"\x08\x00" and data[23] == 6:
            bad = bytearray(data)
            bad[38:42] = struct.pack("!I", rnd.getrandbits(32))   # another sequence number
            out.append((ts + 1, len(bad), bytes(bad)))
        else:
            out.append((ts + 1, len(data), data))                 # the same frame again
    for _ in range(odd):
        ts, _, data = victim = rnd.choice(out)
        if len(data) > 54 and data[23 if data[12:14] == b"\x08\x00" else 20] == 6 and data[47 if data[12:14] ==
                                                                                       b"\x08\x00" else 67] & ACK:
            out.append(_bare(victim, "02:00:00:00:00:77"))
    for _ in range(odd):
        ts = T0 + rnd.randint(0, seconds * S)
        r = rnd.random()
        if r < 0.3:
            out.append(_vlan(rnd.choice(out)))
        elif r < 0.6:
            ts0, wl, data = rnd.choice(out)
            out.append((ts, wl, data[:rnd.randint(1, max(1, len(data) - 1))]))          # cut by the snap length
        else:
            out.append((ts, 60, bytes(rnd.getrandbits(8) for _ in range(rnd.randint(14, 90)))))   # garbage
    out.sort(key=lambda f: f[0])
    for _ in range(len(out) // 200):                           # a few frames out of time order
        k = rnd.randrange(len(out) - 1)
        out[k], out[k + 1] = out[k + 1], out[k]
    return out


def unverified(seed: int, n: int = 40) -> list:
    """What the fast engine counts as *quiet* flows (nothing verified, or UDP), and what must not be: one-way
    mid-stream segments from clients (some from another MAC, some FINs) and from servers, mid-stream connections
    answered exactly later on (so verified by their exchanges), UDP one way and answered part-way, connections
    contradicted or reset that keep sending, and ICMP refusals of UDP."""
    rnd = random.Random(seed)
    out: list = []
    for i in range(n):
        six = rnd.random() < 0.4
        client = f"2001:db8:9::{i + 1:x}" if six else f"10.9.{i // 200}.{i % 200 + 1}"
        srv = server_for(client)
        mac = f"02:00:00:09:{i // 256:02x}:{i % 256:02x}"
        start = T0 + rnd.randint(0, 20 * S)
        gap = int(S * rnd.choice((0.2, 0.5, 1.0)))
        count = rnd.randint(100, 600)
        port = 20000 + i
        kind = rnd.random()
        seq, ack = rnd.getrandbits(32), rnd.getrandbits(32)
        if kind < 0.25:                                        # one way from the client, mid-stream
            for k in range(count):
                m = "02:00:00:00:00:77" if rnd.random() < 0.05 else mac
                fl = ACK | PSH | (FIN if rnd.random() < 0.01 else 0)
                out.append(_wire(start + k * gap, frame(client, port, srv, 5222, fl, b"x" * rnd.randint(0, 40),
                                                        seq=seq + 40 * k, ack=ack, mac=m)))
        elif kind < 0.35:                                      # one way from the server, mid-stream
            for k in range(count):
                out.append(_wire(start + k * gap, frame(srv, 5222, client, port, ACK | PSH, b"y" * 10,
                                                        seq=seq + 10 * k, ack=ack, mac="02:00:00:00:00:02")))
        elif kind < 0.5:                                       # mid-stream, one way for a while, then exchanges
            c = Conn(client, port, mac=mac, isn=seq, server_isn=ack)
            t = start
            for k in range(count // 2):
                out += c.data(t)
                t += gap
            for k in range(4):                                 # a forger's segments: not the client's to record
                out.append(_wire(t + k, frame(client, port, srv, 5222, ACK | PSH, b"f" * 9, seq=rnd.getrandbits(32),
                                              ack=ack, mac="02:00:00:00:00:77")))
            t += 5 * S                   # a pause, then the server acknowledges (twice) what was counted quietly
            out += c.data(t, b"<a/>", to_server=False) + c.data(t + gap // 2, b"<b/>", to_server=False)
            t += gap
            for k in range(count // 2):
                out += c.data(t)
                out += c.data(t + gap // 3, b"<r/>", to_server=False)
                t += gap
        elif kind < 0.7:                                       # UDP one way, answered from some point on
            answer_from = rnd.randint(0, count)
            sport = rnd.choice((5222, 53))
            for k in range(count):
                t = start + k * gap
                q = _wire(t, frame(client, port, srv, sport, 0, b"q", proto="udp", mac=mac))
                out.append(q)
                if k >= answer_from and rnd.random() < 0.7:
                    a = _wire(t + gap // 4, frame(srv, sport, client, port, 0, b"a", proto="udp",
                                                  mac="02:00:00:00:00:02"))
                    out.append(a)
                    if rnd.random() < 0.005:                   # the answer refused: by the client, or by another
                        out.append(icmp_unreachable(a[2], rnd.choice((mac, "02:00:00:00:00:99")), a[0] + 1))
        elif kind < 0.85:                                      # reset, then the client goes on sending
            c = Conn(client, port, mac=mac, isn=seq, server_isn=ack)
            out += steady(c, start, 60, 3)
            out += c.rst(start + 4 * S)
            for k in range(count):
                out += c.data(start + 5 * S + k * gap)
        else:                                                  # contradicted (two SYN-ACKs), then data
            c = Conn(client, port, mac=mac, isn=seq, server_isn=ack)
            out += c.handshake(start)
            other = Conn(client, port, mac=mac, isn=seq, server_isn=ack + 12345)
            out += other.synack(start + 1_000_000)
            for k in range(count):
                out += c.data(start + S + k * gap)
    out.sort(key=lambda f: f[0])
    return out


def steps(frames: list, seed: int) -> list:
    """The frames cut into batches of random sizes, the batches into steps of random counts."""
    rnd = random.Random(seed)
    batches, i = [], 0
    while i < len(frames):
        n = rnd.choice((1, 50, 300, 1000, 1000, 1000))
        batches.append((f"b{len(batches)}", frames[i:i + n]))
        i += n
    out, i = [], 0
    while i < len(batches):
        n = rnd.choice((1, 2, 8, 16))
        out.append(batches[i:i + n])
        i += n
    return out


def outcome(engine, book) -> dict:
    flows = engine.flows.sink.all()
    return {
        "flows": sorted(flows, key=lambda d: d["_id"]),
        "flags": [{k: v for k, v in d.items() if k not in WALL_CLOCK} for d in book.backend.all()],
        "counters": dict(engine.counters), "unverified": dict(engine.unverified),
        "neighbours": engine.neighbours.describe(), "servers": engine.servers.addresses(),
        "series": {ip: dict(c) for o in engine.observers for ip, c in o.counts.items()},
        "windows": [{name: {k: (list(w.times), list(w.weights), w.total, list(w.refs)) for k, w in
                            getattr(cl, name).items()} for name in ("conns", "ips", "hosts", "prefixes")}
                    for cl in engine.classifiers],
    }


class ReleasingFlags(flags_mod.MemoryFlags):
    """Flags a person releases mid-run (what ``flags release`` does to the store, in memory)."""

    def release_flagged(self, at_ns) -> int:
        """Release every active flag at capture time ``at_ns(doc)``; how many."""
        done = 0
        for i, d in enumerate(self.docs):
            if d["status"] == flagdoc.FLAGGED:
                self.docs[i] = flagdoc.ended(d, flagdoc.RELEASED, timespec.utc(at_ns(d)))
                done += 1
        return done

    def released_since(self, since):
        return [d for d in self.docs if d["status"] == flagdoc.RELEASED]


def run(kind, frames, seed: int, cfg=None, persistent: bool = False, forget_at: int = -1, bulk: float = 0.0,
        keep: dict | None = None, release_at: int = -1) -> dict:
    """Both engines' runs over the same random steps. ``release_at``: before that step, every active flag is
    released 30 s of capture time after the newest frame read, and the flag book refreshed (the analyser behind)."""
    cfg = cfg or config.from_dict({"enforce": {"never_ban_self": False}})
    policy = policy_mod.load(None)
    book = flags_mod.FlagBook(cfg, ReleasingFlags())
    engine = kind(cfg, policy, FlowTable(MemoryFlows(), "t"), book,
                  [report.XmppSeries(policy_mod.server_ports(policy, cfg))])
    for n, step in enumerate(steps(frames, seed)):
        if n == forget_at:                                     # flows evicted: loaded again from their documents
            engine.flows.flows.clear()
        if n == release_at:
            behind = engine.flows.newest_ns + 30 * S           # the person acts 30 s of capture ahead of it
            assert book.backend.release_flagged(lambda d: behind)
            book.refresh()
        engine.run_step([(bid, 0, Packed(framebatch.pack(b))) for bid, b in step], n + 1, persistent)
    if keep is not None:
        keep["engine"] = engine
    if kind is FastEngine:        # else the comparison would compare the reference with itself
        assert engine.bulk_packets >= bulk * engine.counters["packets"], (engine.bulk_packets, engine.counters)
    return outcome(engine, book)


def same(a: dict, b: dict) -> None:
    for key in a:
        if key == "flows":
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key]):
                assert x == y, {k: (x[k], y.get(k)) for k in x if x[k] != y.get(k)}
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_fast_engine_gives_the_reference_engines_flows_and_flags_on_a_random_capture(seed):
    frames = capture(seed)
    ref = run(Engine, frames, seed)
    assert ref["flags"], "the capture must make flags, or it proves little"
    assert ref["counters"].get("connections_contradicted") and ref["counters"].get("malformed")
    same(ref, run(FastEngine, frames, seed, bulk=0.1))


def test_the_same_when_flags_are_released_while_the_analyser_is_behind():
    """Releases learned mid-capture: both engines forgive the same packets (the fast one hands the frames
    from before a release to the reference path) and flag the same clients again afterwards."""
    frames = capture(6, n_clients=30)
    n_steps = len(steps(frames, 6))
    ref = run(Engine, frames, 6, release_at=n_steps // 3)
    assert ref["counters"].get("forgiven") and any(f["status"] == "released" for f in ref["flags"])
    same(ref, run(FastEngine, frames, 6, release_at=n_steps // 3, bulk=0.05))


def test_the_same_after_flows_were_evicted_and_read_back_from_their_documents():
    frames = capture(4, n_clients=25)
    ref = run(Engine, frames, 4, persistent=True, forget_at=3)
    same(ref, run(FastEngine, frames, 4, persistent=True, forget_at=3))


def test_the_same_with_neighbours_prefixes_and_a_connection_cost():
    cfg = config.from_dict({"enforce": {"never_ban_self": False},
                            "xmpp": {"prefix_length_v4": 24, "connection_cost": 30, "per_ip_threshold_ppm": 150}})
    frames = capture(5, n_clients=30)
    ref = run(Engine, frames, 5, cfg=cfg)
    same(ref, run(FastEngine, frames, 5, cfg=cfg))


def test_the_fast_engine_counts_the_steady_state_in_bulk():
    """Not a speed test: proof that the bulk path is taken (else the comparisons above compare the reference
    with itself)."""
    frames = []
    for i in range(20):
        frames += steady(Conn(f"10.0.1.{i + 1}", 31000 + i, mac=f"02:00:00:00:01:{i:02x}"), T0, 40, 120, replies=2)
    frames.sort(key=lambda f: f[0])
    cfg = config.Config()
    engine = FastEngine(cfg, policy_mod.load(None), FlowTable(MemoryFlows(), "t"),
                        flags_mod.FlagBook(cfg, flags_mod.MemoryFlags()))
    counted = []
    engine._apply_windows = lambda entries, *a: (counted.append(len(entries)), FastEngine._apply_windows(
        engine, entries, *a))[1]
    for k in range(0, len(frames), 1000):
        engine.run_step([(f"b{k}", 0, Packed(framebatch.pack(frames[k:k + 1000])))], k + 1, False)
    assert sum(counted) > 0


def test_the_adversary_scenarios_give_the_same_results():
    from tests import test_analyser_adversary as adv
    frames = []
    spoof = Spoofer(adv.VICTIM)
    frames += adv.chat(adv.VICTIM, 40000)
    frames += spoof.syn_flood(T0 + 5 * S, 500, per_second=100)
    frames += spoof.data_flood(T0 + 10 * S, 500, port=40000, per_second=100)
    frames += steady(Conn(adv.FLOODER, 41000), T0, 600, 60)
    frames += Spoofer("10.0.0.40", seed=3).forged_connection(T0 + 2 * S, 42000, 200)
    host = adv.HOST_MAC
    for k in range(6):                                         # privacy addresses of one host
        frames += steady(Conn(f"{adv.LAN6}{k + 10:x}", 43000 + k, mac=host), T0 + k * 5 * S, 150, 30)
    frames += adv.chat(f"{adv.LAN6}99", 44000, mac=adv.BENIGN_MAC)
    c = Conn("10.0.0.50", 45000)
    frames += c.handshake(T0) + c.data(T0 + 3_000_000) + c.rst(T0 + 4_000_000)
    frames += [_wire(T0 + k * S, frame("10.0.0.60", 46000, "10.0.0.1", 5222, ACK | PSH, b"x", seq=k * 100,
                                       ack=1)) for k in range(30)]
    frames.sort(key=lambda f: f[0])
    for seed in (7, 8):
        same(run(Engine, frames, seed), run(FastEngine, frames, seed))


def test_offline_and_the_live_engine_choice_follow_the_config():
    assert type(Offline(config.Config(), policy_mod.load(None)).engine) is FastEngine
    cfg = config.from_dict({"analyser": {"engine": "reference"}})
    assert type(Offline(cfg, policy_mod.load(None)).engine) is Engine


def test_flag_bits_and_fin_are_counted_as_the_reference_does():
    c = Conn("10.0.0.70", 47000)
    frames = c.handshake(T0)
    t = T0 + S
    for k in range(300):
        frames += c.data(t + k * 10_000_000)
        frames += [c._f(t + k * 10_000_000 + 1, False, ACK | (0x20 if k % 7 == 0 else 0) | (0xC0 if k % 5 else 0))]
    frames += c.fin(t + 4 * S)
    frames += c.data(t + 5 * S)                                # after the FIN: still counted, the flow closed
    same(run(Engine, frames, 9), run(FastEngine, frames, 9))


def test_a_damaged_batch_counts_its_frames_before_the_damage_in_both_engines():
    frames = steady(Conn("10.0.0.80", 48000), T0, 120, 60, replies=1)
    blobs = [framebatch.pack(frames[k:k + 40]) for k in range(0, len(frames), 40)]
    blobs[1] = blobs[1][:-7]                                   # a record cut short
    blobs[2] = blobs[2] + b"\x01\x02\x03"                      # a record header cut short
    out = []
    for kind in (Engine, FastEngine):
        cfg = config.Config()
        book = flags_mod.FlagBook(cfg, flags_mod.MemoryFlags())
        engine = kind(cfg, policy_mod.load(None), FlowTable(MemoryFlows(), "t"), book)
        for n, blob in enumerate(blobs):
            engine.run_step([(f"b{n}", 0, Packed(blob))], n + 1, False)
        out.append(outcome(engine, book))
    assert out[0]["counters"]["corrupt_batches"] == 2
    same(*out)


@pytest.mark.parametrize("seed", [11, 12])
def test_unverified_and_udp_flows_are_counted_quietly_and_give_the_same_results(seed):
    """One-way, mid-stream, UDP, reset and contradicted flows beside a random capture: the same outcome, and
    most of their packets counted in bulk as quiet flows (else the comparison proves nothing of that path)."""
    quiet = unverified(seed)
    frames = sorted(capture(seed, n_clients=20) + quiet, key=lambda f: f[0])
    ref = run(Engine, frames, seed)
    assert ref["counters"].get("connections_contradicted") and ref["counters"].get("udp_disowned")
    fast = {}
    same(ref, run(FastEngine, frames, seed, keep=fast))
    assert fast["engine"].quiet_packets >= 0.4 * len(quiet), (fast["engine"].quiet_packets, len(quiet))


def test_quiet_flows_keep_the_order_of_unverified_sources_when_their_table_is_full(monkeypatch):
    """Who is named among the unverified sources and who is summed as "other" depends on frame order once the
    table is full: the quiet count leaves a new source to the reference path."""
    import analyser.engine as engine_mod
    monkeypatch.setattr(engine_mod, "MAX_SOURCES", 25)
    frames = unverified(13, n=80)
    ref = run(Engine, frames, 13)
    assert ref["unverified"].get("other"), "the table must fill, or this proves nothing"
    same(ref, run(FastEngine, frames, 13))


def _from_flood(key_text: str) -> bool:
    return " 10.99." in key_text or " 2001:db8:99:" in key_text


def test_a_rotating_address_flood_fills_the_flow_table_to_its_cap_and_the_benign_clients_are_untouched():
    """Every frame a new 5-tuple (an inside host rotating addresses and ports): past ``analyser.max_flows`` such
    new flows toward no server port are counted (``untracked``) but not recorded, so neither memory nor the store
    grows with the flood; connections toward the server port are still tracked, so the benign clients' records,
    flags and verification are those of a capture without the flood. Both engines the same."""
    cap = 1000
    cfg = config.from_dict({"enforce": {"never_ban_self": False}, "analyser": {"max_flows": cap}})
    late = Conn("2001:db8:7::77", 40077, mac="02:00:00:00:07:77", isn=77, server_isn=7700)
    benign = sorted(capture(5, n_clients=30) + steady(late, T0 + 61 * S, 400, 90, replies=1), key=lambda f: f[0])
    flood = rotating_flood(5, T0 + 60 * S, 24_000, per_second=8_000)       # 3 s of flood: the table full at once
    again = [(ts + S, wl, data) for ts, wl, data in flood[:300]]          # its first flows' frames once more, full
    both = sorted(benign + flood + again, key=lambda f: f[0])
    kept: dict = {}
    ref = run(Engine, both, 5, cfg=cfg, keep=kept)
    fast: dict = {}
    same(ref, run(FastEngine, both, 5, cfg=cfg, keep=fast))
    calm: dict = {}
    run(FastEngine, benign, 5, cfg=cfg, keep=calm)
    # the benign flows stay on the bulk path (the full table's index learns the keys that enter it: 1,412 without)
    assert fast["engine"].bulk_packets >= calm["engine"].bulk_packets
    table = kept["engine"].flows
    flood_flows = [d for d in ref["flows"] if _from_flood(d["key"])]
    assert 0 < len(flood_flows) <= cap
    assert ref["counters"]["untracked"] == len(flood) - len(flood_flows)   # (the ones sent again: in their flows)
    assert sum(d["packets"]["c2s"] + d["packets"]["s2c"] for d in flood_flows) == len(flood_flows) + len(again)
    assert ref["counters"]["packets"] == len(both) - ref["counters"].get("malformed", 0) - ref["counters"].get(
        "not_ip", 0)
    assert len([k for k in table.flows if not table.vital(k)]) <= cap
    alone = run(Engine, benign, 5, cfg=cfg)
    unsampled = lambda f: {**f, "evidence": {k: v for k, v in f["evidence"].items() if k != "samples"}}  # noqa: E731
    assert alone["flags"] and list(map(unsampled, ref["flags"])) == list(map(unsampled, alone["flags"]))
    # the client that connected while the table was full: tracked (a server port), verified and flagged
    assert [d["direction"] for d in ref["flows"] if "2001:db8:7::77" in d["key"]] == ["verified"]
    assert any("2001:db8:7::77" in str(f) for f in ref["flags"])
    unwritten = lambda d: {k: v for k, v in d.items() if k != "step"}    # noqa: E731  (steps are cut otherwise,
    # and so batches: the samples name frames by batch)
    assert [unwritten(d) for d in ref["flows"] if not _from_flood(d["key"])] == list(map(unwritten, alone["flows"]))
    for k in ("verified", "connections_verified", "connections_contradicted"):
        assert ref["counters"].get(k, 0) == alone["counters"].get(k, 0), k
    assert ref["counters"]["packets_v6"] == alone["counters"]["packets_v6"] + len(flood[::3]) + len(again[::3])
    flooder = {k: v for k, v in ref["unverified"].items() if _from_flood(f" {k}")}
    assert sum(flooder.values()) == len(flood_flows) + len(again)  # the flows recorded: the untracked ones nowhere
    assert {k: v for k, v in ref["unverified"].items() if k not in flooder} == alone["unverified"]


def test_untracked_packets_age_the_table_so_a_long_flood_gets_room_again():
    """With nothing else on the wire, the flood's own frame times age its admitted flows out (never answered:
    ten seconds), so the table takes new flows again instead of staying full for good."""
    cap = 1000
    cfg = config.from_dict({"analyser": {"max_flows": cap}})
    flood = rotating_flood(6, T0, 30_000, per_second=1_000)               # 30 s of flood
    kept: dict = {}
    ref = run(Engine, flood, 6, cfg=cfg, keep=kept)
    same(ref, run(FastEngine, flood, 6, cfg=cfg))
    assert 2 * cap < len(ref["flows"]) < len(flood) and ref["counters"]["untracked"] == len(flood) - len(ref["flows"])
    assert len(kept["engine"].flows.flows) <= cap


def test_the_full_tables_index_holds_no_more_than_the_table_whichever_way_the_steps_go():
    """``FlowTable.entered`` (the keys the fast engine's index has not read yet) is emptied at each step, also when
    a step goes the reference way (any classifier or observer but the built-in ones) and when the table is never
    full, so it never grows with the flows seen; and while the table is full the index knows each of its keys."""
    cfg = config.from_dict({"analyser": {"max_flows": 1000}})
    flood = rotating_flood(8, T0, 30_000, per_second=1_000)      # 30 s: the table takes new flows again
    engine = FastEngine(cfg, policy_mod.load(None), FlowTable(MemoryFlows(), "t"),
                        flags_mod.FlagBook(cfg, flags_mod.MemoryFlags()), [lambda p: None])
    assert not engine.bulk_possible()
    for n, step in enumerate(steps(flood, 8)):
        engine.run_step([(bid, 0, Packed(framebatch.pack(b))) for bid, b in step], n + 1)
        assert engine.flows.entered == []
    bulk = FastEngine(cfg, policy_mod.load(None), FlowTable(MemoryFlows(), "t"),
                      flags_mod.FlagBook(cfg, flags_mod.MemoryFlags()))
    for n, step in enumerate(steps(flood, 8)):
        bulk.run_step([(bid, 0, Packed(framebatch.pack(b))) for bid, b in step], n + 1)
        assert len(bulk.flows.entered) <= len(bulk.flows.flows)
    assert len(bulk.flows.sink.all()) > 2 * len(bulk.flows.flows)  # more flows entered in all than it holds
    index = bulk._index
    assert bulk.flows.full() and index.built
    assert set(bulk.flows.flows) <= set(index.of) | set(bulk.flows.entered)
    roomy = FastEngine(config.Config(), policy_mod.load(None), FlowTable(MemoryFlows(), "t"),
                       flags_mod.FlagBook(cfg, flags_mod.MemoryFlags()))        # never full: no index at all
    for n, step in enumerate(steps(flood, 8)):
        roomy.run_step([(bid, 0, Packed(framebatch.pack(b))) for bid, b in step], n + 1)
        assert len(roomy.flows.entered) <= len(roomy.flows.flows)
    assert len(roomy.flows.sink.all()) > 2 * len(roomy.flows.flows) and not roomy._index.built


def test_a_full_load_takes_the_vital_flows_and_then_the_first_keys_in_order():
    """``FlowTable.prefetch`` with more stored flows than room: every vital one (a server port), then the
    non-vital ones in key order up to the room, whatever order they are asked in (a restart loads the same)."""
    from analyser.flows import flow_key
    from analyser.parse import parse
    stored = FlowTable(MemoryFlows(), "t", server_ports=(5222,))
    frames = rotating_flood(3, T0, 400, per_second=1_000)
    late = Conn("10.5.0.9", 40009)
    frames += late.handshake(T0 + S) + Conn("2001:db8:7::9", 40010).handshake(T0 + S)
    packets = [parse(*f) for f in frames]
    for p in packets:
        stored.update(p, "b1")
    stored.flush(1)
    keys = {flow_key(p) for p in packets}
    vital = {k for k in keys if 5222 in (k[1][1], k[2][1])}
    assert len(stored.sink.all()) == len(keys) == 402 and len(vital) == 2
    want = vital | set(sorted(keys - vital)[:50])
    for order in (sorted(keys), sorted(keys, reverse=True), list(keys)):
        table = FlowTable(stored.sink, "t", server_ports=(5222,))
        table.max_flows = 50
        table.prefetch(order)
        assert set(table.flows) == want


@pytest.mark.parametrize("seed", [3, 11])
def test_a_frames_lanes_give_its_flow_key_and_the_keys_lanes_give_its_hash(seed):
    """The three uses of an end's lanes agree frame by frame (TCP and UDP, both families, cut and tagged frames
    left out by the shape): ``_lanes_key`` of a bulk frame's lanes is the parse's ``flow_key`` and source, and
    ``_key_hashes`` of that key (the full table's index) is the frame's connection hash."""
    from analyser import fast
    from analyser.flows import flow_key
    from analyser.gather import gather
    from analyser.parse import parse
    frames = capture(seed, n_clients=20, seconds=120) + rotating_flood(seed, T0, 2_000, per_second=1_000)
    fr = fast._Frames(gather([framebatch.pack(frames[k:k + 500]) for k in range(0, len(frames), 500)], "off"))
    bulk, ends = fast._read_shape(fr)[0], fast._endpoints(fr)
    rows = np.flatnonzero(bulk)
    lanes = list(zip(*(ends[k][rows].tolist() for k in fast._LANES)))
    packets = [parse(*frames[i]) for i in rows.tolist()]
    assert {p.v6 for p in packets} == {False, True} and {p.proto for p in packets} == {6, 17}
    assert [fast._lanes_key(x) for x in lanes] == [(flow_key(p), (p.src, p.sport)) for p in packets]
    hashes = fast._pair_hash(ends["hs"][rows], ends["hd"][rows])
    assert fast._key_hashes([flow_key(p) for p in packets]).tolist() == hashes.tolist()
