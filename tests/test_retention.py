"""Retention by size (appliance/retention.py): the decision on its own, then real batches written by the snooper's
writer into the embedded store, trimmed under a small ``frames_max_gb`` with the oldest gone and counted."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading

import pytest
import yaml

from appliance import config as config_mod
from appliance import flagdoc, indexes, retention, store
from appliance.retention import Sizes, bytes_to_free
from snooper import counters
from snooper.batch import Batch
from snooper.spool import Spool
from snooper.status import Reporter, snapshot_of
from snooper.writer import Writer

LOG = logging.getLogger("test")
S = 1_000_000_000
MB = 10**6


# --- the decision -------------------------------------------------------------------------------

def test_nothing_to_free_under_the_cap_and_above_the_floor():
    assert bytes_to_free(Sizes(9 * MB, 50 * MB), 10 * MB, 20 * MB) == 0
    assert bytes_to_free(Sizes(10 * MB, 20 * MB), 10 * MB, 20 * MB) == 0      # exactly at both: nothing
    assert bytes_to_free(Sizes(10**12, None), 0, 20 * MB) == 0                # no cap, free space unknown


def test_over_the_cap_goes_below_it_by_the_headroom():
    need = bytes_to_free(Sizes(12 * MB, 10**12), 10 * MB, 20 * MB)
    assert need == 12 * MB - int(10 * MB * (1 - retention.HEADROOM))
    assert 12 * MB - need < 10 * MB


def test_under_the_floor_frees_the_deficit_and_never_more_than_the_frames():
    assert bytes_to_free(Sizes(50 * MB, 15 * MB), 0, 20 * MB) == 5 * MB + int(20 * MB * retention.HEADROOM)
    assert bytes_to_free(Sizes(3 * MB, 1 * MB), 0, 20 * MB) == 3 * MB       # all frames, and no more exist
    # both due: the larger need wins
    assert bytes_to_free(Sizes(30 * MB, 19 * MB), 10 * MB, 20 * MB) == 30 * MB - int(10 * MB * 0.95)


def test_how_many_batches_for_a_need_at_an_average_size():
    assert retention.how_many(0, 100.0) == 0 and retention.how_many(-5, 100.0) == 0
    assert retention.how_many(1, 100.0) == 1 and retention.how_many(100, 100.0) == 1
    assert retention.how_many(101, 100.0) == 2 and retention.how_many(10_000, 100.0) == 100
    assert retention.how_many(50, 0.0) == 1                                  # no average known: one at a time


def test_the_keys_are_validated_and_flags_outlive_the_escalation_memory():
    cfg = config_mod.from_dict({})
    r = cfg.mongodb.retention
    assert (r.frames_max_gb, r.min_free_gb, r.flags_days, r.status_hours) == (8.0, 2.0, 90.0, 168.0)
    assert cfg.mongodb.data_dir is None
    for key, bad in (("frames_max_gb", -1), ("min_free_gb", "lots"), ("flags_days", 40000), ("status_hours", True)):
        with pytest.raises(config_mod.ConfigError, match=f"mongodb.retention.{key}: got"):
            config_mod.from_dict({"mongodb": {"retention": {key: bad}}})
    with pytest.raises(config_mod.ConfigError, match="mongodb.data_dir: got 'var/lib'; expected an absolute path"):
        config_mod.from_dict({"mongodb": {"data_dir": "var/lib"}})
    with pytest.raises(config_mod.ConfigError, match="flags_days: got 1.*memory_seconds \\(172800 s"):
        config_mod.from_dict({"mongodb": {"retention": {"flags_days": 1}},
                              "enforce": {"escalation": {"memory_seconds": 172800}}})
    assert config_mod.from_dict({"mongodb": {"retention": {"flags_days": 0}},
                                 "enforce": {"escalation": {"memory_seconds": 172800}}})


def test_flags_and_status_have_ttl_indexes_from_their_days_and_hours():
    r = config_mod.Retention(flags_days=2, status_hours=3)
    ttl = {s.name: s.options(r).get("expireAfterSeconds") for s in indexes.INDEXES}
    assert ttl["idx_flags_expires_at"] == 2 * 86400 and ttl["idx_status_updated_at"] == 3 * 3600
    assert {s.name for s in indexes.INDEXES if s.retention} == {
        "idx_frames_ins", "idx_flows_last_seen", "idx_flags_expires_at", "idx_status_updated_at"}


# --- the store ------------------------------------------------------------------------------------

def with_retention(path, **keys) -> config_mod.Config:
    data = yaml.safe_load(path.read_text())
    data["mongodb"]["retention"] = keys
    path.write_text(yaml.safe_dump(data))
    return config_mod.load(path)


def fill(cfg, db, tmp_path, batches: int, frames_per_batch: int = 100, size: int = 1000):
    """``batches`` batches of random frames through the snooper's real writer; returns (counters, writer, spool)."""
    c = counters.new()
    spool = Spool(tmp_path / "spool", 10, "drop_newest", c, LOG)
    w = Writer(db, spool, c, LOG, cfg)
    w.start()
    for seq in range(batches):
        frames = [(1_700_000_000 * S + (seq * frames_per_batch + i) * 1000, size, os.urandom(size))
                  for i in range(frames_per_batch)]
        w.offer(Batch("s1", "run1", seq, frames), block=True)
    w.stop()
    assert c["stored_batches"] == batches
    return c, w, spool


def flows_and_flags(db, n: int = 5) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    for i in range(n):
        db[store.FLOWS].insert_one({"_id": f"flow{i}", "key": f"6 a {i} b 5222", "last_seen": now})
        db[store.FLAGS].insert_one(flagdoc.build(
            client_ip=f"10.0.0.{i + 1}", server_ports=[5222], classifier="xmpp_abuse", reason="test",
            action="drop", evidence={}, offence=1, ban_seconds=300, flagged_at=now, sensor="s1"))


def oldest_went(db, ins: dict) -> set:
    """The batches gone since ``ins`` ({id: ins}) was read are the oldest: none left is older than one gone
    (batches stored in the same millisecond tie); returns the ids gone."""
    left = {d["_id"] for d in db[store.FRAMES].find({}, {"_id": 1})}
    gone = set(ins) - left
    assert gone and left <= set(ins)
    assert max(ins[b] for b in gone) <= min(ins[b] for b in left)
    return gone


def test_filling_past_the_cap_removes_the_oldest_batches_counts_them_and_keeps_flows_and_flags(store_config,
                                                                                               tmp_path):
    path, db = store_config
    cfg = with_retention(path, frames_max_gb=0.01, min_free_gb=0)      # 10 MB
    c, writer, spool = fill(cfg, db, tmp_path, batches=120)            # 120 batches of 101.6 kB of frames
    flows_and_flags(db)
    oversize = retention.frames_bytes(db)
    assert oversize > 10 * MB, oversize
    ins = {d["_id"]: d["ins"] for d in db[store.FRAMES].find({}, {"ins": 1})}
    assert len(ins) == 120
    trimmer = retention.Trimmer(db, lambda: cfg, c, 5.0, threading.Event(), LOG)
    removed = trimmer.round()

    after = retention.frames_bytes(db)
    assert after <= 10 * MB * (1 - retention.HEADROOM), after
    gone = oldest_went(db, ins)                                         # the oldest went, the rest are intact
    assert removed.batches == len(gone) == c["retention_batches"] > 0
    assert removed.frames == c["retention_frames"] == 100 * len(gone)
    assert removed.bytes == c["retention_bytes"] == oversize - after
    # just enough: one batch fewer would have left it over the target
    assert after + removed.bytes / len(gone) > 10 * MB * (1 - retention.HEADROOM)
    assert db[store.FLOWS].count_documents({}) == 5 and db[store.FLAGS].count_documents({}) == 5
    # a second round has nothing to do: the headroom
    assert trimmer.round().batches == 0 and c["retention_batches"] == len(gone)

    # the snooper's status document and metrics carry the count and the sizes
    snapshot = snapshot_of(c, writer, spool, None, None, "run1", "mirror0", trimmer=trimmer)
    doc = Reporter(db, "s1", 5.0, snapshot, LOG, threading.Event()).publish()
    stored = db[store.STATUS].find_one({"_id": "snooper:s1"})
    assert stored["counters"]["retention_batches"] == len(gone) == doc["counters"]["retention_batches"]
    assert stored["counters"]["retention_frames"] == 100 * len(gone)
    assert stored["retention"]["frames_bytes"] == after and stored["retention"]["frames_max_bytes"] == 10 * MB
    assert stored["store_frames_bytes"] == after and stored["store_free_bytes"] > 0
    assert "retention_batches" in counters.NAMES      # so the Prometheus collector exports it
    spool.close()


def test_a_free_space_floor_frees_the_deficit_and_counts_the_reused_space(store_config, tmp_path):
    """The store keeps the pages of removed documents for reuse: after a trim that space counts as free, so the
    floor does not go on removing batches while the file system's free space stays where it was."""
    path, db = store_config
    cfg = with_retention(path, frames_max_gb=0, min_free_gb=0)
    c, writer, spool = fill(cfg, db, tmp_path, batches=30)
    reusable = retention.reusable_bytes(db)
    ins = {d["_id"]: d["ins"] for d in db[store.FRAMES].find({}, {"ins": 1})}
    # sizes as the store counts them (nx-27017 counts a binary as its base64 text, about 4/3 of MongoDB)
    before = retention.frames_stats(db)
    assert before.count == 30 and before.avg > 100_000
    need = int(4 * before.avg) + 1
    removed = retention.trim(db, need)
    assert removed.batches == 5 and removed.frames == 500 and removed.bytes >= need
    assert removed.bytes == before.bytes - retention.frames_bytes(db)
    assert len(oldest_went(db, ins)) == 5
    assert db[store.FRAMES].count_documents({}) == 25
    assert retention.reusable_bytes(db) - reusable >= removed.bytes * 0.9
    spool.close()


def test_free_space_comes_from_the_data_dir_when_set_else_from_what_the_store_reports(store_config, embedded_store):
    path, db = store_config
    stats = db.command("dbStats")
    assert "fsTotalSize" in stats and "fsUsedSize" in stats          # nx-27017 and MongoDB 4.4 both report them
    local = retention.free_bytes(db, str(embedded_store.data_dir))
    reported = retention.free_bytes(db, None)
    disk = os.statvfs(embedded_store.data_dir)
    assert abs(local - disk.f_bavail * disk.f_frsize) < 200 * MB      # the same file system, give or take the others
    # dbStats counts blocks reserved for root (or by a quota) as free: the reason data_dir comes first
    assert abs(reported - (stats["fsTotalSize"] - stats["fsUsedSize"])) < 200 * MB
    assert reported >= local - 200 * MB
    warned = []
    fallback = retention.free_bytes(db, "/nonexistent/dir", warn=warned.append)
    assert abs(fallback - reported) < 200 * MB                     # the fallback (others write to this disk too)
    assert warned == ["retention: mongodb.data_dir /nonexistent/dir: No such file or directory; "
                      "using the file system the store reports"]


def test_the_trimmer_warns_once_about_a_data_dir_it_cannot_read(store_config, caplog):
    path, db = store_config
    edit_cfg = yaml.safe_load(path.read_text())
    edit_cfg["mongodb"]["data_dir"] = "/nonexistent/dir"
    path.write_text(yaml.safe_dump(edit_cfg))
    cfg = config_mod.load(path)
    trimmer = retention.Trimmer(db, lambda: cfg, counters.new(), 5.0, threading.Event(), LOG)
    with caplog.at_level(logging.WARNING, "test"):
        for _ in range(3):
            trimmer.round()
    assert [r.getMessage() for r in caplog.records].count(
        "retention: mongodb.data_dir /nonexistent/dir: No such file or directory; "
        "using the file system the store reports") == 1
    assert trimmer.status()["free_bytes"] > 0


def test_a_floor_that_cannot_be_met_removes_every_batch_counts_them_and_warns_once(store_config, tmp_path, caplog):
    """A disk that something else fills: the floor takes every batch (the store must not fill the disk), says so once,
    and keeps flows and flags."""
    path, db = store_config
    cfg = with_retention(path, frames_max_gb=0, min_free_gb=1_000_000)     # far more than any disk here
    c, writer, spool = fill(cfg, db, tmp_path, batches=12)
    flows_and_flags(db)
    trimmer = retention.Trimmer(db, lambda: cfg, c, 5.0, threading.Event(), LOG)
    with caplog.at_level(logging.WARNING, "test"):
        for _ in range(3):
            trimmer.round()
    assert db[store.FRAMES].count_documents({}) == 0
    assert c["retention_batches"] == 12 and c["retention_frames"] == 1200
    assert db[store.FLOWS].count_documents({}) == 5 and db[store.FLAGS].count_documents({}) == 5
    short = [r.getMessage() for r in caplog.records if "bytes to free" in r.getMessage()]
    assert len(short) == 1 and "frames now 0 bytes" in short[0], short
    spool.close()
