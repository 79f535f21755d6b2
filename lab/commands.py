"""``pisnoop virtual up|down|status``: the virtual appliance from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from appliance import config as config_mod

from . import virtual


def configure(name: str, v: argparse.ArgumentParser) -> None:
    """Arguments of ``pisnoop virtual``; ``appliance.cli`` calls this."""
    vsub = v.add_subparsers(dest="action", metavar="ACTION")
    vsub.required = True
    up = vsub.add_parser("up", help="bring a virtual appliance up and leave it running")
    up.add_argument("--prefix", help="name prefix (default: random ps + 4 hex digits)")
    up.add_argument("--no-store", action="store_true", help="do not start the embedded store")
    up.add_argument("--store-uri", metavar="URI",
                    help="join a store that runs (another virtual appliance's): a second appliance on one store")
    up.add_argument("--sensor", metavar="NAME", help="its snooper.sensor (default: the prefix)")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_virtual_up)
    down = vsub.add_parser("down", help="tear down one run or all of them")
    down.add_argument("prefix", nargs="?")
    down.add_argument("--all", action="store_true")
    down.set_defaults(func=cmd_virtual_down)
    st = vsub.add_parser("status", help="show the runs that are up")
    st.add_argument("prefix", nargs="?")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_virtual_status)


def _base_config(args) -> config_mod.Config:
    """The virtual appliance starts from the user's config when one was named, else defaults."""
    if args.config or config_mod.ENV_VAR in os.environ:
        return config_mod.load(args.config)
    return config_mod.Config()


def cmd_virtual_up(args) -> int:
    va = virtual.VirtualAppliance(_base_config(args), prefix=args.prefix, with_store=not args.no_store,
                                  store_uri=args.store_uri, sensor=args.sensor)
    try:
        va.up()
    except (virtual.VirtualApplianceError, virtual.CommandFailed) as exc:
        print(f"pisnoop: virtual appliance did not come up: {exc}", file=sys.stderr)
        return 1
    st = va.status()
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        print_status(st)
        print(f"\n  export PISNOOP_CONFIG={va.config_path}\n  pisnoop virtual down {va.prefix}")
    return 0


def cmd_virtual_down(args) -> int:
    runs = virtual.list_runs()
    if args.all:
        targets = runs
    elif args.prefix:
        targets = [r for r in runs if r.name == args.prefix]
        if not targets:
            print(f"pisnoop: no virtual appliance {args.prefix!r} under {virtual.base_dir()}", file=sys.stderr)
            return 2
    else:
        if len(runs) != 1:
            print(f"pisnoop: {len(runs)} virtual appliances are up; name one or use --all", file=sys.stderr)
            return 2
        targets = runs
    rc = 0
    for run_dir in targets:
        left = virtual.teardown(Path(run_dir))
        if left:
            rc = 1
            print(f"{run_dir.name}: could not remove: {'; '.join(left)}", file=sys.stderr)
        else:
            print(f"{run_dir.name}: down")
    return rc


def cmd_virtual_status(args) -> int:
    runs = [r for r in virtual.list_runs() if not args.prefix or r.name == args.prefix]
    states = [virtual.status_of(r) for r in runs]
    if args.json:
        print(json.dumps(states, indent=1))
    elif not states:
        print("no virtual appliance is up")
    for st in states if not args.json else []:
        print_status(st)
    return 0


def print_status(st: dict) -> None:
    daemons = ", ".join(f"{n} {d['pid']}{'' if d['alive'] else ' (dead)'}" for n, d in st["daemons"].items())
    print(f"virtual appliance {st['prefix']}  ({st['run_dir']})")
    print(f"  daemons:    {daemons}")
    print(f"  namespaces: {', '.join(n for n, ok in st['namespaces'].items() if ok)}")
    br = st.get("bridge")
    if br:
        print(f"  bridge:     {br['name']} fail_mode={br['fail_mode'] or '?'} flows={br.get('flows', '?')} "
              f"controller={'connected' if br['controller_connected'] else 'not connected'}")
        print(f"  ports:      {' '.join(br['ports'])}")
    if st.get("store"):
        print(f"  store:      {st['store']}")
    if st.get("config"):
        print(f"  config:     {st['config']}")
