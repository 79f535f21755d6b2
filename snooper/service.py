"""``pisnoop snooper``: wire the parts together, run until SIGTERM/SIGINT, flush, exit; SIGHUP reloads.

The capture loop runs on the main thread (signals only set an event it
checks at least every 100 ms); the writer and the status reporter run on
their own threads. On a stop: capture ends, what the kernel already put in
the ring is taken, the open batch is flushed, the writer empties its queue
into the store or the spool, a final status is written, STOPPING=1.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from appliance import netns, retention, service, store
from appliance.errors import UsageError

from . import counters as counters_mod
from . import engine as engine_mod
from . import fdstore, ifcheck
from .batch import new_run_id
from .capture import Capture
from .ring import CaptureError, Ring
from .spool import Spool
from .status import Reporter, snapshot_of
from .writer import Writer


def open_spool(sc, counters: dict, log, replay: bool = True) -> Spool:
    try:
        return Spool(sc.spool_dir, sc.spool_max_mb, sc.spool_full_policy, counters, log, replay=replay)
    except OSError as exc:
        raise UsageError(str(exc)) from None


# What a reload (SIGHUP) changes in a running snooper: retention (the trimmer's cap and floor, the TTLs, ensured
# again by the writer); the capture (interface, ring, filter, dedupe, batches), the spool and the store need a restart.
LIVE = ("mongodb.retention",)


def open_ring(sc, log) -> Ring:
    """The ring systemd kept for us from the previous run if it has our shape, else a new one; kept in turn."""
    with netns.enter(sc.netns):
        try:
            ifindex = socket.if_nametoindex(sc.interface)
        except OSError:
            raise CaptureError(f"interface {sc.interface} does not exist") from None
        ns_inode = os.stat("/proc/thread-self/ns/net").st_ino
    want = fdstore.shape(ns_inode, ifindex, sc.ring_block_size, sc.ring_block_count, sc.ring_block_timeout_ms,
                         sc.snaplen, sc.bpf_filter)
    kept = fdstore.adopt(want, sc.interface)
    for old in kept.discarded:
        log.warning("the ring kept from the previous run (%s) is not this config's (%s) or no longer bound to %s: "
                    "closed, %d frames waiting in it and %d the kernel dropped for want of room lost", old.name,
                    want.name(), sc.interface, old.waiting, old.dropped)

    def new_ring(sock=None) -> Ring:
        return Ring(sc.interface, sc.netns, sc.ring_block_size, sc.ring_block_count, sc.ring_block_timeout_ms,
                    snaplen=sc.snaplen, bpf_filter=sc.bpf_filter, sock=sock)
    ring = None
    if kept.sock is not None:
        try:
            ring = new_ring(kept.sock)
            log.info("capture ring kept from the previous run: %d frames waiting in it", ring.waiting())
        except CaptureError as exc:        # a kept ring that cannot be mapped again: a new one, not a stopped snooper
            fdstore.remove(want.name())
            log.warning("the ring kept from the previous run cannot be used (%s): a new one", exc)
    if ring is None:
        ring = new_ring()
    if not ring.adopted and fdstore.store(ring.sock, want.name()):
        log.info("capture ring given to systemd's fd store: a restart reads on where this run stops")
    return ring


def run(cfg, log, duration: float | None = None) -> int:
    sc = cfg.snooper
    try:
        ifcheck.check(sc.interface, sc.netns, log)
    except ifcheck.UnsafeInterface as exc:
        raise UsageError(f"refusing to capture: {exc}") from None
    engine = engine_mod.make(sc.dedupe_window, sc.snaplen, sc.batch_size)   # C unless missing or turned off
    c = counters_mod.new()
    run_id = new_run_id()
    spool = open_spool(sc, c, log)
    try:
        ring = open_ring(sc, log)
    except CaptureError as exc:
        spool.close()
        raise UsageError(str(exc)) from None
    db = store.database(cfg.mongodb, "pisnoop-snooper")
    writer = Writer(db, spool, c, log, cfg)
    stop = threading.Event()
    capture = Capture(ring, None, writer, c, sc.sensor, run_id, sc.batch_size, sc.batch_interval, stop, engine=engine)
    live = {"cfg": cfg}    # the config in force: a reload (SIGHUP) swaps it for what can change while running
    trimmer = retention.Trimmer(db, lambda: live["cfg"], c, sc.status_interval, threading.Event(), log)
    snapshot = snapshot_of(c, writer, spool, ring, engine, run_id, sc.interface, capture.in_batch, trimmer)
    reporter = Reporter(db, sc.sensor, sc.status_interval, snapshot, log, threading.Event())
    _metrics(cfg, c, snapshot, log)

    def apply(new) -> None:
        live["cfg"] = writer.cfg = new
        writer.indexed = False           # the writer ensures the indexes (the retention TTLs) at its next insert

    def on_signal(signum, _frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.getsignal(signal.SIGHUP)
    service.Reloader(cfg, LIVE, apply, log).install().watch(stop)
    if duration:
        timer = threading.Timer(duration, stop.set)
        timer.daemon = True
        timer.start()
    writer.start()
    reporter.start()
    trimmer.start()
    log.info("capturing on %s%s, run %s, dedupe window %.3g s, batches of %d, spool %s, %s engine", sc.interface,
             f" (netns {sc.netns})" if sc.netns else "", run_id, sc.dedupe_window, sc.batch_size, sc.spool_dir,
             "Python" if isinstance(engine, engine_mod.PyEngine) else "C")
    try:
        capture.run()
    finally:
        service.notify("STOPPING=1")
        for s, h in old.items():
            signal.signal(s, h)
        t0 = time.monotonic()
        trimmer.stop_event.set()
        writer.stop()
        reporter.stop_event.set()
        reporter.publish(final=True)
        ring.close()
        spool.close()
        log.info("stopped after flushing for %.1f s", time.monotonic() - t0)
    return 0 if not writer.is_alive() else 1


def _metrics(cfg, c: dict, snapshot, log) -> None:
    if not cfg.metrics.enabled:
        return
    from prometheus_client import REGISTRY

    def gauges() -> dict:
        return {k: v for k, v in snapshot()[1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    REGISTRY.register(counters_mod.Collector(c, gauges, cfg.snooper.sensor))
    try:
        service.start_metrics(cfg.metrics, cfg.metrics.snooper_port, log)
    except service.MetricsUnavailable as exc:   # capture matters more than its metrics: go on without them
        log.warning("%s: no metrics endpoint", exc)
