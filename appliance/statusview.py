"""What `pisnoop status` knows: read the facts (``read``), judge them (``facts``, pure), show them (``render``).

``read`` is the only part that does I/O: the status documents every service
writes (``snooper:<sensor>``, ``analyser:<sensor>``, ``controller:pisnoop``),
the newest stored batch, the analyser's resume point, the active flags,
``dbStats``, the spool directory and, when systemd runs the services,
``systemctl show``. ``facts`` turns those raw inputs into sections, each line
with its problem (exit 1) or warning (shown, exit 0) named on it, so the
analyser's alert watcher and the command judge an appliance the same way.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

from .redact import redact

SERVICES = ("controller", "snooper", "analyser")
UNITS = {name: f"pisnoop-{name}.service" for name in (*SERVICES, "store")}
SYSTEMD_PROPS = ("LoadState", "ActiveState", "SubState", "NRestarts", "ActiveEnterTimestamp", "StatusText")
STALE_INTERVALS = 3          # a status document older than this many of its intervals: the service is down
STALE_MIN_SECONDS = 10.0
LAG_PROBLEM_SECONDS = 120.0  # the analyser this far behind the newest stored batch: something is wrong
DISK_FREE_WARN = 0.05
DROP_COUNTERS = ("kernel_dropped", "dropped_parse", "dropped_spool_full", "dropped_corrupt", "truncated",
                 "queue_overflows", "store_errors")


# --- reading (I/O only) ---------------------------------------------------------


def systemd_running() -> bool:
    """systemd is PID 1 (sd_booted's test): only then does ``systemctl show`` say anything true."""
    return os.path.isdir("/run/systemd/system")


def systemctl_show(unit: str, timeout: float = 5.0) -> Optional[dict]:
    """A unit's properties, or None when the unit is not loaded (the service does not run under systemd)."""
    try:
        out = subprocess.run(["systemctl", "show", unit, "-p", ",".join(SYSTEMD_PROPS)], capture_output=True,
                             text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return props if props.get("LoadState") == "loaded" else None


def dir_bytes(path: str) -> Optional[int]:
    p = Path(path)
    if not p.is_dir():
        return None
    total = 0
    for f in p.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            continue
    return total


def status_ids(sensor: str) -> dict[str, str]:
    """Each service's status document ``_id`` (each service writes its own: snooper/status.py, analyser/status.py,
    static_controller/command.py)."""
    return {name: f"{name}:{sensor}" for name in SERVICES}


def read(cfg, db, now: Optional[dt.datetime] = None, use_systemd: Optional[bool] = None) -> dict:
    """Every raw input of ``facts``; a store that does not answer is ``store_error`` (the rest still read)."""
    import pymongo

    from . import flagdoc
    now = now or dt.datetime.now(dt.timezone.utc)
    sensor = cfg.snooper.sensor
    raw: dict[str, Any] = {"now": now, "sensor": sensor, "store_error": None, "docs": {}, "systemd": {}}
    if use_systemd if use_systemd is not None else systemd_running():
        raw["systemd"] = {name: systemctl_show(unit) for name, unit in UNITS.items()}
    raw["spool_dir_bytes"] = dir_bytes(cfg.snooper.spool_dir)
    try:
        db.client.admin.command("ping")
        raw.update(read_sensor(db, sensor, now, flagdoc.applies_to(sensor)))
        raw["dbstats"] = db.command("dbStats")
    except pymongo.errors.PyMongoError as exc:
        raw["store_error"] = store_error(exc)
    return raw


def store_error(exc) -> str:
    return f"{exc.__class__.__name__}: {redact(str(exc).split(' (configured timeouts')[0])[:120]}"


FLAG_FIELDS = ("status", "client_ip", "client_mac", "client_port", "expires_at", "classifier", "_id", "sensor",
               "scope")


def read_sensor(db, sensor: str, now: dt.datetime, flags_query: dict) -> dict:
    """One sensor's part of the store: its status documents, newest batch, resume point, the active flags
    ``flags_query`` selects (raises the store's error)."""
    from . import store
    out: dict[str, Any] = {"docs": {name: db[store.STATUS].find_one({"_id": sid})
                                    for name, sid in status_ids(sensor).items()}}
    newest = db[store.FRAMES].find_one({"sensor": sensor}, {"ins": 1, "t1": 1}, sort=[("ins", -1)])
    out["newest_ins"] = newest.get("ins") if newest else None
    state = db[store.STATE].find_one({"_id": f"analyser:{sensor}"}) or {}
    out["analysed_ins"] = state.get("resume")
    out["flags"] = active_flags(db, now, flags_query)
    return out


def active_flags(db, now: dt.datetime, query: dict) -> list[dict]:
    from . import flagdoc, store
    slack = dt.timedelta(seconds=1)       # nx-27017 compares dates at whole seconds: exact below
    active = db[store.FLAGS].find(flagdoc.within(query, {flagdoc.STATUS: {"$in": [flagdoc.FLAGGED, flagdoc.EXEMPT]},
                                                         flagdoc.EXPIRES_AT: {"$gte": now - slack}}))
    return [{k: d.get(k) for k in FLAG_FIELDS} for d in active
            if d.get(flagdoc.EXPIRES_AT) and d[flagdoc.EXPIRES_AT] > now]


# --- judging (pure) ---------------------------------------------------------------


def _age(doc: Optional[dict], now: dt.datetime) -> Optional[float]:
    t = (doc or {}).get("updated_at")
    return (now - t).total_seconds() if isinstance(t, dt.datetime) else None


def _hms(t) -> str:
    return t.strftime("%H:%M:%S UTC") if isinstance(t, dt.datetime) else str(t)


def stale_after(cfg, name: str) -> float:
    interval = cfg.analyser.status_interval if name == "analyser" else cfg.snooper.status_interval
    return max(STALE_INTERVALS * interval, STALE_MIN_SECONDS)


def line(label: str, text: str, problem: str = "", warning: str = "") -> dict:
    return {"label": label, "text": text, "problem": problem, "warning": warning}


def unknown(label: str) -> dict:
    """A fact only the store holds, while it does not answer (the store's own line names the problem)."""
    return line(label, "unknown (the store does not answer)")


def service_lines(cfg, raw: dict) -> list[dict]:
    out = []
    now = raw["now"]
    for name in SERVICES:
        unit = raw["systemd"].get(name)
        doc = raw["docs"].get(name)
        age = _age(doc, now)
        heartbeat = "no status document" if age is None else f"last heartbeat {age:.0f} s ago"
        if raw["store_error"] and unit is None:
            out.append(unknown(name))
            continue
        if unit is not None:
            up = unit.get("ActiveState") == "active"
            ready = up and unit.get("SubState") == "running"
            text = (f"{'up' if up else unit.get('ActiveState', '?')} ({unit.get('SubState', '?')}), "
                    f"{'ready' if ready else 'not ready'}, {heartbeat}, restarts {unit.get('NRestarts', '?')}"
                    f" (systemd)")
            problem = "" if up else f"{UNITS[name]} is {unit.get('ActiveState')}"
        elif doc is not None and doc.get("stopped_at"):     # its last document says it stopped (a clean stop)
            text = f"down (stopped), {heartbeat}, restarts n/a (status document)"
            problem = f"down: stopped at {_hms(doc['stopped_at'])} (its last status document)"
        else:
            limit = stale_after(cfg, name)
            up = age is not None and age <= limit
            text = f"{'up, ready' if up else 'down'}, {heartbeat}, restarts n/a (status document)"
            problem = "" if up else ("no status document: never ran against this store" if age is None
                                     else f"down: its status document is older than {limit:.0f} s")
        out.append(line(name, text, problem=problem))
    return out


def as_of(cfg, raw: dict, name: str) -> str:
    """Said after facts read from a stale status document: they are that service's last word, not now."""
    age = _age(raw["docs"].get(name), raw["now"])
    return f" (its last status, {age:.0f} s old)" if age is not None and age > stale_after(cfg, name) else ""


def switch_lines(cfg, raw: dict) -> list[dict]:
    doc = raw["docs"].get("controller")
    if raw["store_error"]:
        return [unknown("switch")]
    if not doc:
        return [line("switch", "unknown (no controller status document)", problem="no controller status")]
    c = doc.get("counters", {})
    connected = bool(doc.get("connected"))
    flows, planned = c.get("flows_installed", 0), c.get("flows_planned", 0)
    meters, mplanned = c.get("meters_installed", 0), c.get("meters_planned", 0)
    refused = c.get("refused", 0)
    out = [line("switch", f"{'connected' if connected else 'NOT connected'} (datapath {doc.get('datapath_id')}, "
                f"{doc.get('target')}), connects {c.get('connects', 0)}, last disconnect "
                f"{doc.get('last_disconnect') or 'none'}{as_of(cfg, raw, 'controller')}",
                problem="" if connected else "the switch is not connected to the controller" + _why_not(c))]
    short = connected and (flows < planned or meters < mplanned)
    out.append(line("flows", f"{flows} flows installed (plan {planned} + bans), {meters}/{mplanned} meters, "
                    f"{refused} refused", problem="fewer flows or meters installed than planned" if short else "",
                    warning=f"{refused} flows refused" if refused else ""))
    return out


def _why_not(c: dict) -> str:
    ignored = c.get("ignored_datapaths", 0)
    return (f" (a switch with another datapath id was ignored {ignored} times: switch.datapath_id)" if ignored
            else "")


def capture_lines(cfg, raw: dict) -> list[dict]:
    if raw["store_error"]:
        return [unknown("capture")]
    doc = raw["docs"].get("snooper")
    if not doc:
        return [line("capture", "unknown (no snooper status document)", problem="no snooper status")]
    c = doc.get("counters", {})
    drops = {k: c.get(k, 0) for k in DROP_COUNTERS}
    unaccounted = doc.get("unaccounted", 0)
    dropped = {k: v for k, v in drops.items() if v}
    return [
        line("capture", f"{doc.get('captured_per_second', 0):.1f} frames/s on {doc.get('interface')}, "
             f"captured {c.get('captured', 0)}, stored {c.get('stored', 0)}, duplicates {c.get('duplicates', 0)}"
             f"{as_of(cfg, raw, 'snooper')}"),
        line("drops", ", ".join(f"{k} {v}" for k, v in drops.items()) + f", unaccounted {unaccounted}",
             problem=f"{unaccounted} frames unaccounted for" if unaccounted else "",
             warning=("frames dropped: " + ", ".join(dropped)) if dropped else ""),
    ]


def store_lines(cfg, raw: dict) -> list[dict]:
    spool_dir = raw.get("spool_dir_bytes")
    if raw["store_error"]:
        out = [line("store", f"UNREACHABLE at {redact(cfg.mongodb.uri)}: {raw['store_error']}",
                    problem="the store does not answer")]
    else:
        s = raw.get("dbstats") or {}
        total, used = s.get("fsTotalSize"), s.get("fsUsedSize")
        free = (total - used) if total and used is not None else None
        disk = f"disk free {_size(free)} of {_size(total)}" if free is not None else "disk free unknown"
        low = free is not None and total and free / total < DISK_FREE_WARN
        snooper = raw["docs"].get("snooper") or {}
        store_up = snooper.get("store_up", True)
        out = [line("store", f"reachable, {s.get('objects', 0)} documents, data {_size(s.get('dataSize'))}, "
                    f"on disk {_size(s.get('storageSize'))}, {disk}",
                    problem="" if store_up else "the snooper cannot write to the store (spooling)",
                    warning="less than 5 % of the store's disk is free" if low else "")]
    snooper = raw["docs"].get("snooper") or {}
    c = snooper.get("counters") or {}
    if "retention_batches" in c:          # the snooper trims frames by size (mongodb.retention)
        cap = getattr(cfg.mongodb.retention, "frames_max_gb", None)
        out.append(line("retention", f"{c['retention_batches']} batches ({c.get('retention_frames', 0)} frames, "
                        f"{_size(c.get('retention_bytes', 0))}) removed by size"
                        + (f"; frames capped at {cap:g} GB" if cap else "")))
    out.append(line("spool", f"{snooper.get('spool_frames', 0)} frames in {snooper.get('spool_batches', 0)} "
                    f"batches ({_size(snooper.get('spool_bytes', 0))}); {cfg.snooper.spool_dir} holds "
                    f"{_size(spool_dir) if spool_dir is not None else 'nothing (no such directory)'}"))
    return out


def analyser_lines(cfg, raw: dict) -> list[dict]:
    if raw["store_error"]:
        return [unknown("analyser lag"), unknown("alerts")]
    return [lag_line(raw), alert_line(cfg, raw)]


def lag_line(raw: dict) -> dict:
    """Newest stored batch against the analyser's resume point (both ``ins``: when a batch reached the store)."""
    newest, analysed = raw.get("newest_ins"), raw.get("analysed_ins")
    if newest is None:
        return line("analyser lag", "no frames stored yet")
    if analysed is None:
        return line("analyser lag", f"nothing analysed yet; newest batch stored {newest:%H:%M:%S} UTC",
                    problem="the analyser has read nothing")
    lag = max(0.0, (newest - analysed).total_seconds())
    return line("analyser lag", f"{lag:.1f} s (newest stored {newest:%H:%M:%S}, analysed up to {analysed:%H:%M:%S}"
                " UTC)", problem=f"more than {LAG_PROBLEM_SECONDS:.0f} s behind" if lag > LAG_PROBLEM_SECONDS else "")


def alert_line(cfg, raw: dict) -> dict:
    """The analyser's alert sender (``appliance/alerts.py``), from its status document."""
    a = (raw["docs"].get("analyser") or {}).get("alerts")
    if a is None:
        return line("alerts", "unknown (no analyser status document with alert counters)")
    hooks = len(cfg.alerts.webhooks)
    dropped = a.get("dropped_queue_full", 0) + a.get("dropped_gave_up", 0)
    return line("alerts", f"{a.get('events', 0)} events, {hooks} webhook(s): {a.get('sent', 0)} sent, "
                f"{a.get('failed_attempts', 0)} failed attempts, {dropped} dropped, {a.get('pending', 0)} pending",
                warning=f"{dropped} alerts never reached a webhook" if dropped else "")


def flag_lines(cfg, raw: dict) -> list[dict]:
    if raw["store_error"]:
        return [unknown("bans")]
    flags = raw.get("flags") or []
    bans = [f for f in flags if f["status"] == "flagged"]
    exempt = [f for f in flags if f["status"] == "exempt"]

    def subjects(fs):
        names = [f.get("client_mac") or f.get("client_ip") or "?" for f in fs[:5]]
        return (": " + ", ".join(names) + (" ..." if len(fs) > 5 else "")) if fs else ""
    return [line("bans", f"{len(bans)} active{subjects(bans)}"),
            line("exempt", f"{len(exempt)} exempt flags{subjects(exempt)}")]


SECTIONS = (("services", service_lines), ("switch", switch_lines), ("capture", capture_lines),
            ("store", store_lines), ("analyser", analyser_lines), ("flags", flag_lines))


def facts(cfg, raw: dict) -> dict:
    """The whole picture from ``read``'s inputs: sections of lines, the problems, ``ok``."""
    sections = {name: fn(cfg, raw) for name, fn in SECTIONS}
    problems = [f"{ln['label']}: {ln['problem']}" for lines in sections.values() for ln in lines if ln["problem"]]
    warnings = [f"{ln['label']}: {ln['warning']}" for lines in sections.values() for ln in lines if ln["warning"]]
    return {"at": raw["now"].isoformat(), "sensor": raw["sensor"], "config": cfg.source, "ok": not problems,
            "problems": problems, "warnings": warnings, "sections": sections, "inputs": _plain(raw)}


def _plain(raw: dict) -> dict:
    """The raw inputs as JSON can carry them (dates as ISO strings)."""
    def conv(v):
        if isinstance(v, dt.datetime):
            return v.isoformat()
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items() if k != "health"}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return conv({k: v for k, v in raw.items() if k != "now"})


def _size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- the fleet: every sensor sharing the store -------------------------------------

RATE_SECONDS = 10.0     # the store rate of a sensor: frames of the batches that reached the store in this long


def sensors(db) -> list[str]:
    """Every sensor with a status document in the store (``<service>:<sensor>``), sorted."""
    from . import store
    names = {str(d["_id"]).split(":", 1)[1] for d in db[store.STATUS].find({}, {"_id": 1})
             if ":" in str(d["_id"]) and str(d["_id"]).split(":", 1)[0] in SERVICES}
    return sorted(n for n in names if n)


def fleet_read(cfg, db, now: Optional[dt.datetime] = None) -> dict:
    """The raw inputs of ``fleet_facts``: each sensor's documents and its store rate, the fleet's bans."""
    import pymongo

    from . import flagdoc, store
    now = now or dt.datetime.now(dt.timezone.utc)
    raw: dict[str, Any] = {"now": now, "sensor": cfg.snooper.sensor, "store_error": None, "sensors": {}}
    try:
        db.client.admin.command("ping")
        since = now - dt.timedelta(seconds=RATE_SECONDS + 1)       # a second wider: nx-27017's whole seconds
        for name in sensors(db):
            part = read_sensor(db, name, now, {flagdoc.SENSOR: name, flagdoc.SCOPE: {"$ne": flagdoc.FLEET}})
            recent = db[store.FRAMES].find({"sensor": name, "ins": {"$gte": since}}, {"n": 1, "ins": 1})
            part["stored_recent"] = sum(d.get("n", 0) for d in recent
                                        if (now - d["ins"]).total_seconds() <= RATE_SECONDS)
            raw["sensors"][name] = part
        raw["fleet_flags"] = active_flags(db, now, {flagdoc.SCOPE: flagdoc.FLEET})
    except pymongo.errors.PyMongoError as exc:
        raw["store_error"] = store_error(exc)
    return raw


HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"


def sensor_facts(cfg, name: str, part: dict, now: dt.datetime, fleet_bans: int) -> dict:
    """One sensor of the fleet: ``health`` (healthy: every service up and no problem; down: none up; else
    degraded), each service's heartbeat, capture and store rates, analyser lag, its bans by scope."""
    raw = {"now": now, "store_error": None, "systemd": {}, **part}
    services = {}
    for ln in service_lines(cfg, raw):
        age = _age(part["docs"].get(ln["label"]), now)
        services[ln["label"]] = {"up": not ln["problem"], "heartbeat_seconds": None if age is None else round(age, 1),
                                 "problem": ln["problem"]}
    problems = [f"{k}: {v['problem']}" for k, v in services.items() if v["problem"]]
    lag = lag_line(raw)
    if lag["problem"]:
        problems.append(f"analyser lag: {lag['problem']}")
    up = sum(v["up"] for v in services.values())
    health = HEALTHY if not problems else (DOWN if up == 0 else DEGRADED)
    snooper = part["docs"].get("snooper") or {}
    controller = part["docs"].get("controller") or {}
    bans = [f for f in part.get("flags", []) if f["status"] == "flagged"]
    return {"sensor": name, "health": health, "problems": problems, "services": services,
            "capture_per_second": snooper.get("captured_per_second") if services["snooper"]["up"] else 0.0,
            "store_per_second": round(part.get("stored_recent", 0) / RATE_SECONDS, 1),
            "analyser_lag": lag["text"], "switch_connected": bool(controller.get("connected")),
            "bans": {"local": len(bans), "fleet": fleet_bans}}


def fleet_facts(cfg, raw: dict) -> dict:
    """The fleet's picture from ``fleet_read`` (pure): one entry per sensor, ``ok`` when every one is healthy.
    ``bans.fleet`` is the same for every sensor: a fleet ban is enforced by each."""
    if raw["store_error"]:
        return {"at": raw["now"].isoformat(), "ok": False, "store_error": raw["store_error"], "sensors": [],
                "problems": [f"store: {raw['store_error']}"], "fleet_bans": None}
    fleet_bans = [f for f in raw.get("fleet_flags", []) if f["status"] == "flagged"]
    out = [sensor_facts(cfg, name, part, raw["now"], len(fleet_bans)) for name, part in raw["sensors"].items()]
    problems = [f"{s['sensor']}: {p}" for s in out for p in s["problems"]]
    if not out:
        problems.append("no sensor has written a status document to this store")
    return {"at": raw["now"].isoformat(), "ok": not problems, "store_error": None, "sensors": out,
            "problems": problems, "fleet_bans": len(fleet_bans),
            "fleet_ban_subjects": sorted({f.get("client_mac") or f.get("client_ip") or "?" for f in fleet_bans})}


def render_fleet(f: dict) -> str:
    """The fleet on one screen: a line per sensor, its problems under it marked ``!!``."""
    head = f"pisnoop fleet status at {f['at'][:19]} UTC: "
    if f["store_error"]:
        return head + f"store UNREACHABLE: {f['store_error']}\n"
    bad = sum(s["health"] != HEALTHY for s in f["sensors"])
    out = [head + (f"{len(f['sensors'])} sensors, all healthy" if f["ok"] else
                   f"{len(f['sensors'])} sensors, {bad} not healthy"),
           f"  fleet bans {f['fleet_bans']} (enforced at every sensor)"
           + (": " + ", ".join(f["fleet_ban_subjects"][:5]) if f["fleet_bans"] else ""),
           f"  {'sensor':<16} {'health':<9} {'heartbeat s (ctl/snp/ana)':<26} {'capture/s':>9} {'store/s':>8} "
           f"{'switch':<7} {'local bans':>10}  analyser lag"]
    for s in f["sensors"]:
        beats = "/".join("-" if v["heartbeat_seconds"] is None else f"{v['heartbeat_seconds']:.0f}"
                         for v in s["services"].values())
        cap = s["capture_per_second"]
        out.append(f"{'!!' if s['health'] != HEALTHY else '  '}{s['sensor']:<16} {s['health']:<9} {beats:<26} "
                   f"{cap if cap is not None else 0:>9.1f} {s['store_per_second']:>8.1f} "
                   f"{'up' if s['switch_connected'] else 'DOWN':<7} {s['bans']['local']:>10}  {s['analyser_lag']}")
        out += [f"      <- {p}" for p in s["problems"]]
    if not f["sensors"]:
        out.append("  no sensor has written a status document to this store")
    return "\n".join(out) + "\n"


# --- rendering ------------------------------------------------------------------


def render(f: dict) -> str:
    """The screen: one line per fact, ``!!`` and the reason on a line that is wrong, ``!`` on a warning."""
    out = [f"pisnoop status of sensor {f['sensor']} at {f['at'][:19]} UTC: "
           + ("OK" if f["ok"] else f"{len(f['problems'])} PROBLEM(S)")]
    for name, lines in f["sections"].items():
        out.append(f"{name}:")
        for ln in lines:
            mark = "!!" if ln["problem"] else ("! " if ln["warning"] else "  ")
            why = f"  <- {ln['problem']}" if ln["problem"] else (f"  <- {ln['warning']}" if ln["warning"] else "")
            out.append(f" {mark} {ln['label']:<13} {ln['text']}{why}")
    return "\n".join(out) + "\n"
