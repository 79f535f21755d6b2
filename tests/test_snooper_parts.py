"""The snooper's parts on their own: dedupe window, spool, writer against a store that goes away,
ring filter/snaplen, interface check, the export filter. Real sockets, files and store."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import time

import pytest

from appliance import config as config_mod
from appliance import indexes, netns, store
from lab import procs
from snooper import counters, ifcheck, pcap
from snooper.batch import Batch
from snooper.capture import Capture
from snooper.dedupe import Dedupe
from snooper.ring import CaptureError, Ring
from snooper.spool import Spool
from snooper.writer import Writer, insert

LOG = logging.getLogger("test")
S = 1_000_000_000
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)")


def frames(n: int, tag: bytes = b"", size: int = 60, t0: int = 1_700_000_000 * S) -> list:
    return [(t0 + i * 1000, size, (tag + struct.pack("!Q", i)).ljust(size, b"\x11")) for i in range(n)]


# --- dedupe ------------------------------------------------------------------------

def test_dedupe_inside_window_dropped_outside_kept():
    d = Dedupe(2.0)
    a, b = b"frame-a" * 9, b"frame-b" * 9
    assert not d.seen(10 * S, 63, a)
    assert d.seen(10 * S + S, 63, a)              # 1 s later: duplicate
    assert d.seen(12 * S, 63, a)                  # exactly at the window edge: duplicate
    assert not d.seen(12 * S + 1, 63, a)          # just past the window of the kept copy: kept again
    assert d.seen(13 * S, 63, a)                  # ... and it starts a new window
    assert not d.seen(13 * S, 63, b)
    assert not d.seen(13 * S, 1500, b)       # same captured bytes, another wire length (snaplen): another frame
    assert not d.seen(100 * S, 63, a) and not d.seen(100 * S, 63, b)   # after a long gap


def test_dedupe_memory_is_two_windows_at_most():
    d = Dedupe(1.0)
    for i in range(50_000):                   # 10,000 distinct frames a second for 5 s
        d.seen(i * 100_000, 63, struct.pack("!Q", i))
    assert len(d) <= 20_001


def test_dedupe_filter_is_the_same_rule_as_seen():
    import random
    rnd = random.Random(7)
    ts, frames_ = 0, []
    for _ in range(20_000):
        ts += rnd.choice([0, 1000, 10**6, 3 * 10**8, 2 * S])
        frames_.append((ts, rnd.choice([60, 61]), bytes([rnd.randrange(40)])))
    one = Dedupe(1.0)
    expected = [f for f in frames_ if not one.seen(*f)]
    two = Dedupe(1.0)
    kept, dups = [], 0
    for i in range(0, len(frames_), 777):
        k, d = two.filter(frames_[i:i + 777])
        kept += k
        dups += d
    assert kept == expected and dups == len(frames_) - len(expected) and 0 < dups < len(frames_)


def test_dedupe_zero_window_keeps_everything():
    d = Dedupe(0)
    assert not d.seen(1, 63, b"x") and not d.seen(1, 63, b"x")
    assert d.filter([(1, 1, b"x")] * 3) == ([(1, 1, b"x")] * 3, 0)


def test_capture_batches_and_counts_duplicates():
    class Collect:
        def __init__(self):
            self.batches = []

        def offer(self, batch, block=False):
            self.batches.append(batch)

    c, w = counters.new(), Collect()
    cap = Capture(None, Dedupe(2.0), w, c, "s", "r", 100, 60.0, None)
    fs = frames(250)
    truncated_twin = (fs[0][0], 1000, fs[0][2])             # same captured bytes, longer on the wire: another frame
    cap.add(fs + fs[:10] + [fs[1]] + [truncated_twin])      # 11 duplicates
    cap.flush()
    assert [len(b.frames) for b in w.batches] == [100, 100, 51] and [b.seq for b in w.batches] == [0, 1, 2]
    assert c["captured"] == 262 and c["duplicates"] == 11 and c["batches"] == 3 and c["truncated"] == 1
    assert [f for b in w.batches for f in b.frames] == fs + [truncated_twin]


# --- spool ----------------------------------------------------------------------------

def test_spool_is_durable_ordered_and_checksummed(tmp_path):
    c = counters.new()
    sp = Spool(tmp_path, 10, "drop_newest", c, LOG)
    for seq in (2, 0, 1):
        assert sp.put(Batch("s", "r1", seq, frames(5, tag=bytes([seq]))))
    sp.close()
    c2 = counters.new()
    sp = Spool(tmp_path, 10, "drop_newest", c2, LOG)       # a restart finds them, in order
    assert c2["spool_inherited"] == 15 and sp.frames == 15
    names = []
    while (name := sp.oldest()) is not None:
        b = sp.load(name)
        assert b.frames == frames(5, tag=bytes([b.seq]))
        names.append(b.seq)
        sp.remove(name)
    assert names == [0, 1, 2] and sp.frames == 0 and not list(tmp_path.glob("*.psb"))


def test_spool_corrupt_file_moved_aside_and_counted(tmp_path):
    c = counters.new()
    sp = Spool(tmp_path, 10, "drop_newest", c, LOG)
    sp.put(Batch("s", "r", 0, frames(7)))
    sp.put(Batch("s", "r", 1, frames(3)))
    victim = tmp_path / sp.oldest()
    blob = bytearray(victim.read_bytes())
    blob[-5] ^= 0xFF
    victim.write_bytes(bytes(blob))
    assert sp.load(sp.oldest()) is None
    assert c["spool_corrupt"] == 1 and c["dropped_corrupt"] == 7
    assert (tmp_path / "corrupt" / victim.name).exists()
    assert sp.load(sp.oldest()).seq == 1
    (tmp_path / "zzz-000000000009.psb").write_bytes(b"not a spool file")
    (tmp_path / "x.psb.tmp").write_bytes(b"half written")
    sp.close()
    c3 = counters.new()
    sp = Spool(tmp_path, 10, "drop_newest", c3, LOG)
    assert c3["spool_corrupt"] == 1 and len(sp) == 1 and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_spool_full_policy_counts_every_dropped_frame(tmp_path, policy):
    c = counters.new()
    sp = Spool(tmp_path, 1, policy, c, LOG)                 # 1 MiB
    big = [(i, 1000, bytes(1000)) for i in range(300)]      # ~0.3 MiB a batch
    results = [sp.put(Batch("s", "r", seq, big)) for seq in range(5)]
    kept = sorted(int(p.name.split("-")[-1].split(".")[0]) for p in tmp_path.glob("*.psb"))
    assert len(kept) == 3 and sp.used <= 1 << 20
    assert kept == ([0, 1, 2] if policy == "drop_newest" else [2, 3, 4])
    assert results == ([True, True, True, False, False] if policy == "drop_newest" else [True] * 5)
    assert c["dropped_spool_full"] == 600 and c["spooled"] == (900 if policy == "drop_newest" else 1500)


def test_second_process_only_adds_to_a_spool(tmp_path):
    a = Spool(tmp_path, 10, "drop_newest", counters.new(), LOG)
    b = Spool(tmp_path, 10, "drop_newest", counters.new(), LOG)
    assert a.owner and not b.owner


# --- writer against a store that is away, then back ---------------------------------------

def test_writer_spools_while_store_away_then_replays_exactly_once(tmp_path):
    port = procs.free_port()
    cfg = config_mod.from_dict({"mongodb": {"uri": f"mongodb://127.0.0.1:{port}", "timeout_ms": 300,
                                            "retention": {"frames_hours": 1}}})
    c = counters.new()
    sp = Spool(tmp_path / "spool", 10, "drop_newest", c, LOG)
    db = store.database(cfg.mongodb)
    w = Writer(db, sp, c, LOG, cfg)
    w.start()
    sent = [Batch("s", "run1", seq, frames(50, tag=bytes([seq]))) for seq in range(6)]
    for b in sent[:4]:
        w.offer(b)
    deadline = time.monotonic() + 20
    while c["spooled"] < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c["spooled"] == 200 and c["stored"] == 0 and c["store_errors"] >= 1
    es = procs.EmbeddedStore(tmp_path / "store", port=port).start()
    try:
        for b in sent[4:]:
            w.offer(b)
        w.stop()
        docs = list(db[store.FRAMES].find({"run": "run1"}).sort("seq", 1))
        assert [d["seq"] for d in docs] == list(range(6))
        assert [f for d in docs for f in store.batch_frames(d)] == [f for b in sent for f in b.frames]
        assert all(d["ins"] is not None for d in docs)
        assert c["stored"] == 300 and c["replayed"] == c["spooled"] >= 200 and sp.frames == 0
        # a batch whose earlier insert got through but whose answer was lost: retried, no second copy
        insert(db, sent[0], c)
        assert db[store.FRAMES].count_documents({"run": "run1"}) == 6
        ttl = [ix for ix in db[store.FRAMES].list_indexes() if "expireAfterSeconds" in ix]
        assert [(tuple(ix["key"]), ix["expireAfterSeconds"]) for ix in ttl] == [(("ins",), 3600)]
        keys = {tuple(ix["key"]) for ix in db[store.FRAMES].list_indexes()}
        declared = {tuple(k for k, _ in s.keys) for s in indexes.INDEXES if s.collection == store.FRAMES}
        assert keys == {("_id",)} | declared
    finally:
        db.client.close()
        es.stop()


def test_a_stop_with_a_slow_store_spools_the_queue_in_time_and_the_next_run_stores_it_once(tmp_path, embedded_store,
                                                                                           monkeypatch):
    """A store that takes each batch slowly (a loaded one) must not hold a stop past systemd's TimeoutStopSec: the
    SIGKILL would lose the whole queue. After its time for the store the writer spools the rest; the next run's
    writer replays it, each batch stored once."""
    from snooper import writer as writer_mod
    cfg = config_mod.from_dict({"mongodb": {"uri": embedded_store.uri, "database": "t" + secrets.token_hex(5)}})
    db = store.database(cfg.mongodb)
    real = writer_mod.insert

    def slow(db_, batch, c):                     # a store that answers, a batch every 0.1 s
        time.sleep(0.1)
        real(db_, batch, c)
    monkeypatch.setattr(writer_mod, "insert", slow)
    c = counters.new()
    sp = Spool(tmp_path / "spool", 50, "drop_newest", c, LOG)
    w = Writer(db, sp, c, LOG, cfg)
    w.start()
    sent = [Batch("s", "run1", seq, frames(20, tag=bytes([seq]))) for seq in range(100)]    # 10 s for the store
    for b in sent:
        c["captured"] += len(b.frames)          # as the capture loop counts them
        w.offer(b)
    t0 = time.monotonic()
    w.stop(store_seconds=1.0)
    took = time.monotonic() - t0
    try:
        assert not w.is_alive() and took < 2.5, took
        assert 5 <= c["stored_batches"] <= 15 and c["stop_spooled"] == c["spooled"] == 2000 - c["stored"]
        assert c["queue_overflows"] == 0 and counters.unaccounted(c, w.pending_frames, sp.frames) == 0
        sp.close()
        monkeypatch.setattr(writer_mod, "insert", real)
        c2 = counters.new()
        sp2 = Spool(tmp_path / "spool", 50, "drop_newest", c2, LOG)
        assert c2["spool_inherited"] == c["spooled"]
        w2 = Writer(db, sp2, c2, LOG, cfg)
        w2.start()
        w2.stop()
        docs = list(db[store.FRAMES].find({"run": "run1"}).sort("seq", 1))
        assert [d["seq"] for d in docs] == list(range(100))
        assert [f for d in docs for f in store.batch_frames(d)] == [f for b in sent for f in b.frames]
        assert c2["replayed"] == c["spooled"] and sp2.frames == 0
    finally:
        db.client.drop_database(cfg.mongodb.database)
        db.client.close()


# --- ring ------------------------------------------------------------------------------------

@pytest.fixture
def veth():
    ns = "pu" + secrets.token_hex(3)
    netns.run(["ip", "netns", "add", ns])
    try:
        netns.run(["ip", "link", "add", "a0", "type", "veth", "peer", "name", "b0"], ns=ns)
        for dev in ("a0", "b0"):
            netns.run(["ip", "link", "set", dev, "up"], ns=ns)
        yield ns
    finally:
        netns.run(["ip", "netns", "del", ns], check=False)


def _udp(dport: int, size: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0, 64, 17, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02")
    return (b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + ip + struct.pack("!HHHH", 999, dport, size - 34, 0)
            + bytes(size - 42))


@root
def test_ring_applies_bpf_filter_and_snaplen(veth):
    ring = Ring("b0", veth, 1 << 16, 8, 10, snaplen=64, bpf_filter="udp port 5222")
    try:
        with netns.enter(veth):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            s.bind(("a0", 0))
        for i in range(200):
            s.send(_udp(5222 if i % 2 else 80, 300))
        s.close()
        got: list = []
        while ring.wait(200):
            ring.read_block(got)
        assert len(got) == 100
        assert all(len(d) == 64 and wire == 300 and d == _udp(5222, 300)[:64] for _, wire, d in got)
        packets, drops, _ = ring.read_stats()
        assert packets == 100 and drops == 0
        assert ring.read_stats()[0] == 100     # accumulated, although the kernel resets on read
    finally:
        ring.close()


@root
def test_ring_refuses_bad_filter_and_missing_interface(veth):
    with pytest.raises(CaptureError, match="does not compile"):
        Ring("b0", veth, 1 << 16, 8, 10, bpf_filter="udp port banana")
    with pytest.raises(CaptureError, match="does not exist"):
        Ring("nosuch0", veth, 1 << 16, 8, 10)


@root
def test_ifcheck(veth):
    assert ifcheck.check("b0", veth) == []
    netns.run(["ip", "addr", "add", "169.254.1.1/16", "dev", "b0"], ns=veth)
    netns.run(["ip", "addr", "add", "fe80::1234/64", "dev", "b0"], ns=veth)
    assert ifcheck.check("b0", veth) == []
    netns.run(["ip", "addr", "add", "2001:db8::5/64", "dev", "b0", "nodad"], ns=veth)
    with pytest.raises(ifcheck.UnsafeInterface, match="2001:db8::5/64"):
        ifcheck.check("b0", veth)
    netns.run(["ip", "addr", "del", "2001:db8::5/64", "dev", "b0"], ns=veth)
    netns.run(["ip", "addr", "add", "10.0.0.5/24", "dev", "a0"], ns=veth)
    with pytest.raises(ifcheck.UnsafeInterface, match="10.0.0.5/24"):
        ifcheck.check("a0", veth)
    netns.run(["ip", "link", "set", "b0", "down"], ns=veth)
    assert "is down" in ifcheck.check("b0", veth)[0]
    with pytest.raises(ifcheck.UnsafeInterface, match="does not exist"):
        ifcheck.check("nosuch0", veth)
    with pytest.raises(ifcheck.UnsafeInterface, match="namespace"):
        ifcheck.check("b0", veth + "x")


# --- pcap ----------------------------------------------------------------------------------

def test_export_filter_matches_ipv4_ipv6_and_vlan():
    v4 = _udp(5222, 80)
    v6 = (b"\xff" * 6 + b"\x02" * 6 + b"\x86\xdd" + struct.pack("!IHBB", 0x60000000, 8, 17, 64)
          + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + socket.inet_pton(socket.AF_INET6, "2001:db8::2")
          + struct.pack("!HHHH", 4000, 5222, 8, 0))
    vlan = v4[:12] + b"\x81\x00\x00\x05" + v4[12:]
    h = socket.inet_aton("10.0.0.1")
    for f in (v4, vlan):
        assert pcap.matches(f, h, 5222) and pcap.matches(f, None, 999) and not pcap.matches(f, h, 80)
        assert not pcap.matches(f, socket.inet_aton("10.0.0.9"), None)
    assert pcap.matches(v6, socket.inet_pton(socket.AF_INET6, "2001:db8::2"), 5222) and not pcap.matches(v6, h, None)
    assert not pcap.matches(b"\x00" * 10, None, 5222) and pcap.matches(b"\x00" * 10, None, None)
