"""`pisnoop web` in a real headless browser (Debian's chromium and chromedriver, selenium), against the virtual
appliance with its three services and a client flooding the XMPP port; then a real Prometheus scraping the three
services with the shipped rules (shortened), one of which fires when the snooper stops.

One appliance for the module: building it and starting the services is most of the time.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from html import unescape
from pathlib import Path

import pytest
import yaml

from appliance import config as config_mod
from lab import scenario
from lab.procs import free_port, stop_pid
from lab.virtual import VirtualAppliance
from tests import ctlutil
from tests.conftest import REPO, assert_gone, pisnoop
from tests.webutil import (
    Client,
    browser_login,
    chromium,
    needs_browser,
    page_weight,
    served,
    severe_console,
    shot,
    stop_web,
    wait,
)
from webui import auth

PROMETHEUS = shutil.which("prometheus")
PASSWORD = "pw-correct-horse-battery"
FLOODER = "10.0.0.10"
BENIGN = "10.0.0.11"
XMPP_PORT = 5222
RULES = REPO / "monitoring" / "pisnoop-rules.yml"


@pytest.fixture(scope="module")
def appliance():
    web_port = free_port()
    cfg = scenario.service_config(settings={"web": {"port": web_port, "password_hash": auth.hash_password(PASSWORD),
                                                    "session_seconds": 600}})
    va = VirtualAppliance(cfg)
    with va:
        services = scenario.ServiceSet(va)
        echo = None
        try:
            for name in (*scenario.SERVICES, "web"):
                services.start(name)
            echo = ctlutil.start_echo_server(va, XMPP_PORT)
            yield va, services, f"http://127.0.0.1:{web_port}"
        finally:
            if echo is not None:
                stop_pid(echo.pid)
            stop_web(services)
            services.stop()
    assert_gone(va)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("downloads")) as driver:
        yield driver


def drop_flows(va) -> list[str]:
    return scenario.ban_flows(va, FLOODER)


@needs_browser
def test_dashboard_in_a_browser(appliance, browser, tmp_path):
    from selenium.webdriver.common.by import By
    va, services, base = appliance
    out = tmp_path / "screens"
    out.mkdir()
    d = browser

    # no session: every page sends the browser to the login page, JSON is 401, a post is 403
    anon = Client(base)
    for path in ("/", "/flags", "/talkers", "/switch"):
        status, headers, _b = anon.get(path)
        assert status == 303 and headers["Location"].endswith("/login"), (path, status, headers)
    assert anon.get("/api/overview")[0] == 401
    status, headers, body = anon.get("/login")
    assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in headers["Content-Security-Policy"] and b"<script>" not in body
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert anon.post("/flags/ban", {"subject": "10.0.0.99"})[0] == 403

    # the login form refuses the wrong password, and a login post without its CSRF token
    d.get(base + "/")
    assert d.current_url.endswith("/login")
    d.find_element(By.ID, "password").send_keys("wrong-password")
    d.find_element(By.ID, "login-button").click()
    wait(lambda: d.find_elements(By.ID, "login-error"), what="the wrong-password message")
    assert d.current_url.endswith("/login?failed=1")
    assert Client(base).post("/login", {"password": PASSWORD})[0] == 403
    shot(d, out, "login")
    browser_login(d, base, PASSWORD)

    # a logged-in session's forged post (no CSRF token, or another one) is 403 and bans nothing
    c = Client(base)
    assert c.login("not-it") < 0
    assert c.login(PASSWORD) == 303
    assert c.post("/flags/ban", {"subject": "10.0.0.99"})[0] == 403
    assert c.post("/flags/ban", {"subject": "10.0.0.99", "csrf": "x" * 43})[0] == 403
    assert "10.0.0.99" not in c.get("/flags")[2].decode()

    # a benign neighbour: three short conversations of different lengths, far below the threshold
    va.exec("inside", ["ip", "addr", "add", f"{BENIGN}/24", "dev", "eth0"])
    for n in (2, 5, 9):
        assert ctlutil.tcp_client(va, BENIGN, XMPP_PORT, n=n)["ok"] == n

    # the flood: one connection far above 100 packets/min toward 5222, until the switch drops it
    flood = va.popen("inside", [sys.executable, "-c", ctlutil.CLIENT, FLOODER, "10.0.0.1", str(XMPP_PORT), "3000",
                                "0.01"], stdout=subprocess.PIPE, text=True)
    try:
        first = int(d.find_element(By.ID, "c-captured").text)
        wait(lambda: int(d.find_element(By.ID, "c-captured").text) > first, what="the overview's counters to move")
        wait(lambda: drop_flows(va), timeout=60, what="the flood's drop flow")
        shot(d, out, "overview")

        # the flags page: the flooder with its evidence and its chart (drawn by uPlot, threshold line)
        d.get(base + "/flags")
        cards = [s for s in d.find_elements(By.CSS_SELECTOR, "section.flag.flagged")
                 if s.get_attribute("data-subject").split(":")[0] == FLOODER]   # the connection ADDR:PORT
        assert len(cards) == 1, d.page_source[:3000]
        card = cards[0]
        assert "rate" in card.find_element(By.CLASS_NAME, "evidence").text
        chart = card.find_element(By.CLASS_NAME, "chart")
        wait(lambda: chart.get_attribute("data-drawn"), what="the chart")
        assert int(chart.get_attribute("data-drawn")) > 10
        assert chart.find_elements(By.TAG_NAME, "canvas")
        legend = chart.text
        assert "threshold 100" in legend, legend
        shot(d, out, "flags")

        # the evidence pcap, downloaded by the browser, read by tcpdump
        card.find_element(By.CLASS_NAME, "pcap").click()
        pcap = wait(lambda: [p for p in Path(d.downloads).glob("*.pcap")], what="the pcap download")[0]
        wait(lambda: not list(Path(d.downloads).glob("*.crdownload")), what="the download to finish")
        read = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True, timeout=30)
        assert read.returncode == 0, read.stderr
        lines = read.stdout.splitlines()
        assert len(lines) > 10 and all(FLOODER in ln for ln in lines), lines[:3]
        assert any(f"{FLOODER}." in ln and f"> 10.0.0.1.{XMPP_PORT}" in ln for ln in lines)
        print(f"evidence pcap: {pcap}, {len(lines)} frames")

        # release: the drop flow leaves the switch (the flood stopped first: a client still sending over the
        # threshold within the analyser's window would be flagged again at once)
        flood.kill()
        flood.wait()
        flag_id = card.get_attribute("data-id")
        card.find_element(By.CSS_SELECTOR, "form.release button").click()
        flash = wait(lambda: d.find_elements(By.ID, "flash"), what="the release message")[0]
        assert f"released 1 flag(s) of {flag_id}" in flash.text, flash.text
        wait(lambda: not drop_flows(va), timeout=20, what="the drop flow to be removed")
        shot(d, out, "flags-released")
    finally:
        flood.kill()
        flood.wait()

    # a ban by hand from the form: the same command, the same drop flow at the switch; then never ban it
    d.get(base + "/flags")
    form = d.find_element(By.CSS_SELECTOR, "form.ban")
    form.find_element(By.NAME, "subject").send_keys("10.0.0.99")
    form.find_element(By.NAME, "duration").send_keys("5m")
    form.find_element(By.TAG_NAME, "button").click()
    flash = wait(lambda: d.find_elements(By.ID, "flash"), what="the ban message")[0]
    assert flash.text.startswith("banned 10.0.0.99 (tcp/5222,5223 outbound) by drop for 300 s"), flash.text
    wait(lambda: scenario.ban_flows(va, "10.0.0.99"), timeout=20, what="the hand ban's drop flow")
    status, _h, _b = c.post("/flags/allow", {"network": "10.0.0.99", "csrf": c.csrf("/flags")})
    assert status == 303
    assert "never banned from now: 10.0.0.99" in c.get("/flags")[2].decode()

    # talkers and flows: both clients, the benign one's three flows sortable, the filter keeping one address
    def column(table: str, i: int) -> list[str]:
        return [r.find_elements(By.TAG_NAME, "td")[i].text for r in d.find_elements(By.CSS_SELECTOR,
                                                                                   f"#{table} tbody tr")]
    def both_talkers():                     # flows are written every analyser.flush_interval: a few seconds at most
        d.get(base + "/talkers?minutes=10")
        return set(column("talkers", 0)) == {FLOODER, BENIGN}
    wait(both_talkers, timeout=15, what="both clients among the talkers")
    head = d.find_element(By.CSS_SELECTOR, '#flows th[data-col="3"]')
    head.click()
    down = [int(x) for x in column("flows", 3)]
    assert len(down) >= 4 and down == sorted(down, reverse=True) and down != sorted(down), down
    head.click()
    assert [int(x) for x in column("flows", 3)] == sorted(down)
    d.get(base + "/talkers?minutes=10&addr=" + BENIGN)
    clients = column("flows", 0)
    assert len(clients) == 3 and all(c.startswith(BENIGN + ":") for c in clients), clients
    assert column("talkers", 0) == [BENIGN]
    shot(d, out, "talkers")

    # the switch: the controller's flows by module with counters, its meters
    def polled():
        d.get(base + "/switch")
        return "counters polled 20" in d.find_element(By.ID, "switch-state").text
    wait(polled, timeout=25, step=1.0, what="the switch page with the controller's polled counters")
    assert d.find_element(By.ID, "switch-state").text.startswith("connected")
    mirror = [r.find_elements(By.TAG_NAME, "td") for r in d.find_elements(By.CSS_SELECTOR, "#flows-mirror tbody tr")]
    assert mirror and all(cells[4].text.isdigit() for cells in mirror), "every mirror flow with its packet count"
    assert sum(int(cells[4].text) for cells in mirror) > 100, "the flood went through the mirror flows"
    heads = [h.text for h in d.find_elements(By.TAG_NAME, "h3")]
    assert any(h.startswith("mirror") for h in heads) and any(h.startswith("Meters") for h in heads), heads
    shot(d, out, "switch")

    # the pages ran under their CSP without a violation or a script error (the browser's console)
    severe = severe_console(d)
    assert not severe, severe

    weights = {p: page_weight(c, p) for p in ("/login", "/", "/flags", "/talkers", "/switch", "/fleet")}
    print("page weight (bytes, HTML + JS + CSS as served): " + json.dumps(weights))


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (setup.sh installs it)")
def test_prometheus_scrapes_the_services_and_a_rule_fires_when_the_snooper_stops(appliance, tmp_path):
    va, services, _base = appliance
    cfg = config_mod.load(va.config_path)
    m = cfg.metrics
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:              # the shipped rules, quicker: the same expressions
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = {"pisnoop-controller": m.controller_port, "pisnoop-snooper": m.snooper_port,
            "pisnoop-analyser": m.analyser_port}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                           for job, port in jobs.items()]}))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    api = f"http://127.0.0.1:{port}/api/v1"

    def get(path: str):
        try:
            with urllib.request.urlopen(api + path, timeout=5) as r:
                return json.loads(r.read())["data"]
        except OSError:
            return None
    try:
        def all_up():
            data = get("/query?query=up")
            return data and len(data["result"]) == 3 and all(r["value"][1] == "1" for r in data["result"])
        wait(all_up, timeout=40, step=0.5, what="Prometheus to scrape the three services")
        from tests.test_monitoring import dashboard_metrics
        declared = set()          # what the running services' endpoints declare (a family may have no sample yet)
        for port_ in jobs.values():
            with urllib.request.urlopen(f"http://127.0.0.1:{port_}/metrics", timeout=5) as r:
                for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", r.read().decode(), re.M):
                    declared.add(f"{name.removesuffix('_total')}_total" if kind == "counter" else name)
        missing = sorted(dashboard_metrics() - declared)
        assert not missing, f"dashboard metrics the running services do not export: {missing}"
        scraped = set(get("/label/__name__/values") or [])
        assert {"pisnoop_snooper_captured_total", "pisnoop_controller_of_messages_total",
                "pisnoop_analyser_lag_seconds"} <= scraped
        assert not [a for a in get("/alerts")["alerts"] if a["labels"].get("alertname") == "PisnoopServiceDown"]

        snooper = services.procs["snooper"]
        snooper.send_signal(signal.SIGTERM)
        snooper.wait(timeout=30)

        def firing():
            return [a for a in (get("/alerts") or {}).get("alerts", []) if a["state"] == "firing"
                    and a["labels"].get("alertname") == "PisnoopServiceDown"
                    and a["labels"].get("job") == "pisnoop-snooper"]
        alert = wait(firing, timeout=30, step=0.5, what="PisnoopServiceDown for the snooper")[0]
        print(f"fired: {alert['labels']} {alert['annotations'].get('summary')}")
        others = [a["labels"]["job"] for a in get("/alerts")["alerts"]
                  if a["labels"].get("alertname") == "PisnoopServiceDown"]
        assert others == ["pisnoop-snooper"], others
    finally:
        prom.send_signal(signal.SIGTERM)
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()


def test_sessions_end_after_their_lifetime_and_on_logout():
    now = [1000.0]
    s = auth.Sessions(60, clock=lambda: now[0])
    a = s.start()
    assert s.get(a.token) is a and s.get("made-up") is None and s.get(None) is None
    now[0] += 59.9
    assert s.get(a.token) is a, "a session in use does not outlive its login, but lives until then"
    now[0] += 0.2
    assert s.get(a.token) is None
    b = s.start()
    s.end(b.token)
    assert s.get(b.token) is None
    assert not auth.same(b.csrf, None) and not auth.same("", "") and auth.same(b.csrf, b.csrf)


def test_fleet_page_and_its_json_show_each_sensor_as_status_fleet_judges_it(store_config):
    """Four sensors on one store, written as their services write their status documents: all fresh, the snooper
    stale, all stale, and one whose name is markup. The page and ``/api/fleet`` say what ``status --fleet`` says."""
    from appliance import flagdoc, statusview
    from appliance import store as store_mod
    from webui import app as app_mod
    from webui import command
    path, db = store_config
    settings = yaml.safe_load(path.read_text())
    settings["snooper"]["sensor"] = "alpha"
    settings["web"] = {"password_hash": auth.hash_password(PASSWORD)}
    path.write_text(yaml.safe_dump(settings))
    cfg = config_mod.load(path)
    now = dt.datetime.now(dt.timezone.utc)
    fresh, stale = now - dt.timedelta(seconds=1), now - dt.timedelta(minutes=10)
    hostile = '<img src=x onerror="alert(1)">'
    ages = {"alpha": (fresh, fresh, fresh), "beta": (fresh, stale, fresh), "gamma": (stale, stale, stale),
            hostile: (fresh, fresh, fresh)}
    for sensor, times in ages.items():
        for name, t in zip(statusview.SERVICES, times):
            doc = {"_id": f"{name}:{sensor}", "updated_at": t, "counters": {}}
            doc.update({"controller": {"connected": True}, "snooper": {"captured_per_second": 12.5}}.get(name, {}))
            db[store_mod.STATUS].insert_one(doc)
    for sensor, scope, ip in (("beta", "local", "10.0.0.20"), ("gamma", "fleet", "10.0.0.21")):
        db[store_mod.FLAGS].insert_one(flagdoc.build(
            client_ip=ip, server_ports=[5222], classifier="test", reason="test", action="drop", evidence={},
            offence=1, ban_seconds=600, sensor=sensor, scope=scope, flagged_at=now))

    server = command.serve(app_mod.build(cfg, db), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        anon = Client(f"http://127.0.0.1:{server.server_port}")
        status, headers, _b = anon.get("/fleet")
        assert status == 303 and headers["Location"].endswith("/login")
        status, _h, body = anon.get("/api/fleet")
        assert status == 401 and json.loads(body) == {"error": "log in first"}
        c = Client(anon.base)
        assert c.login(PASSWORD) == 303
        for page in ("/", "/flags", "/talkers", "/switch"):
            assert b'<a href="/fleet">Fleet</a>' in c.get(page)[2], page
        status, headers, body = c.get("/fleet")
        html = body.decode()
        assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"], headers
        assert headers["Cache-Control"] == "no-store" and headers["X-Frame-Options"] == "DENY"
        assert '<a href="/fleet" class="here">Fleet</a>' in html and "<script>" not in html
        assert "<img" not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
        want = {"alpha": "healthy", "beta": "degraded", "gamma": "down", hostile: "healthy"}
        rows = dict(re.findall(r'<tr class="health-\w+" data-sensor="([^"]*)" data-health="(\w+)"', html))
        assert {unescape(k): v for k, v in rows.items()} == want, rows
        assert "alpha (this one)" in html and "fleet bans 1 (enforced at every sensor): 10.0.0.21" in html

        status, headers, body = c.get("/api/fleet")
        j = json.loads(body)
        assert status == 200 and headers["Content-Type"].startswith("application/json") and j["ok"] is False
        by = {s["sensor"]: s for s in j["fleet"]["sensors"]}
        assert {k: s["health"] for k, s in by.items()} == want
        assert {k: s["bans"] for k, s in by.items() if k in ("beta", "gamma")} == {
            "beta": {"local": 1, "fleet": 1}, "gamma": {"local": 0, "fleet": 1}}
        assert not by["beta"]["services"]["snooper"]["up"] and by["beta"]["capture_per_second"] == 0.0
        assert by["alpha"]["capture_per_second"] == 12.5
        assert 'data-sensor="beta" data-health="degraded"' in j["html"] and "<img" not in j["html"]
        cli = pisnoop("--config", str(path), "status", "--fleet", "--json")
        assert cli.returncode == 1
        assert {s["sensor"]: s["health"] for s in json.loads(cli.stdout)["sensors"]} == want
    finally:
        server.shutdown()
        server.server_close()


def web_config(path: Path, sensor: str = "alpha", **mongodb):
    """The store_config fixture's config with a dashboard password, sensor ``sensor``, ``mongodb`` overrides."""
    settings = yaml.safe_load(path.read_text())
    settings["snooper"]["sensor"] = sensor
    settings["mongodb"].update(mongodb)
    settings["web"] = {"password_hash": auth.hash_password(PASSWORD)}
    path.write_text(yaml.safe_dump(settings))
    return config_mod.load(path)


def test_logins_verify_at_most_two_passwords_at_once_and_the_rest_are_told_busy(store_config, monkeypatch):
    """Twelve logins at once: scrypt (32 MiB each) never runs more than twice at a time; a login that finds no free
    verifier within the short wait is a 503 'busy' and was never verified; each one verified is logged in."""
    from webui import app as app_mod
    path, db = store_config
    cfg = web_config(path)
    real, lock, now, peak, calls = auth.verify_password, threading.Lock(), [0], [0], [0]

    def counting(password, stored):
        with lock:
            now[0] += 1
            calls[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            threading.Event().wait(1.0)         # longer than the wait for a slot: the others cannot get one
            return real(password, stored)
        finally:
            with lock:
                now[0] -= 1
    monkeypatch.setattr(auth, "verify_password", counting)
    n = 12
    with served(cfg, db) as base:
        clients = [Client(base) for _ in range(n)]
        tokens = [c.csrf("/login") for c in clients]
        got: list = [None] * n
        go = threading.Barrier(n)

        def one(i):
            go.wait()
            got[i] = clients[i].post("/login", {"csrf": tokens[i], "password": PASSWORD})
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    busy = [g for g in got if g[0] == 503]
    logged_in = [g for g in got if g[0] == 303 and g[1]["Location"].endswith("/")]
    assert peak[0] == app_mod.VERIFY_SLOTS == 2, peak
    assert len(busy) + len(logged_in) == n and len(logged_in) == calls[0], [g[0] for g in got]
    assert len(busy) >= n - 4 and all(b"busy, try again" in g[2] for g in busy), [g[0] for g in got]


def test_switch_page_escapes_a_hostile_module_name_in_the_table_id(store_config):
    from appliance import statusview
    from appliance import store as store_mod
    path, db = store_config
    cfg = web_config(path)
    hostile = 'x"><img src=x onerror="alert(1)">'
    db[store_mod.STATUS].insert_one({
        "_id": statusview.status_ids("alpha")["controller"], "updated_at": dt.datetime.now(dt.timezone.utc),
        "connected": True, "modules": [hostile],
        "switch": {"flows": [{"module": hostile, "table": 0, "priority": 1, "match": "any", "actions": "drop"}],
                   "meters": []}})
    with served(cfg, db) as base:
        c = Client(base)
        assert c.login(PASSWORD) == 303
        status, _h, body = c.get("/switch")
    html = body.decode()
    assert status == 200 and "<img" not in html, html
    assert 'id="flows-x&quot;&gt;&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"' in html


def _flag(db, sensor: str, scope: str, ip: str, evidence: dict | None = None):
    from appliance import flagdoc
    from appliance import store as store_mod
    doc = flagdoc.build(client_ip=ip, server_ports=[5222], classifier="test", reason="test", action="drop",
                        evidence=evidence or {}, offence=1, ban_seconds=600, sensor=sensor, scope=scope,
                        flagged_at=dt.datetime.now(dt.timezone.utc))
    return db[store_mod.FLAGS].insert_one(doc).inserted_id


def test_flags_page_lists_the_flags_this_sensor_enforces_with_their_sensor_and_reach(store_config):
    """Sensor alpha's page: its own flag and gamma's fleet flag, each card naming its sensor and reach; beta's
    local flag (enforced at beta only, alpha could not release it) is not listed."""
    path, db = store_config
    cfg = web_config(path)
    _flag(db, "alpha", "local", "10.0.0.22")
    _flag(db, "beta", "local", "10.0.0.20")
    _flag(db, "gamma", "fleet", "10.0.0.21")
    with served(cfg, db) as base:
        c = Client(base)
        assert c.login(PASSWORD) == 303
        html = c.get("/flags")[2].decode()
    cards = {m.group(1): m.group(0)
             for m in re.finditer(r'<section class="flag \w+" data-subject="([^"]*)".*?</section>', html, re.S)}
    assert set(cards) == {"10.0.0.22", "10.0.0.21"}, html
    assert '<span class="sensor">sensor gamma</span>, <span class="reach">fleet</span>' in cards["10.0.0.21"]
    assert '<span class="sensor">sensor alpha</span>, <span class="reach">local</span>' in cards["10.0.0.22"]


def test_chart_of_a_fleet_flag_reads_the_frames_of_the_sensor_that_raised_it(store_config):
    """Gamma flagged 10.0.0.60 fleet-wide from its own frames; alpha's chart of that flag draws gamma's frames
    (alpha saw none of that client)."""
    from tests import analyser_frames as af
    path, db = store_config
    cfg = web_config(path)
    flood = af.steady(af.Conn("10.0.0.60", 40000), af.T0, per_minute=300, seconds=60)
    af.store_frames(db, flood, sensor="gamma")
    af.store_frames(db, af.steady(af.Conn("10.0.0.61", 40001), af.T0, per_minute=300, seconds=60), sensor="alpha")
    fid = _flag(db, "gamma", "fleet", "10.0.0.60", {"first_packet_ns": af.T0, "last_packet_ns": af.T0 + 60 * af.S,
                                                     "threshold": 100, "window_seconds": 60})
    with served(cfg, db) as base:
        c = Client(base)
        assert c.login(PASSWORD) == 303
        status, _h, body = c.get(f"/api/flags/{fid}/chart")
    j = json.loads(body)
    assert status == 200 and j["threshold"] == 100 and len(j["y"]) > 10, j
    assert max(j["y"]) >= 250, j["y"]


def test_never_ban_button_exempts_at_this_sensor_only(store_config):
    from appliance import neverban
    from appliance import store as store_mod
    path, db = store_config
    cfg = web_config(path)
    _flag(db, "alpha", "local", "10.0.0.30")
    with served(cfg, db) as base:
        c = Client(base)
        assert c.login(PASSWORD) == 303
        html = c.get("/flags")[2].decode()
        assert ('<button type="submit" title="never ban 10.0.0.30 at sensor alpha only (pisnoop flags allow '
                '--local)">Never ban here</button>') in html, html
        status, headers, _b = c.post("/flags/allow", {"network": "10.0.0.30", "csrf": c.csrf("/flags")})
        assert status == 303 and headers["Location"].endswith("/flags")
        flash = re.search(r'<p class="flash" id="flash">([^<]*)</p>', c.get("/flags")[2].decode()).group(1)
    assert flash.startswith("never banned from now: 10.0.0.30 (flags allow on alpha only: allowed from the "), flash
    entries = list(db[store_mod.NEVER_BAN].find({}, {"_id": 0, neverban.SCOPE: 1, neverban.SENSOR: 1}))
    assert entries == [{neverban.SCOPE: neverban.LOCAL, neverban.SENSOR: "alpha"}], entries


def test_talkers_minutes_not_a_finite_number_is_the_default(store_config):
    path, db = store_config
    cfg = web_config(path)
    with served(cfg, db) as base:
        c = Client(base)
        assert c.login(PASSWORD) == 303
        for text in ("nan", "inf", "-inf", "NaN", "x"):
            status, _h, body = c.get(f"/talkers?minutes={text}")
            assert status == 200 and b'name="minutes" size="4" value="15"' in body, text
        assert b'value="30"' in c.get("/talkers?minutes=30")[2]


def test_anonymous_requests_get_nothing_and_the_session_cookie_is_httponly_strict(store_config):
    path, db = store_config
    cfg = web_config(path)
    fid = str(_flag(db, "alpha", "local", "10.0.0.40"))
    with served(cfg, db) as base:
        anon = Client(base)
        for path_ in ("/", "/flags", f"/flags/{fid}/pcap", "/talkers", "/switch", "/fleet"):
            for method in ("GET", "HEAD"):
                status, headers, _b = anon.request(path_, method)
                assert status == 303 and headers["Location"].endswith("/login"), (path_, method, status)
        for path_ in ("/api/overview", f"/api/flags/{fid}/chart", "/api/fleet"):
            assert anon.get(path_)[0] == 401, path_
        for path_ in ("/logout", "/flags/ban", f"/flags/{fid}/release", "/flags/allow"):
            assert anon.post(path_, {"subject": "10.0.0.99", "network": "10.0.0.99"})[0] == 403, path_
        c = Client(base)
        assert c.login(PASSWORD) == 303
        session = [h for h in c.set_cookies if h.startswith("pisnoop_session=")]
        assert len(session) == 1, c.set_cookies
        attrs = {a.strip().lower() for a in session[0].split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attrs, session
        assert c.post("/logout", {})[0] == 403, "a logged-in POST /logout without its token changes nothing"
        assert c.get("/flags")[0] == 200
    assert db["flags"].count_documents({}) == 1 and db["never_ban"].count_documents({}) == 0


def test_a_store_away_is_a_503_with_one_redacted_line_and_no_traceback(store_config, capfd):
    """The store's URI points at a closed port (with a password): every page that reads the store answers 503
    with ``statusview.store_error``'s line, no traceback and no password; a button is refused, nothing raised."""
    path, db = store_config
    fid = str(_flag(db, "alpha", "local", "10.0.0.50"))
    secret = "s3cret-Pw-zz"
    cfg = web_config(path, uri=f"mongodb://op:{secret}@127.0.0.1:{free_port()}/?authSource=admin", timeout_ms=300)
    from appliance import store as store_mod
    away = store_mod.database(cfg.mongodb, "pisnoop-web")
    try:
        with served(cfg, away) as base:
            c = Client(base)
            assert c.login(PASSWORD) == 303
            csrf = c.csrf("/fleet")
            for path_ in ("/flags", "/talkers", "/switch", f"/api/flags/{fid}/chart", f"/flags/{fid}/pcap"):
                status, headers, body = c.get(path_)
                text = body.decode()
                assert status == 503 and "did not answer: ServerSelectionTimeoutError" in text, (path_, status, text)
                assert secret not in text and "Traceback" not in text and "Content-Disposition" not in headers
            assert "application/json" in c.get(f"/api/flags/{fid}/chart")[1]["Content-Type"]
            for path_, fields in (("/flags/ban", {"subject": "10.0.0.99"}), (f"/flags/{fid}/release", {}),
                                  ("/flags/allow", {"network": "10.0.0.99"})):
                status, _h, body = c.post(path_, {**fields, "csrf": csrf})
                assert status in (303, 503) and secret.encode() not in body and b"Traceback" not in body, path_
        err = capfd.readouterr().err
        assert "Traceback" not in err and secret not in err, err[-2000:]
    finally:
        away.client.close()


def test_buttons_run_the_commands_over_the_dashboards_own_client(store_config, monkeypatch):
    """Ban, release, allow from the dashboard: done, and not one new MongoClient (each click used to leave one open)."""
    from appliance import store as store_mod
    path, db = store_config
    cfg = web_config(path)
    opened = []
    real = store_mod.client
    monkeypatch.setattr(store_mod, "client", lambda *a, **kw: opened.append(a) or real(*a, **kw))
    with served(cfg, db) as base:
        c = Client(base)
        assert c.login(PASSWORD) == 303
        csrf = c.csrf("/flags")
        assert c.post("/flags/ban", {"subject": "10.0.0.70", "csrf": csrf})[0] == 303
        fid = str(db[store_mod.FLAGS].find_one({"client_ip": "10.0.0.70"})["_id"])
        assert c.post(f"/flags/{fid}/release", {"csrf": csrf})[0] == 303
        assert f"released 1 flag(s) of {fid}" in c.get("/flags")[2].decode()
        assert c.post("/flags/allow", {"network": "10.0.0.71", "csrf": csrf})[0] == 303
    assert db[store_mod.NEVER_BAN].count_documents({}) == 1 and opened == [], opened
