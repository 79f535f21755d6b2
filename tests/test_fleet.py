"""Two virtual appliances, one embedded store: scopes, the fleet view, each analyser on its own frames.

Appliance A and appliance B each have their bridge, snooper, controller and analyser (``lab.scenario``'s
``ServiceSet``); B joins A's store (``VirtualAppliance(store_uri=...)``) under its own sensor name. Both
inside hosts are 10.0.0.10 (two sites with the same private addresses). The policy has two payload rules
on the echo servers' ports: ``spam_here`` on 5222 raises ``local`` flags, ``spam_everywhere`` on 5223
``fleet`` ones. One fixture for the module: the tests run in order on the same two appliances. The last one
also watches the dashboard's fleet page (``pisnoop web`` of B, in a headless Chromium).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time

import pytest
import yaml

from appliance import store
from lab import scenario
from lab.procs import free_port
from lab.virtual import VirtualAppliance
from tests import webutil
from tests.conftest import assert_gone, pisnoop
from tests.ctlutil import flows_matching, start_echo_server, wait_for
from webui import auth

CLIENT_IP, SERVER_IP = "10.0.0.10", "10.0.0.1"
LOCAL_PORT, FLEET_PORT, PLAIN_PORT = 5222, 5223, 7000
PATTERN = "<m[0-9]{6}/>"
PASSWORD = "pw-fleet-page-" + secrets.token_hex(4)

# Sends n echo messages; closes with an RST (SO_LINGER 0) so that no orphaned socket retransmits a blocked
# segment after the test released its ban (a late copy would count toward the next flag).
CLIENT = r"""
import json, socket, struct, sys, time
src, dst, port, n, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
out = {"ok": 0, "error": None}
c = socket.socket(); c.settimeout(1.0)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
try:
    c.bind((src, 0)); c.connect((dst, port))
    for i in range(n):
        msg = b"<m%06d/>" % i
        c.sendall(msg); got = b""
        while len(got) < len(msg):
            d = c.recv(len(msg) - len(got))
            if not d: raise OSError("closed")
            got += d
        out["ok"] += 1
        time.sleep(gap)
except OSError as e:
    out["error"] = f"{e.__class__.__name__}: {e}"
c.close()
print(json.dumps(out), flush=True)
"""


def client(va, port: int, n: int, gap: float = 0.02) -> dict:
    res = va.exec("inside", [sys.executable, "-c", CLIENT, CLIENT_IP, SERVER_IP, str(port), str(n), str(gap)],
                  check=False, timeout=60)
    return json.loads(res.stdout.strip().splitlines()[-1])


class Site:
    """One appliance and its three services."""

    def __init__(self, va: VirtualAppliance):
        self.va = va
        self.services = scenario.ServiceSet(va)
        self.servers: list[subprocess.Popen] = []

    @property
    def sensor(self) -> str:
        return self.va.config.snooper.sensor

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return pisnoop("--config", str(self.va.config_path), *args)

    def ban_flows(self, port: int) -> list[str]:
        return flows_matching(self.va, f"nw_src={CLIENT_IP}", f"tp_dst={port}", "actions=drop")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    policy = d / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "xmpp_abuse": {"enabled": False},
        "payload_match": [
            {"name": "spam_here", "pattern": PATTERN, "threshold_per_minute": 20, "server_port": LOCAL_PORT,
             "scope": "ip", "flag_scope": "local"},
            {"name": "spam_everywhere", "pattern": PATTERN, "threshold_per_minute": 20, "server_port": FLEET_PORT,
             "scope": "ip", "flag_scope": "fleet"}]}))
    base = scenario.service_config(settings={"analyser": {"policy_file": str(policy)},
                                             "xmpp": {"server_ports": [LOCAL_PORT, FLEET_PORT]},
                                             "enforce": {"never_ban_servers": False},
                                             "web": {"port": free_port(), "password_hash": auth.hash_password(PASSWORD),
                                                     "session_seconds": 600}})
    tag = secrets.token_hex(2)
    a = VirtualAppliance(base, prefix=f"pf{tag}a", sensor=f"site-a-{tag}")
    made: list[VirtualAppliance] = []
    sites: list[Site] = []
    drain_stop = threading.Event()
    drainer = None
    try:
        a.up()
        made.append(a)
        b = VirtualAppliance(base, prefix=f"pf{tag}b", store_uri=a.store.uri, sensor=f"site-b-{tag}")
        b.up()
        made.append(b)
        assert b.store is None and b.config.mongodb.uri == a.config.mongodb.uri
        sites = [Site(a), Site(b)]
        for s in sites:
            s.servers = [start_echo_server(s.va, p) for p in (LOCAL_PORT, FLEET_PORT, PLAIN_PORT)]
            for name in ("controller", "snooper", "analyser"):
                s.services.start(name)
        sites[1].services.start("web")          # B's dashboard, for the fleet page (before the drain thread reads)

        def drain():
            while not drain_stop.wait(0.2):
                for s in sites:
                    s.services.drain()
        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        for s in sites:
            assert wait_for(lambda s=s: "full set pushed" in s.services.log_tail("controller", 100_000), 20), \
                s.services.log_tail("controller")
        db = store.database(a.config.mongodb)
        yield sites, db
        db.client.close()
    finally:
        drain_stop.set()
        if drainer is not None:
            drainer.join(10)              # before the services' stop closes the sockets it reads
        for s in sites:
            webutil.stop_web(s.services)
            s.services.stop()
            for p in s.servers:
                p.kill()
                p.wait()
        for va in reversed(made):
            va.down()
            assert_gone(va)


def analysed(db, sensor: str) -> tuple[int, int]:
    """(frames the sensor's analyser counted, frames stored for the sensor)."""
    doc = db[store.STATUS].find_one({"_id": f"analyser:{sensor}"}) or {}
    stored = sum(d["n"] for d in db[store.FRAMES].find({"sensor": sensor}, {"n": 1}))
    return doc.get("counters", {}).get("frames", -1), stored


def test_each_analyser_reads_exactly_its_own_sensors_frames_while_both_write(fleet):
    (a, b), db = fleet
    results = {}

    def talk(site):
        results[site.sensor] = [client(site.va, PLAIN_PORT, 30, 0.01) for _ in range(3)]
    threads = [threading.Thread(target=talk, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["ok"] == 30 for rs in results.values() for r in rs), results

    def settled():
        got = [analysed(db, s.sensor) for s in (a, b)]
        return got if all(n == stored and stored > 180 for n, stored in got) else None
    got = wait_for(settled, 30, 0.5)
    assert got, [analysed(db, s.sensor) for s in (a, b)]
    total = sum(d["n"] for d in db[store.FRAMES].find({}, {"n": 1}))
    assert got[0][1] + got[1][1] == total, "every stored frame belongs to one of the two sensors"
    # and each analyser's flows are its own (written every analyser.flush_interval: within a few seconds)
    assert wait_for(lambda: all(db[store.FLOWS].count_documents({"sensor": s.sensor}) >= 3 for s in (a, b)), 15, 0.5), \
        [db[store.FLOWS].count_documents({"sensor": s.sensor}) for s in (a, b)]
    assert db[store.FLOWS].count_documents({"sensor": {"$nin": [a.sensor, b.sensor]}}) == 0


def test_a_local_flag_bans_only_at_the_site_that_raised_it(fleet):
    (a, b), db = fleet
    r = client(a.va, LOCAL_PORT, 200)
    assert r["ok"] < 200, r                     # blocked mid-way at A
    flag = wait_for(lambda: db[store.FLAGS].find_one({"classifier": "spam_here", "status": "flagged"}), 10)
    assert flag and (flag["sensor"], flag["scope"], flag["client_ip"]) == (a.sensor, "local", CLIENT_IP), flag
    assert wait_for(lambda: a.ban_flows(LOCAL_PORT), 2.0), a.va.ofctl("dump-flows")
    time.sleep(1.5)                            # B polls every 0.25 s: six polls
    assert not flows_matching(b.va, f"nw_src={CLIENT_IP}"), b.va.ofctl("dump-flows")
    assert client(b.va, LOCAL_PORT, 3)["ok"] == 3, "the same address behind B is not banned there"
    listed_b = b.cli("flags", "list").stdout
    assert CLIENT_IP not in listed_b, listed_b
    everyone = b.cli("flags", "list", "--all-sensors")
    assert CLIENT_IP in everyone.stdout and a.sensor in everyone.stdout and " local " in everyone.stdout
    assert CLIENT_IP in a.cli("flags", "list").stdout


def test_a_fleet_flag_bans_everywhere_within_2_s_and_its_release_lifts_it_everywhere(fleet):
    (a, b), db = fleet
    r = client(a.va, FLEET_PORT, 200)
    assert r["ok"] < 200, r
    flag = wait_for(lambda: db[store.FLAGS].find_one({"classifier": "spam_everywhere", "status": "flagged"}), 10,
                    0.02)
    assert flag and (flag["sensor"], flag["scope"]) == (a.sensor, "fleet"), flag
    assert wait_for(lambda: b.ban_flows(FLEET_PORT), 2.0, 0.02), b.va.ofctl("dump-flows")
    took = time.time() - flag["flagged_at"].timestamp()       # the flag's own time: when A's analyser wrote it
    assert took < 2.0, took
    print(f"fleet ban installed at B {took:.2f} s after A's analyser flagged")
    assert a.ban_flows(FLEET_PORT)
    assert not b.ban_flows(LOCAL_PORT), "A's local flag still does not reach B"
    r = client(b.va, FLEET_PORT, 3)
    assert r["ok"] == 0 and r["error"], r      # the same client behind B is blocked there
    assert CLIENT_IP in b.cli("flags", "list").stdout

    rel = b.cli("flags", "release", CLIENT_IP)   # from B: the fleet flag only (A's local one is not B's)
    assert rel.returncode == 0 and str(flag["_id"]) in rel.stdout, rel.stderr
    assert "1 flag(s)" in rel.stdout, rel.stdout
    assert wait_for(lambda: not b.ban_flows(FLEET_PORT) and not a.ban_flows(FLEET_PORT), 2.0), \
        (a.va.ofctl("dump-flows"), b.va.ofctl("dump-flows"))
    assert a.ban_flows(LOCAL_PORT), "A's local flag stays until released at A"
    assert client(b.va, FLEET_PORT, 3)["ok"] == 3
    assert a.cli("flags", "release", CLIENT_IP).returncode == 0
    assert wait_for(lambda: not a.ban_flows(LOCAL_PORT), 2.0)
    assert db[store.FLAGS].count_documents({"status": "flagged"}) == 0


def test_a_local_never_ban_entry_keeps_a_fleet_ban_off_that_site_only(fleet):
    (a, b), db = fleet
    allow = b.cli("flags", "allow", CLIENT_IP, "--local", "--reason", "B's admin")
    assert allow.returncode == 0 and f"flags allow on {b.sensor} only" in allow.stdout, allow.stderr
    try:
        ban = a.cli("flags", "ban", CLIENT_IP, "--fleet", "--port", str(FLEET_PORT), "--for", "2m")
        assert ban.returncode == 0 and "every appliance on this store" in ban.stdout, ban.stderr   # A's list: no entry
        assert wait_for(lambda: a.ban_flows(FLEET_PORT), 2.0), a.va.ofctl("dump-flows")
        time.sleep(1.0)
        assert not b.ban_flows(FLEET_PORT), "B's own never-ban entry holds the fleet ban off B"
        assert client(b.va, FLEET_PORT, 3)["ok"] == 3
    finally:
        assert a.cli("flags", "release", CLIENT_IP).returncode == 0
        assert b.cli("flags", "allow", "--remove", CLIENT_IP, "--local").returncode == 0
    assert wait_for(lambda: not a.ban_flows(FLEET_PORT), 2.0)
    assert db[store.NEVER_BAN].count_documents({}) == 0


def test_report_of_one_sensor_another_sensor_and_all_sensors(fleet, tmp_path):
    (a, b), db = fleet
    out = ["--since", "15m", "-o", str(tmp_path)]
    mine = b.cli("report", *out)
    assert mine.returncode == 0, mine.stderr
    assert f"report for sensor {b.sensor}" in mine.stdout
    assert "spam_everywhere" in mine.stdout and "spam_here" not in mine.stdout, mine.stdout   # A's local flag
    other = b.cli("report", "--sensor", a.sensor, *out)
    assert other.returncode == 0 and "spam_here" in other.stdout and "spam_everywhere" in other.stdout, other.stdout
    every = b.cli("report", "--all-sensors", *out)
    assert every.returncode == 0 and a.sensor in every.stdout and b.sensor in every.stdout, every.stdout
    bad = b.cli("report", "--sensor", "no such", *out)
    assert bad.returncode == 2 and "--sensor 'no such'" in bad.stderr and len(bad.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def fleet_page(fleet, tmp_path_factory):
    """B's dashboard (``pisnoop web`` on the shared store) in a headless Chromium, logged in: (driver, base URL)."""
    (_a, b), _db = fleet
    if not webutil.browser_ready():
        pytest.skip("chromium and chromium-driver are not installed (setup.sh installs them)")
    with webutil.chromium(tmp_path_factory.mktemp("downloads")) as d:
        base = f"http://127.0.0.1:{b.va.config.web.port}"
        d.get(base + "/fleet")
        webutil.browser_login(d, base, PASSWORD)
        yield d, base


def page_health(d) -> dict[str, str]:
    """sensor -> health, as the fleet page shows it now (its script replaces the table every 2 s)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        return {r.get_attribute("data-sensor"): r.get_attribute("data-health")
                for r in d.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")}
    except StaleElementReferenceException:       # replaced while read: the next look sees the new one
        return {}


def fleet_status(site) -> tuple[int, dict]:
    r = site.cli("status", "--fleet", "--json")
    return r.returncode, json.loads(r.stdout)


def test_status_fleet_shows_both_sensors_and_a_stopped_snooper_degrades_only_its_own(fleet, fleet_page, tmp_path):
    (a, b), db = fleet
    d, base = fleet_page
    code, f = wait_for(lambda: (lambda cf: cf if cf[0] == 0 else None)(fleet_status(b)), 15, 0.5) or fleet_status(b)
    by = {s["sensor"]: s for s in f["sensors"]}
    assert code == 0 and set(by) == {a.sensor, b.sensor}, f
    assert all(s["health"] == "healthy" and s["switch_connected"] for s in by.values()), f
    assert all(v["heartbeat_seconds"] is not None and v["heartbeat_seconds"] < 10
               for s in by.values() for v in s["services"].values()), f
    text = b.cli("status", "--fleet").stdout
    assert a.sensor in text and b.sensor in text and "all healthy" in text, text

    # the dashboard's fleet page (B's): both sensors healthy, refreshed by its script without a reload
    from selenium.webdriver.common.by import By
    d.get(base + "/fleet")
    both_healthy = {a.sensor: "healthy", b.sensor: "healthy"}
    assert webutil.wait(lambda: page_health(d) == both_healthy, 10, what="both sensors healthy on the fleet page")
    shown = d.find_element(By.ID, "fleet-verdict").text
    assert shown.endswith("2 sensors, all healthy"), shown
    loaded_at = shown

    proc = a.services.procs["snooper"]
    proc.terminate()
    proc.wait(30)

    def degraded():
        c, st = fleet_status(b)
        s = {x["sensor"]: x for x in st["sensors"]}
        return (c, s) if s[a.sensor]["health"] == "degraded" else None
    got = wait_for(degraded, 20, 0.5)
    assert got, fleet_status(b)
    code, by = got
    assert code == 1 and by[b.sensor]["health"] == "healthy", by
    assert not by[a.sensor]["services"]["snooper"]["up"] and by[a.sensor]["services"]["controller"]["up"], by
    assert by[a.sensor]["capture_per_second"] == 0.0
    text = a.cli("status", "--fleet").stdout
    assert f"!!{a.sensor}" in text and "snooper: down" in text, text

    # the page, not reloaded, follows: A degraded (its snooper down), B still healthy
    degraded_a = {a.sensor: "degraded", b.sensor: "healthy"}
    webutil.wait(lambda: page_health(d) == degraded_a, 10, what="A degraded on the fleet page")
    shown = d.find_element(By.ID, "fleet-verdict").text
    assert shown != loaded_at and shown.endswith("2 sensors, 1 not healthy"), shown
    row = d.find_element(By.CSS_SELECTOR, f'#fleet tr[data-sensor="{a.sensor}"]').text
    assert "snooper: down" in row and "(down)" in row, row
    assert "(this one)" in d.find_element(By.CSS_SELECTOR, f'#fleet tr[data-sensor="{b.sensor}"]').text
    webutil.shot(d, tmp_path, "fleet")
    severe = webutil.severe_console(d)
    assert not severe, severe
    c = webutil.Client(base)
    assert c.get("/api/fleet")[0] == 401 and c.login(PASSWORD) == 303
    j = json.loads(c.get("/api/fleet")[2])
    assert {s["sensor"]: s["health"] for s in j["fleet"]["sensors"]} == degraded_a, j
    print(f"fleet page weight (bytes, HTML + JS + CSS as served): {webutil.page_weight(c, '/fleet')}")
