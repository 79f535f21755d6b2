"""The ``pisnoop`` command: a table of sub-commands, each imported only when run.

``COMMANDS`` names every sub-command, the module that implements it and its
one-line help, so ``pisnoop --help`` imports nothing and ``pisnoop snooper``
imports the snooper's command module and nothing of the analyser, the
controller or the lab. The chosen module's ``configure(name, parser)`` adds
its arguments and sets ``func(args) -> exit code``.

Exit codes are decided here and only here: a ``BadInput`` (bad config,
argument, file) is 2, a ``Failure`` (the store away, a write that failed) is
1, both with one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import config as config_mod
from . import timespec
from .errors import BadInput, Failure
from .redact import redact

LAB_HINT = "the lab is not installed: from a pisnoop checkout, pip install ./lab (the pisnoop-lab package)"

# name, module, help: the order is the order of `pisnoop --help`
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("check-config", "appliance.commands", "validate a config file and exit (0 good, 2 bad)"),
    ("status", "appliance.status_command",
     "this appliance at a glance: services, switch, capture, store, analyser lag, bans (exit 1: something is wrong)"),
    ("controller", "static_controller.command",
     "run the static controller (OpenFlow 1.3, os-ken) for switch.datapath_id"),
    ("snooper", "snooper.cli", "capture the mirror interface into the store (the pisnoop-snooper service)"),
    ("export-pcap", "snooper.cli", "write stored frames to a classic pcap file"),
    ("import-pcap", "snooper.cli", "store a pcap/pcapng file's Ethernet frames as if captured"),
    ("analyser", "analyser.commands",
     "the analyser service: stored frames -> flows, flags (or one pass with --once)"),
    ("analyse", "analyser.commands", "run the classifiers over a pcap, no store; print the report and the flags"),
    ("report", "analyser.commands", "top talkers, flagged clients and an XMPP rate plot from the store"),
    ("flags", "analyser.flag_commands",
     "list, ban or release flagged clients; never ban an address (flags allow)"),
    ("web", "webui.command",
     "the dashboard: login, live status, flags with charts and buttons, talkers, the switch (--hash-password)"),
    ("virtual", "lab.commands", "the virtual appliance: OVS bridge, three hosts and a store in namespaces (lab)"),
    ("demo", "lab.demo", "the closed loop end to end: flood detected, client blocked, others unharmed (lab)"),
)
_GLOBAL_WITH_VALUE = {"--config", "-c", "--log-level"}
_TIME_OPTIONS = {"--since", "--until"}


def chosen_command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (skipping the global options and their values)."""
    names = {name for name, _module, _help in COMMANDS}
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _GLOBAL_WITH_VALUE:
            skip = True
        elif arg.startswith("-"):
            continue
        else:
            return arg if arg in names else None
    return None


def attach_spans(argv: list[str]) -> list[str]:
    """``--since -30m`` as ``--since=-30m``: argparse would take a value that starts with "-" for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _TIME_OPTIONS and arg.startswith("-") and timespec.is_span(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """Every sub-command is listed; only ``chosen`` gets its module imported and its arguments."""
    parser = argparse.ArgumentParser(prog="pisnoop",
                                     description="OpenFlow traffic snooper and XMPP guard for a Raspberry Pi.")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help=f"config file (default: ${config_mod.ENV_VAR} or {config_mod.DEFAULT_PATH})")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module, text in COMMANDS:
        p = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            importlib.import_module(module).configure(name, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = attach_spans(sys.argv[1:] if argv is None else list(argv))
    try:
        args = build_parser(chosen_command(argv)).parse_args(argv)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        if exc.name == "lab" or (exc.name or "").startswith("lab."):
            print(f"pisnoop: {LAB_HINT}", file=sys.stderr)
            return 2
        raise
    except BadInput as exc:
        print(f"pisnoop: {redact(str(exc))}", file=sys.stderr)
        return 2
    except Failure as exc:
        print(f"pisnoop: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pisnoop: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        store_errors = sys.modules.get("pymongo.errors")
        if store_errors is not None and isinstance(exc, store_errors.PyMongoError):
            print(f"pisnoop: the store failed: {exc.__class__.__name__}: {redact(str(exc))[:200]}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
