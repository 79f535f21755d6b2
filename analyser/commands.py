"""``pisnoop analyser | analyse --pcap | report`` (the ``flags`` commands: ``analyser.flag_commands``).

Only what ``configure`` needs is imported here; each command imports the
analyser's parts it runs, so ``pisnoop report --help`` loads no parser, no
store driver and no plotting library.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
        who = p.add_mutually_exclusive_group()
        who.add_argument("--sensor", metavar="NAME", help="another sensor on the same store (default: snooper.sensor)")
        who.add_argument("--all-sensors", action="store_true", help="every sensor on the store together")
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
    progress = _range_progress("analyser --once", since, until)
    for batches in reader.time_range(db, cfg.snooper.sensor, since, until):
        batches = [(bid, start, list(frames)) for bid, start, frames in batches]
        off.run(batches)
        _advance(progress, batches, since)
    progress.done()
    title = (f"analysis of sensor {cfg.snooper.sensor} from {timespec.utc(since):%Y-%m-%d %H:%M:%S} to "
             + (f"{timespec.utc(until):%Y-%m-%d %H:%M:%S}" if until is not None else "now") + " (nothing stored)")
    print(report.write(off.report(title), Path(args.output) if args.output else None, "range"), end="")
    return 0


def _range_progress(what: str, since_ns: int, until_ns):
    """A progress line over capture time: from ``since_ns`` to ``until_ns`` (None: now)."""
    import time

    from appliance.progress import Progress
    return Progress(what, (until_ns if until_ns is not None else time.time_ns()) - since_ns)


def _advance(progress, batches, since_ns: int) -> None:
    """After a chunk of ``(batch id, start, frames)``: frames so far, and how far into the range the last one is."""
    last = since_ns
    for _bid, _start, frames in batches:
        inside = [f[0] for f in frames if f[2]]        # frames outside the range are kept empty (reader)
        progress.frames += len(inside)
        last = max([last, *inside])
    progress.update(progress.frames, last - since_ns)


def cmd_analyse(args) -> int:
    from appliance import pcapfile, service

    from . import policy as policy_mod
    from . import report
    from .offline import Offline
    cfg = _config_or_defaults(args)
    policy = policy_mod.load(args.policy or cfg.analyser.policy_file)
    service.setup_logging("analyser", args.log_level)
    from appliance.progress import Progress, file_size
    off = Offline(cfg, policy)
    name = Path(args.pcap).name
    progress = Progress("analyse", file_size(args.pcap))
    chunk, index, start, at = [], 0, 0, 0
    for fr in pcapfile.read(args.pcap):
        chunk.append(fr)
        index += 1
        if len(chunk) >= PCAP_CHUNK:
            off.run([(name, start, chunk)])
            at += sum(16 + len(x[2]) for x in chunk)   # bytes read, estimated: a record header and its data
            progress.update(index, at)
            chunk, start = [], index
    if chunk:
        off.run([(name, start, chunk)])
    progress.done()
    if args.json:
        for f in off.book.backend.all():
            print(json.dumps(f, default=str, sort_keys=True))
        return 0
    out = Path(args.output) if args.output else None
    print(report.write(off.report(f"analysis of {args.pcap} (nothing stored)"), out, "pcap"), end="")
    return 0


def _report_sensors(args, cfg, db) -> list[str]:
    """The sensors a report covers: ``--sensor``, every sensor with frames or a status document, or this one."""
    from appliance import statusview, store
    if args.sensor is not None and not re.match(r"^[A-Za-z0-9_-]{1,64}$", args.sensor):
        raise UsageError(f"--sensor {args.sensor!r}: expected a sensor name (1 to 64 letters, digits, _ or -)")
    if not args.all_sensors:
        return [args.sensor or cfg.snooper.sensor]
    return sorted(set(statusview.sensors(db)) | {s for s in db[store.FRAMES].distinct("sensor") if s})


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
    sensors = _report_sensors(args, cfg, db)
    fq: dict = {"last_seen": {"$gte": since}}
    if until:
        fq["first_seen"] = {"$lt": until}
    if not args.all_sensors:                  # flows and frames per sensor (idx_flows_sensor_key, idx_frames_sensor_t1)
        fq["sensor"] = sensors[0]
    talkers, families, unverified = report.summary(db[store.FLOWS].find(fq), ports, args.top)
    # one sensor: the flags its controller enforces (its own and the fleet's); all sensors: every flag
    flags = flags_mod.MongoFlags(db, None if args.all_sensors else sensors[0]).all(since)
    if until:
        flags = [f for f in flags if f["flagged_at"] < until]
    series = report.XmppSeries(ports)
    progress = _range_progress("report", since_ns, until_ns)
    for sensor in sensors:
        for batches in reader.time_range(db, sensor, since_ns, until_ns):
            batches = [(bid, start, list(frames)) for bid, start, frames in batches]
            for _bid, _start, frames in batches:
                for ts, wl, data in frames:
                    p = parse(ts, wl, data) if data else None
                    if p.__class__ is Packet:
                        series(p)
            _advance(progress, batches, since_ns)
    progress.done()
    who = f"sensor {sensors[0]}" if not args.all_sensors else f"all sensors ({', '.join(sensors) or 'none'})"
    r = report.Report(f"report for {who} since {since:%Y-%m-%d %H:%M:%S} UTC", talkers, flags,
                      series, policy_mod.threshold_ppm(policy, cfg), policy_mod.window_seconds(policy, cfg),
                      ip_threshold_ppm=policy_mod.ip_threshold_ppm(policy, cfg), families=families,
                      unverified=unverified)
    out = Path(args.output or cfg.analyser.report_dir)
    try:
        print(report.write(r, out, "report"), end="")
    except OSError as exc:
        raise UsageError(f"{out}: cannot write the plot ({exc.strerror})") from None
    return 0
