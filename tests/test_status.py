"""`pisnoop status` against the running virtual appliance (controller, snooper, analyser, embedded store), and
its judgement of systemd's facts (no systemd runs the services here)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance import statusview
from lab import scenario
from lab.virtual import VirtualAppliance
from tests.conftest import PISNOOP, REPO, assert_gone, pisnoop

HELPERS = Path("/work/helpers")
SECTIONS = ("services", "switch", "capture", "store", "analyser", "flags")


def save(name: str, text: str) -> None:
    """The closing note's copies of the screen (only where the helpers' folder exists)."""
    if HELPERS.is_dir():
        (HELPERS / name).write_text(text)


def status(va, *extra: str):
    return pisnoop("--config", str(va.config_path), "status", *extra, timeout=60)


def wait_status(va, pred, timeout: float = 40.0):
    deadline = time.monotonic() + timeout
    while True:
        res = status(va)
        if pred(res) or time.monotonic() > deadline:
            return res
        time.sleep(0.5)


def lines_of(text: str) -> dict[str, str]:
    """label -> its whole line, for the screen's fact lines."""
    out = {}
    for ln in text.splitlines():
        if ln.startswith(" ") and len(ln) > 4:
            out[ln[4:17].strip()] = ln
    return out


@pytest.fixture
def running():
    va = VirtualAppliance(scenario.service_config())
    services = None
    with va:
        services = scenario.ServiceSet(va)
        try:
            for name in scenario.SERVICES:
                services.start(name)
            yield va, services
        finally:
            services.stop()
    assert_gone(va)


def test_status_healthy_then_snooper_stopped_then_store_stopped(running):
    va, services = running
    # traffic through the bridge: mirrored, stored, analysed; a ban and an exempt flag by hand
    assert va.ping("inside", "10.0.0.1", count=5)
    banned = pisnoop("--config", str(va.config_path), "flags", "ban", "10.0.0.99", "--for", "10m")
    assert banned.returncode == 0, banned.stderr
    allowed = pisnoop("--config", str(va.config_path), "flags", "allow", "10.0.0.98")
    assert allowed.returncode == 0, allowed.stderr
    exempt = pisnoop("--config", str(va.config_path), "flags", "ban", "10.0.0.98", "--for", "10m")
    assert exempt.returncode == 2 and "recorded as exempt" in exempt.stderr, exempt.stderr

    pinger = va.popen("inside", ["ping", "-n", "-q", "-i", "0.1", "-c", "300", "10.0.0.1"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        res = wait_status(va, lambda r: r.returncode == 0 and "no frames stored" not in r.stdout
                          and " 0.0 frames/s" not in r.stdout)
    finally:
        pinger.kill()
        pinger.wait()
    assert res.returncode == 0, res.stdout + res.stderr
    save("status-healthy.txt", res.stdout)
    assert res.stdout.startswith(f"pisnoop status of sensor {va.config.snooper.sensor} at ") and ": OK\n" in res.stdout
    assert "!!" not in res.stdout and "unknown" not in res.stdout
    facts = lines_of(res.stdout)
    for name in scenario.SERVICES:
        assert "up, ready, last heartbeat" in facts[name], facts[name]
    # run as their units say: capture first (the snooper's Nice=-5), the others at the default
    assert {n: os.getpriority(os.PRIO_PROCESS, services.procs[n].pid) for n in scenario.SERVICES} == {
        n: (-5 if n == "snooper" else 0) for n in scenario.SERVICES}
    assert "connected (datapath" in facts["switch"] and "NOT" not in facts["switch"]
    installed, planned = map(int, re.search(r"(\d+) flows installed \(plan (\d+)", facts["flows"]).groups())
    assert planned > 0 and installed >= planned, facts["flows"]
    meters, meters_planned = map(int, re.search(r"(\d+)/(\d+) meters", facts["flows"]).groups())
    assert meters == meters_planned == 2, facts["flows"]     # the XMPP meter and the penalty meter
    assert float(facts["capture"].split()[1]) > 0 and "frames/s on mirror0" in facts["capture"], facts["capture"]
    assert "kernel_dropped 0" in facts["drops"] and "unaccounted 0" in facts["drops"]
    assert "reachable" in facts["store"] and "disk free" in facts["store"] and "disk free unknown" not in facts["store"]
    assert "holds" in facts["spool"]
    assert "s (newest stored" in facts["analyser lag"]
    assert facts["bans"].split()[1:4] == ["1", "active:", "10.0.0.99"], facts["bans"]
    assert facts["exempt"].split()[1:5] == ["1", "exempt", "flags:", "10.0.0.98"], facts["exempt"]

    js = status(va, "--json")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert doc["ok"] is True and doc["problems"] == [] and tuple(doc["sections"]) == SECTIONS
    labels = [ln["label"] for sec in doc["sections"].values() for ln in sec]
    assert labels == list(facts), (labels, list(facts))
    assert doc["inputs"]["docs"]["snooper"]["counters"]["captured"] > 0
    assert [f["client_ip"] for f in doc["inputs"]["flags"] if f["status"] == "flagged"] == ["10.0.0.99"]

    watched = status(va, "--watch", "0.2", "--count", "3")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.count("\x1b[H\x1b[2J") == 3 and watched.stdout.count("pisnoop status of sensor") == 3
    watching = subprocess.Popen([*PISNOOP, "--config", str(va.config_path), "status", "--watch", "0.2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        time.sleep(3)
    finally:
        watching.send_signal(signal.SIGINT)                   # Ctrl-C ends a watch: the last verdict, no complaint
        out, err = watching.communicate(timeout=30)
    assert watching.returncode == 0 and err == "" and out.count("pisnoop status of sensor") >= 2, (out[-500:], err)

    # the snooper stops: its last status document says so, and the line naming it says so at once
    proc = services.procs["snooper"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    res = status(va)
    assert res.returncode == 1, res.stdout
    save("status-broken.txt", res.stdout)
    broken = lines_of(res.stdout)
    assert broken["snooper"].startswith(" !! snooper       down (stopped), last heartbeat"), broken["snooper"]
    assert "down: stopped at " in broken["snooper"] and "(its last status document)" in broken["snooper"]
    assert [ln for ln in res.stdout.splitlines() if ln.startswith(" !!")] == [broken["snooper"]]
    assert "1 PROBLEM(S)" in res.stdout.splitlines()[0]
    doc = json.loads(status(va, "--json").stdout)
    assert doc["ok"] is False and len(doc["problems"]) == 1 and doc["problems"][0].startswith("snooper: down")

    # the store stops: one problem line names it and where it was
    va.store.stop()
    res = status(va)
    assert res.returncode == 1
    bad = [ln for ln in res.stdout.splitlines() if ln.startswith(" !!")]
    assert len(bad) == 1 and bad[0].startswith(" !! store         UNREACHABLE at mongodb://127.0.0.1:"), bad


# --- the judgement alone, from inputs as systemd and the documents give them ----------------------------------

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


def raw_inputs(**over) -> dict:
    fresh = NOW - dt.timedelta(seconds=2)
    raw = {"now": NOW, "sensor": "s", "store_error": None, "systemd": {}, "spool_dir_bytes": 0,
           "docs": {"controller": {"updated_at": fresh, "connected": True, "counters": {
                        "flows_installed": 7, "flows_planned": 7, "meters_installed": 1, "meters_planned": 1}},
                    "snooper": {"updated_at": fresh, "counters": {"captured": 10, "stored": 10}, "unaccounted": 0,
                                "store_up": True},
                    "analyser": {"updated_at": fresh}},
           "newest_ins": NOW, "analysed_ins": NOW, "flags": [],
           "dbstats": {"fsTotalSize": 100, "fsUsedSize": 50}}
    raw.update(over)
    return raw


def test_the_snoopers_retention_counters_are_shown_when_it_has_them():
    raw = raw_inputs()
    raw["docs"]["snooper"]["counters"].update(retention_batches=3, retention_frames=3000, retention_bytes=2048)
    text = statusview.render(statusview.facts(config_mod.Config(), raw))
    assert "    retention     3 batches (3000 frames, 2.0 KB) removed by size" in text
    assert "retention" not in statusview.render(statusview.facts(config_mod.Config(), raw_inputs()))


def test_a_stopped_service_is_down_at_once_and_a_silent_one_once_its_document_is_stale():
    cfg = config_mod.Config()
    stopped = raw_inputs()
    stopped["docs"]["snooper"]["stopped_at"] = NOW - dt.timedelta(seconds=2)
    f = statusview.facts(cfg, stopped)
    assert f["problems"] == ["snooper: down: stopped at 11:59:58 UTC (its last status document)"]
    limit = statusview.stale_after(cfg, "snooper")
    silent = raw_inputs()
    silent["docs"]["snooper"]["updated_at"] = NOW - dt.timedelta(seconds=limit + 1)
    f = statusview.facts(cfg, silent)
    assert f["problems"] == [f"snooper: down: its status document is older than {limit:.0f} s"]
    assert " !! snooper       down, last heartbeat" in statusview.render(f)
    silent["docs"]["snooper"]["updated_at"] = NOW - dt.timedelta(seconds=limit - 1)
    assert statusview.facts(cfg, silent)["ok"]


def test_a_failed_unit_under_systemd_is_named_with_its_restarts():
    unit = {"LoadState": "loaded", "ActiveState": "failed", "SubState": "failed", "NRestarts": "4"}
    running = {"LoadState": "loaded", "ActiveState": "active", "SubState": "running", "NRestarts": "0"}
    f = statusview.facts(config_mod.Config(), raw_inputs(systemd={"snooper": unit, "controller": running,
                                                                  "analyser": running}))
    assert not f["ok"] and f["problems"] == ["snooper: pisnoop-snooper.service is failed"]
    text = statusview.render(f)
    assert " !! snooper       failed (failed), not ready, last heartbeat 2 s ago, restarts 4 (systemd)" in text
    assert "    controller    up (running), ready, last heartbeat 2 s ago, restarts 0 (systemd)" in text


@pytest.mark.parametrize("change, problem", [
    ({"docs": {"controller": {"updated_at": NOW, "connected": False}}}, "switch: the switch is not connected"),
    ({"docs": {"controller": {"updated_at": NOW, "connected": False, "counters": {"ignored_datapaths": 2}}}},
     "switch: the switch is not connected to the controller (a switch with another datapath id was ignored 2 times"),
    ({"analysed_ins": NOW - dt.timedelta(seconds=300)}, "analyser lag: more than 120 s behind"),
    ({"docs": {"snooper": {"updated_at": NOW, "counters": {}, "unaccounted": 3}}}, "drops: 3 frames unaccounted"),
    ({"docs": {"snooper": {"updated_at": NOW, "counters": {}, "unaccounted": 0, "store_up": False}}},
     "store: the snooper cannot write"),
])
def test_each_fault_is_one_problem_on_its_line(change, problem):
    raw = raw_inputs()
    for k, v in change.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    f = statusview.facts(config_mod.Config(), raw)
    assert len(f["problems"]) == 1 and f["problems"][0].startswith(problem), f["problems"]
    assert statusview.facts(config_mod.Config(), raw_inputs())["ok"]
