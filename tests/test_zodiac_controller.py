"""The real ``pisnoop controller`` (switch.target zodiacfx) against the Zodiac FX model (lab/zodiac).

No root, no OVS: the model connects to the controller over 127.0.0.1, wipes on every connect and drop,
pages flow stats 15 per reply and records every burst the controller sends between two of its replies.
The controller process is measured from /proc (threads, open file descriptors).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
import types

import pytest
import yaml

from appliance import flagdoc, store
from lab.procs import free_port
from lab.zodiac import ZodiacSwitch
from lab.zodiac import table as lab_table
from tests.ctlutil import REPO, ControllerProcess, settled_usage, wait_for

IN = "10.0.0.10"
XMPP = dict(eth_src="02:00:00:00:00:0a", eth_dst="02:00:00:00:00:01", eth_type=0x0800, ipv4_dst="10.0.0.1",
            ip_proto=6, tcp_src=40000, tcp_dst=5222)
STATIC = 6          # the zodiacfx plan without bans (mirror copies, policy default, XMPP meter, patch)


def zodiac_config(tmp_path, store_config, port: int, **over):
    path, _db = store_config
    cfg = yaml.safe_load(path.read_text())
    cfg["switch"] = {"target": "zodiacfx", "datapath_id": 0x70B3D56CD888,
                     "ports": {"inside": 1, "mirror": 2, "upstream": 3, "management": 4},
                     "controller": {"listen_host": "127.0.0.1", "listen_port": port}}
    cfg["snooper"]["status_interval"] = 0.5
    cfg["enforce"] = {"poll_interval": 0.5}
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def rig(tmp_path, store_config):
    """(controller, switch factory, db): the controller runs; the test starts the model when it wants."""
    port = free_port()
    path = zodiac_config(tmp_path, store_config, port)
    switches: list[ZodiacSwitch] = []

    def switch(**kw) -> ZodiacSwitch:
        sw = ZodiacSwitch(("127.0.0.1", port), **{"tick": 0.1, **kw}).start()
        switches.append(sw)
        return sw

    ctl = ControllerProcess(types.SimpleNamespace(run_dir=tmp_path, config_path=path))
    try:
        yield ctl, switch, store_config[1]
    finally:
        for sw in switches:
            sw.stop()
        ctl.kill(hard=False)


def flow_set(sw) -> list:
    return sorted((f.table_id, f.priority, f.cookie, f.match, f.instructions) for f in sw.flows())


def status(db) -> dict:
    return db[store.STATUS].find_one({"component": "controller"}) or {}


def flag_doc(ip, seconds=120):
    return flagdoc.build(client_ip=ip, client_port=None, server_ports=[5222], classifier="test", reason="test flood",
                         action="drop", evidence={}, offence=1, ban_seconds=seconds, sensor="test",
                         scope="fleet", flagged_at=dt.datetime.now(dt.timezone.utc))


def ban_ips(n: int) -> list[str]:
    return [f"10.1.{i // 250}.{1 + i % 250}" for i in range(n)]


def assert_no_burst_over_the_buffer(sw) -> None:
    c = sw.counters()
    assert c["overflows"] == 0 and c["lost_bytes"] == 0 and c["max_burst"] <= sw.rx_buffer, (c, sw.burst_sizes())


def test_50_abrupt_reconnects_the_identical_set_every_time_flat_threads_and_sockets_every_drop_counted(rig):
    ctl, switch, db = rig
    ctl.start()
    sw = switch()
    assert sw.wait(lambda s: len(s.flows()) == STATIC, 30), ctl.log[-2000:]
    first = flow_set(sw)
    time.sleep(0.5)
    usage = settled_usage(ctl.proc.pid)
    for i in range(50):
        n = i + 1
        ctl.wait_log("connected from", count=n, timeout=15)          # the controller has its features reply
        if i % 2:                                                       # a whole push, checked, then cut
            assert sw.wait(lambda s: len(s.flows()) == STATIC, 10), f"no push on connect {n}"
            assert flow_set(sw) == first
        sw.drop("rst" if i % 4 < 2 else "fin", reconnect=0)           # even rounds: within ~100 ms of connect
    assert sw.wait(lambda s: s.connects == 51 and len(s.flows()) == STATIC, 15)
    assert flow_set(sw) == first
    assert settled_usage(ctl.proc.pid, want=usage) == usage, "threads or sockets grew with the reconnects"
    assert wait_for(lambda: status(db).get("counters", {}).get("disconnects") == 50, 10), status(db)
    doc = status(db)
    assert doc["counters"]["connects"] == 51 and sum(doc["disconnect_reasons"].values()) == 50
    log = ctl.log
    assert log.count(") after ") == 50 and "keeps its flows" not in log
    assert "the zodiacfx wipes its flows and drops every packet until it reconnects" in log
    assert "refused" not in log and sw.errors == []
    assert_no_burst_over_the_buffer(sw)


def test_a_flag_is_enforced_and_after_a_wipe_the_ban_comes_back_with_its_time_left(rig):
    ctl, switch, db = rig
    ctl.start()
    sw = switch()
    assert sw.wait(lambda s: len(s.flows()) == STATIC, 30), ctl.log[-2000:]
    assert sorted(sw.where(1, ipv4_src=IN, **XMPP).ports) == [2, 3]
    db[store.FLAGS].insert_one(flag_doc(IN, seconds=120))
    assert sw.wait(lambda s: len(s.flows()) == STATIC + 1, 10), ctl.log[-2000:]
    w = sw.where(1, ipv4_src=IN, **XMPP)
    assert w.ports == (2,), w                                   # mirrored, not forwarded
    assert sorted(sw.where(1, ipv4_src="10.0.0.11", **XMPP).ports) == [2, 3]
    assert all(4 not in sw.where(p, ipv4_src=IN, **XMPP).ports for p in (1, 3))
    ban = [f for f in sw.flows() if f.priority == 320][0]            # a drop ban (enforce: drop 320, limit 310)
    sw.drop("rst", reconnect=False)
    assert sw.flows() == []                                     # the switch wiped its table
    time.sleep(3.0)
    sw.reconnect_now()
    assert sw.wait(lambda s: len(s.flows()) == STATIC + 1, 15), ctl.log[-2000:]
    again = [f for f in sw.flows() if f.priority == 320][0]
    assert again.match == ban.match and ban.hard_timeout - 5 <= again.hard_timeout <= ban.hard_timeout - 3
    assert sw.where(1, ipv4_src=IN, **XMPP).ports == (2,)
    assert_no_burst_over_the_buffer(sw)


def test_200_bans_are_pushed_paced_and_read_back_in_pages(rig):
    ctl, switch, db = rig
    db[store.FLAGS].insert_many([flag_doc(ip) for ip in ban_ips(200)])
    ctl.start()
    sw = switch()
    assert sw.wait(lambda s: len(s.flows()) == STATIC + 200, 60), (len(sw.flows()), ctl.log[-2000:])
    # the read-back once enforce knows its set: 206 flows, 15 a page; nothing is taken for stale
    assert wait_for(lambda: ctl.log.count("full set pushed") == 1 and status(db).get("counters", {}).get(
        "flows_installed") == STATIC + 200, 15)
    time.sleep(2.0)
    assert len(sw.flows()) == STATIC + 200 and "removing" not in ctl.log
    assert sw.errors == [] and sw.counters()["errors_sent"] == 0
    assert_no_burst_over_the_buffer(sw)
    assert len(sw.burst_sizes()) > 200 * 100 // sw.rx_buffer                  # paced: many small bursts
    assert all(sorted(sw.where(1, ipv4_src=ip, **XMPP).ports) == [2] for ip in ban_ips(200)[::37])


def test_the_controller_fills_the_zodiac_block_pool_exactly_and_refuses_the_rest_before_sending(rig):
    """The Zodiac's 1,024-block pool holds fewer ban flows than its 480-flow limit (docs/ARCHITECTURE.md): the
    zodiacfx profile counts the blocks, so the controller sends exactly what fits (the model answers no
    TABLE_FULL and has no room for one more ban), refuses the rest, counted and reported; the rest stays."""
    ctl, switch, db = rig
    ctl.start()
    sw = switch()
    assert sw.wait(lambda s: len(s.flows()) == STATIC, 30), ctl.log[-2000:]
    db[store.FLAGS].insert_many([flag_doc(ip) for ip in ban_ips(474)])        # 480 flows by the flow count
    assert wait_for(lambda: status(db).get("refused", {}).get("enforce/capacity"), 30), status(db)
    time.sleep(3.0)
    held = len(sw.flows())
    refused = status(db)["refused"]["enforce/capacity"]
    print(f"the model holds {held} flows ({held - STATIC} bans); the controller refused {refused}")
    assert STATIC + 200 < held < 480 and held + refused == STATIC + 474, (held, refused)
    assert sw.counters()["errors_sent"] == 0 and sw.errors == []              # nothing sent that did not fit
    pool = sw.table.pool
    room = sum(free for size, free in zip(lab_table.MEMBAGS, pool.free) if size >= 56)
    assert room < 2, "the model has room for another ban flow (a 56-byte flow_mod and a 56-byte match)"
    assert status(db)["counters"]["flows_installed"] == held
    assert ctl.log.count("has no room") == refused
    assert sorted(sw.where(1, ipv4_src="10.0.0.11", **XMPP).ports) == [2, 3]   # the rest stays
    assert sw.where(1, ipv4_src=ban_ips(474)[0], **XMPP).ports == (2,)
    assert_no_burst_over_the_buffer(sw)


def test_a_plan_the_zodiac_cannot_hold_is_refused_in_one_line_before_anything_is_sent(tmp_path, store_config):
    port = free_port()
    path = zodiac_config(tmp_path, store_config, port, xmpp={"meter": {"rate": 100, "unit": "kbps", "burst": 10}})
    with ZodiacSwitch(("127.0.0.1", port), tick=0.1) as sw:
        res = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(path), "controller"],
                             cwd=str(REPO), capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "BURST" in res.stderr and "Zodiac FX" in res.stderr      # the config check refuses it first
        assert sw.connects == 0 and sw.counters()["messages"] == 0
