"""What the pages show, read through the functions the commands use (nothing re-derived here).

* overview: ``appliance.status_command.once`` (``pisnoop status``'s facts);
* flags: ``analyser.flags.MongoFlags`` (``pisnoop flags list``), the chart
  from ``analyser.report.XmppSeries`` over the stored frames
  (``pisnoop report``'s plot), the pcap from ``snooper.pcap.export``
  (``pisnoop export-pcap``);
* talkers: ``analyser.report.summary`` over the ``flows`` collection;
* the switch: the controller's status document (``switch``: the flows and
  meters it installed, by module, with the counters it last polled);
* the fleet: ``appliance.statusview.fleet_read`` and ``fleet_facts``
  (``pisnoop status --fleet``'s picture of every sensor on the store).
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
from typing import Optional

from appliance import flagdoc, store, timespec

CHART_MARGIN_S = 30          # frame time shown either side of a flag's evidence window
FLOWS_SHOWN = 300


def overview(cfg, db) -> dict:
    from appliance import status_command
    return status_command.once(cfg, db)


def fleet(cfg, db) -> dict:
    """Every sensor sharing the store, judged as ``pisnoop status --fleet`` judges it."""
    from appliance import statusview
    return statusview.fleet_facts(cfg, statusview.fleet_read(cfg, db))


def _policy(cfg):
    from analyser import policy as policy_mod
    return policy_mod, policy_mod.load(cfg.analyser.policy_file)


def flags(cfg, db, hours: float = 24.0) -> list[dict]:
    """The flags this sensor enforces (its own and the fleet's, as ``pisnoop flags list``): the active ones and those
    flagged in the last ``hours``, newest first, with the fields the page shows."""
    from analyser import flags as flags_mod
    from analyser import report
    now = flags_mod.now_utc()
    book = flags_mod.MongoFlags(db, cfg.snooper.sensor)
    docs = {d["_id"]: d for d in book.all(now - dt.timedelta(hours=hours))}
    docs.update({d["_id"]: d for d in book.active(now)})
    out = []
    for d in sorted(docs.values(), key=lambda d: d.get(flagdoc.FLAGGED_AT) or now, reverse=True):
        try:
            f = flagdoc.parse(d)
        except flagdoc.BadFlag:
            continue
        out.append({"id": str(d["_id"]), "subject": report.subject(d), "scope": report.scope(d),
                    "client_ip": f.client_ip, "status": f.status, "action": f.action, "classifier": f.classifier,
                    "reason": f.reason, "offence": f.offence, "origin": f.origin,
                    "flagged_at": f.flagged_at, "expires_at": f.expires_at, "sensor": f.sensor, "reach": f.reach,
                    "ports": f"{f.protocol}/{','.join(map(str, f.server_ports))} {f.direction}",
                    "evidence": {k: v for k, v in (d.get(flagdoc.EVIDENCE) or {}).items()
                                 if k not in ("first_packet", "last_packet")},
                    "active": f.status == flagdoc.FLAGGED and f.expires_at > now})
    return out


def flag_doc(db, flag_id: str) -> Optional[dict]:
    from bson import ObjectId
    from bson.errors import InvalidId
    ids: list = [flag_id]
    try:
        ids.append(ObjectId(flag_id))
    except (InvalidId, TypeError):
        pass
    return db[store.FLAGS].find_one({"_id": {"$in": ids}})


def evidence_window(doc: dict) -> Optional[tuple[int, int]]:
    """[first, last] packet of the flag's evidence in ns, or None (a manual ban has no evidence window)."""
    ev = doc.get(flagdoc.EVIDENCE) or {}
    lo, hi = ev.get("first_packet_ns"), ev.get("last_packet_ns")
    return (lo, hi) if isinstance(lo, int) and isinstance(hi, int) and lo <= hi else None


def chart(cfg, db, doc: dict) -> dict:
    """Packets/min toward the XMPP ports of the flag's client over its evidence window (± a margin), sliding
    window as the analyser counts, with the threshold the flag was raised against. The frames are those of the
    sensor that raised the flag (a fleet flag may come from another one)."""
    from analyser import reader, report
    from analyser.parse import Packet, parse
    policy_mod, policy = _policy(cfg)
    window = evidence_window(doc)
    ev = doc.get(flagdoc.EVIDENCE) or {}
    threshold = ev.get("threshold") or policy_mod.threshold_ppm(policy, cfg)
    out = {"threshold": threshold, "unit": ev.get("rate_unit", "packets/min"), "t": [], "y": [],
           "client": report.subject(doc)}
    ip = doc.get(flagdoc.CLIENT_IP)
    if window is None or not ip:
        out["note"] = "no evidence window (a manual ban)" if window is None else "a MAC subject: no per-address chart"
        return out
    net = ipaddress.ip_network(ip, strict=False)
    lo, hi = window[0] - CHART_MARGIN_S * timespec.NS, window[1] + CHART_MARGIN_S * timespec.NS
    series = report.XmppSeries(policy_mod.server_ports(policy, cfg))
    for batches in reader.time_range(db, doc.get(flagdoc.SENSOR) or cfg.snooper.sensor, lo, hi):
        for _bid, _start, frames in batches:
            for ts, wl, data in frames:
                p = parse(ts, wl, data) if data else None
                if p.__class__ is Packet and ipaddress.ip_address(p.src) in net:
                    series(p)
    per_client = series.rates(ev.get("window_seconds") or policy_mod.window_seconds(policy, cfg))
    totals: dict[float, float] = {}
    for times, rates in per_client.values():          # a prefix: its addresses together, as its aggregate counts
        for t, r in zip(times, rates):
            totals[t.timestamp()] = totals.get(t.timestamp(), 0.0) + r
    lo_s, hi_s = lo / timespec.NS, hi / timespec.NS
    keep = sorted(t for t in totals if lo_s <= t <= hi_s)
    out["t"], out["y"] = keep, [round(totals[t], 1) for t in keep]
    return out


def pcap(db, doc: dict) -> tuple[bytes, int]:
    """The flag's evidence window as a classic pcap (``export-pcap --since --until --host``): bytes, frames."""
    window = evidence_window(doc)
    if window is None:
        return b"", 0
    ip = doc.get(flagdoc.CLIENT_IP)
    host = ip if ip and "/" not in ip else None
    from snooper.pcap import export
    buf = io.BytesIO()
    n = export(db, buf, window[0], window[1], host=host, sensor=doc.get(flagdoc.SENSOR))
    return buf.getvalue(), n


def talkers(cfg, db, minutes: float, address: str = "") -> tuple[list, list]:
    """(top talkers, flows) of the last ``minutes``; ``address`` keeps the flows with it on either side."""
    from analyser import report
    policy_mod, policy = _policy(cfg)
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes)
    query: dict = {"last_seen": {"$gte": since}}
    if address:
        query["$or"] = [{"client_ip": address}, {"server_ip": address}]
    docs = list(db[store.FLOWS].find(query).sort("last_seen", -1).limit(5000))
    top, _families, _unverified = report.summary(docs, policy_mod.server_ports(policy, cfg), top=50)
    flows = [{"client": f"{d['client_ip']}:{d['client_port']}", "server": f"{d['server_ip']}:{d['server_port']}",
              "proto": {6: "tcp", 17: "udp"}.get(d.get("proto"), str(d.get("proto"))),
              "packets": d["packets"]["c2s"] + d["packets"]["s2c"], "bytes": d["bytes"]["c2s"] + d["bytes"]["s2c"],
              "verified": d.get("direction") == "verified", "first_seen": d.get("first_seen"),
              "last_seen": d.get("last_seen")} for d in docs[:FLOWS_SHOWN]]
    return top, flows


def switch(cfg, db) -> dict:
    """The controller's own account of the switch (its status document): connection, flows and meters by module."""
    from appliance import statusview
    doc = db[store.STATUS].find_one({"_id": statusview.status_ids(cfg.snooper.sensor)["controller"]}) or {}
    return {"connected": doc.get("connected"), "datapath_id": doc.get("datapath_id"), "target": doc.get("target"),
            "updated_at": doc.get("updated_at"), "modules": doc.get("modules") or [],
            "flows": (doc.get("switch") or {}).get("flows", []), "meters": (doc.get("switch") or {}).get("meters", []),
            "counters_at": _when((doc.get("switch") or {}).get("counters_at")), "found": bool(doc)}


def _when(t) -> Optional[dt.datetime]:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc) if isinstance(t, (int, float)) else None
