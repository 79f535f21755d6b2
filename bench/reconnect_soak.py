"""A 1-hour-equivalent reconnect soak: the real ``pisnoop controller`` (zodiacfx) against the Zodiac FX model.

A Zodiac that flaps every ~2 s reconnects ~1,800 times an hour; this drops the model's connection
``--rounds`` times (RST and FIN in turn, the model back at once) and waits for each full push. It prints
the controller's threads, open file descriptors and RSS before and after (read from /proc), and the
ratio after/before: a leak of one thread or socket per connection shows as a ratio far above 1.

    python bench/reconnect_soak.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.procs import EmbeddedStore, free_port  # noqa: E402
from lab.zodiac import ZodiacSwitch  # noqa: E402
from tests.ctlutil import ControllerProcess, settled_usage  # noqa: E402

STATIC = 6


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pisnoop-soak-") as tmp:
        tmp = Path(tmp)
        es = EmbeddedStore(tmp / "store").start()
        port = free_port()
        cfg = {"mongodb": {"uri": es.uri, "database": "soak"}, "metrics": {"enabled": False},
               "snooper": {"spool_dir": str(tmp / "spool")}, "analyser": {"report_dir": str(tmp / "reports")},
               "switch": {"target": "zodiacfx", "datapath_id": 0x70B3D56CD888,
                          "ports": {"inside": 1, "mirror": 2, "upstream": 3, "management": 4},
                          "controller": {"listen_host": "127.0.0.1", "listen_port": port}}}
        (tmp / "pisnoop.yaml").write_text(yaml.safe_dump(cfg))
        ctl = ControllerProcess(types.SimpleNamespace(run_dir=tmp, config_path=tmp / "pisnoop.yaml")).start()
        sw = ZodiacSwitch(("127.0.0.1", port), tick=0.1).start()
        try:
            if not sw.wait(lambda s: len(s.flows()) == STATIC, 30):
                raise SystemExit(f"no first push:\n{ctl.log[-2000:]}")
            time.sleep(1.0)
            pid = ctl.proc.pid
            t0, (th0, fd0), rss0 = time.monotonic(), settled_usage(pid), rss(pid)
            for i in range(args.rounds):
                n = i + 1
                ctl.wait_log("connected from", count=n, timeout=30)
                sw.drop("rst" if i % 2 else "fin", reconnect=0)
                if n % 200 == 0:
                    th, fd = settled_usage(pid, timeout=0.5)
                    print(f"  {n:5d} reconnects: threads {th}, fds {fd}, rss {rss(pid) / 1e6:.1f} MB", flush=True)
            ctl.wait_log("connected from", count=args.rounds + 1, timeout=30)
            sw.wait(lambda s: len(s.flows()) == STATIC, 30)
            elapsed = time.monotonic() - t0
            th1, fd1 = settled_usage(pid, want=(th0, fd0))
            rss1 = rss(pid)
        finally:
            sw.stop()
            ctl.kill(hard=False)
            es.stop()
        c = sw.counters()
        print(f"{args.rounds} reconnects in {elapsed:.0f} s ({args.rounds / elapsed:.1f}/s); model: {c['connects']} "
              f"connects, max burst {c['max_burst']} B (buffer {sw.rx_buffer}), overflows {c['overflows']}")
        print(f"threads {th0} -> {th1} (x{th1 / th0:.2f}), fds {fd0} -> {fd1} (x{fd1 / fd0:.2f}), "
              f"rss {rss0 / 1e6:.1f} -> {rss1 / 1e6:.1f} MB (x{rss1 / rss0:.2f})")
        print(f"controller log: {ctl.log.count(') after ')} disconnects logged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
