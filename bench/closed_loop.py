#!/usr/bin/env python3
"""Detection-to-block latency of the closed loop (target: median <= 2 s).

Runs the demo scenario N times (default 5). For each run:

* threshold crossing: from the stored frames' own timestamps, the first
  moment one connection of the abusive client has more than
  ``xmpp.threshold_ppm`` packets toward the XMPP port inside
  ``xmpp.window_seconds``;
* block: the install time of the drop flow (dump time minus the flow's
  ``duration``), and the first stored (mirrored) frame of that client after
  it, i.e. the first frame the switch dropped;
* latency = first dropped frame - threshold crossing.

The reference in the same process is the loop's built-in polling budget
(snooper batch interval + analyser poll + controller poll): the ratio says how
far the loop is from the delay its own polling imposes.

    sudo .venv/bin/python bench/closed_loop.py [--runs 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyser import parse  # noqa: E402
from appliance import store  # noqa: E402
from lab import scenario  # noqa: E402


def abuser_packets(db, ip: str, ports) -> list[tuple[int, int]]:
    """(ts_ns, client source port) of every stored TCP frame from ``ip`` toward one of ``ports``."""
    out = []
    for doc in db[store.FRAMES].find({}, {"data": 1}):
        for fr in store.batch_frames(doc):
            pkt = parse.parse(*fr)
            if isinstance(pkt, parse.Packet) and pkt.src == ip and pkt.proto == 6 and pkt.dport in ports:
                out.append((pkt.ts_ns, pkt.sport))
    return sorted(out)


def crossing_ns(packets: list[tuple[int, int]], threshold: int, window_s: float) -> int | None:
    by_conn: dict[int, list[int]] = {}
    for ts, sport in packets:
        by_conn.setdefault(sport, []).append(ts)
    best = None
    win = int(window_s * 1e9)
    for times in by_conn.values():
        for k in range(threshold, len(times)):
            if times[k] - times[k - threshold] <= win:
                best = times[k] if best is None else min(best, times[k])
                break
    return best


def drop_install_ns(va, ip: str) -> int | None:
    dumped = time.time_ns()
    for line in va.ofctl("dump-flows").splitlines():
        if f"nw_src={ip}" in line and ("actions=drop" in line or "meter:" in line):
            m = re.search(r"duration=([\d.]+)s", line)
            if m:
                return dumped - int(float(m.group(1)) * 1e9)
    return None


def one_run(i: int, out: Path) -> float | None:
    opts = scenario.Options(benign=1, warmup=3, after_block=2, timeout=60, out_dir=out / f"run{i}")
    result, va = scenario.run(opts)
    try:
        if not result.blocked:
            print(f"run {i}: not blocked: {result.errors}")
            return None
        cfg = va.config
        db = store.database(cfg.mongodb, "bench")
        pk = abuser_packets(db, scenario.ABUSER_IP, cfg.xmpp.server_ports)
        cross = crossing_ns(pk, cfg.xmpp.threshold_ppm, cfg.xmpp.window_seconds)
        install = drop_install_ns(va, scenario.ABUSER_IP)
        db.client.close()
        if cross is None or install is None:
            print(f"run {i}: no crossing ({cross}) or no drop flow ({install})")
            return None
        first_drop = next((ts for ts, _ in pk if ts >= install), None)
        if first_drop is None:
            print(f"run {i}: no frame of the client after the drop flow")
            return None
        lat = (first_drop - cross) / 1e9
        print(f"run {i}: threshold crossed, drop flow after {(install - cross) / 1e9:.3f} s, "
              f"first dropped frame after {lat:.3f} s")
        return lat
    finally:
        va.down()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    cfg = scenario.service_config()
    budget = cfg.snooper.batch_interval + cfg.analyser.poll_interval + cfg.enforce.poll_interval
    with tempfile.TemporaryDirectory() as tmp:
        lats = [x for x in (one_run(i + 1, Path(tmp)) for i in range(args.runs)) if x is not None]
    if not lats:
        print("no run produced a figure")
        return 1
    med, mx = statistics.median(lats), max(lats)
    print(f"detection-to-block latency over {len(lats)}/{args.runs} runs: median {med:.3f} s, max {mx:.3f} s "
          f"(target median <= 2 s)")
    print(f"ratio to the polling budget ({budget:.2f} s = batch interval + analyser poll + enforce poll): "
          f"median {med / budget:.2f}x, max {mx / budget:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
