"""Alerts: a webhook receiver on 127.0.0.1 gets one JSON alert per flag raised, released and expired, with its
evidence; a receiver that hangs for 30 s delays nothing, and what waited arrives once it is back (or is counted
dropped past the queue's bound); the watcher's events; the config keys."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest
import yaml

from analyser.live import Analyser
from appliance import alerts, config, store, watch
from lab.procs import free_port
from tests.analyser_frames import T0, Conn, steady, store_frames
from tests.conftest import PISNOOP, REPO, pisnoop

CLIENTS = ("10.0.0.10", "10.0.0.20", "10.0.0.30")
DOWN_SECONDS = 30          # how long the webhook hangs in the flag test


class Receiver:
    """A webhook on 127.0.0.1:``port``: keeps every JSON body it is posted, answers 204."""

    def __init__(self, port: int):
        got = self.got = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append((self.path, self.headers["Content-Type"], json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def wait(self, n: int, timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return [body for _path, _ctype, body in self.got]


@contextlib.contextmanager
def hanging(port: int):
    """A webhook that is "down" the worst way: it takes the connection and never answers."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    try:
        yield s
    finally:
        s.close()


def alert_cfg(port: int, **over) -> config.Alerts:
    data = {"webhooks": [f"http://127.0.0.1:{port}/hook"], "timeout_seconds": 1.0, "retry_max_seconds": 0.3,
            **over}
    return config.from_dict({"alerts": data}).alerts


def timed(fn):
    """``fn`` wrapped to record how long each call took."""
    took = []

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            took.append(time.perf_counter() - t)
    return wrapper, took


@pytest.fixture
def env(embedded_store, tmp_path):
    name = "t" + uuid.uuid4().hex[:10]
    port = free_port()
    data = {"mongodb": {"uri": embedded_store.uri, "database": name},
            "analyser": {"poll_interval": 0.05, "status_interval": 0.2, "report_dir": str(tmp_path / "reports")},
            "snooper": {"spool_dir": str(tmp_path / "spool")},
            "enforce": {"ban_seconds": 6},
            "alerts": {"webhooks": [f"http://127.0.0.1:{port}/hook"], "timeout_seconds": 1.0,
                       "retry_max_seconds": 0.3},
            "metrics": {"enabled": False}}
    path = tmp_path / "pisnoop.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = config.load(path)
    db = store.database(cfg.mongodb)
    yield cfg, path, db, port
    db.client.drop_database(name)
    db.client.close()


def test_flag_alerts_with_evidence_arrive_once_the_webhook_is_back_and_never_delay_the_analyser(env, caplog):
    cfg, path, db, port = env
    frames = []
    for i, ip in enumerate(CLIENTS):
        frames += steady(Conn(ip, 40000 + i), T0, 600, 30)
    store_frames(db, frames)
    caplog.set_level(logging.WARNING, logger="pisnoop.alerts")
    with hanging(port):
        down_since = time.monotonic()
        a = Analyser(cfg, db)
        a.alerts.emit, took = timed(a.alerts.emit)
        t = time.perf_counter()
        while a.step():
            pass
        step_seconds = time.perf_counter() - t
        assert len(took) == 3, "one alert per flag raised"
        # a POST to this webhook hangs for timeout_seconds (1 s) each time: none of that is in the analyser's path
        assert max(took) < 0.05 and step_seconds < cfg.alerts.timeout_seconds, (took, step_seconds)
        deadline = time.monotonic() + 10
        while a.alerts.counters["failed_attempts"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.alerts.counters["failed_attempts"] >= 2 and a.alerts.counters["sent"] == 0
        time.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_since)))   # the webhook stays down this long
        assert a.alerts.pending() == 3 and a.alerts.counters["sent"] == 0
        assert a.alerts.counters["failed_attempts"] >= DOWN_SECONDS // 2    # retried all along (1 s + back-off each)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pisnoop-alert:")]
    flags = {d["client_ip"]: d for d in db[store.FLAGS].find()}
    assert sorted(lines) == sorted(f"pisnoop-alert: flag_raised subject={ip}:{40000 + i} scope=connection "
                                   f"classifier=xmpp_abuse action=drop status=flagged reason="
                                   f"{json.dumps(flags[ip]['reason'])} id={flags[ip]['_id']}"
                                   for i, ip in enumerate(CLIENTS))

    rx = Receiver(port)                   # the webhook is back on the same address
    try:
        got = rx.wait(3)
        assert [b["event"] for b in got] == ["flag_raised"] * 3
        assert sorted(b["flag"]["client_ip"] for b in got) == sorted(CLIENTS)
        for b in got:
            ev = b["evidence"]
            assert ev["count"] == 101 and ev["threshold"] == 100 and ev["samples"], ev
            assert b["id"] == str(flags[b["flag"]["client_ip"]]["_id"]) and b["sensor"] == cfg.snooper.sensor
            assert b["scope"] == "connection" and b["classifier"] == "xmpp_abuse"
            sent = dt.datetime.fromisoformat(b["flag"]["expires_at"])     # the store keeps milliseconds
            assert abs(sent - flags[b["flag"]["client_ip"]]["expires_at"]) < dt.timedelta(milliseconds=1)
        assert rx.got[0][:2] == ("/hook", "application/json")

        # released by hand: one alert, from the command
        res = pisnoop("--config", str(path), "flags", "release", CLIENTS[0])
        assert res.returncode == 0 and res.stderr == "", res.stderr
        got = rx.wait(4)
        assert len(got) == 4 and got[3]["event"] == "flag_released" and got[3]["subject"] == f"{CLIENTS[0]}:40000"
        assert got[3]["flag"]["status"] == "released" and got[3]["evidence"]["count"] == 101

        # the other two expire: one alert each, from the analyser's housekeeping
        ends = max(d["expires_at"] for d in db[store.FLAGS].find())
        time.sleep(max(0.0, (ends - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 0.2)
        a.housekeeping()
        got = rx.wait(6)
        assert sorted((b["event"], b["flag"]["client_ip"]) for b in got[4:]) == [
            ("flag_expired", CLIENTS[1]), ("flag_expired", CLIENTS[2])]
        a.housekeeping()                  # nothing more expires: no second alert
        time.sleep(0.5)
        assert len(rx.got) == 6
        a.alerts.close(wait=2)
        assert a.alerts.counters == {"events": 5, "queued": 5, "sent": 5, "failed_attempts":
                                     a.alerts.counters["failed_attempts"], "dropped_queue_full": 0,
                                     "dropped_gave_up": 0}
    finally:
        rx.close()


def test_past_the_queue_bound_alerts_are_counted_dropped_and_the_rest_arrive_in_order():
    port = free_port()
    acfg = alert_cfg(port, queue_size=5)
    with hanging(port):
        sender = alerts.Alerter(acfg, "s")
        sender.emit("test", id="0")
        deadline = time.monotonic() + 5
        while not sender.busy and time.monotonic() < deadline:   # the sender thread holds alert 0
            time.sleep(0.01)
        t = time.perf_counter()
        for i in range(1, 20):
            sender.emit("test", id=str(i))
        emitting = time.perf_counter() - t
        assert emitting < 0.05, emitting
        assert sender.counters["dropped_queue_full"] == 14 and sender.pending() == 6
    rx = Receiver(port)
    try:
        got = rx.wait(6)
        assert [b["id"] for b in got] == ["0", "1", "2", "3", "4", "5"]
        time.sleep(0.5)
        assert len(rx.got) == 6 and sender.counters["sent"] == 6
    finally:
        sender.close()
        rx.close()


def test_an_alert_is_given_up_after_retry_seconds_and_counted():
    port = free_port()                    # nothing listens: refused at once, retried with back-off
    sender = alerts.Alerter(alert_cfg(port, retry_seconds=1.0, retry_max_seconds=0.2), "s")
    sender.emit("test", id="x")
    deadline = time.monotonic() + 10
    while sender.counters["dropped_gave_up"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    sender.close()
    c = sender.counters
    assert c["dropped_gave_up"] == 1 and c["sent"] == 0
    assert 4 <= c["failed_attempts"] <= 10, c          # 0.5 s first, then 0.2 s steps within 1 s: not a busy loop


def test_a_reloaded_alerts_section_takes_effect_from_the_next_alert():
    port = free_port()
    sender = alerts.Alerter(config.Alerts(), "s")              # no webhook: lines only, no thread
    sender.emit("test", id="before")
    assert sender.thread is None and sender.pending() == 0
    rx = Receiver(port)
    try:
        sender.configure(alert_cfg(port))
        sender.emit("test", id="after")
        assert [b["id"] for b in rx.wait(1)] == ["after"]
        time.sleep(0.3)
        assert len(rx.got) == 1
    finally:
        sender.close()
        rx.close()


def test_the_log_line_is_one_line_with_quoted_values_and_no_webhook_means_no_thread(caplog):
    caplog.set_level(logging.WARNING, logger="pisnoop.alerts")
    sender = alerts.Alerter(config.Alerts(), "s")
    assert sender.thread is None
    sender.emit("service_down", service="snooper", seconds=61.5, reason="its status document is stale")
    assert [r.getMessage() for r in caplog.records] == [
        'pisnoop-alert: service_down service=snooper reason="its status document is stale" seconds=61.5']
    sender.close()


# --- the watcher (pure) -----------------------------------------------------------------------------------

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


def doc(age: float, run: str = "r1", **counters) -> dict:
    return {"updated_at": NOW - dt.timedelta(seconds=age), "run": run, "counters": counters, "unaccounted": 0}


def test_watch_service_down_once_then_up_and_the_store_after_its_time():
    w = watch.Watch(config.Alerts(service_down_seconds=30, store_down_seconds=60))
    assert w.documents({"controller": doc(1), "snooper": doc(1)}, NOW) == []
    events = w.documents({"controller": doc(1), "snooper": doc(31)}, NOW)
    assert [(e, f["service"]) for e, f in events] == [("service_down", "snooper")]
    assert w.documents({"controller": doc(1), "snooper": doc(40)}, NOW) == []          # said once
    assert [e for e, _f in w.documents({"controller": doc(1), "snooper": doc(2)}, NOW)] == ["service_up"]
    assert w.store(False, 100.0) == [] and w.store(False, 159.0) == []
    assert [e for e, _f in w.store(False, 160.0)] == ["store_down"] and w.store(False, 200.0) == []
    assert w.store(True, 201.0) == [("store_up", {"seconds": 101.0})]
    assert w.store(False, 300.0) == [] and w.store(True, 301.0) == []                   # short: nothing to say


def test_watch_capture_drops_are_the_growth_within_one_run():
    w = watch.Watch(config.Alerts())
    assert w.documents({"snooper": doc(1, kernel_dropped=5)}, NOW) == []                # history is not news
    assert w.documents({"snooper": doc(1, kernel_dropped=5)}, NOW) == []
    (event, fields), = w.documents({"snooper": doc(1, kernel_dropped=9, dropped_spool_full=2)}, NOW)
    assert event == "capture_drops" and fields["counters"] == {"kernel_dropped": 4, "dropped_spool_full": 2}
    assert w.documents({"snooper": doc(1, run="r2", kernel_dropped=1)}, NOW) == []      # a new run counts anew


def test_alerts_config_is_validated_like_every_key():
    for bad, where in (({"webhooks": ["mailto:x"]}, "alerts.webhooks[0]"), ({"queue_size": 0}, "alerts.queue_size"),
                       ({"timeout_seconds": "5"}, "alerts.timeout_seconds"), ({"url": "x"}, "alerts.url")):
        with pytest.raises(config.ConfigError) as exc:
            config.from_dict({"alerts": bad}, "f.yaml")
        assert str(exc.value).startswith(f"f.yaml: {where}: got ")


def test_the_analyser_alerts_a_stale_service_and_capture_drops_from_the_status_documents(env):
    cfg, _path, db, port = env
    sensor = cfg.snooper.sensor
    now = dt.datetime.now(dt.timezone.utc)
    rx = Receiver(port)
    a = Analyser(cfg, db)
    try:
        def put(name, age, **extra):
            db[store.STATUS].replace_one({"_id": f"{name}:{sensor}"}, {
                "_id": f"{name}:{sensor}", "updated_at": now - dt.timedelta(seconds=age), **extra}, upsert=True)
        put("controller", 1)
        put("snooper", 1, run="r1", counters={"kernel_dropped": 0})
        a.look(store_up=True)
        put("controller", cfg.alerts.service_down_seconds + 5)
        put("snooper", 1, run="r1", counters={"kernel_dropped": 7})
        a.look(store_up=True)
        a.look(store_up=True)             # nothing new: no second alert
        got = rx.wait(2)
        time.sleep(0.3)
        assert len(rx.got) == 2
        assert sorted(b["event"] for b in got) == ["capture_drops", "service_down"]
        down = next(b for b in got if b["event"] == "service_down")
        assert down["service"] == "controller" and down["seconds"] >= cfg.alerts.service_down_seconds
        drops = next(b for b in got if b["event"] == "capture_drops")
        assert drops["counters"] == {"kernel_dropped": 7}
    finally:
        a.alerts.close(wait=1)
        rx.close()


def alert_counts(db, status_id: str, sent: int, timeout: float = 30.0) -> dict:
    """A service's alert counters from its status document, once they count ``sent`` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        counted = (db[store.STATUS].find_one({"_id": status_id}) or {}).get("alerts") or {}
        if counted.get("sent") == sent or time.monotonic() > deadline:
            return counted
        time.sleep(0.1)


def test_the_analyser_service_alerts_its_flags_and_a_stale_service_and_counts_them_in_its_status(env):
    cfg, path, db, port = env
    sensor = cfg.snooper.sensor
    stale = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=cfg.alerts.service_down_seconds + 5)
    db[store.STATUS].insert_one({"_id": f"controller:{sensor}", "updated_at": stale})
    frames = []
    for i, ip in enumerate(CLIENTS):
        frames += steady(Conn(ip, 40000 + i), T0, 600, 30)
    store_frames(db, frames)
    rx = Receiver(port)
    proc = subprocess.Popen([*PISNOOP, "--config", str(path), "analyser"], cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        got = rx.wait(4, timeout=60)
        counted = alert_counts(db, f"analyser:{sensor}", sent=4)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        rx.close()
    assert proc.returncode == 0, out[-2000:]
    assert sorted(b["event"] for b in got) == ["flag_raised"] * 3 + ["service_down"], got
    assert counted["sent"] == 4 and counted["dropped_queue_full"] == 0 and counted["pending"] == 0, counted
    assert out.count("pisnoop-alert: flag_raised ") == 3 and out.count("pisnoop-alert: service_down ") == 1, out


def test_the_controller_alerts_when_the_analyser_goes_quiet_and_when_it_is_back(env, tmp_path):
    """The analyser cannot report itself down: the running controller does (its store thread reads the
    analyser's status document), once, then ``service_up`` once it is fresh again; it counts both in its own
    status document. The analyser's watch is not doubled: the controller alerts on no other service."""
    cfg, path, db, port = env
    sensor = cfg.snooper.sensor
    data = yaml.safe_load(path.read_text())
    data["switch"] = {"controller": {"listen_host": "127.0.0.1", "listen_port": free_port()}}
    data["snooper"]["status_interval"] = 0.2
    data["alerts"]["service_down_seconds"] = 2
    path.write_text(yaml.safe_dump(data))

    def analyser_seen(age: float) -> None:
        db[store.STATUS].replace_one({"_id": f"analyser:{sensor}"}, {
            "_id": f"analyser:{sensor}", "updated_at": dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age)},
            upsert=True)
    analyser_seen(30)
    db[store.STATUS].insert_one({"_id": f"snooper:{sensor}", "updated_at": dt.datetime(2026, 1, 1,
                                                                                      tzinfo=dt.timezone.utc)})
    rx = Receiver(port)
    proc = subprocess.Popen([*PISNOOP, "--config", str(path), "controller"], cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        got = rx.wait(1, timeout=60)
        assert [(b["event"], b["service"]) for b in got] == [("service_down", "analyser")], got
        assert got[0]["seconds"] >= 30
        back = threading.Event()

        def analyser_back():                                   # the analyser writing its status again
            while not back.wait(0.2):
                analyser_seen(0)
        writer = threading.Thread(target=analyser_back, daemon=True)
        writer.start()
        rx.wait(2, timeout=30)
        time.sleep(1.0)                                        # nothing more comes: no second alert
        counted = alert_counts(db, f"controller:{sensor}", sent=2)
        back.set()
        writer.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        rx.close()
    assert [(b["event"], b["service"]) for b in rx.wait(2)] == [("service_down", "analyser"),
                                                                ("service_up", "analyser")]
    assert counted["sent"] == 2 and counted["pending"] == 0, counted
    assert proc.returncode == 0, out[-2000:]
    assert out.count("pisnoop-alert: service_down service=analyser") == 1 and "service=snooper" not in out, out
