"""The analysis pipeline in memory: the live path's classifiers and flag rules, nothing stored.

``analyse --pcap`` and ``analyser --once --since`` run it, and so do the tests
that prove a pcap gives the same flags as the live service.
"""

from __future__ import annotations

from appliance import neverban

from . import flags as flags_mod
from . import policy as policy_mod
from . import report
from .engine import engine_class
from .flows import FlowTable, MemoryFlows


class Offline:
    """Frames in, flow records and flags kept in memory; ``report()`` makes the report of what it saw."""

    def __init__(self, cfg, policy, engine=None):
        self.cfg, self.policy = cfg, policy
        self.flow_docs = MemoryFlows()
        self.series = report.XmppSeries(policy_mod.server_ports(policy, cfg))
        own = neverban.own_addresses(cfg) if cfg.enforce.never_ban_self else ()
        self.book = flags_mod.FlagBook(cfg, flags_mod.MemoryFlags(), own=own)
        table = FlowTable(self.flow_docs, cfg.snooper.sensor)
        self.engine = (engine or engine_class(cfg))(cfg, policy, table, self.book, [self.series])
        self.step = 0

    def run(self, batches) -> None:
        self.step += 1
        self.engine.run_step(batches, self.step, persistent=False)

    def report(self, title: str) -> report.Report:
        c = self.engine.counters
        docs = self.flow_docs.all()
        talkers, fams, unverified = report.summary(docs, self.series.ports)
        keys = ("frames", "malformed", "not_ip", "corrupt_batches", "packets_v4", "packets_v6", "verified",
                "connections_verified", "connections_contradicted", "flags", "flags_exempt")
        return report.Report(title, talkers, self.book.backend.all(), self.series,
                             policy_mod.threshold_ppm(self.policy, self.cfg),
                             policy_mod.window_seconds(self.policy, self.cfg), {k: c[k] for k in keys if c.get(k)},
                             policy_mod.ip_threshold_ppm(self.policy, self.cfg), fams, unverified)
