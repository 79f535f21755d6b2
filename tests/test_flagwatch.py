"""The controller's flag poll against the real embedded store: what another writer's clock does to it.

Flags are stamped (``updated_at``) by whoever writes them: this sensor's
analyser, another sensor's, an operator's ``flags ban`` on a laptop. A poll
that only read what is newer than the newest stamp it had seen would never
see a fleet ban from a machine whose clock is a few seconds behind.
"""

from __future__ import annotations

import datetime as dt

from appliance import config, flagdoc, store
from static_controller import flagwatch


def flag(sensor: str, ip: str, at: dt.datetime, scope: str = flagdoc.LOCAL) -> dict:
    doc = flagdoc.build(client_ip=ip, server_ports=[5222], classifier="xmpp_abuse", reason="test", action="drop",
                        evidence={}, offence=1, ban_seconds=3600, flagged_at=at, sensor=sensor, scope=scope)
    doc["_id"] = f"{sensor}-{ip}"
    return doc


def test_a_fleet_ban_stamped_by_a_clock_behind_is_enforced_and_nothing_is_handed_on_twice(store_config):
    path, db = store_config
    cfg = config.load(path)
    cfg = config.from_dict({**config.to_dict(cfg), "snooper": {**config.to_dict(cfg)["snooper"], "sensor": "a"}})
    posted = []
    watcher = flagwatch.FlagWatcher(cfg, posted.append, "controller:a")
    now = flagwatch.utcnow()
    flags = db[store.FLAGS]
    flags.insert_one(flag("a", "10.0.0.5", now))                       # A's own analyser, A's clock
    watcher._once(db)                                                   # the snapshot
    assert posted[-1].snapshot and [d["_id"] for d in posted[-1].docs] == ["a-10.0.0.5"]
    flags.insert_one(flag("a", "10.0.0.6", now + dt.timedelta(seconds=1)))
    watcher._once(db)
    assert [d["_id"] for d in posted[-1].docs] == ["a-10.0.0.6"]        # only what changed since
    # B's analyser, its clock 3 s behind A's: a fleet ban and one of its own (local: not A's)
    behind = now - dt.timedelta(seconds=3)
    flags.insert_many([flag("b", "10.0.0.7", behind, flagdoc.FLEET), flag("b", "10.0.0.8", behind)])
    n = len(posted)
    watcher._once(db)
    assert len(posted) == n + 1 and [d["_id"] for d in posted[-1].docs] == ["b-10.0.0.7"]
    watcher._once(db)
    assert len(posted) == n + 1, "the same documents were handed on again"
    # B releases its fleet ban, still 3 s behind: lifted at A too
    flags.replace_one({"_id": "b-10.0.0.7"}, flagdoc.ended(flags.find_one({"_id": "b-10.0.0.7"}), flagdoc.RELEASED,
                                                            behind + dt.timedelta(seconds=1)))
    watcher._once(db)
    assert len(posted) == n + 2
    assert [(d["_id"], d["status"]) for d in posted[-1].docs] == [("b-10.0.0.7", flagdoc.RELEASED)]


def test_a_change_that_kept_its_stamp_is_handed_on_too(store_config):
    """A writer that changes a flag without bumping updated_at (a hand edit in the shell) is still seen."""
    path, db = store_config
    posted = []
    watcher = flagwatch.FlagWatcher(config.load(path), posted.append, "controller:x")
    now = flagwatch.utcnow()
    db[store.FLAGS].insert_one(flag(watcher.sensor, "10.0.0.9", now))
    watcher._once(db)
    watcher._once(db)
    n = len(posted)
    db[store.FLAGS].update_one({"_id": f"{watcher.sensor}-10.0.0.9"}, {"$set": {"status": flagdoc.RELEASED}})
    watcher._once(db)
    assert len(posted) == n + 1 and [d["status"] for d in posted[-1].docs] == [flagdoc.RELEASED]


def test_an_address_this_machine_gains_or_loses_is_handed_to_the_core_at_the_next_poll(store_config):
    """The controller's never-ban list holds this machine's addresses as they are now (never_ban_self): a change
    is handed on with the never-ban entries at the next poll, once; no change, nothing handed on."""
    from tests.netutil import address_of_this_machine
    path, db = store_config
    watcher = flagwatch.FlagWatcher(config.load(path), (posted := []).append, "controller:a")
    mine = "198.51.100.78"
    watcher._once(db)
    assert posted[-1].snapshot and mine not in posted[-1].own
    watcher._once(db)
    assert len(posted) == 1
    with address_of_this_machine(mine):
        watcher._once(db)
        assert len(posted) == 2 and not posted[-1].snapshot and posted[-1].never_ban == ()
        assert set(posted[-1].own) - set(posted[0].own) == {mine}
        watcher._once(db)
        assert len(posted) == 2
    watcher._once(db)
    assert len(posted) == 3 and posted[-1].own == posted[0].own
