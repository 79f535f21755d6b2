"""Config reload (SIGHUP, ``systemctl reload``): each service applies what it can while running, names what needs a
restart, and keeps the config in force when the file is bad. The real services against the embedded store."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from appliance import config as config_mod
from appliance import netns, service, store
from tests.analyser_frames import T0, Conn, S, steady, store_frames
from tests.conftest import REPO
from tests.test_analyser import wait_for

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")
SLOW, CALM, LATE = "10.0.0.21", "10.0.0.22", "10.0.0.23"


def edit(path: Path, **sections) -> None:
    data = yaml.safe_load(path.read_text())
    for k, v in sections.items():
        for key, value in v.items():
            if isinstance(value, dict):
                data.setdefault(k, {}).setdefault(key, {}).update(value)
            else:
                data.setdefault(k, {})[key] = value
    path.write_text(yaml.safe_dump(data))


class Service:
    """``pisnoop <command>`` as a subprocess with its log in a file."""

    def __init__(self, path: Path, command: str, log_path: Path):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("PISNOOP_CONFIG", None)
        env.pop("NOTIFY_SOCKET", None)
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(path), command],
                                     cwd=str(REPO), env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def lines(self, word: str) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if word in line]

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def wait_line(self, word: str, count: int = 1) -> list[str]:
        def found():
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            got = self.lines(word)
            return got if len(got) >= count else None
        return wait_for(found, 30, f"{count} log line(s) with {word!r}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


# --- the shared mechanism ----------------------------------------------------------------------

def test_a_reload_applies_the_live_keys_keeps_the_rest_and_refuses_a_bad_file(tmp_path, caplog):
    path = tmp_path / "pisnoop.yaml"
    path.write_text(yaml.safe_dump({"xmpp": {"threshold_ppm": 100}, "snooper": {"interface": "mirror0"}}))
    cfg = config_mod.load(path)
    got = []
    r = service.Reloader(cfg, ("xmpp.threshold_ppm", "enforce"), lambda c: got.append(c) or ["noted"],
                         logging.getLogger("t"))
    edit(path, xmpp={"threshold_ppm": 50}, snooper={"interface": "other0"}, enforce={"never_ban": ["10.9.0.0/16"]})
    with caplog.at_level(logging.INFO, "t"):
        now = r.reload()
    assert now is r.cfg is got[-1]
    assert now.xmpp.threshold_ppm == 50 and now.enforce.never_ban == ("10.9.0.0/16",)
    assert now.snooper.interface == "mirror0"            # kept: the service could not take it while running
    [line] = [rec.getMessage() for rec in caplog.records]
    assert line == (f"reload of {path}: applied xmpp.threshold_ppm 100 -> 50, enforce.never_ban [] -> "
                    "['10.9.0.0/16']; noted; needs a restart: snooper.interface 'other0'")
    caplog.clear()
    # a bad value, then bad YAML: one line each, the config in force stays
    for text in ("xmpp:\n  threshold_ppm: -3\n", "xmpp: [\n"):
        path.write_text(text)
        with caplog.at_level(logging.INFO, "t"):
            assert r.reload() is None
        [line] = [rec.getMessage() for rec in caplog.records]
        assert line.startswith(f"reload refused, the config in force is unchanged: {path}: ")
        assert r.cfg is now and len(got) == 1
        caplog.clear()
    # a mix the cross-checks refuse (per-IP under the new per-connection line): refused too, nothing applied
    path.write_text(yaml.safe_dump({"xmpp": {"threshold_ppm": 400}}))
    r2 = service.Reloader(cfg, ("xmpp.threshold_ppm",), got.append, logging.getLogger("t"))
    with caplog.at_level(logging.INFO, "t"):
        assert r2.reload() is None
    assert "per_ip_threshold_ppm" in caplog.records[-1].getMessage() and r2.cfg is cfg


def test_a_fault_in_applying_keeps_the_config_in_force(tmp_path, caplog):
    path = tmp_path / "pisnoop.yaml"
    path.write_text("{}\n")
    cfg = config_mod.load(path)

    def broken(_cfg):
        raise RuntimeError("apply went wrong")
    r = service.Reloader(cfg, ("xmpp",), broken, logging.getLogger("t"))
    edit(path, xmpp={"threshold_ppm": 50})
    with caplog.at_level(logging.INFO, "t"):
        assert r.reload() is None
    assert r.cfg is cfg and [rec.getMessage() for rec in caplog.records] == [
        "reload failed, the config in force is unchanged: RuntimeError: apply went wrong"]


# --- the analyser --------------------------------------------------------------------------------

def test_sighup_with_a_lower_threshold_flags_a_client_under_the_old_line(store_config, tmp_path):
    """A client at 60 packets a minute is under the 100/min line; after a reload to 50/min it is flagged, with no
    restart; a client at 20/min stays unflagged; a bad file on SIGHUP leaves the analyser on its config."""
    path, db = store_config
    edit(path, analyser={"poll_interval": 0.05, "status_interval": 0.2}, xmpp={"threshold_ppm": 100})
    slow, calm = Conn(SLOW, 40001), Conn(CALM, 40002)
    first = steady(slow, T0, 60, 90) + steady(calm, T0, 20, 90)
    seq = store_frames(db, first)
    svc = Service(path, "analyser", tmp_path / "analyser.log")
    try:
        wait_for(lambda: (db[store.STATUS].find_one({"_id": "analyser:pisnoop"}) or {}).get("counters", {})
                 .get("frames", 0) >= len(first), what="the first 90 s analysed")
        assert db[store.FLAGS].count_documents({}) == 0          # 60/min is under the line in force

        edit(path, xmpp={"threshold_ppm": 50})
        svc.hup()
        [line] = svc.wait_line("reload of")
        assert "applied xmpp.threshold_ppm 100 -> 50; classifiers rebuilt from <built-in policy>" in line
        assert "needs a restart" not in line
        more = (steady(slow, T0 + 90 * S, 60, 90, handshake=False) + steady(calm, T0 + 90 * S, 20, 90, handshake=False))
        seq = store_frames(db, more, first_seq=seq)
        flag = wait_for(lambda: db[store.FLAGS].find_one({"client_ip": SLOW}), what="the slow client flagged")
        assert "threshold 50/min" in flag["reason"], flag["reason"]

        # a bad file: one line, and the analyser goes on with the 50/min line
        path.write_text("xmpp: {threshold_ppm: lots}\n")
        svc.hup()
        [bad] = svc.wait_line("reload refused")
        assert "xmpp.threshold_ppm: got 'lots'" in bad
        late = Conn(LATE, 40003)
        tail = steady(late, T0 + 200 * S, 60, 70)
        store_frames(db, tail, first_seq=seq)
        wait_for(lambda: db[store.FLAGS].count_documents({"client_ip": LATE}),
                 what="a flag under the line still in force")
        assert svc.proc.poll() is None
    finally:
        rc = svc.stop()
    assert rc == 0
    assert db[store.FLAGS].count_documents({"client_ip": CALM}) == 0
    assert len(svc.lines("reload of")) == 1 and len(svc.lines("reload refused")) == 1
    assert not svc.lines("Traceback")


# --- the snooper ---------------------------------------------------------------------------------

@pytest.fixture
def mirror_ns():
    """A namespace of this run with an interface ``mirror0`` (one end of a veth pair whose other end is silent)."""
    ns = "ps" + secrets.token_hex(2) + "rl"
    netns.run(["ip", "netns", "add", ns])
    try:
        netns.run(["ip", "link", "add", "mirror0", "type", "veth", "peer", "name", "mirror0p"], ns=ns)
        netns.run(["ip", "link", "set", "mirror0", "up"], ns=ns)
        yield ns
    finally:
        netns.run(["ip", "netns", "del", ns], check=False)
    assert ns not in netns.list_namespaces()


@root
def test_the_snooper_reloads_retention_and_names_the_capture_keys_as_needing_a_restart(store_config, tmp_path,
                                                                                        mirror_ns):
    path, db = store_config
    edit(path, snooper={"netns": mirror_ns, "interface": "mirror0", "status_interval": 0.3, "sensor": "rl"},
         mongodb={"retention": {"frames_max_gb": 0, "min_free_gb": 0}})
    c = Conn(SLOW, 40001)
    store_frames(db, steady(c, T0, 600, 120, payload=b"x" * 900), sensor="other", batch_size=50)
    before = db[store.FRAMES].count_documents({})
    from tests.test_retention import flows_and_flags, oldest_went
    ins = {d["_id"]: d["ins"] for d in db[store.FRAMES].find({}, {"ins": 1})}
    flows_and_flags(db)
    svc = Service(path, "snooper", tmp_path / "snooper.log")
    try:
        status = wait_for(lambda: (lambda d: d if d and d.get("retention") else None)(
            db[store.STATUS].find_one({"_id": "snooper:rl"})), what="a status with the store's sizes")
        assert status["counters"]["retention_batches"] == 0 and db[store.FRAMES].count_documents({}) == before
        size = status["retention"]["frames_bytes"]
        assert size > 0 and status["retention"]["frames_max_bytes"] == 0

        cap_gb = size / 2 / 1e9
        edit(path, mongodb={"retention": {"frames_max_gb": cap_gb}}, snooper={"interface": "other0"})
        svc.hup()
        [line] = svc.wait_line("reload of")
        assert f"applied mongodb.retention.frames_max_gb 0.0 -> {cap_gb!r}" in line
        assert line.endswith("needs a restart: snooper.interface 'other0'")
        status = wait_for(lambda: (lambda d: d if d["counters"]["retention_batches"] else None)(
            db[store.STATUS].find_one({"_id": "snooper:rl"})), what="a trim counted in the status")
        left = db[store.FRAMES].count_documents({})
        assert status["counters"]["retention_batches"] == before - left > 0
        assert status["retention"]["frames_bytes"] <= size / 2
        assert status["interface"] == "mirror0"                      # still capturing where it started
        assert db[store.FLOWS].count_documents({}) == 5 and db[store.FLAGS].count_documents({}) == 5
        oldest_went(db, ins)

        path.write_text("mongodb: {retention: {frames_max_gb: -1}}\n")
        svc.hup()
        [bad] = svc.wait_line("reload refused")
        assert "mongodb.retention.frames_max_gb: got -1" in bad
        t = time.time()
        wait_for(lambda: db[store.STATUS].find_one({"_id": "snooper:rl"})["updated_at"].timestamp() > t + 0.5,
                 what="the snooper still running")
    finally:
        rc = svc.stop()
    assert rc == 0 and not svc.lines("Traceback")
    assert len(svc.lines("reload of")) == 1 and len(svc.lines("reload refused")) == 1


# --- the controller --------------------------------------------------------------------------------

@root
def test_the_controller_applies_a_new_never_ban_entry_to_an_active_ban_and_keeps_its_listen_port():
    """A ban is installed; the client's address put on enforce.never_ban and SIGHUP: the ban flow goes, the listen
    port change waits for a restart (the switch stays connected), a bad file changes nothing."""
    from lab.virtual import VirtualAppliance
    from tests.conftest import assert_gone
    from tests.ctlutil import ControllerProcess, connected, flows_matching, table_snapshot
    from tests.ctlutil import wait_for as wait_until
    from tests.test_controller import IN, flag_doc

    va = VirtualAppliance()
    with va, ControllerProcess(va) as ctl:
        ctl.wait_pushed()
        db = store.database(va.config.mongodb)
        try:
            db[store.FLAGS].insert_one(flag_doc(IN))
            assert wait_until(lambda: flows_matching(va, f"nw_src={IN}"), 5.0), "no ban flow"
            path = Path(va.config_path)
            port = va.config.switch.controller.listen_port
            edit(path, enforce={"never_ban": [f"{IN}/32"]}, switch={"controller": {"listen_port": port + 1}})
            ctl.proc.send_signal(signal.SIGHUP)
            ctl.wait_log("reload of")
            [line] = [x for x in ctl.log.splitlines() if "reload of" in x]
            assert f"applied enforce.never_ban [] -> ['{IN}/32']; active flags read again; " in line
            assert line.endswith(f"needs a restart: switch.controller.listen_port {port + 1}")
            assert wait_until(lambda: not flows_matching(va, f"nw_src={IN}"), 5.0), "the exempt ban stayed"
            assert wait_until(lambda: connected(va), 5.0) and "disconnect" not in ctl.log.lower(), ctl.log[-2000:]
            table = table_snapshot(va)

            path.write_text("enforce: {never_ban: [not-an-address]}\n")
            ctl.proc.send_signal(signal.SIGHUP)
            ctl.wait_log("reload refused")
            [bad] = [x for x in ctl.log.splitlines() if "reload refused" in x]
            assert "enforce.never_ban[0]: got 'not-an-address'" in bad
            time.sleep(1.0)
            assert ctl.proc.poll() is None and connected(va) and table_snapshot(va) == table, ctl.log[-2000:]
            assert ctl.log.count("reload of") == 1 and "Traceback" not in ctl.log
        finally:
            db.client.close()
    assert_gone(va)


def test_a_reload_gives_the_alerter_and_the_watcher_the_new_alerts_section(store_config):
    from analyser import live

    path, db = store_config
    cfg = config_mod.load(path)
    analyser = live.Analyser(cfg, db)
    try:
        new = dataclasses.replace(cfg, alerts=dataclasses.replace(
            cfg.alerts, webhooks=("http://127.0.0.1:9/hook",), store_down_seconds=5.0))
        assert "alerts" in live.LIVE
        analyser.apply(new)
        assert analyser.alerts.webhooks == ("http://127.0.0.1:9/hook",)
        assert analyser.watch.cfg.store_down_seconds == 5.0
    finally:
        analyser.alerts.close(wait=0)
