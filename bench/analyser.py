"""How many stored frames the analyser gets through per minute on one core.

Frames: XMPP-like TCP traffic of 200 clients (handshake, then data segments
of 60-300 bytes toward port 5222 and some back), packed in batches of 1,000
frames as the snooper stores them. Figures, all in the same run:

* reference 1: a loop that only unpacks the same batches (framebatch.unpack)
* reference 2: dpkt per frame (dpkt.ethernet.Ethernet), what the parser avoids
* analyser in memory: parse + flows + classifiers (Engine, MemoryFlows)
* analyser from the store: the service's steps against the embedded store
  (read batches, analyse, write flows and the resume point), CPU time of
  this process only (the store runs in its own process)
* flag latency: the service running (default poll interval), a batch whose
  packet crosses the threshold is stored; time until its flag is in the
  store (the closed-loop budget from crossing to block is 2 s)

Target: >= 1,000,000 stored frames per minute on one core.
    PYTHONPATH=. python bench/analyser.py [--frames 300000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dpkt  # noqa: E402

from analyser import policy as policy_mod  # noqa: E402
from analyser.live import Analyser  # noqa: E402
from analyser.offline import Offline  # noqa: E402
from appliance import config, framebatch, store  # noqa: E402
from lab import procs  # noqa: E402
from tests.analyser_frames import T0, Conn, S, steady  # noqa: E402

BATCH = 1000


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300_000)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the flags of the three abusers would flood the output
    frames = traffic(args.frames)
    blobs = [framebatch.pack(frames[i:i + BATCH]) for i in range(0, len(frames), BATCH)]
    n = len(frames)
    cfg = config.Config()
    print(f"{n} frames in {len(blobs)} batches of {BATCH}, {sum(len(b) for b in blobs) / n:.0f} bytes/frame packed")

    def unpack_only():
        for b in blobs:
            for _f in framebatch.unpack(b):
                pass
    w_ref, c_ref = timed(unpack_only)

    sample = frames[: min(n, 50_000)]

    def dpkt_each():
        for _ts, _wl, data in sample:
            eth = dpkt.ethernet.Ethernet(data)
            _ = eth.data.data.dport
    w_dpkt, _ = timed(dpkt_each)
    dpkt_fps = len(sample) / w_dpkt

    off = Offline(cfg, policy_mod.load(None))
    w_mem, c_mem = timed(lambda: [off.run([(f"b{i}", 0, framebatch.unpack(b))]) for i, b in enumerate(blobs)])
    assert off.engine.counters["packets"] == n, off.engine.counters

    with tempfile.TemporaryDirectory() as tmp:
        es = procs.EmbeddedStore(Path(tmp) / "store").start()
        try:
            scfg = config.from_dict({"mongodb": {"uri": es.uri, "database": "bench"}, "metrics": {"enabled": False}})
            db = store.database(scfg.mongodb)
            docs = []
            for i in range(len(blobs)):
                d = store.batch_document("pisnoop", "bench", i, frames[i * BATCH:(i + 1) * BATCH])
                d["ins"] = dt.datetime.now(dt.timezone.utc)
                docs.append(d)
            db[store.FRAMES].insert_many(docs)
            a = Analyser(scfg, db)
            w_st, c_st = timed(lambda: a.run(once=True))
            assert a.engine.counters["packets"] == n, a.engine.counters
            flows = db[store.FLOWS].count_documents({})
            flags = db[store.FLAGS].count_documents({})
            latencies = flag_latency(scfg, db)
        finally:
            es.stop()

    per_min = lambda secs: n / secs * 60  # noqa: E731
    print(f"reference 1  unpack only:              {per_min(w_ref):>13,.0f} frames/min  "
          f"({w_ref / n * 1e6:.2f} µs/frame)")
    print(f"reference 2  dpkt per frame:           {dpkt_fps * 60:>13,.0f} frames/min  ({1e6 / dpkt_fps:.2f} µs/frame)")
    print(f"analyser in memory (1 core):           {per_min(c_mem):>13,.0f} frames/min  "
          f"({c_mem / n * 1e6:.2f} µs/frame CPU)")
    print(f"analyser from the store, CPU (1 core): {per_min(c_st):>13,.0f} frames/min  "
          f"({c_st / n * 1e6:.2f} µs/frame CPU)")
    print(f"analyser from the store, wall clock:   {per_min(w_st):>13,.0f} frames/min  "
          f"({flows} flows, {flags} flags written)")
    print(f"ratios: analyser in memory = {w_ref / w_mem:.3f} x unpack-only speed, "
          f"{(n / w_mem) / dpkt_fps:.2f} x dpkt-per-frame speed; "
          f"from the store = {(n / w_st) / dpkt_fps:.2f} x dpkt-per-frame")
    latencies.sort()
    print(f"flag latency (batch stored -> flag stored, poll interval {cfg.analyser.poll_interval} s): "
          f"median {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms "
          f"over {len(latencies)} runs")
    target = 1_000_000
    print(f"target >= {target:,} frames/min on one core: {'met' if per_min(c_st) >= target else 'NOT met'} "
          f"({per_min(c_st) / target:.1f} x target, CPU); wall clock {per_min(w_st) / target:.1f} x target")


if __name__ == "__main__":
    main()
