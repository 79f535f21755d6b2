"""Reports: top talkers and flagged clients as a table, XMPP packet rate as a PNG.

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


class XmppSeries:
    """Packets toward the XMPP port per client IP per second of frame time."""

    def __init__(self, server_port: int):
        self.port = server_port
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def __call__(self, p) -> None:
        if p.dport == self.port and p.proto == TCP:
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


def talkers(flow_docs, server_port: int, top: int = 10) -> list[dict]:
    """Clients by bytes over their flows: flows, packets, bytes, packets toward the XMPP port."""
    by: dict[str, dict] = {}
    for d in flow_docs:
        t = by.setdefault(d["client_ip"], {"client_ip": d["client_ip"], "flows": 0, "packets": 0, "bytes": 0,
                                           "xmpp_packets": 0, "unverified": 0})
        t["flows"] += 1
        pk = d["packets"]["c2s"] + d["packets"]["s2c"]
        t["packets"] += pk
        t["bytes"] += d["bytes"]["c2s"] + d["bytes"]["s2c"]
        if d["server_port"] == server_port and d["proto"] == TCP:
            t["xmpp_packets"] += d["packets"]["c2s"]
        if d["direction"] != "verified":
            t["unverified"] += 1
    return sorted(by.values(), key=lambda t: (-t["bytes"], t["client_ip"]))[:top]


def render_text(r: Report) -> str:
    lines = [r.title, ""]
    if r.counters:
        lines.append("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(r.counters.items())))
        lines.append("")
    lines.append("Top talkers")
    lines.append(f"  {'client':<40} {'flows':>6} {'packets':>9} {'bytes':>12} {'xmpp pkts':>9}")
    for t in r.talkers:
        lines.append(f"  {t['client_ip']:<40} {t['flows']:>6} {t['packets']:>9} {t['bytes']:>12} "
                     f"{t['xmpp_packets']:>9}")
    if not r.talkers:
        lines.append("  (no flows)")
    lines.append("")
    lines.append(f"Flagged clients ({len(r.flags)})")
    if r.flags:
        lines.append(f"  {'flagged at (UTC)':<20} {'client':<24} {'classifier':<14} {'off':>3} {'ban s':>6} "
                     f"{'count':>6} {'rate/min':>9} {'status':<8} reason")
    for f in r.flags:
        ev = f.get("evidence", {})
        lines.append(f"  {f['flagged_at']:%Y-%m-%d %H:%M:%S} {client_text(f['client_ip'], f['client_port']):<24} "
                     f"{f['classifier']:<14} {f['offence']:>3} {f['ban_seconds']:>6} {ev.get('count', ''):>6} "
                     f"{ev.get('rate', ''):>9} {f['status']:<8} {f['reason']}")
    return "\n".join(lines) + "\n"


def render_png(r: Report, path: Path) -> Optional[Path]:
    """Write the rate plot; None when there is no XMPP traffic to plot."""
    rates = r.series.rates(r.window_seconds)
    if not rates:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flagged_ips = {f["client_ip"] for f in r.flags}
    order = sorted(rates, key=lambda ip: (ip not in flagged_ips, -max(rates[ip][1]), ip))[:MAX_CLIENTS_PLOTTED]
    fig, ax = plt.subplots(figsize=(10, 5))
    marked = False
    for ip in order:
        times, values = rates[ip]
        line, = ax.plot(times, values, label=ip, linewidth=1.2)
        for f in r.flags:
            when = f.get("evidence", {}).get("last_packet")
            if f["client_ip"] == ip and when is not None:
                ax.axvline(when, color=line.get_color(), linestyle=":", linewidth=1)
                ax.plot([when], [r.threshold_ppm], marker="v", markersize=9, color=line.get_color(), linestyle="none",
                        label=None if marked else "flag raised")
                marked = True
    ax.axhline(r.threshold_ppm, color="red", linestyle="--", linewidth=1,
               label=f"threshold per connection {r.threshold_ppm}/min")
    if r.ip_threshold_ppm:
        ax.axhline(r.ip_threshold_ppm, color="darkred", linestyle="-.", linewidth=1,
                   label=f"threshold per client IP {r.ip_threshold_ppm}/min")
    ax.set_title(f"packets per minute toward the XMPP port ({r.window_seconds:g} s sliding window)")
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
