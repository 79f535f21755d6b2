"""``pisnoop analyser | analyse --pcap | report`` (the ``flags`` commands: ``analyser.flag_commands``).

Only what ``configure`` needs is imported here; each command imports the
analyser's parts it runs, so ``pisnoop report --help`` loads no parser, no
store driver and no plotting library.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from appliance import config as config_mod
from appliance import timespec
from appliance.errors import UsageError

PCAP_CHUNK = 1000


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments of ``name`` (one of analyser, analyse, report); ``appliance.cli`` calls this."""
    if name == "analyser":
        p.add_argument("--once", action="store_true", help="read what is new since the resume point, then exit")
        p.add_argument("--since", help="with --once: analyse this capture-time range only, store nothing; "
                       + timespec.FORMS)
        p.add_argument("--until", help="end of the --since range, same forms (default: now)")
        p.add_argument("-o", "--output", metavar="DIR", help="with --since: also write the rate plot here")
        p.set_defaults(func=cmd_analyser)
    elif name == "analyse":
        p.add_argument("--pcap", required=True, metavar="FILE")
        p.add_argument("--policy", metavar="FILE", help="policy file (default: analyser.policy_file of the config)")
        p.add_argument("-o", "--output", metavar="DIR", help="write the rate plot here")
        p.add_argument("--json", action="store_true", help="print the flags it would raise as JSON lines instead")
        p.set_defaults(func=cmd_analyse)
    elif name == "report":
        p.add_argument("--since", default="1h", help=timespec.FORMS + " (default 1h)")
        p.add_argument("--until", help="end of the range, same forms (default: now)")
        p.add_argument("-o", "--output", metavar="DIR", help="where the PNG goes (default: analyser.report_dir)")
        p.add_argument("--top", type=int, default=10)
        p.set_defaults(func=cmd_report)
    else:
        raise ValueError(f"analyser.commands has no command {name!r}")


def _config_or_defaults(args) -> config_mod.Config:
    """Commands that need no store still honour a config when there is one."""
    if args.config or os.environ.get(config_mod.ENV_VAR) or config_mod.DEFAULT_PATH.exists():
        return config_mod.load(args.config)
    return config_mod.Config()


def _db(cfg):
    from appliance import store
    db = store.database(cfg.mongodb, "pisnoop-analyser")
    store.ping(db)
    return db


def cmd_analyser(args) -> int:
    cfg = config_mod.load(args.config)
    if args.since or args.until:
        if not args.once:
            raise UsageError("--since/--until need --once (a one-shot pass over a time range)")
        return _one_shot(cfg, args)
    from .live import serve
    return serve(cfg, args.log_level, once=args.once)


def _one_shot(cfg, args) -> int:
    from appliance import service

    from . import policy as policy_mod
    from . import reader, report
    from .offline import Offline
    since = timespec.parse(args.since, "--since") if args.since else 0
    until = timespec.parse(args.until, "--until") if args.until else None
    off = Offline(cfg, policy_mod.load(cfg.analyser.policy_file))
    service.setup_logging("analyser", args.log_level)
    db = _db(cfg)
    for batches in reader.time_range(db, cfg.snooper.sensor, since, until):
        off.run(batches)
    title = (f"analysis of sensor {cfg.snooper.sensor} from {timespec.utc(since):%Y-%m-%d %H:%M:%S} to "
             + (f"{timespec.utc(until):%Y-%m-%d %H:%M:%S}" if until is not None else "now") + " (nothing stored)")
    print(report.write(off.report(title), Path(args.output) if args.output else None, "range"), end="")
    return 0


def cmd_analyse(args) -> int:
    from appliance import pcapfile, service

    from . import policy as policy_mod
    from . import report
    from .offline import Offline
    cfg = _config_or_defaults(args)
    policy = policy_mod.load(args.policy or cfg.analyser.policy_file)
    service.setup_logging("analyser", args.log_level)
    off = Offline(cfg, policy)
    name = Path(args.pcap).name
    chunk, index, start = [], 0, 0
    for fr in pcapfile.read(args.pcap):
        chunk.append(fr)
        index += 1
        if len(chunk) >= PCAP_CHUNK:
            off.run([(name, start, chunk)])
            chunk, start = [], index
    if chunk:
        off.run([(name, start, chunk)])
    if args.json:
        for f in off.book.backend.all():
            print(json.dumps(f, default=str, sort_keys=True))
        return 0
    out = Path(args.output) if args.output else None
    print(report.write(off.report(f"analysis of {args.pcap} (nothing stored)"), out, "pcap"), end="")
    return 0


def cmd_report(args) -> int:
    from appliance import store

    from . import flags as flags_mod
    from . import policy as policy_mod
    from . import reader, report
    from .parse import Packet, parse
    cfg = config_mod.load(args.config)
    since_ns = timespec.parse(args.since, "--since")
    until_ns = timespec.parse(args.until, "--until") if args.until else None
    since = timespec.utc(since_ns)
    until = timespec.utc(until_ns) if until_ns is not None else None
    policy = policy_mod.load(cfg.analyser.policy_file)
    db = _db(cfg)
    ports = policy_mod.server_ports(policy, cfg)
    fq: dict = {"last_seen": {"$gte": since}}
    if until:
        fq["first_seen"] = {"$lt": until}
    talkers, families, unverified = report.summary(db[store.FLOWS].find(fq), ports, args.top)
    flags = flags_mod.MongoFlags(db).all(since)
    if until:
        flags = [f for f in flags if f["flagged_at"] < until]
    series = report.XmppSeries(ports)
    for batches in reader.time_range(db, cfg.snooper.sensor, since_ns, until_ns):
        for _bid, _start, frames in batches:
            for ts, wl, data in frames:
                p = parse(ts, wl, data) if data else None
                if p.__class__ is Packet:
                    series(p)
    r = report.Report(f"report for sensor {cfg.snooper.sensor} since {since:%Y-%m-%d %H:%M:%S} UTC", talkers, flags,
                      series, policy_mod.threshold_ppm(policy, cfg), policy_mod.window_seconds(policy, cfg),
                      ip_threshold_ppm=policy_mod.ip_threshold_ppm(policy, cfg), families=families,
                      unverified=unverified)
    out = Path(args.output or cfg.analyser.report_dir)
    try:
        print(report.write(r, out, "report"), end="")
    except OSError as exc:
        raise UsageError(f"{out}: cannot write the plot ({exc.strerror})") from None
    return 0
