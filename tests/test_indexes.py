"""appliance/indexes.py: the declaration is consistent, and ensure_indexes brings any database to it
(new, already right, retention changed, made by the old code) against the real embedded_store store."""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid

import pytest
from pymongo import MongoClient, monitoring

from appliance import config, indexes, store
from appliance.indexes import Index
from lab import procs
from tests.conftest import REPO

NOW = dt.datetime.now(dt.timezone.utc)
CHANGING = {"createIndexes", "dropIndexes", "collMod"}


class Commands(monitoring.CommandListener):
    """The names of the commands a client sent."""

    def __init__(self):
        self.sent: list[str] = []

    def started(self, event):
        self.sent.append(event.command_name)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


@pytest.fixture
def env(embedded_store):
    """(config factory, database, command recorder) on a fresh database."""
    name = "t" + uuid.uuid4().hex[:10]
    commands = Commands()
    client = MongoClient(embedded_store.uri, tz_aware=True, event_listeners=[commands])

    def make(frames_hours=168, flows_hours=720) -> config.Config:
        return config.from_dict({"mongodb": {"uri": embedded_store.uri, "database": name, "retention": {
            "frames_hours": frames_hours, "flows_hours": flows_hours}}})

    yield make, client[name], commands
    client.drop_database(name)
    client.close()


def seen(db) -> set:
    """Every index of the pisnoop collections as (collection, name, keys, TTL or None)."""
    return {(c, ix["name"], tuple(ix["key"].items()), ix.get("expireAfterSeconds"))
            for c in indexes.COLLECTIONS for ix in db[c].list_indexes() if ix["name"] != "_id_"}


def declared(cfg) -> set:
    return {(s.collection, s.name, s.keys, s.options(cfg.mongodb.retention).get("expireAfterSeconds"))
            for s in indexes.INDEXES}


def ttl_of(db, collection: str) -> int:
    [ttl] = [ix["expireAfterSeconds"] for ix in db[collection].list_indexes() if "expireAfterSeconds" in ix]
    return ttl


def fill(db, n=20) -> None:
    """Documents in frames and flows, stored just now (no TTL is anywhere near them)."""
    for seq in range(n):
        doc = store.batch_document("s1", "run1", seq, [(seq * 1000 + 1, 60, b"x" * 60)])
        db[store.FRAMES].insert_one({**doc, "ins": NOW})
        db[store.FLOWS].insert_one({"_id": f"flow{seq}", "key": f"6 a {seq} b 5222", "last_seen": NOW})


def counts(db) -> tuple[int, int]:
    return db[store.FRAMES].count_documents({}), db[store.FLOWS].count_documents({})


# --- the declaration ---------------------------------------------------------------------------

def test_the_declared_indexes_have_no_conflict():
    assert indexes.conflicts(indexes.INDEXES) == []
    assert {s.collection for s in indexes.INDEXES} <= set(indexes.COLLECTIONS)


@pytest.mark.parametrize("extra,expected", [
    # the old reader's index: the TTL index's key pattern without its TTL (IndexOptionsConflict on MongoDB)
    (Index(store.FRAMES, "idx_frames_ins", (("ins", 1),), "no TTL"), "key pattern of idx_frames_ins again"),
    (Index(store.FLOWS, "idx_flows_last_seen", (("last_seen", 1),), "other retention", "frames_hours"),
     "key pattern of idx_flows_last_seen again"),
    (Index(store.FLAGS, "idx_flags_updated_at", (("updated_at", 1), ("status", 1)), "same name, other keys"),
     "IndexKeySpecsConflict"),
    (Index(store.FLAGS, "updated_at_1", (("updated_at", 1),), "MongoDB's default name"), "key pattern"),
    (Index(store.FLAGS, "idx_flags_x", (("y", 1),), "a name nx-27017 would not give"), "would name it idx_flags_y"),
    (Index(store.FLAGS, "idx_flags_y", (("y", -1),), "descending"), "descending"),
    (Index(store.FLOWS, "idx_flows_a_b", (("a", 1), ("b", 1)), "compound TTL", "flows_hours"), "single-field"),
])
def test_the_checker_finds_what_real_mongodb_would_refuse(extra, expected):
    problems = indexes.conflicts(indexes.INDEXES + (extra,))
    assert problems and all(extra.name in p for p in problems) and any(expected in p for p in problems), problems


def test_retention_hours_become_ttl_seconds_and_keep_is_the_largest_ttl():
    assert indexes.ttl_seconds(1) == 3600 and indexes.ttl_seconds(0.5) == 1800 and indexes.ttl_seconds(1e-6) == 1
    assert indexes.ttl_seconds(0) == indexes.KEEP_SECONDS == 2**31 - 1   # MongoDB accepts 0 to 2147483647
    assert indexes.ttl_seconds(87600) < indexes.KEEP_SECONDS


# --- planning against what real MongoDB lists (nx-27017 cannot make these names) ----------------

RETENTION = config.Retention(frames_hours=2, flows_hours=720)


def ix(name, keys, **options):
    return {"v": 2, "key": dict(keys), "name": name, **options}


@pytest.mark.parametrize("old", [ix("ins_1", [("ins", 1)]), ix("ins_1", [("ins", 1)], expireAfterSeconds=3600),
                                 ix("idx_frames_ins", [("ins", 1)]),
                                 ix("idx_frames_ins", [("ins", 1)], expireAfterSeconds=7200, unique=True),
                                 ix("idx_frames_ins", [("ins", 1), ("t0", 1)], expireAfterSeconds=7200)])
def test_a_same_key_index_that_collmod_cannot_fix_is_dropped_before_it_is_made_again(old):
    changes = indexes.plan(store.FRAMES, [ix("_id_", [("_id", 1)]), old], RETENTION)
    steps = [(c.action, c.name) for c in changes]
    assert steps.index(("drop", old["name"])) < steps.index(("create", "idx_frames_ins"))
    made = [c for c in changes if c.name == "idx_frames_ins" and c.action == "create"]
    assert made[0].keys == (("ins", 1),) and made[0].options == {"expireAfterSeconds": 7200}


def test_a_ttl_that_differs_is_changed_in_place():
    right = [ix(s.name, s.keys, **s.options(RETENTION)) for s in indexes.INDEXES if s.collection == store.FRAMES]
    assert indexes.plan(store.FRAMES, right, RETENTION) == []
    old_ttl = [dict(i, expireAfterSeconds=3600.0) if i["name"] == "idx_frames_ins" else i for i in right]
    changes = indexes.plan(store.FRAMES, old_ttl, RETENTION)
    assert [(c.action, c.name, c.options) for c in changes] == [("ttl", "idx_frames_ins", {"expireAfterSeconds": 7200})]
    keep = indexes.plan(store.FRAMES, right, config.Retention(frames_hours=0))
    assert [(c.action, c.options) for c in keep] == [("ttl", {"expireAfterSeconds": indexes.KEEP_SECONDS})]


# --- ensure_indexes on the embedded_store store ---------------------------------------------------------

def test_ensure_makes_the_declared_set_and_a_second_time_changes_nothing(env):
    make, db, commands = env
    cfg = make(frames_hours=1)
    made = indexes.ensure_indexes(db, cfg)
    assert sorted(c.name for c in made) == sorted(s.name for s in indexes.INDEXES)
    assert {c.action for c in made} == {"create"}
    first = seen(db)
    assert first == declared(cfg)
    commands.sent.clear()
    assert indexes.ensure_indexes(db, cfg) == []
    assert "listIndexes" in commands.sent and not CHANGING & set(commands.sent), commands.sent
    assert seen(db) == first


def test_a_changed_retention_is_a_ttl_change_and_keeps_every_document(env):
    make, db, commands = env
    indexes.ensure_indexes(db, make(frames_hours=1, flows_hours=2))
    fill(db)
    before = counts(db)
    assert before == (20, 20) and (ttl_of(db, store.FRAMES), ttl_of(db, store.FLOWS)) == (3600, 7200)
    for frames_hours, flows_hours in ((3, 0), (0, 24), (1, 2)):
        commands.sent.clear()
        changes = indexes.ensure_indexes(db, make(frames_hours, flows_hours))
        assert {(c.action, c.name) for c in changes} == {("ttl", "idx_frames_ins"), ("ttl", "idx_flows_last_seen")}
        assert "collMod" in commands.sent and "dropIndexes" not in commands.sent
        assert ttl_of(db, store.FRAMES) == indexes.ttl_seconds(frames_hours)
        assert ttl_of(db, store.FLOWS) == indexes.ttl_seconds(flows_hours)
        assert counts(db) == before
    assert seen(db) == declared(make(1, 2))


def old_code_indexes(db, frames_hours: float, flows_hours: float) -> None:
    """The create_index calls of the version before appliance/indexes.py, in the order its services ran them."""
    frames = db[store.FRAMES]
    frames.create_index("t0")                                      # snooper writer
    frames.create_index("t1")
    frames.create_index("first_ns")
    if frames_hours:
        frames.create_index("ins", expireAfterSeconds=int(frames_hours * 3600))
    else:
        frames.create_index("ins")
    frames.create_index([("sensor", 1), ("ins", 1)])               # analyser reader
    frames.create_index("ins")
    db[store.FLOWS].create_index("key")                            # analyser flows
    ttl = {"expireAfterSeconds": int(flows_hours * 3600)} if flows_hours else {}
    db[store.FLOWS].create_index("last_seen", **ttl)
    for keys in ("updated_at", [("status", 1), ("expires_at", 1)], [("client_ip", 1), ("flagged_at", 1)]):
        db[store.FLAGS].create_index(keys)                         # analyser flags, then the controller
    db[store.FLAGS].create_index("updated_at")
    db[store.FLAGS].create_index([("status", 1), ("expires_at", 1)])


@pytest.mark.parametrize("frames_hours,flows_hours", [(168, 720), (0, 0), (1, 0)])
def test_a_database_made_by_the_old_code_is_brought_to_the_declared_set(env, frames_hours, flows_hours):
    make, db, _commands = env
    fill(db)
    old_code_indexes(db, frames_hours, flows_hours)
    assert seen(db) != declared(make())
    cfg = make(frames_hours=24, flows_hours=48)
    changes = indexes.ensure_indexes(db, cfg)
    assert {(c.action, c.name) for c in changes} >= {("drop", "idx_frames_t0"), ("drop", "idx_frames_t1"),
                                                      ("create", "idx_frames_sensor_t1"),
                                                      ("create", "idx_flags_flagged_at")}
    assert seen(db) == declared(cfg)
    assert counts(db) == (20, 20)
    assert indexes.ensure_indexes(db, cfg) == []


def test_an_index_that_is_not_pisnoops_is_left_alone(env):
    """An operator's own index (keys no pisnoop version uses) survives every ensure, also a retention change."""
    make, db, commands = env
    indexes.ensure_indexes(db, make(frames_hours=1))
    db[store.FRAMES].create_index([("run", 1)])
    theirs = {ix["name"] for ix in db[store.FRAMES].list_indexes()} - {s.name for s in indexes.INDEXES} - {"_id_"}
    assert len(theirs) == 1
    commands.sent.clear()
    assert indexes.ensure_indexes(db, make(frames_hours=1)) == []
    assert not CHANGING & set(commands.sent)
    assert [c.action for c in indexes.ensure_indexes(db, make(frames_hours=2))] == ["ttl"]
    assert theirs <= {ix["name"] for ix in db[store.FRAMES].list_indexes()}
    assert indexes.plan(store.FRAMES, [ix("run_1", [("run", 1)]), ix("t0_1", [("t0", 1)])], RETENTION)[0] == \
        indexes.Change("drop", store.FRAMES, "t0_1")


def test_capture_and_enforcement_go_on_when_the_store_refuses_indexes(embedded_store, caplog):
    """A user without the createIndex right (real MongoDB: Unauthorized, code 13) must not stop storing frames;
    a store that cannot be reached still raises, so the caller's retry path runs."""
    from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

    cfg = config.from_dict({"mongodb": {"uri": embedded_store.uri, "database": "t" + uuid.uuid4().hex[:10]}})

    class Refusing:
        def __getitem__(self, name):
            return self

        def list_indexes(self):
            raise OperationFailure("not authorized on pisnoop to execute command createIndexes", code=13)

    with caplog.at_level("ERROR", logger="pisnoop.test"):
        assert indexes.ensure_or_go_on(Refusing(), cfg, logging.getLogger("pisnoop.test")) is False
    assert [r.getMessage() for r in caplog.records if "refused to set up the indexes" in r.getMessage()] != []
    assert "code 13" in caplog.records[-1].getMessage()

    db = MongoClient(embedded_store.uri, tz_aware=True)[cfg.mongodb.database]
    assert indexes.ensure_or_go_on(db, cfg, logging.getLogger("pisnoop.test")) is True
    assert seen(db) == declared(cfg)
    db.client.drop_database(cfg.mongodb.database)
    away = MongoClient(f"mongodb://127.0.0.1:{procs.free_port()}", serverSelectionTimeoutMS=300)["x"]
    with pytest.raises(ServerSelectionTimeoutError):
        indexes.ensure_or_go_on(away, cfg, logging.getLogger("pisnoop.test"))


# --- nobody else touches indexes ----------------------------------------------------------------

INDEX_CALL = re.compile(r"\b(create_index|drop_index)(es)?\s*\(|\b(createIndexes|dropIndexes|collMod)\b")


def test_only_appliance_indexes_creates_or_drops_indexes():
    sources = [p for p in REPO.rglob("*.py")
               if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
               and p.relative_to(REPO).parts[0] != "tests"]
    callers = {str(p.relative_to(REPO)) for p in sources if INDEX_CALL.search(p.read_text(encoding="utf-8"))}
    assert callers == {"appliance/indexes.py"}


def test_every_per_sensor_query_has_an_index_leading_with_its_keys():
    """The fleet's queries (docs/FLEET.md): each clause of a controller's or analyser's ``$or`` and each per-sensor
    read has a declared index whose keys start with the clause's equality field, then the rest of the query."""
    declared = {(ix.collection, ix.keys) for ix in indexes.INDEXES}
    need = [(store.FLAGS, (("sensor", 1), ("updated_at", 1))), (store.FLAGS, (("scope", 1), ("updated_at", 1))),
            (store.FLAGS, (("sensor", 1), ("status", 1), ("expires_at", 1))),
            (store.FLAGS, (("scope", 1), ("status", 1), ("expires_at", 1))),
            (store.FRAMES, (("sensor", 1), ("ins", 1))), (store.FRAMES, (("sensor", 1), ("t1", 1))),
            (store.FLOWS, (("sensor", 1), ("key", 1)))]
    assert [n for n in need if n not in declared] == []
    assert (store.FLOWS, (("key", 1),)) in indexes.LEGACY        # the flows index before flows were per sensor


def test_a_time_range_read_is_sorted_in_the_order_of_its_index():
    """No sort in memory (MongoDB 4.4 refuses one over 100 MB): the sort is a declared index's key, whose fields
    the filter uses too."""
    from analyser import reader
    query, order = reader.range_query("site-a", 10**18, 2 * 10**18)
    keys = {ix.keys for ix in indexes.INDEXES if ix.collection == store.FRAMES}
    assert tuple(order) in keys
    assert set(query) <= {k for k, _ in order} | {"t0"} and list(query)[:2] == [k for k, _ in order]
