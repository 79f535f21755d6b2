"""How many stored frames per second the analyser gets through on one core, fast engine against reference.

Frames: XMPP-like TCP traffic of 200 clients (handshake, then data segments
of 60-300 bytes toward port 5222 and some back), packed in batches of 1,000
frames as the snooper stores them. Figures, all in the same run:

* reference 1: a loop that only unpacks the same batches (framebatch.unpack)
* reference 2: dpkt per frame (dpkt.ethernet.Ethernet), what the parser avoids
* in memory, per engine: parse + flows + classifiers (the service's engine,
  steps of 64 batches as the service reads them, MemoryFlows): the reference
  engine (analyser/engine.py) and the fast one (analyser/fast.py) on the same
  frames in this process, and whether they gave the same flows and flags
* from the store, per engine: the service's steps against the embedded store
  (read batches, analyse, write flows and the resume point), CPU time of this
  process only (the store runs in its own process); flows and flags compared
* in memory, on the whole-appliance benchmark's traffic (lab/uplink.py: 2,176
  connections, one way, mid-stream, a third UDP, at the 100 Mb/s line rate of
  64-byte frames): both engines, the fast one counting it on its quiet path;
  and the fast one again with Python's default collector thresholds, against
  the service's (appliance/service.py tune_gc, which every run here uses)
* in memory, a rotating-address flood (tests/analyser_frames.py: every frame
  a new 5-tuple, UDP and bare SYNs, IPv4 and IPv6, at 100,000 a second)
  with the flow table capped at 10,000 (analyser.max_flows): both engines,
  and how much of it went untracked
* flag latency: the service running (default poll interval, fast engine), a
  batch whose packet crosses the threshold is stored; time until its flag is
  in the store (the closed-loop budget from crossing to block is 2 s)

Target (issue 12): >= 1,000,000 stored frames per second on one core.
The machine is shared: compare the ratios, not the absolute figures.
    PYTHONPATH=. python bench/analyser.py [--frames 300000] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dpkt  # noqa: E402

from analyser import flags as flags_mod  # noqa: E402
from analyser import gather  # noqa: E402
from analyser import policy as policy_mod  # noqa: E402
from analyser.engine import Engine  # noqa: E402
from analyser.fast import FastEngine  # noqa: E402
from analyser.flows import FlowTable, MemoryFlows  # noqa: E402
from analyser.live import Analyser  # noqa: E402
from analyser.packed import Packed  # noqa: E402
from appliance import config, framebatch, service, store  # noqa: E402
from lab import procs, uplink  # noqa: E402
from tests.analyser_frames import T0, Conn, S, rotating_flood, steady  # noqa: E402

BATCH = 1000
DEFAULT_GC = gc.get_threshold()       # CPython's own, read before main() applies the service's


def traffic(n_frames: int, clients: int = 200) -> list:
    rnd = random.Random(7)
    conns = [Conn(f"10.1.{i // 250}.{i % 250 + 1}", 30000 + i, mac=f"02:00:00:01:{i // 256:02x}:{i % 256:02x}")
             for i in range(clients)]
    frames = []
    for i, c in enumerate(conns):
        frames += c.handshake(T0 + i * 1_000_000)
    t = T0 + S
    heavy = conns[:3]  # three abusers (~850 packets/min each toward the server), the rest ~40/min
    while len(frames) < n_frames:
        c = rnd.choice(heavy) if rnd.random() < 0.3 else rnd.choice(conns)
        size = rnd.randint(60, 300)
        frames += c.data(t, b"<message>" + b"x" * size + b"</message>", to_server=rnd.random() < 0.7)
        t += 5_000_000  # 200 frames per second of frame time
    return frames[:n_frames]


def uplink_blobs(n_frames: int) -> list:
    """lab/uplink.py's frames at 148,810 a second, packed in batches of BATCH."""
    data = list(uplink.frames(min(n_frames, uplink.UNIQUE)))
    frames = [(T0 + i * 1_000_000_000 // 148_810, len(data[i % len(data)]), data[i % len(data)])
              for i in range(n_frames)]
    return [framebatch.pack(frames[i:i + BATCH]) for i in range(0, n_frames, BATCH)]


def flag_latency(cfg, db, runs: int = 7) -> list[float]:
    """Seconds from storing the crossing batch to finding the flag, with the service loop running."""
    import threading
    a = Analyser(cfg, db)
    th = threading.Thread(target=a.run, daemon=True)
    th.start()
    out = []
    try:
        for r in range(runs):
            c = Conn(f"10.9.0.{r + 1}", 50000 + r, mac=f"02:00:00:09:00:{r + 1:02x}")   # one host each
            frames = steady(c, T0 + 3600 * S, 6000, 1.2)  # 120 packets in 1.2 s: crosses 100/min at once
            doc = store.batch_document("pisnoop", "latency", r, frames)
            time.sleep(0.37 * (r % 3))  # land at different points of the poll cycle
            doc["ins"] = dt.datetime.now(dt.timezone.utc)
            t = time.perf_counter()
            db[store.FRAMES].insert_one(doc)
            while not db[store.FLAGS].find_one({"client_ip": c.c}):
                if time.perf_counter() - t > 30:
                    got = [(f.get("client_ip"), f.get("client_mac"), f["status"]) for f in db[store.FLAGS].find()]
                    raise SystemExit(f"no flag for {c.c} after 30 s: {dict(a.engine.counters)}, flags {got}")
                time.sleep(0.005)
            out.append(time.perf_counter() - t)
    finally:
        a.stop.set()
        th.join(10)
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


WALL_CLOCK = ("_id", "flagged_at", "expires_at", "created_at", "updated_at")
WRITES = ("step", "step_batches")     # which write of the service held the flow last: when analyser.flush_interval fell


def outcome(flow_docs, flag_docs) -> tuple:
    """What both engines must agree on: every flow record but when it was written, every flag but its wall-clock
    times."""
    flows = sorted(({k: v for k, v in d.items() if k not in WRITES} for d in flow_docs), key=lambda d: d["_id"])
    flags = sorted(({k: v for k, v in d.items() if k not in WALL_CLOCK} for d in flag_docs), key=repr)
    return flows, flags


def in_memory(kind, cfg, blobs) -> tuple[float, tuple, object]:
    """CPU seconds of one engine over the batches (64 a step, as the service reads them), and its outcome."""
    book = flags_mod.FlagBook(cfg, flags_mod.MemoryFlags())
    engine = kind(cfg, policy_mod.load(None), FlowTable(MemoryFlows(), cfg.snooper.sensor), book)
    steps = [[(f"b{i}", 0, Packed(b)) for i, b in enumerate(blobs[k:k + 64], k)] for k in range(0, len(blobs), 64)]
    _, cpu = timed(lambda: [engine.run_step(st, n + 1, persistent=True) for n, st in enumerate(steps)])
    return cpu, outcome(engine.flows.sink.all(), book.backend.all()), engine


def from_store(scfg, db) -> tuple[float, float, tuple]:
    a = Analyser(scfg, db)
    wall, cpu = timed(lambda: a.run(once=True))
    return wall, cpu, outcome(db[store.FLOWS].find(), db[store.FLAGS].find())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300_000)
    ap.add_argument("--quick", action="store_true", help="100,000 frames, no flag latency (under 2 minutes)")
    args = ap.parse_args()
    if args.quick:
        args.frames = min(args.frames, 100_000)
    logging.disable(logging.WARNING)  # the flags of the three abusers would flood the output
    frames = traffic(args.frames)
    blobs = [framebatch.pack(frames[i:i + BATCH]) for i in range(0, len(frames), BATCH)]
    n = len(frames)
    cfg = config.Config()
    print(f"{n} frames in {len(blobs)} batches of {BATCH}, {sum(len(b) for b in blobs) / n:.0f} bytes/frame packed")
    print(f"the fast engine's step gather: {'C (analyser._fastread)' if gather.use_c() else 'numpy (analyser.gather)'}")

    def unpack_only():
        for b in blobs:
            for _f in framebatch.unpack(b):
                pass
    w_ref, _ = timed(unpack_only)

    sample = frames[: min(n, 50_000)]

    def dpkt_each():
        for _ts, _wl, data in sample:
            eth = dpkt.ethernet.Ethernet(data)
            _ = eth.data.data.dport
    w_dpkt, _ = timed(dpkt_each)
    dpkt_us = w_dpkt / len(sample) * 1e6

    service.tune_gc()                 # what the analyser service runs with: both engines here too
    c_old, mem_old, _ = in_memory(Engine, cfg, blobs)
    c_new, mem_new, fast = in_memory(FastEngine, cfg, blobs)
    assert fast.counters["packets"] == n, fast.counters
    n_up = 3 * n                      # the first step (64 batches) sees each connection for the first time: slow
    up = uplink_blobs(n_up)
    u_old, umem_old, _ = in_memory(Engine, cfg, up)
    u_new, umem_new, ufast = in_memory(FastEngine, cfg, up)
    gc.set_threshold(*DEFAULT_GC)
    u_def, _, _ = in_memory(FastEngine, cfg, up)
    service.tune_gc()
    cap = 10_000                      # a rotating-address flood past analyser.max_flows
    fcfg = config.from_dict({"analyser": {"max_flows": cap}})
    n_fl = n_up                       # past the first second, the steady state of a flood: the table full
    flood = rotating_flood(9, T0, n_fl, per_second=100_000)
    fl = [framebatch.pack(flood[i:i + BATCH]) for i in range(0, n_fl, BATCH)]
    f_old, fmem_old, _ = in_memory(Engine, fcfg, fl)
    f_new, fmem_new, ffast = in_memory(FastEngine, fcfg, fl)

    with tempfile.TemporaryDirectory() as tmp:
        es = procs.EmbeddedStore(Path(tmp) / "store").start()
        try:
            docs = []
            for i in range(len(blobs)):
                d = store.batch_document("pisnoop", "bench", i, frames[i * BATCH:(i + 1) * BATCH])
                d["ins"] = dt.datetime.now(dt.timezone.utc)
                docs.append(d)
            got = {}
            for engine in ("reference", "fast"):
                scfg = config.from_dict({"mongodb": {"uri": es.uri, "database": f"bench_{engine}"},
                                         "metrics": {"enabled": False}, "analyser": {"engine": engine}})
                db = store.database(scfg.mongodb)
                db[store.FRAMES].insert_many([dict(d) for d in docs])
                got[engine] = from_store(scfg, db) + (db[store.FLOWS].count_documents({}),
                                                      db[store.FLAGS].count_documents({}))
            latencies = [] if args.quick else flag_latency(scfg, db)
        finally:
            es.stop()

    us = lambda secs: secs / n * 1e6  # noqa: E731
    line = lambda name, secs: print(f"{name:<40}{n / secs:>12,.0f} frames/s  ({us(secs):.2f} µs/frame)")  # noqa: E731
    print(f"reference 1  unpack only:                {n / w_ref:>12,.0f} frames/s  ({us(w_ref):.2f} µs/frame)")
    print(f"reference 2  dpkt per frame:             {1e6 / dpkt_us:>12,.0f} frames/s  ({dpkt_us:.2f} µs/frame)")
    line("in memory, reference engine (1 core):", c_old)
    line("in memory, fast engine (1 core):", c_new)
    print(f"  fast = {c_old / c_new:.2f} x the reference engine, {dpkt_us / us(c_new):.2f} x dpkt-per-frame; "
          f"{fast.bulk_packets / n:.0%} of the packets counted in bulk verified, {fast.quiet_packets / n:.0%} quiet; "
          f"same flows and flags: "
          f"{'yes' if mem_old == mem_new else 'NO'} ({len(mem_new[0])} flows, {len(mem_new[1])} flags)")
    uline = lambda name, secs: print(f"{name:<40}{n_up / secs:>12,.0f} frames/s  ({secs / n_up * 1e6:.2f} µs/frame)")  # noqa: E731
    uline(f"uplink traffic ({n_up:,} frames), reference:", u_old)
    uline(f"uplink traffic ({n_up:,} frames), fast:", u_new)
    print(f"  fast = {u_old / u_new:.2f} x the reference engine; {ufast.quiet_packets / n_up:.0%} of the packets "
          f"counted quietly; same flows and flags: {'yes' if umem_old == umem_new else 'NO'} "
          f"({len(umem_new[0])} flows)")
    uline(f"uplink traffic, fast, Python's default gc {DEFAULT_GC}:", u_def)
    print(f"  the service's gc threshold {service.GC_THRESHOLD} = {u_def / u_new:.2f} x Python's default")
    uline(f"rotating-address flood ({n_fl:,} frames, table of {cap:,}), reference:", f_old)
    uline(f"rotating-address flood ({n_fl:,} frames, table of {cap:,}), fast:", f_new)
    print(f"  fast = {f_old / f_new:.2f} x the reference engine; {ffast.counters['untracked'] / n_fl:.0%} of the "
          f"frames untracked (a new flow each, the table full), {len(ffast.flows.flows):,} flows in memory at the end; "
          f"same flows and flags: {'yes' if fmem_old == fmem_new else 'NO'} ({len(fmem_new[0]):,} flows recorded)")
    (w_so, c_so, out_so, _, _), (w_sn, c_sn, out_sn, fl_sn, fg_sn) = got["reference"], got["fast"]
    line("from the store, reference engine, CPU:", c_so)
    line("from the store, fast engine, CPU:", c_sn)
    print(f"  fast = {c_so / c_sn:.2f} x the reference engine (CPU), {w_so / w_sn:.2f} x (wall clock: "
          f"{n / w_sn:,.0f} frames/s); same flows and flags: {'yes' if out_so == out_sn else 'NO'} "
          f"({fl_sn} flows, {fg_sn} flags written)")
    if latencies:
        latencies.sort()
        print(f"flag latency (batch stored -> flag stored, poll interval {cfg.analyser.poll_interval} s): "
              f"median {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms "
              f"over {len(latencies)} runs")
    target = 1_000_000
    print(f"target >= {target:,} stored frames/s on one core: {'met' if n / c_sn >= target else 'NOT met'} "
          f"({n / c_sn / target:.2f} x target, CPU from the store; in memory {n / c_new / target:.2f} x)")


if __name__ == "__main__":
    main()
