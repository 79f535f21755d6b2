"""``pisnoop demo``: the whole appliance at work, in namespaces, in under three minutes.

An abusive XMPP client floods a real Prosody server through the virtual
appliance; the snooper stores every mirrored frame, the analyser flags the
client, the controller drops its traffic at the switch while the benign
clients keep chatting. The demo proves each of those from its own evidence
(server-side message counts, switch flow counters, stored frames) and
leaves nothing running unless ``--keep``. ``--attack`` picks another attack
(``lab/scenario.py``: ipv6, spoof, rotate, reconnect); each proves the
attacker limited or blocked and every benign message delivered, and for
spoof that the victim is never banned.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import scenario


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments of ``pisnoop demo``; ``appliance.cli`` calls this."""
    p.add_argument("--attack", choices=scenario.ATTACKS, default="flood",
                   help="the attack to show (default flood): " + ", ".join(scenario.ATTACKS))
    p.add_argument("--benign", type=int, default=3, help="benign clients (default 3)")
    p.add_argument("--benign-rate", type=float, default=6.0, help="messages per minute per benign client (default 6)")
    p.add_argument("--abusive-rate", type=float, default=20.0,
                   help="messages per second of the abusive client (default 20)")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds of benign chat before the flood (default 8)")
    p.add_argument("--after-block", type=float, default=8.0, help="seconds of chat after the block (default 8)")
    p.add_argument("--timeout", type=float, default=90.0,
                   help="give up if no block within this many seconds (default 90)")
    p.add_argument("-o", "--out", default="demo-out",
                   help="where the report PNG and attack pcap go (default ./demo-out)")
    p.add_argument("--keep", action="store_true", help="leave the virtual appliance up for exploring")
    p.set_defaults(func=cmd_demo)


def _positive(name: str, value: float, lo: float = 0.0) -> None:
    from appliance.errors import UsageError
    if not value > lo:
        raise UsageError(f"--{name}: got {value}; expected a number above {lo:g}")


def cmd_demo(args) -> int:
    _positive("benign", args.benign)
    _positive("benign-rate", args.benign_rate)
    _positive("abusive-rate", args.abusive_rate)
    _positive("timeout", args.timeout)
    for name in ("warmup", "after_block"):
        _positive(name.replace("_", "-"), getattr(args, name), -1e-9)
    opts = scenario.Options(attack=args.attack, benign=args.benign, benign_per_minute=args.benign_rate,
                            abusive_per_second=args.abusive_rate, warmup=args.warmup,
                            after_block=args.after_block, timeout=args.timeout, out_dir=Path(args.out).resolve())
    live = sys.stdout.isatty()

    def tick(line: str) -> None:
        if live:
            sys.stdout.write("\r" + line[:160].ljust(160))
            sys.stdout.flush()

    print("pisnoop demo: virtual appliance, controller, snooper, analyser, Prosody (TLS, IPv4 and IPv6), "
          f"benign clients and the {opts.attack} attack")
    result, va = scenario.run(opts, on_tick=tick, keep=args.keep)
    try:
        if live:
            print()
        ok = print_result(result)
    finally:
        if args.keep:
            print(f"\nleft up: export PISNOOP_CONFIG={va.config_path}; pisnoop virtual down {va.prefix}")
        else:
            left = va.down()
            print(f"\ntorn down: {'nothing left running' if not left else 'LEFT ' + '; '.join(left)}")
    return 0 if ok else 1


def verdict(result: scenario.Result) -> list[str]:
    """What failed, in words (empty when the appliance did its job)."""
    bad = []
    for label, tr in result.targets.items():
        if not tr.blocked_at:
            bad.append(f"the {label} ({tr.target.value}) was not blocked")
    if result.targets and result.blocked:
        for jid, at_block in result.received_at_block.items():
            if result.received.get(jid, 0) != at_block:
                bad.append(f"messages of {jid} still reached the server after the block")
    for f in result.banned_protected:
        bad.append(f"a benign client or victim banned: {f.get('client_mac') or f.get('client_ip')} "
                   f"by {f.get('classifier')}")
    for jid in result.benign_jids:
        if result.received.get(jid, 0) != result.sent.get(jid, 0) or not result.sent.get(jid):
            bad.append(f"{jid}: sent {result.sent.get(jid, 0)}, server got {result.received.get(jid, 0)}")
    if result.unaccounted is None:
        bad.append("the snooper published no accounting")
    elif result.unaccounted != 0:
        bad.append(f"snooper: {result.unaccounted} frames unaccounted")
    if result.attack in ("flood", "ipv6", "reconnect") and result.abuser_frames_stored == 0:
        bad.append("no frame of the abusive client was stored")
    bad += result.errors
    return bad


def print_result(r: scenario.Result) -> bool:
    t = r.timeline
    print(f"\n== result ({r.attack})")
    for label, tr in r.targets.items():
        if tr.blocked_at:
            lat = f"{tr.latency:.2f} s" if tr.latency is not None else "?"
            print(f"{label} {tr.target.value} flagged after {tr.flagged_at - t['flood_start']:.1f} s of attack, "
                  f"blocked at the switch after {tr.blocked_at - t['flood_start']:.1f} s; threshold-crossing "
                  f"frame to enforcing flow {lat}; drop-flow packets {tr.drop_packets}")
        else:
            print(f"{label} {tr.target.value}: NOT blocked")
        if tr.flag:
            f = tr.flag
            print(f"  flag: {f.get('client_mac') or f.get('client_ip')}"
                  f"{':' + str(f['client_port']) if f.get('client_port') else ''} by {f.get('classifier')} "
                  f"({f.get('reason')}), action {f.get('action')}, ban {f.get('ban_seconds')} s")
            ev = f.get("evidence") or {}
            shown = {k: v for k, v in ev.items() if k not in ("sample_frames", "samples")}
            print("  evidence: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    for jid in r.attacker_jids:
        got = r.received.get(jid, 0)
        print(f"  attacker {jid}: sent {r.sent.get(jid, 0)}, reached the server {got} "
              f"({got - r.received_at_block.get(jid, got)} after the block settled)")
    for name, rep in r.generators.items():
        print(f"  {name}: " + ", ".join(f"{k} {v if not isinstance(v, list) else len(v)}" for k, v in rep.items()))
    if r.victims:
        print(f"spoofed victim {', '.join(r.victims)}: "
              f"{'never banned' if not r.banned_protected else 'BANNED'}")
    if r.abuser_frames_stored:
        print(f"  the attacker's frames kept as evidence in the store: {r.abuser_frames_stored}")
    for jid in r.benign_jids:
        print(f"  benign {jid}: sent {r.sent.get(jid, 0)}, reached the server {r.received.get(jid, 0)}")
    print(f"stored IP frames: IPv4 {r.frames_by_family.get(4, 0)}, IPv6 {r.frames_by_family.get(6, 0)}")
    c = r.snooper
    print("snooper: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for kind, path in r.files.items():
        print(f"{kind}: {path}")
    bad = verdict(r)
    print("\n" + (f"PASS: {r.attack}: attacker stopped, benign clients unharmed, every frame accounted for"
                  if not bad else "FAIL: " + "; ".join(bad)))
    return not bad
