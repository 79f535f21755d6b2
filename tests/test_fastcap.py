"""The C capture engine (snooper/_fastcap.c) against the Python one (snooper/engine.py): same bytes, same counts.

TPACKET_V3 blocks are laid out here the way the kernel lays them out (block descriptor, tpacket3_hdr per
frame, VLAN tag stripped into the header), filled with random frames: duplicates inside and outside the
window, across window rotations and long gaps, VLAN-tagged frames with and without a TPID, frames cut by
the kernel (caplen < wire) and by the engine's snaplen, frames shorter than an Ethernet header, broken
headers. Both engines walk the same blocks; every packed batch and every counter must be equal. The C
engine must be built: a missing or broken one fails here.
"""

from __future__ import annotations

import random
import struct

import pytest

from appliance import framebatch
from snooper import counters, engine
from snooper.capture import Capture
from snooper.dedupe import Dedupe

S = 1_000_000_000
BLOCK = 1 << 16
_DESC = struct.Struct("<IIIII")
_HDR = struct.Struct("<IIIIIIHHIIH")   # next, sec, nsec, snaplen, len, status, mac, net, rxhash, vlan_tci, vlan_tpid
MAC_OFF = 66                            # where the kernel puts the frame: after the 48-byte header and sockaddr_ll
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 0x10, 0x40


def c_engine(window: float, snaplen: int, batch: int):
    assert engine.available(), "snooper._fastcap is not built: pip install -e . (or python -m appliance.cext)"
    return engine.make(window, snaplen, batch, mode="on")


def py_engine(window: float, snaplen: int, batch: int):
    return engine.make(window, snaplen, batch, mode="off")


def block(frames: list, bsize: int = BLOCK) -> bytearray:
    """One ring block holding ``frames``: (ts_ns, wire, data as in the ring, status, tci, tpid, next override)."""
    buf = bytearray(bsize)
    off = first = 48
    for i, (ts, wire, data, status, tci, tpid, nxt) in enumerate(frames):
        rec = (MAC_OFF + len(data) + 15) & ~15
        last = i == len(frames) - 1
        nxt_off = nxt if nxt is not None else (0 if last else rec)
        _HDR.pack_into(buf, off, nxt_off, ts // S, ts % S, len(data), wire, 1 | status, MAC_OFF, MAC_OFF, 0, tci, tpid)
        buf[off + MAC_OFF:off + MAC_OFF + len(data)] = data
        off += rec
    _DESC.pack_into(buf, 0, 3, 0, 1, len(frames), first)
    return buf


def random_blocks(seed: int, count: int) -> list[bytearray]:
    rnd = random.Random(seed)
    kept: list[tuple[int, bytes, int]] = []    # earlier frames to send again
    ts = 1_700_000_000 * S
    blocks = []
    for _ in range(count):
        frames, used = [], 48
        while True:
            r = rnd.random()   # mostly close together; now and then past the window, or past two (both generations go)
            ts += rnd.choice([0, 1, 1000, 10**5, 10**6]) if r < 0.97 else rnd.choice([7 * 10**8, S, 3 * S])
            if kept and rnd.random() < 0.4:   # again: a recent frame (inside the window) or any earlier one
                data, wire = (rnd.choice(kept[-20:]) if rnd.random() < 0.7 else rnd.choice(kept))[1:]
            else:
                size = rnd.choice([4, 13, 14, 60, 64, 65, 97, 128, 300, 1400])
                data = rnd.randbytes(size) if rnd.random() < 0.7 else bytes([rnd.randrange(3)]) * size
                wire = size + (rnd.choice([0, 0, 0, 20, 1000]))   # > size: cut by the kernel's snaplen
                kept.append((ts, data, wire))
            vlan = rnd.random() < 0.2
            status = (TP_STATUS_VLAN_VALID | (TP_STATUS_VLAN_TPID_VALID if rnd.random() < 0.5 else 0)) if vlan else 0
            rec = (MAC_OFF + len(data) + 15) & ~15
            if used + rec > BLOCK or len(frames) > 400:
                break
            frames.append((ts, wire, data, status, rnd.randrange(1 << 16), rnd.choice([0x8100, 0x88A8]), None))
            used += rec
        blocks.append(block(frames))
    return blocks


def run_blocks(eng, blocks: list) -> tuple[list, list]:
    results, batches = [], []
    for b in blocks:
        results.append(eng.walk(b, 0, len(b)))
        batches += eng.ready()
    batches += eng.take()
    return results, batches


@pytest.mark.parametrize("window,snaplen,batch", [(1.0, 262144, 1000), (2.0, 96, 333), (0, 262144, 50),
                                                  (0.5, 64, 1)])
def test_c_and_python_give_the_same_batches_and_counts(window, snaplen, batch):
    blocks = random_blocks(11, 40)
    c_res, c_batches = run_blocks(c_engine(window, snaplen, batch), blocks)
    p_res, p_batches = run_blocks(py_engine(window, snaplen, batch), blocks)
    assert c_res == p_res
    assert c_batches == p_batches
    total = [sum(r[i] for r in c_res) for i in range(4)]
    captured, dups, bad, trunc = total
    assert captured > 5000 and bad == 0 and trunc > 0
    assert (dups > 500) == (window > 0)
    assert sum(b[1] for b in c_batches) == captured - dups
    assert all(b[1] == batch for b in c_batches[:-1])
    # the batches hold what the Python ring walk read, cut to snaplen, VLAN tags back in place
    frames = [f for b in c_batches for f in framebatch.unpack(b[0])]
    assert all(len(f.data) <= snaplen for f in frames)
    assert any(f.data[12:14] in (b"\x81\x00", b"\x88\xa8") for f in frames)


def test_vlan_tag_goes_back_and_counts_in_the_wire_length():
    data = bytes(range(60))
    b = block([(5 * S, 60, data, TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID, 0x2064, 0x88A8, None),
               (5 * S + 1, 60, data, TP_STATUS_VLAN_VALID, 0x0007, 0, None),
               (5 * S + 2, 11, data[:11], TP_STATUS_VLAN_VALID, 0x0007, 0, None)])
    for eng in (c_engine(2.0, 262144, 10), py_engine(2.0, 262144, 10)):
        assert eng.walk(b, 0, len(b)) == (3, 0, 0, 0)
        (blob, n, wire, first, last), = eng.take()
        got = list(framebatch.unpack(blob))
        assert (n, wire, first, last) == (3, 64 + 64 + 15, 5 * S, 5 * S + 2)
        assert got[0].data == data[:12] + b"\x88\xa8\x20\x64" + data[12:] and got[0].wire_len == 64
        assert got[1].data == data[:12] + b"\x81\x00\x00\x07" + data[12:]
        assert got[2].data == data[:11] + b"\x81\x00\x00\x07"


def test_broken_headers_count_the_rest_of_the_block():
    good = (7 * S, 60, b"a" * 60, 0, 0, 0, None)
    cases = {
        "caplen over wire": [good, (7 * S + 1, 50, b"b" * 60, 0, 0, 0, None), good],
        "next offset out of the block": [good, (7 * S + 2, 60, b"c" * 60, 0, 0, 0, BLOCK), good],
    }
    for name, frames in cases.items():
        b = block(frames)
        c_res = c_engine(2.0, 262144, 10).walk(b, 0, len(b))
        p_res = py_engine(2.0, 262144, 10).walk(b, 0, len(b))
        expect = (1, 0, 2, 0) if name == "caplen over wire" else (2, 0, 1, 0)
        assert c_res == p_res == expect, name
    with pytest.raises(ValueError):
        c_engine(2.0, 262144, 10).walk(bytearray(100), 0, 200)     # a block beyond the buffer: refused
    with pytest.raises(ValueError):
        c_engine(2.0, 262144, 10).walk(bytearray(100), 2**62, 2**62)   # offsets whose sum overflows: refused
    huge = [good, (7 * S + 3, 0xFFFFFFFE, b"d" * 60, TP_STATUS_VLAN_VALID, 7, 0, None), good]
    b = block(huge)                             # a tag that does not fit the 32-bit wire length: a broken header
    assert c_engine(2.0, 262144, 10).walk(b, 0, len(b)) == py_engine(2.0, 262144, 10).walk(b, 0, len(b)) == (1, 0, 2, 0)


def test_a_walker_never_initialised_refuses_every_call():
    from snooper import _fastcap
    bare = _fastcap.Walker.__new__(_fastcap.Walker)
    for call in (lambda: bare.add([(0, 10, b"x")]), bare.take, bare.ready, lambda: bare.walk(bytearray(100), 0, 64)):
        with pytest.raises(RuntimeError, match="before __init__"):
            call()


def test_add_frames_same_as_python_and_as_dedupe_seen():
    rnd = random.Random(5)
    ts, frames = 0, []
    for _ in range(20_000):
        ts += rnd.choice([0, 1000, 10**6, 3 * 10**8, 2 * S])
        frames.append((ts, rnd.choice([60, 61, 4000]), bytes([rnd.randrange(40)]) * rnd.choice([1, 60])))
    ref = Dedupe(1.0)
    expected = [f for f in frames if not ref.seen(*f)]
    c_eng, p_eng = c_engine(1.0, 262144, 777), py_engine(1.0, 262144, 777)
    c_counts = [c_eng.add(frames[i:i + 999]) for i in range(0, len(frames), 999)]
    p_counts = [p_eng.add(frames[i:i + 999]) for i in range(0, len(frames), 999)]
    assert c_counts == p_counts
    c_b, p_b = c_eng.take(), p_eng.take()
    assert c_b == p_b and [f for b in c_b for f in framebatch.unpack(b[0])] == expected
    assert len(c_eng) == len(p_eng) > 0


def test_capture_counters_equal_with_either_engine():
    class Collect:
        def __init__(self):
            self.batches = []

        def offer(self, batch, block=False):
            self.batches.append(batch)

    class Blocks:  # the part of Ring the capture uses, over prepared blocks
        def __init__(self, blocks):
            self.blocks, self.block_size, self.i = blocks, BLOCK, 0
            self.mm = None

        def ready(self):
            if self.i >= len(self.blocks):
                return None
            self.mm = self.blocks[self.i]
            return 0

        def release(self):
            self.i += 1

    out = {}
    for mode in ("on", "off"):
        c, w = counters.new(), Collect()
        cap = Capture(Blocks(random_blocks(3, 25)), None, w, c, "s", "r", 500, 60.0, None,
                      engine=engine.make(2.0, 128, 500, mode=mode))
        while cap._block() is not None:
            pass
        cap.flush()
        out[mode] = (c, [(b.seq, framebatch.pack(b.frames)) for b in w.batches])
    assert out["on"] == out["off"]
    c = out["on"][0]
    assert c["captured"] > 3000 and c["duplicates"] > 0 and c["truncated"] > 0
    assert c["captured"] - c["duplicates"] == sum(framebatch.summary(list(framebatch.unpack(p)))[0]
                                                  for _, p in out["on"][1])


def test_env_picks_the_engine(monkeypatch):
    monkeypatch.setenv(engine.ENV, "off")
    assert isinstance(engine.make(2.0, 64, 10), engine.PyEngine)
    monkeypatch.setenv(engine.ENV, "auto")
    assert not isinstance(engine.make(2.0, 64, 10), engine.PyEngine)
    monkeypatch.setenv(engine.ENV, "fast")
    with pytest.raises(engine.BadInput, match="PISNOOP_FASTCAP"):
        engine.make(2.0, 64, 10)


def test_packed_batches_fill_the_writer_queue_by_their_size_and_spool_as_lists_do(tmp_path):
    import logging

    from snooper.batch import Batch
    from snooper.spool import Spool
    from snooper.writer import Writer

    eng = c_engine(2.0, 262144, 100)
    eng.add([(S + i, 60, struct.pack("!Q", i).ljust(60, b"\x33")) for i in range(300)])
    packed = [framebatch.Packed(*b) for b in eng.take()]
    assert [len(p) for p in packed] == [100, 100, 100] and all(len(p.data) == 100 * 76 for p in packed)
    c = counters.new()
    spool = Spool(tmp_path, 10, "drop_newest", c, logging.getLogger("test"))
    w = Writer(None, spool, c, logging.getLogger("test"), None, queue_bytes=2 * 100 * 76)   # not started: it holds
    for seq, p in enumerate(packed):
        w.offer(Batch("s", "r", seq, p))
    assert w.pending_frames == 200 and w.pending_bytes == 2 * 100 * 76 and c["queue_overflows"] == 1
    back = spool.load(spool.oldest())
    assert back.seq == 2 and back.frames == list(packed[2]) and c["spooled"] == 100
    spool.close()
