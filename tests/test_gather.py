"""The step's records as arrays (analyser/gather.py): the C pass (analyser._fastread) and the numpy one give the same
bytes, both read what framebatch.unpack reads, and the fast engine's results do not depend on which ran."""

from __future__ import annotations

import logging
import random
import struct

import numpy as np
import pytest
from bson import Binary

from analyser import fast, gather
from analyser.fast import FastEngine
from analyser.packed import Packed
from appliance import framebatch
from appliance.errors import BadInput
from tests.test_analyser_fast import capture, run, same

needs_c = pytest.mark.skipif(not gather.available(), reason="analyser._fastread is not built: run "
                             "`python -m appliance.cext .` in the repository (or pip install -e .)")
ARRAYS = ("offs", "owner", "ts", "wl", "cap", "head")


def random_blob(rnd: random.Random) -> bytes:
    """A packed batch of random frames (0..1600 bytes, many shorter than HEAD), maybe damaged at its end."""
    frames = [(rnd.randint(-2**63, 2**63 - 1), rnd.getrandbits(32),
               rnd.randbytes(rnd.choice((0, 1, 13, 54, 71, 72, 73, rnd.randint(0, 1600)))))
              for _ in range(rnd.choice((0, 1, 2, 7, 40)))]
    blob = framebatch.pack(frames)
    damage = rnd.random()
    if damage < 0.1 and blob:
        blob = blob[:rnd.randrange(len(blob))]                         # cut anywhere: a header or a frame short
    elif damage < 0.15:
        blob += rnd.randbytes(rnd.randint(1, 15))                      # a header cut short
    elif damage < 0.2:
        blob += struct.pack("<qII", 5, 60, rnd.choice((1, 1600, 0xFFFFFFFF))) + rnd.randbytes(rnd.randint(0, 1))
    return blob


def expected(blobs: list):
    """What framebatch.unpack reads of each blob: its frames and its error text."""
    out = []
    for blob in blobs:
        frames, err = [], None
        try:
            for f in framebatch.unpack(bytes(blob)):
                frames.append(f)
        except framebatch.CorruptBatch as exc:
            err = str(exc)
        out.append((frames, err))
    return out


def check_reads_what_unpack_reads(blobs: list, got: gather.Records) -> None:
    want = expected(blobs)
    size = sum(len(b) for b in blobs)
    assert got.buf == b"".join(bytes(b) for b in blobs) + bytes(-size % 8 + gather.PAD)
    assert got.errors == [err for _, err in want]
    frames = [f for fs, _ in want for f in fs]
    assert got.owner.tolist() == [i for i, (fs, _) in enumerate(want) for _ in fs]
    assert len(got.offs) == len(frames) and got.head.shape == (len(frames), gather.HEAD)
    for j, (ts, wl, data) in enumerate(frames):
        o = int(got.offs[j])
        assert (int(got.ts[j]), int(got.wl[j]), int(got.cap[j])) == (ts, wl, len(data))
        assert got.buf[o + 16:o + 16 + len(data)] == data
        assert got.head[j].tobytes() == got.buf[o + 16:o + 16 + gather.HEAD]   # past a short frame: what follows


def identical(a: gather.Records, b: gather.Records) -> None:
    assert type(a.buf) is type(b.buf) is bytes and a.buf == b.buf
    assert a.errors == b.errors
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x.dtype, x.shape, x.flags.writeable) == (y.dtype, y.shape, y.flags.writeable), name
        assert x.tobytes() == y.tobytes(), name


@pytest.mark.parametrize("seed", range(6))
def test_the_numpy_gather_reads_what_unpack_reads_on_random_blobs(seed):
    rnd = random.Random(seed)
    blobs = [random_blob(rnd) for _ in range(rnd.choice((1, 3, 64, 200)))]
    check_reads_what_unpack_reads(blobs, gather.gather(blobs, "off"))


@needs_c
@pytest.mark.parametrize("seed", range(12))
def test_c_and_numpy_give_the_same_bytes_on_random_blobs(seed):
    rnd = random.Random(seed)
    blobs = [random_blob(rnd) for _ in range(rnd.choice((1, 3, 64, 200)))]
    c = gather.gather(blobs, "on")
    identical(c, gather.gather(blobs, "off"))
    check_reads_what_unpack_reads(blobs, c)
    if len(c.offs) > 200:
        assert set((c.offs & 7).tolist()) == set(range(8))               # records at every alignment
        assert (c.cap < gather.HEAD).sum() > 10                           # frames shorter than the head


@needs_c
@pytest.mark.parametrize("seed", [2, 5])
def test_the_c_fields_are_what_the_fast_engines_numpy_passes_compute(seed):
    """The frame shape and endpoints the C pass computes with the gather (fast.py keeps them) against
    ``fast._read_shape`` and ``fast._endpoints`` on the numpy gather's frames: real TCP and UDP frames of both families,
    and copies with a byte of their first HEAD changed or cut short, so every check of the shape fails somewhere."""
    rnd = random.Random(seed)
    frames = capture(seed, n_clients=20, seconds=120)
    for _ in range(4000):
        ts, wl, data = rnd.choice(frames)
        if rnd.random() < 0.7 and len(data) > 13:
            k = rnd.randrange(12, min(len(data), gather.HEAD))
            data = data[:k] + bytes([rnd.getrandbits(8)]) + data[k + 1:]
        else:
            data = data[:rnd.randint(0, len(data))]
        frames.append((ts, wl, data))
    blobs = [framebatch.pack(frames[k:k + 700]) + rnd.randbytes(rnd.choice((0, 0, 3)))
             for k in range(0, len(frames), 700)]
    c = gather.gather(blobs, "on")
    fr = fast._Frames(gather.gather(blobs, "off"))
    shape, ends = fast._read_shape(fr), fast._endpoints(fr)
    assert len(c.shape) == len(shape) and set(c.ends) == set(ends)
    all_rows = np.arange(len(fr.ts))
    more = {k: fr.seg(k, shape[1], all_rows) for k in gather.MORE}        # the numpy reading of the same fields
    assert fr.more is None and set(c.more) == set(more)
    for x, y in [*zip(c.shape, shape), *((c.ends[k], ends[k]) for k in ends), *((c.more[k], more[k]) for k in more)]:
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    bulk, v6, udp, synrst = shape[0], shape[1], shape[6], shape[7]
    assert 0.5 < bulk.mean() < 0.97 and 0.05 < v6[bulk].mean() < 0.95     # both kinds, both families
    assert 0.005 < udp[bulk].mean() < 0.5                                   # and both protocols
    assert 0.001 < synrst.mean() < 0.2 and not (synrst & (bulk | udp)).any()   # handshakes and resets, TCP only


@pytest.mark.parametrize("mode", ["off", pytest.param("on", marks=needs_c)])
def test_damage_counts_the_records_before_it_with_unpacks_texts(mode):
    one = framebatch.pack([(7, 60, b"a" * 60), (8, 10, b"b" * 10)])
    blobs = [one, one[:-3], one + b"\x01\x02", b"", one + struct.pack("<qII", 9, 60, 0xFFFFFFFF), one[:10]]
    got = gather.gather(blobs, mode)
    assert got.errors == [None, "record at byte 76 claims 10 bytes, 7 left", "truncated record header at byte 102",
                          None, "record at byte 102 claims 4294967295 bytes, 0 left",
                          "truncated record header at byte 0"]
    assert got.owner.tolist() == [0, 0, 1, 2, 2, 4, 4]
    assert got.offs.tolist() == [0, 76, 102, 201, 277, 305, 381]
    check_reads_what_unpack_reads(blobs, got)


@pytest.mark.parametrize("mode", ["off", pytest.param("on", marks=needs_c)])
def test_no_blob_and_empty_blobs_give_no_record(mode):
    for blobs in ([], [b""], [b""] * 5):
        got = gather.gather(blobs, mode)
        assert got.buf == bytes(gather.PAD) and got.errors == [None] * len(blobs)
        assert all(len(getattr(got, name)) == 0 for name in ARRAYS) and got.head.shape == (0, gather.HEAD)


@pytest.mark.parametrize("mode", ["off", pytest.param("on", marks=needs_c)])
def test_bytes_like_blobs_read_as_their_bytes(mode):
    rnd = random.Random(3)
    blobs = [random_blob(rnd) for _ in range(30)]
    want = gather.gather(blobs, mode)
    for kind in (bytearray, memoryview, Binary):
        identical(gather.gather([kind(b) for b in blobs], mode), want)


@needs_c
def test_the_c_gather_refuses_what_is_not_a_list_of_bytes_like_blobs():
    from analyser import _fastread
    with pytest.raises(TypeError):
        _fastread.gather(None)
    held = bytearray(framebatch.pack([(1, 60, b"x" * 60)]))
    with pytest.raises(TypeError):
        _fastread.gather([held, 5])
    held += b"more"                                                      # no buffer of it is left held
    _fastread.gather([held])
    held += b"more"
    with pytest.raises(BufferError):
        _fastread.gather([memoryview(bytes(64))[::2]])                 # not contiguous
    assert (_fastread.HEAD, _fastread.PAD) == (gather.HEAD, gather.PAD)


def test_the_env_picks_the_gather(monkeypatch):
    monkeypatch.setenv(gather.ENV, "off")
    assert not gather.use_c()
    monkeypatch.setenv(gather.ENV, "fast")
    with pytest.raises(BadInput, match="PISNOOP_FASTREAD"):
        gather.use_c()
    monkeypatch.setattr(gather, "_fastread", None)
    monkeypatch.setenv(gather.ENV, "on")
    with pytest.raises(BadInput, match="not built"):
        gather.use_c()
    monkeypatch.setenv(gather.ENV, "auto")
    assert not gather.use_c()                                            # missing: the numpy one


@needs_c
def test_the_env_picks_c_when_built(monkeypatch):
    monkeypatch.delenv(gather.ENV, raising=False)
    assert gather.use_c()
    monkeypatch.setenv(gather.ENV, "on")
    assert gather.use_c()


@needs_c
@pytest.mark.parametrize("seed", [1, 4])
def test_the_fast_engine_gives_the_same_flows_flags_and_counters_with_either_gather(seed, monkeypatch):
    frames = capture(seed)                      # short, cut and garbage frames among them
    got = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(gather.ENV, mode)
        got[mode] = run(FastEngine, frames, seed, bulk=0.15)
    assert got["on"]["flags"] and got["on"]["flows"]
    same(got["off"], got["on"])


@needs_c
def test_damaged_batches_are_counted_and_logged_alike_with_either_gather(monkeypatch, caplog):
    from analyser import flags as flags_mod
    from analyser import policy as policy_mod
    from analyser.flows import FlowTable, MemoryFlows
    from appliance import config
    from tests.analyser_frames import T0, Conn, steady
    frames = steady(Conn("10.0.0.80", 48000), T0, 120, 60, replies=1)
    blobs = [framebatch.pack(frames[k:k + 40]) for k in range(0, len(frames), 40)]
    blobs[1] = blobs[1][:-7]
    blobs[2] = blobs[2] + b"\x01\x02\x03"
    got = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(gather.ENV, mode)
        caplog.clear()
        cfg = config.Config()
        engine = FastEngine(cfg, policy_mod.load(None), FlowTable(MemoryFlows(), "t"),
                            flags_mod.FlagBook(cfg, flags_mod.MemoryFlags()))
        with caplog.at_level(logging.WARNING, logger="pisnoop.analyser"):
            engine.run_step([(f"b{n}", 0, Packed(b)) for n, b in enumerate(blobs[:4])], 1, False)
            engine.run_step([(f"b{n}", 0, Packed(b)) for n, b in enumerate(blobs[4:], 4)], 2, False)
        got[mode] = (dict(engine.counters), sorted(engine.flows.sink.all(), key=lambda d: d["_id"]),
                     [r.getMessage() for r in caplog.records])
    assert got["on"][0]["corrupt_batches"] == 2
    want = [f"batch b{i}: {err}; its remaining frames are skipped" for i, (_, err) in enumerate(expected(blobs)) if err]
    assert [m for m in got["on"][2] if m.startswith("batch ")] == want
    assert got["off"] == got["on"]


def test_every_array_is_read_only_either_way():
    got = gather.gather([framebatch.pack([(1, 60, b"x" * 60)])], "off")
    for name in ARRAYS:
        with pytest.raises(ValueError):
            getattr(got, name)[0] = 0
    assert np.array_equal(got.cap, [60])


@needs_c
@pytest.mark.parametrize("n", [0, 1, 2, 1000, 70_000])
def test_grouping_in_c_is_numpys_unique(n):
    """The step's connections grouped in C (a hash table) as numpy.unique groups them (sorted keys, first
    positions, inverse): few keys, many, all equal, all distinct, and the extremes of uint64."""
    rng = np.random.default_rng(n)
    cases = [rng.integers(0, 50, size=n, dtype=np.uint64), rng.integers(0, 1 << 63, size=n, dtype=np.uint64) * 2 + 1,
             np.full(n, (1 << 64) - 1, dtype=np.uint64), np.arange(n, dtype=np.uint64)[::-1].copy()]
    for keys in cases:
        want, got = gather.group(keys, "off"), gather.group(keys, "on")
        assert [(a.dtype, a.tobytes()) for a in want] == [(b.dtype, b.tobytes()) for b in got]
