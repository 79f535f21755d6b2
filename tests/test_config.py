"""The config file: typed, immutable, validated on load, one-line refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from appliance import config
from tests.conftest import REPO, pisnoop

BAD = sorted((Path(__file__).parent / "configs" / "bad").glob("*.yaml"))
EXAMPLE = REPO / "appliance" / "pisnoop.example.yaml"
# files that cannot carry an "# expect:" comment
SPECIAL = {"32_not_utf8.yaml": "UTF-8"}


def expected_key(path: Path) -> str:
    if path.name in SPECIAL:
        return SPECIAL[path.name]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect:' line"
    return first[len("# expect: "):]


def test_corpus_is_large_enough():
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_exits_2_with_one_line_naming_the_key(path):
    res = pisnoop("check-config", str(path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(path) in lines[0]
    assert expected_key(path) in lines[0]
    assert "expected" in lines[0]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_raises_config_error_in_process(path):
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert expected_key(path) in str(info.value)


def test_missing_file_is_exit_2(tmp_path):
    res = pisnoop("check-config", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    assert "nope.yaml" in res.stderr and "existing config file" in res.stderr


def test_example_config_is_valid_and_equals_the_defaults():
    res = pisnoop("check-config", str(EXAMPLE))
    assert res.returncode == 0, res.stderr
    assert config.load(EXAMPLE) == config.Config()


def test_empty_file_means_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert config.load(f) == config.Config()


def test_values_are_typed_and_immutable(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("switch:\n  datapath_id: '0xbeef'\n  target: zodiacfx\n  ports: {management: 4}\n"
                 "snooper:\n  dedupe_window: 0\n")
    cfg = config.load(f)
    assert cfg.switch.datapath_id == 0xBEEF
    assert cfg.switch.target == "zodiacfx"
    assert isinstance(cfg.snooper.dedupe_window, float) and cfg.snooper.dedupe_window == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.switch.target = "ovs"  # type: ignore[misc]


def test_env_var_and_option_choose_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("xmpp: {threshold_ppm: 42}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("xmpp: {threshold_ppm: -1}\n")
    assert pisnoop("check-config", env={"PISNOOP_CONFIG": str(good)}).returncode == 0
    res = pisnoop("check-config", env={"PISNOOP_CONFIG": str(bad)})
    assert res.returncode == 2 and "xmpp.threshold_ppm" in res.stderr
    # --config wins over the environment
    res = pisnoop("--config", str(good), "check-config", env={"PISNOOP_CONFIG": str(bad)})
    assert res.returncode == 0, res.stderr
    res = pisnoop("check-config", "--print", str(good))
    assert "threshold_ppm: 42" in res.stdout


def test_round_trip_through_yaml():
    cfg = config.Config()
    assert config.from_dict(config.to_dict(cfg)) == cfg


# --- many appliances, one store ----------------------------------------------------------------------------------


def test_mongodb_read_preference_is_one_of_pymongos_and_a_refused_uri_shows_no_password():
    assert config.Config().mongodb.read_preference == "primary"
    cfg = config.from_dict({"mongodb": {"read_preference": "secondaryPreferred"}})
    assert cfg.mongodb.read_preference == "secondaryPreferred"
    with pytest.raises(config.ConfigError, match=r"mongodb.read_preference: got 'secondaries'; expected one of"):
        config.from_dict({"mongodb": {"read_preference": "secondaries"}})
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"mongodb": {"uri": "mongodb://pisnoop:hunter2 x@db1:27017/?replicaSet=rs0"}})
    assert "hunter2" not in str(err.value) and "mongodb://pisnoop:***@db1:27017" in str(err.value)
    good = config.from_dict({"mongodb": {"uri": "mongodb://pisnoop:hunter2@db1,db2,db3/?replicaSet=rs0&tls=true"
                                                "&w=majority&retryWrites=true&readPreference=primaryPreferred"}})
    assert "hunter2" in good.mongodb.uri          # the config holds it; only what is shown is masked


def test_the_policy_chooses_each_classifiers_flag_scope_and_the_flag_carries_it():
    import datetime as dt

    from analyser import flags as flags_mod
    from analyser import policy as policy_mod
    from analyser.classifiers import Verdict
    rule = {"pattern": "x", "server_port": 5223, "scope": "ip"}
    rules = [{**rule, "name": "r1"}, {**rule, "name": "r2", "flag_scope": "fleet"}]
    pol = policy_mod.from_dict({"xmpp_abuse": {"flag_scope": "fleet"}, "bandwidth_hog": {"enabled": True},
                                "payload_match": rules})
    built = policy_mod.build(pol, config.Config())
    assert [(c.name, c.flag_scope) for c in built] == [("xmpp_abuse", "fleet"), ("bandwidth_hog", "local"),
                                                       ("r1", "local"), ("r2", "fleet")]
    with pytest.raises(config.ConfigError, match=r"payload_match\[0\]\.flag_scope: got 'global'; expected one of "
                                                 r"'local', 'fleet'"):
        policy_mod.from_dict({"payload_match": [{**rule, "name": "r1", "flag_scope": "global"}]})
    with pytest.raises(config.ConfigError, match="custom_flag_scope"):
        policy_mod.from_dict({"custom_flag_scope": "all"})
    book = flags_mod.FlagBook(config.Config(), flags_mod.MemoryFlags(), "site-a")
    now = dt.datetime.now(dt.timezone.utc)
    for c in built[2:]:
        book.offer(Verdict("r", client_ip=f"10.0.0.{len(book.backend.docs) + 5}", server_port=5223), c, now)
    assert [(d["classifier"], d["scope"], d["sensor"]) for d in book.backend.docs] == [
        ("r1", "local", "site-a"), ("r2", "fleet", "site-a")]


# --- web: the dashboard's section ---------------------------------------------------------------------------------


def test_web_section_defaults_bind_to_loopback_with_no_login():
    w = config.Config().web
    assert (w.listen_host, w.password_hash) == ("127.0.0.1", None)
    assert 60 <= w.session_seconds <= 86400


@pytest.mark.parametrize("key, value, expected", [
    ("listen_host", "localhost", "an IPv4 or IPv6 address"),
    ("port", 0, "a TCP port from 1 to 65535"),
    ("session_seconds", 5, "seconds from 60 to 604800"),
    ("password_hash", "hunter2hunter2", "a hash from `pisnoop web --hash-password`"),
    ("password_hash", "scrypt$15$8$1$00$" + "0" * 64, "a hash from `pisnoop web --hash-password`"),
])
def test_bad_web_values_are_one_line_naming_the_key(key, value, expected, tmp_path):
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump({"web": {key: value}}))
    res = pisnoop("check-config", str(path))
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr.count("\n") == 1 and f"web.{key}: " in res.stderr and expected in res.stderr, res.stderr
    if key == "password_hash":
        assert value not in res.stderr, "a refused hash (maybe a password typed in by mistake) is never echoed"


def test_hash_password_prints_a_hash_the_config_takes_and_the_login_checks(tmp_path):
    from webui import auth
    res = pisnoop("web", "--hash-password", input="a long enough password\n")
    assert res.returncode == 0, res.stderr
    stored = res.stdout.strip()
    assert stored.startswith("scrypt$") and "a long enough" not in stored
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump({"web": {"password_hash": stored}}))
    assert config.load(path).web.password_hash == stored
    assert auth.verify_password("a long enough password", stored)
    assert not auth.verify_password("a long enough passworD", stored)
    again = pisnoop("web", "--hash-password", input="a long enough password\n").stdout.strip()
    assert again != stored and auth.verify_password("a long enough password", again), "salted: never the same"
    short = pisnoop("web", "--hash-password", input="short\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr


def test_pbkdf2_hashes_are_accepted_too(tmp_path):
    import hashlib

    from webui import auth
    salt = bytes(range(16))
    stored = f"pbkdf2_sha256$600000${salt.hex()}${hashlib.pbkdf2_hmac('sha256', b'pw-12345678', salt, 600000).hex()}"
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump({"web": {"password_hash": stored}}))
    assert config.load(path).web.password_hash == stored
    assert auth.verify_password("pw-12345678", stored) and not auth.verify_password("pw-12345679", stored)


def test_the_dashboard_refuses_to_start_without_a_login(tmp_path):
    path = tmp_path / "web.yaml"
    path.write_text("web:\n  port: 8099\n")
    res = pisnoop("--config", str(path), "web")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "web.password_hash: got None" in res.stderr, res
