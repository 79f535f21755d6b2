#!/usr/bin/env python3
"""Whole-appliance benchmark: snooper + analyser CPU a frame at 100 Mb/s of 64-byte frames, the store beside it.

The virtual appliance (lab/virtual.py) with the embedded store; the controller, the snooper and the analyser
started as the demo starts them (lab/scenario.py's ServiceSet: own processes, READY=1 on their notify
sockets, the demo's config). tcpreplay sends benign 64-byte frames (2,048 XMPP clients, each under every
threshold, beside 128 bulk HTTPS and QUIC flows; 400,000 unique frames, so no frame repeats within the
dedupe window) at ``--rate`` (148,810 pps: the Zodiac FX's 100 Mb/s line rate) for ``--duration`` s out of the
switch's end of the mirror link: they arrive on ``mirror0`` exactly as mirrored frames do. They do not
pass the userspace OVS bridge, which tops out near 20 kpps here (its port counters are printed to show
it saw none of them). Then the services catch up; CPU is read from /proc for each process.

Printed: snooper and analyser CPU µs a frame and their sum (target <= 1.5 µs), the store's µs a frame
(its inserts and the analyser's reads) beside it, the share of one core each needs at the line rate, and
the stored rate as a ratio to the line rate.

``--attack``: goal 4 of issue 12. The demo's flood scenario (a benign XMPP client, then a flooding one,
through the switch) with ``--background`` pps of the same benign frames on the mirror link during it:
the time from the flooding client's threshold crossing to the first of its frames the switch dropped
(bench/closed_loop.py's measure), against 2 s, and against the loop's own polling budget.

    sudo .venv/bin/python bench/appliance.py [--duration 60] [--rate 148810]
    sudo .venv/bin/python bench/appliance.py --duration 10          # quick (< 2 min)
    sudo .venv/bin/python bench/appliance.py --attack [--background 100000]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import dpkt  # noqa: E402
import psutil  # noqa: E402
from capture import LINE_RATE_100M, Sender  # noqa: E402
from pymongo.errors import PyMongoError  # noqa: E402

from appliance import store  # noqa: E402
from lab import scenario, uplink  # noqa: E402
from lab.virtual import VirtualAppliance  # noqa: E402

LINE_RATE = LINE_RATE_100M[64]


def benign_pcap(path: Path, count: int = uplink.UNIQUE) -> Path:
    """``count`` unique 64-byte frames of ``lab/uplink.py``'s benign uplink traffic, as a pcap for tcpreplay."""
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh, snaplen=65535)
        for data in uplink.frames(count):
            w.writepkt(data, ts=1.0)
    return path


def cpu_of(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def port_rx(va: VirtualAppliance, port: int) -> int:
    for line in va.ofctl("dump-ports", str(port)).splitlines():
        if "rx pkts=" in line:
            return int(line.split("rx pkts=")[1].split(",")[0])
    return -1


def counters(db, component: str, sensor: str, tries: int = 20) -> dict:
    """A service's counters from its status document (a store busy with the load may time out a read: again)."""
    for _ in range(tries):
        try:
            doc = db[store.STATUS].find_one({"_id": f"{component}:{sensor}"}) or {}
            return doc.get("counters", {})
        except PyMongoError:
            time.sleep(0.5)
    raise RuntimeError(f"the store did not answer for the {component}'s status {tries} times")


def fresh(db, component: str, sensor: str, pid: int) -> tuple[dict, float]:
    """A service's counters just after it published them, and its CPU time at that moment (within ~0.1 s)."""
    def stamp():
        try:
            return (db[store.STATUS].find_one({"_id": f"{component}:{sensor}"}, {"updated_at": 1}) or {}).get(
                "updated_at")
        except PyMongoError:
            return None
    first = stamp()
    end = time.monotonic() + 5
    while time.monotonic() < end and stamp() == first:
        time.sleep(0.05)
    cpu = cpu_of(pid)
    return counters(db, component, sensor), cpu


def wait_until(pred, timeout: float, step: float = 0.5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def bench_load(args, tmp: Path) -> int:
    pcap = benign_pcap(tmp / "benign.pcap")
    va = VirtualAppliance(scenario.service_config()).up()
    services = scenario.ServiceSet(va)
    drain = threading.Event()
    try:
        for name in scenario.SERVICES:
            services.start(name)
        db = store.database(va.config.mongodb, "bench-appliance")
        sensor = va.config.snooper.sensor
        pids = {n: p.pid for n, p in services.procs.items()}
        pids["store"] = va.state["pids"]["store"]
        pids["ovs-vswitchd"] = va.state["pids"]["ovs-vswitchd"]
        def keep_draining() -> None:      # the services' sd_notify blocks when their notify sockets fill up
            while not drain.wait(0.5):
                services.drain()

        threading.Thread(target=keep_draining, daemon=True).start()
        time.sleep(2.0)                                    # the services settle (first status, indexes)
        s0 = counters(db, "snooper", sensor)
        a0 = counters(db, "analyser", sensor)
        cpu0 = {n: cpu_of(p) for n, p in pids.items()}
        ovs_rx0 = port_rx(va, va.config.switch.ports.mirror)
        print(f"sending {args.rate} pps of 64-byte frames for {args.duration:.0f} s onto the mirror link of "
              f"{va.prefix} ...", flush=True)
        snd = Sender(va.sw_ns, f"{va.prefix}-p{va.config.switch.ports.mirror}", pcap, args.rate,
                     args.duration).result()
        cpu_send = {n: cpu_of(p) for n, p in pids.items()}
        ovs_rx = port_rx(va, va.config.switch.ports.mirror) - ovs_rx0

        def snooper_done() -> bool:
            c = counters(db, "snooper", sensor)
            return c.get("captured", 0) - s0.get("captured", 0) >= snd["sent"] and \
                c.get("stored", 0) - s0.get("stored", 0) >= c.get("captured", 0) - s0.get("captured", 0) \
                - (c.get("duplicates", 0) - s0.get("duplicates", 0))

        wait_until(snooper_done, args.duration + args.catch_up)     # what it spooled meanwhile is replayed first
        s1 = counters(db, "snooper", sensor)
        stored = s1.get("stored", 0) - s0.get("stored", 0)
        cpu_snooper = cpu_of(pids["snooper"])
        # the analyser reads as fast as it can while it lags: its CPU over what it has read is its cost a frame
        caught_up = wait_until(lambda: counters(db, "analyser", sensor).get("frames", 0) - a0.get("frames", 0)
                               >= stored, args.catch_up)
        a1, cpu_analyser = fresh(db, "analyser", sensor, pids["analyser"])
        cpu1 = {n: cpu_of(p) for n, p in pids.items()}
        cpu1["snooper"], cpu1["analyser"] = cpu_snooper, cpu_analyser
        drain.set()
        read = a1.get("frames", 0) - a0.get("frames", 0)
    finally:
        drain.set()
        problems = services.stop()
        last = {}
        if "db" in locals():        # the snooper's last status, after its flush
            last = db[store.STATUS].find_one({"_id": f"snooper:{sensor}"}) or {}
            tail = services.log_tail("snooper", 400)
        final = last.get("counters", {})
        va.down()
    captured = final.get("captured", 0) - s0.get("captured", 0)
    stored = final.get("stored", 0) - s0.get("stored", 0)
    dups = final.get("duplicates", 0) - s0.get("duplicates", 0)
    lost = final.get("kernel_dropped", 0) - s0.get("kernel_dropped", 0)
    use = {n: cpu1[n] - cpu0[n] for n in cpu0}
    per = {"snooper": use["snooper"] / max(1, captured), "analyser": use["analyser"] / max(1, read),
           "store": use["store"] / max(1, stored + read),
           "store_send": (cpu_send["store"] - cpu0["store"]) / max(1, captured)}
    both = per["snooper"] + per["analyser"]
    print(f"sent {snd['sent']} in {snd['seconds']:.1f} s ({snd['pps']:.0f} pps = {snd['pps'] / LINE_RATE:.3f}x the "
          f"100 Mb/s line rate of {LINE_RATE} pps); captured {captured}, stored {stored}, kernel ring drops {lost}; "
          f"duplicates {dups}; analysed {read}"
          + ("" if caught_up else f" (behind by {stored - read} after --catch-up {args.catch_up:.0f} s)"))
    print(f"snooper at the end: spooled {final.get('spooled', 0) - s0.get('spooled', 0)}, queue overflows "
          f"{final.get('queue_overflows', 0) - s0.get('queue_overflows', 0)}, store errors "
          f"{final.get('store_errors', 0) - s0.get('store_errors', 0)}, in the spool {last.get('spool_frames')}, "
          f"unaccounted {last.get('unaccounted')}")
    if stored < captured - dups:
        print(f"snooper log: ...{tail}")
    print(f"stored rate {stored / snd['seconds']:.0f} pps -> {stored / snd['seconds'] / LINE_RATE:.3f}x the line rate")
    print(f"OVS port {va.config.switch.ports.mirror} rx during the send: {ovs_rx} packets (the frames did not pass the "
          f"bridge); ovs-vswitchd {(cpu_send['ovs-vswitchd'] - cpu0['ovs-vswitchd']) / snd['seconds'] * 100:.0f}% "
          f"of a core")
    print(f"cpu a frame: snooper {per['snooper'] * 1e6:.3f} us + analyser {per['analyser'] * 1e6:.3f} us = "
          f"{both * 1e6:.3f} us (target <= 1.5 us: {both * 1e6 / 1.5:.2f}x of it)")
    print(f"the store beside it: {per['store_send'] * 1e6:.3f} us a frame captured during the send (inserts, and the "
          f"analyser's reads meanwhile); {per['store'] * 1e6:.3f} us a frame stored or read over the whole run; "
          f"controller {use['controller']:.2f} s of CPU in all")
    print(f"share of one core at the line rate: snooper {per['snooper'] * LINE_RATE * 100:.0f}%, analyser "
          f"{per['analyser'] * LINE_RATE * 100:.0f}%, both {both * LINE_RATE * 100:.0f}%, store during the send "
          f"{(cpu_send['store'] - cpu0['store']) / snd['seconds'] * 100:.0f}%; "
          f"machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for p in problems:
        print(f"problem: {p}")
    return 0 if not problems else 1


def stored_rate(db, sensor: str, until_ns: int, seconds: float = 5.0) -> float:
    """Frames a second in the batches stored whose frames all fall in the ``seconds`` before ``until_ns``: what
    the analyser really had to read then (the background reaches the mirror link only as fast as the machine
    lets it)."""
    lo = until_ns - int(seconds * 1e9)
    query = {"sensor": sensor, "first_ns": {"$gte": lo}, "last_ns": {"$lt": until_ns}}
    n = sum(d["n"] for d in db[store.FRAMES].find(query, {"n": 1}))
    return n / seconds


def bench_attack(args, tmp: Path) -> int:
    import closed_loop
    pcap = benign_pcap(tmp / "benign.pcap")
    senders: list = []

    def tick(_line: str) -> None:       # the first tick: the services are up; the background starts
        if senders:
            return
        run = next(iter(sorted(scenario_runs() - before, key=lambda p: p.stat().st_mtime)), None)
        if run is None:
            return
        prefix = run.name
        senders.append(Sender(f"{prefix}-sw", f"{prefix}-p2", pcap, args.background, args.duration + 120))
        print(f"background: {args.background} pps of benign 64-byte frames onto {prefix}'s mirror link", flush=True)

    from lab.virtual import list_runs

    def scenario_runs() -> set:
        return set(list_runs())

    before = scenario_runs()
    opts = scenario.Options(benign=1, warmup=args.warmup, after_block=2, timeout=60, out_dir=tmp / "run")
    result, va = scenario.run(opts, on_tick=tick)
    bg = None
    cfg = va.config
    try:
        db = store.database(cfg.mongodb, "bench")
        snoop = db[store.STATUS].find_one({"component": "snooper"}) or {}
        pk = closed_loop.abuser_packets(db, scenario.ABUSER_IP, cfg.xmpp.server_ports)
        cross = closed_loop.crossing_ns(pk, cfg.xmpp.threshold_ppm, cfg.xmpp.window_seconds)
        install = closed_loop.drop_install_ns(va, scenario.ABUSER_IP)
        seen = stored_rate(db, cfg.snooper.sensor, cross) if cross is not None else None
        flag = db[store.FLAGS].find_one({"client_ip": scenario.ABUSER_IP}, sort=[("flagged_at", 1)])
        flagged = flag["flagged_at"].timestamp() * 1e9 if flag else None
        held = db[store.FRAMES].find_one({"sensor": cfg.snooper.sensor, "first_ns": {"$lte": cross or 0},
                                          "last_ns": {"$gte": cross or 0}}, {"ins": 1})
        stored_at = held["ins"].timestamp() * 1e9 if held else None
        db.client.close()
    finally:
        for s in senders:
            s.proc.send_signal(signal.SIGINT)     # tcpreplay prints its figures on SIGINT
            try:
                bg = s.result()
            except RuntimeError:
                bg = None
        va.down()
    budget = cfg.snooper.batch_interval + cfg.analyser.poll_interval + cfg.enforce.poll_interval
    c = snoop.get("counters", {})
    print(f"snooper: captured {c.get('captured')}, stored {c.get('stored')}, kernel ring drops "
          f"{c.get('kernel_dropped')}; background sent {bg['sent'] if bg else '?'} "
          f"({bg['pps'] if bg else 0:.0f} pps)")
    if seen is not None:
        print(f"stored around the crossing (the 5 s before it, batches whose frames are all inside): {seen:,.0f} "
              f"frames/s ({seen / args.background:.2f}x the background sent)")
    if not result.blocked or cross is None or install is None:
        print(f"not blocked (blocked={result.blocked}, crossing={cross}, drop flow={install}): {result.errors}")
        return 1
    first_drop = next((ts for ts, _ in pk if ts >= install), None)
    if first_drop is None:
        print("no frame of the flooding client after the drop flow")
        return 1
    lat = (first_drop - cross) / 1e9
    if flagged is not None:
        print(f"of it: crossing -> flag stored {(flagged - cross) / 1e9:.3f} s (capture, store, analyser), "
              f"flag -> drop flow {(install - flagged) / 1e9:.3f} s (controller, switch)")
        if stored_at is not None:
            print(f"  crossing -> its batch stored {(stored_at - cross) / 1e9:.3f} s (batching, the snooper's queue, "
                  f"the insert), batch stored -> flag {(flagged - stored_at) / 1e9:.3f} s (analyser)")
    print(f"under {args.background} pps of background: threshold crossed -> drop flow {(install - cross) / 1e9:.3f} s, "
          f"first dropped frame {lat:.3f} s (target <= 2 s: {lat / 2:.2f}x of it; "
          f"{lat / budget:.2f}x the polling budget of {budget:.2f} s)")
    return 0 if lat <= 2.0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60, help="seconds of traffic (load run)")
    ap.add_argument("--rate", type=int, default=LINE_RATE, help="pps of 64-byte frames (load run)")
    ap.add_argument("--catch-up", type=float, default=30,
                    help="seconds the analyser gets to catch up after the send (its figure is over what it read)")
    ap.add_argument("--attack", action="store_true", help="goal 4: the flood scenario under --background pps")
    ap.add_argument("--background", type=int, default=100_000, help="pps of benign background with --attack")
    ap.add_argument("--warmup", type=float, default=5, help="seconds before the flood starts (--attack)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/appliance.py: needs root (namespaces, OVS)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pisnoop-bench-") as tmp:
        return bench_attack(args, Path(tmp)) if args.attack else bench_load(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
