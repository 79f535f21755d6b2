"""The ``pisnoop`` command.

Each subcommand lives next to the code it drives: a module listed in
``COMMAND_MODULES`` has ``register(subparsers)``, which adds its parsers and
sets ``func(args) -> exit code``. A bad config always ends with exit code 2
and one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import config as config_mod

COMMAND_MODULES = (
    "appliance.commands",
    "appliance.demo",
    "appliance.analyser.commands",
    "static_controller.command",
    "snooper.cli",
)


class UsageError(Exception):
    """A bad argument or environment the user can fix; exit 2 with the message."""


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The validated config named by ``--config`` / PISNOOP_CONFIG / the default."""
    return config_mod.load(getattr(args, "config", None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pisnoop", description="OpenFlow traffic snooper and XMPP guard for a Raspberry Pi.")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help=f"config file (default: ${config_mod.ENV_VAR} or {config_mod.DEFAULT_PATH})")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except config_mod.ConfigError as exc:
        print(f"pisnoop: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"pisnoop: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pisnoop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: command modules raise
    # appliance.cli.UsageError, which must be the class main() catches.
    from appliance.cli import main as _main
    sys.exit(_main())
