"""Subcommands: ``snooper``, ``export-pcap``, ``import-pcap``.

The capture and store parts are imported by the command that runs them, so
``--help`` loads neither pymongo nor the ring.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from appliance import timespec
from appliance.config import load as load_config_file
from appliance.errors import UsageError


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments of ``name`` (snooper, export-pcap, import-pcap); ``appliance.cli`` calls this."""
    if name == "snooper":
        p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (benchmarks, tests)")
        p.set_defaults(func=cmd_snooper)
    elif name == "export-pcap":
        p.add_argument("--since", required=True, help=timespec.FORMS)
        p.add_argument("--until", default="now", help="same forms as --since (default: now)")
        p.add_argument("--host", help="only frames from or to this IPv4/IPv6 address")
        p.add_argument("--port", type=int, help="only TCP/UDP frames from or to this port")
        p.add_argument("--sensor", help="only frames of this sensor")
        p.add_argument("--run", help="only frames of this capture or import run")
        p.add_argument("--ns", action="store_true", help="nanosecond timestamps (default: microseconds, truncated)")
        p.add_argument("-o", "--output", required=True, metavar="FILE", help="the pcap file to write ('-' for stdout)")
        p.set_defaults(func=cmd_export)
    elif name == "import-pcap":
        p.add_argument("file")
        p.add_argument("--dedupe", action="store_true",
                       help="drop duplicates within snooper.dedupe_window (default: keep all)")
        p.add_argument("--sensor", help="sensor name to store under (default: snooper.sensor)")
        p.set_defaults(func=cmd_import)
    else:
        raise ValueError(f"snooper.cli has no command {name!r}")


def cmd_snooper(args) -> int:
    from appliance import service

    from .service import run
    cfg = load_config_file(args.config)
    log = service.setup_logging("snooper", args.log_level)
    return run(cfg, log, duration=args.duration)


def cmd_export(args) -> int:
    from appliance import store

    from .pcap import export
    cfg = load_config_file(args.config)
    since, until = timespec.parse(args.since, "--since"), timespec.parse(args.until, "--until")
    if until < since:
        raise UsageError("export-pcap: --until is before --since")
    if args.host:
        try:
            ipaddress.ip_address(args.host)
        except ValueError:
            raise UsageError(f"export-pcap: --host {args.host!r} is not an IP address") from None
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"export-pcap: --port {args.port}: expected 0 to 65535")
    db = store.database(cfg.mongodb, "pisnoop-export")
    store.ping(db)
    try:
        out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")
    except OSError as exc:
        raise UsageError(f"export-pcap: {args.output}: {exc.strerror}") from None
    from appliance.progress import Progress
    progress = Progress("export-pcap", until - since)
    with out:
        n = export(db, out, since, until, host=args.host, port=args.port, sensor=args.sensor, run=args.run,
                   nano=args.ns, progress=progress)
    progress.done()
    print(f"{n} frames written to {args.output}", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from appliance import service
    from appliance.progress import Progress, file_size

    from .pcap import import_file
    cfg = load_config_file(args.config)
    log = service.setup_logging("import", args.log_level)
    progress = Progress("import-pcap", file_size(args.file))
    try:
        c, run, left = import_file(cfg, args.file, log, dedupe=args.dedupe, sensor=args.sensor, progress=progress)
    finally:
        progress.done()
    print(f"run {run}: read {c['captured']} frames, stored {c['stored']}, duplicates {c['duplicates']}, "
          f"unreadable records {c['dropped_parse']}, waiting in the spool {left}")
    return 0 if not left else 1
