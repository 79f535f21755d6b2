"""``pisnoop check-config``: validate a config file and exit."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import config as config_mod
from .redact import redact


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments of ``pisnoop check-config``; ``appliance.cli`` calls this."""
    p.add_argument("file", nargs="?",
                   help="the file to check (default: --config, $PISNOOP_CONFIG, /etc/pisnoop/pisnoop.yaml)")
    p.add_argument("--print", action="store_true", help="print the effective config with all defaults filled in")
    p.set_defaults(func=cmd_check_config)


def cmd_check_config(args) -> int:
    path = args.file or args.config
    cfg = config_mod.load(path)
    if args.print:           # the URI's password masked: this output is pasted into tickets
        shown = dataclasses.replace(cfg, mongodb=dataclasses.replace(cfg.mongodb, uri=redact(cfg.mongodb.uri)))
        sys.stdout.write(config_mod.dump(shown))
    else:
        print(f"{cfg.source}: ok")
    return 0
