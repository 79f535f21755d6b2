#!/usr/bin/env python3
"""Full-set push time on switch connect, against ``ovs-ofctl add-flows`` of the same set.

For each flow-set size (the static set alone, then with N active bans from
the store) the controller is killed and restarted R times on a virtual
appliance; each connect logs features-reply -> barrier-reply. The reference,
measured in the same run on the same bridge: ``ovs-ofctl add-flows`` of the
very flows the controller installed (dump-flows --no-stats), and a bare
``ovs-ofctl probe`` (process start + connect + echo round trip).

    sudo .venv/bin/python bench/controller_push.py [--rounds 5] [--bans 200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import store  # noqa: E402
from appliance.netns import run  # noqa: E402
from lab.virtual import VirtualAppliance  # noqa: E402
from tests.ctlutil import ControllerProcess  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def add_bans(va, n: int) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    docs = [{"client_ip": f"10.0.{1 + i // 250}.{1 + i % 250}", "client_port": None, "server_port": 5222,
             "classifier": "bench", "reason": "bench", "action": "drop", "evidence": {}, "offence": 1,
             "ban_seconds": 3600, "flagged_at": now, "expires_at": now + dt.timedelta(hours=1), "updated_at": now,
             "status": "flagged"} for i in range(n)]
    db = store.database(va.config.mongodb)
    try:
        db[store.FLAGS].insert_many(docs)
    finally:
        db.client.close()


def measure(va, rounds: int) -> tuple[list[float], list[int]]:
    """Push times of connects whose push carried the whole table (bans loaded before the switch came)."""
    pushes, sizes = [], []
    for _ in range(rounds + 1):
        ctl = ControllerProcess(va).start()
        try:
            ms = ctl.wait_pushed(timeout=60)
            time.sleep(1.5)
            size = int(re.search(r"full set pushed: (\d+) flows", ctl.log).group(1))
        finally:
            ctl.kill(hard=True)
        pushes.append(ms)
        sizes.append(size)
    return pushes[1:], sizes[1:]                 # the first connect also paid for cold caches


def reference(va, rounds: int) -> tuple[list[float], list[float]]:
    with tempfile.NamedTemporaryFile("w", suffix=".flows", delete=False) as fh:
        fh.write(va.ofctl("dump-flows", "--no-stats"))
        path = fh.name
    try:
        add = [timed(lambda: va.ofctl("add-flows", path)) for _ in range(rounds)]
        probe = [timed(lambda: run(["ovs-ofctl", "-O", "OpenFlow13", "probe", va.bridge], env=va.ovs_env))
                 for _ in range(rounds)]
    finally:
        Path(path).unlink()
    return add, probe


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bans", type=int, default=200)
    args = ap.parse_args()
    with VirtualAppliance() as va:
        for bans in (0, args.bans):
            if bans:
                add_bans(va, bans)
            pushes, sizes = measure(va, args.rounds)
            flows = sum(1 for line in va.ofctl("dump-flows").splitlines() if "cookie=" in line)
            if min(sizes) != flows:
                print(f"note: some pushes carried {min(sizes)} of {flows} flows (bans not yet loaded at connect)")
            add, probe = reference(va, args.rounds)
            p, a, pr = statistics.median(pushes), statistics.median(add), statistics.median(probe)
            print(f"{flows:4d} flows: controller push on connect {p:7.2f} ms (median of {len(pushes)}; "
                  f"min {min(pushes):.2f}, max {max(pushes):.2f})")
            print(f"            ovs-ofctl add-flows of the same set {a:7.2f} ms   ratio push/add-flows {p / a:5.2f}")
            print(f"            ovs-ofctl probe (echo round trip)   {pr:7.2f} ms   ratio push/probe     {p / pr:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
