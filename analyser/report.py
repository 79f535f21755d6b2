"""Reports: top talkers, flags (by subject and scope), exempt flags and unverified traffic as text; XMPP rate as PNG.

The same ``Report`` is filled from memory (``analyse --pcap``, one-shot
ranges) or from the store (``pisnoop report``), and rendered the same way.
The plot shows, per client, packets toward the XMPP port per minute over a
sliding window on frame time, the threshold line, and a marker where each
flag was raised (at the last packet of its evidence).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from appliance.flagdoc import client_text

from .parse import TCP

MAX_CLIENTS_PLOTTED = 8


DEFENCE = ("the shared XMPP meter (xmpp.meter: every client's packets toward the XMPP ports, together) limits it; "
           "no flag names a claimed source")


class XmppSeries:
    """Packets toward the XMPP ports per client IP per second of frame time."""

    def __init__(self, server_ports):
        self.ports = frozenset((server_ports,) if isinstance(server_ports, int) else server_ports)
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def __call__(self, p) -> None:
        if p.dport in self.ports and p.proto == TCP:
            self.counts[p.src][p.ts_ns // 1_000_000_000] += 1

    def rates(self, window_seconds: float) -> dict[str, tuple[list, list]]:
        """Per client: (times, packets/min over the sliding window ending at each second)."""
        w = max(1, int(round(window_seconds)))
        out = {}
        for ip, per_sec in self.counts.items():
            lo, hi = min(per_sec), max(per_sec) + w
            times, rates, running = [], [], 0
            for s in range(lo, hi + 1):
                running += per_sec.get(s, 0) - per_sec.get(s - w, 0)
                times.append(dt.datetime.fromtimestamp(s, tz=dt.timezone.utc))
                rates.append(running * 60.0 / w)
            out[ip] = (times, rates)
        return out


@dataclass
class Report:
    title: str
    talkers: list[dict]
    flags: list[dict]
    series: XmppSeries
    threshold_ppm: int
    window_seconds: float
    counters: dict = field(default_factory=dict)
    ip_threshold_ppm: Optional[int] = None
    families: dict = field(default_factory=dict)       # "IPv4"/"IPv6" -> {flows, packets, bytes}
    unverified: list = field(default_factory=list)     # (claimed source, packets) most first


def talkers(flow_docs, server_ports, top: int = 10) -> list[dict]:
    """Clients by bytes over their flows: flows, packets, bytes, verified and unverified packets toward XMPP."""
    ports = frozenset((server_ports,) if isinstance(server_ports, int) else server_ports)
    return sorted(_by_client(flow_docs, ports).values(), key=lambda t: (-t["bytes"], t["client_ip"]))[:top]


def _by_client(flow_docs, ports) -> dict:
    by: dict[str, dict] = {}
    for d in flow_docs:
        t = by.setdefault(d["client_ip"], {"client_ip": d["client_ip"], "flows": 0, "packets": 0, "bytes": 0,
                                           "xmpp_packets": 0, "verified": 0, "unverified": 0})
        t["flows"] += 1
        t["packets"] += d["packets"]["c2s"] + d["packets"]["s2c"]
        t["bytes"] += d["bytes"]["c2s"] + d["bytes"]["s2c"]
        unv = unverified_c2s(d)
        if d["server_port"] in ports and d["proto"] == TCP:
            t["xmpp_packets"] += d["packets"]["c2s"]
            t["verified"] += d["packets"]["c2s"] - unv
        t["unverified"] += unv
    return by


def unverified_c2s(d: dict) -> int:
    """Packets of the client side that did not count (flow documents before verification count none)."""
    v = d.get("verified_packets")
    return d["packets"]["c2s"] - v["c2s"] if v else 0


def families(flow_docs) -> dict:
    """Flows, packets and bytes per IP family."""
    out: dict[str, dict] = {}
    for d in flow_docs:
        fam = f"IPv{d.get('family') or (6 if ':' in d['client_ip'] else 4)}"
        f = out.setdefault(fam, {"flows": 0, "packets": 0, "bytes": 0})
        f["flows"] += 1
        f["packets"] += d["packets"]["c2s"] + d["packets"]["s2c"]
        f["bytes"] += d["bytes"]["c2s"] + d["bytes"]["s2c"]
    return out


def unverified_sources(flow_docs, top: int = 10) -> list[tuple[str, int]]:
    """Claimed sources of unverified packets (packets toward the other side that no verified connection holds)."""
    c: Counter = Counter()
    for d in flow_docs:
        n = unverified_c2s(d)
        if n:
            c[d["client_ip"]] += n
    return c.most_common(top)


def summary(flow_docs, server_ports, top: int = 10) -> tuple[list, dict, list]:
    """(talkers, families, unverified sources) in one pass over a list of flow documents."""
    docs = list(flow_docs)
    return talkers(docs, server_ports, top), families(docs), unverified_sources(docs, top)


def subject(f: dict) -> str:
    """The flag's subject as ``pisnoop flags`` shows it: MAC, prefix, address or address:port."""
    return f.get("client_mac") or client_text(f["client_ip"], f.get("client_port"))


def scope(f: dict) -> str:
    if f.get("client_mac"):
        return "host"
    if "/" in (f.get("client_ip") or ""):
        return "prefix"
    return "connection" if f.get("client_port") is not None else "address"


def _what(f: dict) -> str:
    ports = f.get("server_ports") or [f.get("server_port")]
    return f"{f.get('protocol', 'tcp')}/{','.join(map(str, ports))} {f.get('direction', 'outbound')}"


def render_text(r: Report) -> str:
    lines = [r.title, ""]
    if r.counters:
        lines.append("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(r.counters.items())))
    if r.families:
        lines.append("per family: " + "; ".join(f"{fam} {v['flows']} flows, {v['packets']} packets, {v['bytes']} bytes"
                                                 for fam, v in sorted(r.families.items())))
    if r.counters or r.families:
        lines.append("")
    lines.append("Top talkers")
    lines.append(f"  {'client':<40} {'flows':>6} {'packets':>9} {'bytes':>12} {'xmpp pkts':>9} {'verified':>9} "
                 f"{'unverif.':>9}")
    for t in r.talkers:
        lines.append(f"  {t['client_ip']:<40} {t['flows']:>6} {t['packets']:>9} {t['bytes']:>12} "
                     f"{t['xmpp_packets']:>9} {t.get('verified', 0):>9} {t.get('unverified', 0):>9}")
    if not r.talkers:
        lines.append("  (no flows)")
    banned = [f for f in r.flags if f["status"] != "exempt"]
    exempt = [f for f in r.flags if f["status"] == "exempt"]
    lines.append("")
    lines.append(f"Flagged clients ({len(banned)})")
    header = (f"  {'flagged at (UTC)':<20} {'scope':<10} {'subject':<30} {'bans':<22} {'classifier':<14} {'off':>3} "
              f"{'ban s':>6} {'count':>6} {'rate/min':>9} {'status':<8} ")
    if banned:
        lines.append(header + "reason")
    for f in banned:
        ev = f.get("evidence", {})
        lines.append(f"  {f['flagged_at']:%Y-%m-%d %H:%M:%S} {scope(f):<10} {subject(f):<30} {_what(f):<22} "
                     f"{f['classifier']:<14} {f['offence']:>3} {f['ban_seconds']:>6} {ev.get('count', ''):>6} "
                     f"{ev.get('rate', ''):>9} {f['status']:<8} {f['reason']}")
    lines.append("")
    lines.append(f"Exempt: flagged but never banned, on the never-ban list ({len(exempt)})")
    for f in exempt:
        lines.append(f"  {f['flagged_at']:%Y-%m-%d %H:%M:%S} {scope(f):<10} {subject(f):<30} {_what(f):<22} "
                     f"{f['classifier']:<14} exempt by {f.get('exempt_reason')}: {f['reason']}")
    lines.append("")
    total = sum(n for _, n in r.unverified)
    lines.append(f"Unverified traffic per claimed source ({total} packets; counted, never a ban of the source)")
    for src, n in r.unverified:
        lines.append(f"  {src:<40} {n:>9} unverified packets")
    lines.append(f"  defence: {DEFENCE}" if r.unverified else "  (none)")
    return "\n".join(lines) + "\n"


def render_png(r: Report, path: Path) -> Optional[Path]:
    """Write the rate plot; None when there is no XMPP traffic to plot."""
    rates = r.series.rates(r.window_seconds)
    if not rates:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flagged_ips = {f["client_ip"] for f in r.flags if f.get("client_ip")}
    order = sorted(rates, key=lambda ip: (ip not in flagged_ips, -max(rates[ip][1]), ip))[:MAX_CLIENTS_PLOTTED]
    fig, ax = plt.subplots(figsize=(10, 5))
    marked = False
    for ip in order:
        times, values = rates[ip]
        line, = ax.plot(times, values, label=ip, linewidth=1.2)
        for f in r.flags:
            when = f.get("evidence", {}).get("last_packet")
            if f.get("client_ip") == ip and when is not None:
                ax.axvline(when, color=line.get_color(), linestyle=":", linewidth=1)
                ax.plot([when], [r.threshold_ppm], marker="v", markersize=9, color=line.get_color(), linestyle="none",
                        label=None if marked else "flag raised")
                marked = True
    ax.axhline(r.threshold_ppm, color="red", linestyle="--", linewidth=1,
               label=f"threshold per connection {r.threshold_ppm}/min")
    if r.ip_threshold_ppm:
        ax.axhline(r.ip_threshold_ppm, color="darkred", linestyle="-.", linewidth=1,
                   label=f"threshold per client IP {r.ip_threshold_ppm}/min")
    ports = ", ".join(map(str, sorted(r.series.ports)))
    ax.set_title(f"packets per minute toward the XMPP port(s) {ports} ({r.window_seconds:g} s sliding window)")
    ax.set_xlabel("frame time (UTC)")
    ax.set_ylabel("packets/min")
    ax.legend(loc="upper left", fontsize="small")
    fig.autofmt_xdate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(r: Report, out_dir: Optional[Path], stem: str = "xmpp-rate") -> str:
    """The text, plus a line naming the PNG when one was written."""
    text = render_text(r)
    if out_dir is not None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        png = render_png(r, Path(out_dir) / f"{stem}-{stamp}.png")
        text += f"\nplot: {png}\n" if png else "\nplot: none (no XMPP traffic)\n"
    return text
