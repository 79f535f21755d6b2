"""The HTML of each page: plain markup, every value escaped, no inline script or style (the CSP forbids both).

``static/app.js`` adds what moves: the overview's and the fleet's refresh, the flags' charts,
sortable tables. Every form carries the session's CSRF token.
"""

from __future__ import annotations

import datetime as dt
import json
from html import escape
from typing import Iterable

HERE, NUM_HEAD, NUM_CELL = ' class="here"', ' data-num="1"', ' class="num"'
NAV = (("/", "Overview"), ("/flags", "Flags"), ("/talkers", "Talkers and flows"), ("/switch", "Switch"),
       ("/fleet", "Fleet"))


def e(v) -> str:
    if isinstance(v, dt.datetime):
        v = f"{v:%Y-%m-%d %H:%M:%S}"
    return escape("" if v is None else str(v), quote=True)


def csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(csrf)}">'


def layout(title: str, body: str, csrf: str | None, current: str = "", flash: str = "", page: str = "") -> str:
    nav = ""
    if csrf is not None:
        links = "".join(f'<a href="{href}"{HERE if href == current else ""}>{e(text)}</a>'
                        for href, text in NAV)
        nav = (f'<nav>{links}<form method="post" action="/logout" class="logout">{csrf_field(csrf)}'
               '<button type="submit">Log out</button></form></nav>')
    note = f'<p class="flash" id="flash">{e(flash)}</p>' if flash else ""
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>pisnoop: {e(title)}</title><link rel=\"stylesheet\" href=\"/static/app.css\">"
            + ("<link rel=\"stylesheet\" href=\"/static/uPlot.min.css\">" if page == "flags" else "")
            + f"</head><body data-page=\"{e(page)}\"><header><h1>pisnoop</h1>{nav}</header><main>"
            f"<h2>{e(title)}</h2>{note}{body}</main>"
            + ("<script src=\"/static/uPlot.iife.min.js\"></script>" if page == "flags" else "")
            + "<script src=\"/static/app.js\"></script></body></html>")


def login(csrf: str, failed: bool) -> str:
    why = '<p class="error" id="login-error">wrong password</p>' if failed else ""
    body = (f'{why}<form method="post" action="/login" id="login">{csrf_field(csrf)}'
            '<label>Password <input type="password" name="password" id="password" autocomplete="current-password" '
            'autofocus required></label> <button type="submit" id="login-button">Log in</button></form>')
    return layout("Log in", body, None, page="login")


def facts_html(f: dict) -> str:
    """``pisnoop status``'s picture: the verdict, then each section's lines, a problem or warning marked."""
    verdict = "OK" if f["ok"] else f"{len(f['problems'])} PROBLEM(S)"
    rows = []
    for name, lines in f["sections"].items():
        rows.append(f'<tr class="section"><th colspan="2">{e(name)}</th></tr>')
        for ln in lines:
            cls = "problem" if ln["problem"] else ("warning" if ln["warning"] else "")
            why = ln["problem"] or ln["warning"]
            rows.append(f'<tr class="{cls}"><td>{e(ln["label"])}</td><td>{e(ln["text"])}'
                        + (f' <span class="why">&larr; {e(why)}</span>' if why else "") + "</td></tr>")
    return (f'<p id="verdict" class="{"ok" if f["ok"] else "bad"}">sensor {e(f["sensor"])} at {e(f["at"][:19])} UTC: '
            f'{e(verdict)}</p><table id="facts">{"".join(rows)}</table>')


def counters(f: dict) -> dict:
    """The numbers the overview shows large: read from the same inputs ``pisnoop status`` judged."""
    docs = f.get("inputs", {}).get("docs", {}) or {}
    snooper = (docs.get("snooper") or {}).get("counters", {}) or {}
    ctl = (docs.get("controller") or {}).get("counters", {}) or {}
    bans = [x for x in f.get("inputs", {}).get("flags") or [] if x.get("status") == "flagged"]
    return {"captured": snooper.get("captured", 0), "stored": snooper.get("stored", 0),
            "duplicates": snooper.get("duplicates", 0), "flows_installed": ctl.get("flows_installed", 0),
            "bans": len(bans)}


def overview(f: dict, csrf: str, flash: str) -> str:
    tiles = "".join(f'<div class="tile"><span class="n" id="c-{k}">{e(v)}</span><span>{e(k.replace("_", " "))}'
                    '</span></div>' for k, v in counters(f).items())
    body = (f'<div class="tiles" id="tiles">{tiles}</div><div id="status">{facts_html(f)}</div>'
            '<p class="muted">refreshed every 2 s (<code>pisnoop status</code>)</p>')
    return layout("Overview", body, csrf, "/", flash, page="overview")


def _form(action: str, csrf: str, button: str, fields: str = "", cls: str = "", title: str = "") -> str:
    tip = f' title="{e(title)}"' if title else ""
    return (f'<form method="post" action="{e(action)}" class="inline {cls}">{csrf_field(csrf)}{fields}'
            f'<button type="submit"{tip}>{e(button)}</button></form>')


def flags(rows: list[dict], here: str, csrf: str, flash: str) -> str:
    """The flags sensor ``here`` enforces, each card saying which sensor raised it and its reach (local, fleet)."""
    ban = _form("/flags/ban", csrf, "Ban", '<input name="subject" placeholder="ADDR[/LEN], ADDR:PORT or MAC" required>'
                '<input name="duration" placeholder="for (e.g. 30m)"><input name="reason" placeholder="reason">',
                "ban")
    cards = []
    for r in rows:
        ev = r["evidence"]
        evidence = ", ".join(f"{k} {v}" for k, v in ev.items() if k != "samples")
        samples = ", ".join(map(str, ev.get("samples", [])))
        buttons = ""
        if r["active"]:
            buttons += _form(f"/flags/{r['id']}/release", csrf, "Release", cls="release")
        if r["client_ip"]:
            buttons += _form("/flags/allow", csrf, "Never ban here",
                             f'<input type="hidden" name="network" value="{e(r["client_ip"])}">', "allow",
                             f"never ban {r['client_ip']} at sensor {here} only (pisnoop flags allow --local)")
        if "first_packet_ns" in ev:
            buttons += f'<a class="button pcap" href="/flags/{e(r["id"])}/pcap">evidence pcap</a>'
        chart = (f'<div class="chart" data-flag="{e(r["id"])}" id="chart-{e(r["id"])}"></div>'
                 if "first_packet_ns" in ev else "")
        cards.append(
            f'<section class="flag {e(r["status"])}" data-subject="{e(r["subject"])}" data-id="{e(r["id"])}">'
            f'<h3>{e(r["subject"])} <small>{e(r["scope"])}, {e(r["status"])}, {e(r["action"])} {e(r["ports"])}'
            f'</small></h3><p>{e(r["reason"])} (classifier {e(r["classifier"])}, offence {e(r["offence"])}, '
            f'{e(r["origin"])}); <span class="sensor">sensor {e(r["sensor"])}</span>, '
            f'<span class="reach">{e(r["reach"])}</span>; flagged {e(r["flagged_at"])}, '
            f'until {e(r["expires_at"])} UTC; id '
            f'<code>{e(r["id"])}</code></p><p class="evidence">evidence: {e(evidence)}'
            + (f'; sample frames {e(samples)}' if samples else "")
            + f'</p>{chart}<div class="buttons">{buttons}</div></section>')
    body = (f'<div class="box"><h3>Ban by hand</h3>{ban}</div>'
            + ("".join(cards) or '<p id="no-flags">no flags in the last 24 h</p>'))
    return layout("Flags", body, csrf, "/flags", flash, page="flags")


def _table(table_id: str, heads: Iterable[str], rows: Iterable[Iterable], numeric: set[int]) -> str:
    th = "".join(f'<th data-col="{i}"{NUM_HEAD if i in numeric else ""}>{e(h)}</th>'
                 for i, h in enumerate(heads))
    trs = "".join("<tr>" + "".join(f'<td{NUM_CELL if i in numeric else ""}>{e(v)}</td>'
                                   for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="sortable" id="{e(table_id)}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def talkers(top: list, flows: list, minutes: float, address: str, csrf: str, flash: str) -> str:
    form = (f'<form method="get" action="/talkers" class="inline"><label>last <input name="minutes" size="4" '
            f'value="{e(f"{minutes:g}")}"> min</label> <label>address <input name="addr" id="addr" '
            f'value="{e(address)}" placeholder="any"></label> <button type="submit">Show</button></form>')
    t = _table("talkers", ("client", "flows", "packets", "bytes", "xmpp packets", "verified", "unverified"),
               ((x["client_ip"], x["flows"], x["packets"], x["bytes"], x["xmpp_packets"], x.get("verified", 0),
                 x.get("unverified", 0)) for x in top), {1, 2, 3, 4, 5, 6})
    f = _table("flows", ("client", "server", "proto", "packets", "bytes", "verified", "first seen", "last seen"),
               ((x["client"], x["server"], x["proto"], x["packets"], x["bytes"], "yes" if x["verified"] else "no",
                 x["first_seen"], x["last_seen"]) for x in flows), {3, 4})
    body = (f"{form}<h3>Top talkers</h3>{t}<h3>Flows ({len(flows)} newest)</h3>{f}"
            '<p class="muted">click a column head to sort</p>')
    return layout("Talkers and flows", body, csrf, "/talkers", flash, page="talkers")


def switch(s: dict, csrf: str, flash: str) -> str:
    if not s["found"]:
        body = '<p class="error">no controller status document: is pisnoop-controller running?</p>'
        return layout("Switch", body, csrf, "/switch", flash, page="switch")
    head = (f'<p id="switch-state">{"connected" if s["connected"] else "NOT connected"}: datapath '
            f'{e(s["datapath_id"])} ({e(s["target"])}), modules {e(", ".join(s["modules"]))}; status of '
            f'{e(s["updated_at"])} UTC, counters polled {e(s["counters_at"] or "not yet")}</p>')
    by_module: dict[str, list] = {}
    for fl in s["flows"]:
        by_module.setdefault(fl.get("module", "?"), []).append(fl)
    parts = []
    for mod, fls in by_module.items():
        parts.append(f'<h3>{e(mod)} ({len(fls)} flows)</h3>' + _table(
            f"flows-{mod}", ("table", "priority", "match", "actions", "packets", "bytes", "cookie"),
            ((x.get("table"), x.get("priority"), x.get("match"), x.get("actions"), x.get("packets", ""),
              x.get("bytes", ""), x.get("cookie")) for x in fls), {0, 1, 4, 5}))
    meters = _table("meters", ("meter", "module", "unit", "bands", "dropped packets"),
                    ((m.get("meter_id"), m.get("module"), m.get("unit"), m.get("bands"), m.get("drops", ""))
                     for m in s["meters"]), {0, 4})
    body = head + "".join(parts) + f"<h3>Meters ({len(s['meters'])})</h3>{meters}"
    return layout("Switch", body, csrf, "/switch", flash, page="switch")


FLEET_HEADS = ("sensor", "health", "controller", "snooper", "analyser", "capture/s", "store/s", "switch",
               "local bans", "fleet bans", "analyser lag", "problems")
FLEET_NUM = {5, 6, 8, 9}


def _heartbeat(svc: dict) -> str:
    hb = svc["heartbeat_seconds"]
    return ("no status" if hb is None else f"{hb:.0f} s ago") + ("" if svc["up"] else " (down)")


def fleet_html(f: dict, here: str) -> str:
    """``pisnoop status --fleet``'s picture (``statusview.fleet_facts``): a row per sensor, ``here`` marked."""
    at = e(f["at"][11:19])
    if f["store_error"]:
        return f'<p id="fleet-verdict" class="bad">at {at} UTC: store UNREACHABLE: {e(f["store_error"])}</p>'
    sensors = f["sensors"]
    bad = sum(s["health"] != "healthy" for s in sensors)
    verdict = (f"{len(sensors)} sensors, all healthy" if f["ok"] else
               f"{len(sensors)} sensors, {bad} not healthy" if sensors else "no sensor has written a status document")
    subjects = ", ".join(f.get("fleet_ban_subjects", [])[:5])
    rows = []
    for s in sensors:
        cap = s["capture_per_second"]
        cells = (s["sensor"] + (" (this one)" if s["sensor"] == here else ""), s["health"],
                 *(_heartbeat(v) for v in s["services"].values()), f"{cap or 0:.1f}", f"{s['store_per_second']:.1f}",
                 "up" if s["switch_connected"] else "DOWN", s["bans"]["local"], s["bans"]["fleet"],
                 s["analyser_lag"], "; ".join(s["problems"]))
        tds = "".join(f'<td{NUM_CELL if i in FLEET_NUM else ""}>{e(v)}</td>' for i, v in enumerate(cells))
        rows.append(f'<tr class="health-{e(s["health"])}" data-sensor="{e(s["sensor"])}" '
                    f'data-health="{e(s["health"])}">{tds}</tr>')
    head = "".join(f"<th>{e(h)}</th>" for h in FLEET_HEADS)
    return (f'<p id="fleet-verdict" class="{"ok" if f["ok"] else "bad"}">at {at} UTC: {e(verdict)}</p>'
            f'<p id="fleet-bans">fleet bans {e(f["fleet_bans"])} (enforced at every sensor)'
            + (f": {e(subjects)}" if subjects else "") + "</p>"
            f'<table id="fleet"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def fleet(f: dict, here: str, csrf: str, flash: str) -> str:
    body = (f'<div id="fleet-box">{fleet_html(f, here)}</div><p class="muted">every sensor sharing the store, '
            'heartbeats of controller, snooper and analyser; refreshed every 2 s (<code>pisnoop status --fleet</code>)'
            '</p>')
    return layout("Fleet", body, csrf, "/fleet", flash, page="fleet")


def as_json(v) -> str:
    return json.dumps(v, default=lambda x: x.isoformat() if isinstance(x, dt.datetime) else str(x))
