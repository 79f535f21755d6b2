"""``pisnoop demo``: show the appliance doing its main job, then clean up."""

from __future__ import annotations

import argparse

from . import commands, virtual


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="bring up a virtual appliance, show it working, tear it down")
    p.add_argument("--keep", action="store_true", help="leave the virtual appliance up for exploring")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    va = virtual.VirtualAppliance()
    va.up()
    try:
        commands.print_status(va.status())
        inside, upstream = va.hosts["inside"].ip, va.hosts["upstream"].ip
        blocked = not va.ping("inside", upstream, count=2)
        print(f"\nsecure fail mode, no flows: inside {inside} -> upstream {upstream} "
              f"{'blocked (as it must be)' if blocked else 'FORWARDED (wrong)'}")
        if args.keep:
            print(f"\nleft up: export PISNOOP_CONFIG={va.config_path}; pisnoop virtual down {va.prefix}")
            return 0 if blocked else 1
    except BaseException:
        va.down()
        raise
    left = va.down()
    print(f"torn down: {'clean' if not left else 'LEFT ' + '; '.join(left)}")
    return 0 if blocked and not left else 1
