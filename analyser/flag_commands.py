"""``pisnoop flags list | ban | release | allow``: the operator's own path to the flags and the never-ban list.

A manual ban is a flag document like the analyser's (``appliance.flagdoc``,
origin ``manual``), so the controller enforces it exactly like one. A subject
on the never-ban list (``appliance.neverban``: the config's
``enforce.never_ban``, the ``never_ban`` collection that ``flags allow``
writes, this machine's addresses) is recorded with status ``exempt`` and
the command exits 2: nothing was banned, and a script must see that.

With several appliances on one store (``flagdoc`` ``scope``): ``list`` shows
the flags this sensor enforces (its own and the fleet's; ``--all-sensors``:
every flag in the store), ``ban --fleet`` bans at every appliance (default:
this one), ``release`` releases the flags this sensor enforces (a fleet flag is
one document: releasing it lifts it everywhere), ``allow --local`` exempts on
this appliance only (default: fleet-wide, like every entry stored before).

The new options are read with ``getattr`` (default off), so a caller that
builds its own ``argparse.Namespace`` (a web page) keeps working without them.

Exit codes: 0 done; 1 nothing to release or remove, or the store is away; 2 a
bad argument (one line) or a ban refused as exempt.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

from appliance import config as config_mod
from appliance import timespec
from appliance.errors import UsageError

OBJECT_ID = re.compile(r"^[0-9a-fA-F]{24}$")


def configure(name: str, p: argparse.ArgumentParser) -> None:
    if name != "flags":
        raise ValueError(f"analyser.flag_commands has no command {name!r}")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    fl = sub.add_parser("list", help="the active flags (--all: also exempt, released and expired ones)")
    fl.add_argument("--all", action="store_true")
    fl.add_argument("--json", action="store_true", help="one JSON document per line (with its id)")
    fl.add_argument("--all-sensors", action="store_true",
                    help="every sensor's flags (default: the flags this sensor enforces: its own and the fleet's)")
    fl.set_defaults(func=cmd_list)
    fb = sub.add_parser("ban", help="ban a client by hand: an address, a prefix ADDR/LEN, ADDR:PORT or a MAC")
    fb.add_argument("subject", metavar="ADDR[/LEN]|ADDR:PORT|MAC")
    fb.add_argument("--port", action="append", metavar="P",
                    help="a server port (repeatable, at most 8; default: xmpp.server_ports)")
    fb.add_argument("--protocol", default="tcp", help="tcp (default) or udp")
    fb.add_argument("--inbound", action="store_true",
                    help="the client is on the upstream side (default: outbound, the client is inside)")
    fb.add_argument("--for", dest="duration", metavar="DURATION",
                    help="how long: 90s, 30m, 2h, 1d (default: enforce.ban_seconds)")
    fb.add_argument("--action", help="drop or limit (default: enforce.action)")
    fb.add_argument("--reason", default="banned by hand", metavar="TEXT")
    fb.add_argument("--fleet", action="store_true",
                    help="enforced by every appliance sharing the store (default: only this one, snooper.sensor)")
    fb.set_defaults(func=cmd_ban)
    fr = sub.add_parser("release", help="release active flags: by flag id, or a subject (ADDR[/LEN], ADDR:PORT, MAC)")
    fr.add_argument("target", metavar="ID|ADDR[/LEN]|ADDR:PORT|MAC")
    fr.set_defaults(func=cmd_release)
    fa = sub.add_parser("allow", help="never ban an address or prefix (on top of enforce.never_ban); "
                                      "--list shows the list, --remove takes an entry off")
    fa.add_argument("network", nargs="?", metavar="ADDR[/LEN]")
    fa.add_argument("--reason", default="", metavar="TEXT")
    fa.add_argument("--list", action="store_true")
    fa.add_argument("--remove", metavar="ADDR[/LEN]")
    fa.add_argument("--local", action="store_true",
                    help="on this appliance only (default: every appliance sharing the store)")
    fa.set_defaults(func=cmd_allow)


def _db(cfg, args):
    """The caller's database (``args.db``: the dashboard's own client, so a button opens none) or a new client."""
    from appliance import store
    db = getattr(args, "db", None)
    db = store.database(cfg.mongodb, "pisnoop-flags") if db is None else db
    store.ping(db)
    return db


def _never_ban(cfg, db):
    from appliance import neverban, store
    own = neverban.own_addresses(cfg) if cfg.enforce.never_ban_self else ()
    return neverban.NeverBan.of(cfg, db[store.NEVER_BAN].find(neverban.applies_to(cfg.snooper.sensor)), (), own)


# --- list ---------------------------------------------------------------------------------------------------


def cmd_list(args) -> int:
    from appliance import flagdoc

    from . import flags as flags_mod
    cfg = config_mod.load(args.config)
    book = flags_mod.MongoFlags(_db(cfg, args), None if getattr(args, "all_sensors", False) else cfg.snooper.sensor)
    docs = book.all() if args.all else book.active(flags_mod.now_utc())
    if args.json:
        for d in docs:
            print(json.dumps({**{k: v for k, v in d.items() if k != "_id"}, "id": str(d.get("_id"))}, default=str,
                             sort_keys=True))
        return 0
    if not docs:
        print("no flags" if args.all else "no active flags")
        return 0
    print(f"{'id':<24} {'client':<30} {'scope':<10} {'ports':<16} {'dir':<8} {'action':<6} {'status':<8} "
          f"{'expires (UTC)':<19} {'origin':<8} {'sensor':<16} {'reach':<6} reason")
    for d in docs:
        try:
            f = flagdoc.parse(d)
        except flagdoc.BadFlag as exc:
            print(f"pisnoop: flag {d.get('_id')} ignored: {exc}", file=sys.stderr)
            continue
        ports = f"{f.protocol}/{','.join(map(str, f.server_ports))}"
        reason = f.reason + (f" [exempt: {f.exempt_reason}]" if f.exempt_reason else "")
        print(f"{str(f.id):<24} {f.subject:<30} {f.scope:<10} {ports:<16} {f.direction:<8} {f.action:<6} "
              f"{f.status:<8} {f.expires_at:%Y-%m-%d %H:%M:%S} {f.origin:<8} {f.sensor:<16} {f.reach:<6} {reason}")
    return 0


# --- ban ----------------------------------------------------------------------------------------------------


def _ports(cfg, given) -> list[int]:
    if not given:
        return list(cfg.xmpp.server_ports)
    out = []
    for text in given:
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise UsageError(f"--port {text!r}: expected a port from 1 to 65535")
        out.append(int(text))
    return out


def _seconds(cfg, text) -> int:
    if text is None:
        return cfg.enforce.ban_seconds
    if not timespec.is_span(text):
        raise UsageError(f"--for {text!r}: expected a duration such as 90s, 30m, 2h or 1d")
    ns = -timespec.parse(text.lstrip("-"), "--for", now_ns=0)
    if ns <= 0:
        raise UsageError(f"--for {text!r}: expected a duration of at least 1 s")
    return math.ceil(ns / timespec.NS)


def cmd_ban(args) -> int:
    from appliance import flagdoc
    from appliance.errors import BadInput

    from . import flags as flags_mod
    cfg = config_mod.load(args.config)
    ip, mac, port = flagdoc.parse_subject(args.subject)
    now = flags_mod.now_utc()
    fields = dict(client_ip=ip, client_mac=mac, client_port=port, protocol=args.protocol,
                  server_ports=_ports(cfg, args.port), direction=flagdoc.INBOUND if args.inbound else flagdoc.OUTBOUND,
                  classifier="manual", reason=args.reason, action=args.action or cfg.enforce.action,
                  evidence={"by": "pisnoop flags ban"}, ban_seconds=_seconds(cfg, args.duration), flagged_at=now,
                  sensor=cfg.snooper.sensor, origin=flagdoc.MANUAL,
                  scope=flagdoc.FLEET if getattr(args, "fleet", False) else flagdoc.LOCAL)
    flagdoc.build(offence=1, **fields)            # every argument checked before the store is asked anything
    db = _db(cfg, args)
    from appliance import store
    earlier = db[store.FLAGS].count_documents({flagdoc.CLIENT_MAC: mac} if mac else {flagdoc.CLIENT_IP: ip})
    exempt = _never_ban(cfg, db).exempts(_net_of(doc_of(ip))) if ip else None
    doc = flagdoc.build(offence=earlier + 1, exempt_reason=exempt, **fields)
    fid = store.flags(db).insert_one(doc).inserted_id
    _alert(cfg, "flag_exempt" if exempt else "flag_raised", [doc])
    f = flagdoc.parse(doc)
    if exempt:
        raise BadInput(f"{f.subject} is on the never-ban list ({exempt}): flag {fid} recorded as exempt, "
                       "nothing banned")
    where = "every appliance on this store" if f.reach == flagdoc.FLEET else f"sensor {f.sensor} only"
    print(f"banned {f.subject} ({f.protocol}/{','.join(map(str, f.server_ports))} {f.direction}) by {f.action} for "
          f"{f.ban_seconds} s, until {f.expires_at:%Y-%m-%d %H:%M:%S} UTC, at {where}: flag {fid}")
    return 0


# --- release ------------------------------------------------------------------------------------------------


def cmd_release(args) -> int:
    from appliance import flagdoc

    from . import flags as flags_mod
    text = args.target.strip()
    if OBJECT_ID.match(text):
        from bson import ObjectId
        query = {"_id": {"$in": [ObjectId(text), text]}}
    else:
        ip, mac, port = flagdoc.parse_subject(text)
        query = {flagdoc.CLIENT_MAC: mac} if mac else {flagdoc.CLIENT_IP: ip}
        if port is not None:
            query[flagdoc.CLIENT_PORT] = port
    cfg = config_mod.load(args.config)
    released = flags_mod.MongoFlags(_db(cfg, args), cfg.snooper.sensor).release_where(query, flags_mod.now_utc())
    if not released:
        print(f"pisnoop: no active flag for {text}", file=sys.stderr)
        return 1
    _alert(cfg, "flag_released", released)
    print(f"released {len(released)} flag(s) of {text}: {', '.join(str(d['_id']) for d in released)}")
    return 0


def _alert(cfg, event: str, docs: list) -> None:
    """One alert per flag written by hand: the log line now, the webhooks given up to their timeout to take it
    (a command does not wait out a webhook that is down: the alert is then counted dropped and logged)."""
    from appliance import alerts
    sender = alerts.Alerter(cfg.alerts, cfg.snooper.sensor, logger=alerts.command_logger("flags"))
    for doc in docs:
        sender.emit(event, **alerts.flag_fields(doc))
    sender.close(wait=cfg.alerts.timeout_seconds)


# --- allow --------------------------------------------------------------------------------------------------


def cmd_allow(args) -> int:
    from appliance import neverban, store

    from . import flags as flags_mod
    chosen = [x for x in (args.network is not None, args.list, args.remove is not None) if x]
    if len(chosen) != 1:
        raise UsageError("flags allow: give exactly one of ADDR[/LEN], --list or --remove ADDR[/LEN]")
    cfg = config_mod.load(args.config)
    if args.list:
        db = _db(cfg, args)
        entries = _never_ban(cfg, db).entries
        for e in entries:
            print(e.describe())
        if not entries:
            print("the never-ban list is empty")
        return 0
    sensor = cfg.snooper.sensor if getattr(args, "local", False) else None
    if args.remove is not None:
        net = neverban.network(args.remove)
        if str(net) in cfg.enforce.never_ban or any(neverban.network(t) == net for t in cfg.enforce.never_ban):
            raise UsageError(f"{args.remove} is in the config (enforce.never_ban): remove it there")
        entry = {neverban.NETWORK: neverban.entry_id(net, sensor)}
        if not _db(cfg, args)[store.NEVER_BAN].delete_one(entry).deleted_count:
            print(f"pisnoop: {args.remove} is not on the stored never-ban list", file=sys.stderr)
            return 1
        print(f"{args.remove} taken off the never-ban list: it can be banned again")
        return 0
    doc = neverban.entry_doc(args.network, args.reason, flags_mod.now_utc(), sensor)
    db = _db(cfg, args)
    db[store.NEVER_BAN].replace_one({neverban.NETWORK: doc[neverban.NETWORK]}, doc, upsert=True)
    held = [d for d in flags_mod.MongoFlags(db, sensor).active(flags_mod.now_utc())
            if neverban.NeverBan([neverban.parse_entry(doc)]).exempts(_net_of(d))]
    note = f"; {len(held)} active flag(s) on it are no longer enforced (flags release closes them)" if held else ""
    print(f"never banned from now: {neverban.parse_entry(doc).describe()}{note}")
    return 0


def doc_of(ip: str) -> dict:
    return {"client_ip": ip}


def _net_of(doc: dict):
    """The subject network of a flag document, None for a MAC subject (or a value flagdoc would refuse)."""
    import ipaddress
    try:
        return ipaddress.ip_network(doc.get("client_ip")) if doc.get("client_ip") else None
    except ValueError:
        return None
