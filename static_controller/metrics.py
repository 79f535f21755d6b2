"""Prometheus metrics of the controller, read at scrape time from what the
event loop last published (one dict swapped atomically: no locks, no races)."""

from __future__ import annotations

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

PREFIX = "pisnoop_controller"


class Collector:
    def __init__(self, source):
        self.source = source          # callable -> the latest published dict

    def collect(self):
        s = self.source() or {}
        msgs = CounterMetricFamily(f"{PREFIX}_of_messages", "OpenFlow messages by direction and type",
                                   labels=["direction", "type"])
        for (direction, kind), n in s.get("of_messages", {}).items():
            msgs.add_metric([direction, kind], n)
        yield msgs
        errs = CounterMetricFamily(f"{PREFIX}_of_errors", "OpenFlow errors from the switch", labels=["type", "code"])
        for (t, c), n in s.get("of_errors", {}).items():
            errs.add_metric([str(t), str(c)], n)
        yield errs
        pushed = CounterMetricFamily(f"{PREFIX}_flows_pushed", "flow-mods sent, by module", labels=["module"])
        for mod, n in s.get("pushed", {}).items():
            pushed.add_metric([mod], n)
        yield pushed
        refused = CounterMetricFamily(f"{PREFIX}_refused_flows", "flows refused by the flowspace or target check",
                                      labels=["module", "reason"])
        for (mod, reason), n in s.get("refused", {}).items():
            refused.add_metric([mod, reason], n)
        yield refused
        drops = CounterMetricFamily(f"{PREFIX}_meter_band_drops", "packets dropped by meter bands (polled)",
                                    labels=["meter"])
        for meter, n in s.get("meter_drops", {}).items():
            drops.add_metric([str(meter)], n)
        yield drops
        connects = CounterMetricFamily(f"{PREFIX}_connects", "switch connections accepted (each gets the full set)")
        connects.add_metric([], s.get("connects", 0))
        yield connects
        gone = CounterMetricFamily(f"{PREFIX}_disconnects", "switch connections that ended, by reason",
                                   labels=["reason"])
        for reason, n in s.get("disconnects", {}).items():
            gone.add_metric([reason], n)
        yield gone
        chunks = CounterMetricFamily(f"{PREFIX}_paced_chunks", "chunks let out by the pacer (targets with a window)")
        chunks.add_metric([], s.get("paced_chunks", 0))
        yield chunks
        outages = CounterMetricFamily(f"{PREFIX}_store_outages", "times the store became unreachable")
        outages.add_metric([], s.get("store_outages", 0))
        yield outages
        for name, help_, key in (("connected", "1 while the switch is connected", "connected"),
                                 ("store_up", "1 while the store answers", "store_up"),
                                 ("flows_installed", "flows the controller believes are on the switch",
                                  "flows_installed"),
                                 ("push_milliseconds", "last full-set push, features-reply to barrier-reply",
                                  "push_ms")):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", help_)
            g.add_metric([], float(s.get(key) or 0))
            yield g


def register(source) -> Collector:
    c = Collector(source)
    REGISTRY.register(c)
    return c
