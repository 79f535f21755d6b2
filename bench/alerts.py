"""Does a webhook that hangs slow the analyser down? The engine's time over the same frames, in the same run:

* reference: the engine with no alerts at all (``on_flag`` None)
* log only: every flag alerted, no webhook (the ``pisnoop-alert:`` line, to a null handler)
* hanging webhook: every flag alerted and queued for a webhook on 127.0.0.1 that takes the connection and never
  answers (each POST would block ``timeout_seconds``, 5 s)

Frames: ``--clients`` clients, each sending 600 packets/min toward 5222 for 20 s (each one flag).
Best of three runs each, interleaved; the ratios to the reference are printed:
a ratio near 1 for the hanging webhook is the point.
    PYTHONPATH=. python bench/alerts.py [--clients 200]
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyser import policy as policy_mod  # noqa: E402
from analyser.engine import Engine  # noqa: E402
from analyser.flags import FlagBook, MemoryFlags  # noqa: E402
from analyser.flows import FlowTable, MemoryFlows  # noqa: E402
from appliance import alerts, config  # noqa: E402
from tests.analyser_frames import T0, Conn, steady  # noqa: E402


def frames_of(clients: int) -> list:
    out = []
    for i in range(clients):
        out += steady(Conn(f"10.{i // 250}.{i % 250}.10", 40000, mac=f"02:00:00:00:{i // 250:02x}:{i % 250:02x}"),
                      T0 + i * 1000, 600, 20)
    return sorted(out, key=lambda f: f[0])


def run(cfg, frames, alerter) -> tuple[float, int]:
    book = FlagBook(cfg, MemoryFlags())
    on_flag = None if alerter is None else (lambda doc: alerter.emit("flag_raised", **alerts.flag_fields(doc)))
    engine = Engine(cfg, policy_mod.load(None), FlowTable(MemoryFlows(), "b"), book, on_flag=on_flag)
    t = time.perf_counter()
    for i in range(0, len(frames), 1000):
        engine.run_step([("b", i, frames[i:i + 1000])], i // 1000 + 1, persistent=False)
    return time.perf_counter() - t, engine.counters.get("flags", 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    args = ap.parse_args()
    logging.getLogger("pisnoop").addHandler(logging.NullHandler())
    logging.getLogger("pisnoop").propagate = False
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(1024)
    port = hang.getsockname()[1]
    base = {"enforce": {"never_ban_self": False}}
    cfg = config.from_dict(base)
    hook = config.from_dict({**base, "alerts": {"webhooks": [f"http://127.0.0.1:{port}/"], "timeout_seconds": 5.0,
                                                "queue_size": 100_000}})
    frames = frames_of(args.clients)
    run(cfg, frames[:5000], None)                                  # warm up
    quiet = alerts.Alerter(cfg.alerts, "b")
    hanging = alerts.Alerter(hook.alerts, "b")
    best = {"ref": [], "log": [], "hang": []}
    for _ in range(3):                                             # best of three, interleaved: a shared machine
        seconds, flags = run(cfg, frames, None)
        best["ref"].append(seconds)
        best["log"].append(run(cfg, frames, quiet)[0])
        best["hang"].append(run(hook, frames, hanging)[0])
    ref, logged, slow = (min(best[k]) for k in ("ref", "log", "hang"))
    print(f"{len(frames):,} frames, {flags} flags")
    print(f"reference (no alerts)      {ref:7.3f} s")
    print(f"log only                   {logged:7.3f} s  ratio {logged / ref:.2f}")
    c = hanging.counters
    print(f"hanging webhook            {slow:7.3f} s  ratio {slow / ref:.2f}  "
          f"(sent {c['sent']}, pending {hanging.pending()}, failed attempts {c['failed_attempts']})")
    hanging.close()
    hang.close()


if __name__ == "__main__":
    main()
