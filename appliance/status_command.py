"""``pisnoop status``: the appliance at a glance (exit 0 all well, 1 something wrong); ``--json``, ``--watch``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import config as config_mod
from . import statusview
from .errors import UsageError

CLEAR = "\x1b[H\x1b[2J"     # cursor home, clear screen: the next picture replaces the last one in place


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments of ``pisnoop status``; ``appliance.cli`` calls this."""
    p.add_argument("--json", action="store_true", help="the same facts as one JSON document (for scripts)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="refresh in place every SECONDS (default 2) until interrupted")
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N pictures")
    p.add_argument("--fleet", action="store_true",
                   help="every sensor sharing the store: health, last heartbeats, rates, analyser lag, bans by scope")
    p.set_defaults(func=cmd_status)


def once(cfg, db, fleet: bool = False) -> dict:
    if fleet:
        return statusview.fleet_facts(cfg, statusview.fleet_read(cfg, db))
    return statusview.facts(cfg, statusview.read(cfg, db))


def show(f: dict, as_json: bool, fleet: bool = False) -> str:
    if as_json:
        return json.dumps(f, indent=2) + "\n"
    return statusview.render_fleet(f) if fleet else statusview.render(f)


def cmd_status(args) -> int:
    from . import store
    if args.watch is not None and args.watch <= 0:
        raise UsageError(f"--watch: got {args.watch}; expected seconds above 0")
    if args.count is not None and (args.count < 1 or args.watch is None):
        raise UsageError("--count: a number of pictures from 1, with --watch")
    cfg = config_mod.load(args.config)
    db = store.database(cfg.mongodb, "pisnoop-status")
    try:
        if args.watch is None:
            f = once(cfg, db, args.fleet)
            sys.stdout.write(show(f, args.json, args.fleet))
            return 0 if f["ok"] else 1
        shown = 0
        try:
            while True:
                f = once(cfg, db, args.fleet)
                sys.stdout.write(("" if args.json else CLEAR) + show(f, args.json, args.fleet))
                sys.stdout.flush()
                shown += 1
                if args.count is not None and shown >= args.count:
                    break
                time.sleep(args.watch)
        except KeyboardInterrupt:         # Ctrl-C is how a watch ends: the last picture's verdict, no complaint
            if not shown:
                raise
        return 0 if f["ok"] else 1
    finally:
        db.client.close()
