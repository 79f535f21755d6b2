"""The Grafana dashboard and the Prometheus rules in monitoring/: every metric they name is one the services export
(the names come from the services' own metric definitions), and promtool accepts the rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

DASHBOARD = REPO / "monitoring" / "grafana-pisnoop.json"
RULES = REPO / "monitoring" / "pisnoop-rules.yml"
METRIC = re.compile(r"\b(pisnoop_[a-z0-9_]+|up)\b(?!\s*\()")
BUILTIN = {"up"}                      # Prometheus' own series per scrape target


def _exposed(families) -> set[str]:
    """The sample names Prometheus sees for these metric families (a counter ``x`` is scraped as ``x_total``)."""
    out = set()
    for fam in families:
        out.add(f"{fam.name}_total" if fam.type == "counter" else fam.name)
    return out


def exported_metrics() -> set[str]:
    """Every metric name the three services export, from their collectors and metric objects."""
    from analyser import status as analyser_status
    from snooper import counters
    from static_controller import metrics as controller_metrics
    families = list(controller_metrics.Collector(lambda: {}).collect())
    families += list(counters.Collector(counters.new(), dict, "s").collect())
    for m in analyser_status._metrics().values():
        families += list(m.collect())
    return _exposed(families)


def panel_queries() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def names_in(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)                 # label matchers: not metric names
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    return set(METRIC.findall(expr))


def dashboard_metrics() -> set[str]:
    return {n for _title, expr in panel_queries() for n in names_in(expr)} - BUILTIN


def test_every_dashboard_panel_queries_a_metric_the_services_export():
    exported = exported_metrics()
    assert len(exported) > 30, sorted(exported)
    queries = panel_queries()
    assert len(queries) >= 15
    titles = {t for t, _e in queries}
    for want in ("Capture rate", "Capture drops", "Store writes", "Analyser lag", "Flags and bans",
                 "OpenFlow messages by type", "Meter drops", "Switch connects and disconnects"):
        assert want in titles
    for title, expr in queries:
        names = names_in(expr)
        assert names, f"{title}: {expr} names no metric"
        unknown = names - exported - BUILTIN
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which no service exports"


def test_the_name_check_catches_a_misspelt_metric():
    assert names_in('rate(pisnoop_snooper_capturd_total{sensor="x"}[1m])') - exported_metrics() \
        == {"pisnoop_snooper_capturd_total"}


def test_every_rule_names_exported_metrics_and_has_a_summary():
    exported = exported_metrics()
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"PisnoopServiceDown", "PisnoopCaptureDrops", "PisnoopStoreUnreachable", "PisnoopAnalyserLag",
            "PisnoopFlagRate"} <= names
    for r in rules:
        unknown = names_in(r["expr"]) - exported - BUILTIN
        assert not unknown, f"{r['alert']}: {sorted(unknown)}"
        assert r["annotations"]["summary"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian's prometheus (promtool) is not installed")
def test_promtool_accepts_the_rules_and_the_example_config():
    example = REPO / "monitoring" / "prometheus.example.yml"
    for args in (["check", "rules", str(RULES)], ["check", "config", str(example)]):
        res = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
