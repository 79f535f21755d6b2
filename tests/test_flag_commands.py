"""``pisnoop flags list | ban | release | allow`` through the real command line and the embedded store."""

from __future__ import annotations

import datetime as dt
import json
import socket

import pytest
import yaml

from appliance import flagdoc, store
from tests.conftest import pisnoop

V6NET = "fd70:6973:6e00:1::/64"      # not this machine's prefix: its own addresses are never banned


def run(path, *args):
    return pisnoop("--config", str(path), "flags", *args, timeout=60)


def flags_of(db):
    return [flagdoc.parse(d) for d in db[store.FLAGS].find().sort(flagdoc.FLAGGED_AT, 1)]


def one_line(r) -> str:
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip()


def with_config(path, **over):
    doc = yaml.safe_load(path.read_text())
    for key, value in over.items():
        doc.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_ban_with_defaults_writes_a_manual_flag_and_list_shows_it(store_config):
    path, db = store_config
    before = dt.datetime.now(dt.timezone.utc)
    r = run(with_config(path, xmpp={"server_ports": [5222, 5223]}), "ban", "10.0.0.10")
    assert r.returncode == 0, r.stderr
    [f] = flags_of(db)
    assert (f.client_ip, f.client_port, f.protocol, f.server_ports, f.direction, f.action, f.status, f.origin,
            f.classifier, f.ban_seconds, f.offence) == \
        ("10.0.0.10", None, "tcp", (5222, 5223), "outbound", "drop", "flagged", "manual", "manual", 300, 1)
    assert before <= f.flagged_at and f.expires_at == f.flagged_at + dt.timedelta(seconds=300)
    assert f"flag {f.id}" in r.stdout and "by drop for 300 s" in r.stdout
    r = run(path, "list")
    assert r.returncode == 0 and "10.0.0.10" in r.stdout and "tcp/5222,5223" in r.stdout and "manual" in r.stdout
    r = run(path, "list", "--json")
    [row] = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["id"] == str(f.id) and row["client_ip"] == "10.0.0.10" and row["origin"] == "manual"


def test_ban_of_every_scope_and_option(store_config):
    path, db = store_config
    assert run(path, "ban", V6NET, "--port", "3478", "--port", "53", "--protocol", "udp", "--inbound", "--for", "10m",
               "--action", "limit", "--reason", "TURN flood").returncode == 0
    assert run(path, "ban", "02-00-00-00-00-AA", "--for", "1.5s").returncode == 0
    assert run(path, "ban", "[FD70:6973:6e00:1::10]:40000", "--port", "5223").returncode == 0
    assert run(path, "ban", "10.0.0.11:40001", "--for", "2h").returncode == 0
    p, m, c, a = flags_of(db)
    assert (p.client_ip, p.scope, p.protocol, p.server_ports, p.direction, p.action, p.ban_seconds, p.reason) == \
        (V6NET, "prefix", "udp", (53, 3478), "inbound", "limit", 600, "TURN flood")
    assert (m.client_mac, m.client_ip, m.scope, m.ban_seconds) == ("02:00:00:00:00:aa", None, "host", 2)
    assert (c.client_ip, c.client_port, c.scope, c.server_ports) == ("fd70:6973:6e00:1::10", 40000, "connection",
                                                                      (5223,))
    assert (a.client_ip, a.client_port, a.ban_seconds) == ("10.0.0.11", 40001, 7200)
    listing = run(path, "list", "--all").stdout   # the 2 s MAC ban may be over by now
    for text in (V6NET, "02:00:00:00:00:aa", "[fd70:6973:6e00:1::10]:40000", "udp/53,3478", "inbound"):
        assert text in listing


@pytest.mark.parametrize("args,expected", [
    (["nonsense"], "client 'nonsense'"),
    (["10.0.0.0/8"], "at least /16"),
    (["10.0.0.1/24"], "without host bits"),
    (["10.0.0.10", "--port", "0"], "--port '0'"),
    (["10.0.0.10", "--port", "x"], "--port 'x'"),
    (["10.0.0.10"] + [a for p in range(1, 10) for a in ("--port", str(p))], "server_ports"),
    (["10.0.0.10", "--port", "5", "--port", "5"], "server_ports"),
    (["10.0.0.10", "--for", "5x"], "--for '5x'"),
    (["10.0.0.10", "--for", "0s"], "at least 1 s"),
    (["10.0.0.10", "--protocol", "icmp"], "protocol 'icmp'"),
    (["10.0.0.10", "--action", "block"], "action 'block'"),
    (["02:00:00:00:00:aa", "--inbound"], "direction 'inbound'"),
    (["10.0.0.0/24:80"], "client '10.0.0.0/24:80'"),
])
def test_ban_refuses_a_bad_argument_in_one_line_before_asking_the_store(store_config, args, expected):
    path, db = store_config
    r = run(path, "ban", *args)
    assert r.returncode == 2 and expected in one_line(r), r.stderr
    assert db[store.FLAGS].count_documents({}) == 0


def test_ban_of_a_never_ban_subject_is_recorded_exempt_and_exits_2(store_config):
    path, db = store_config
    with_config(path, enforce={"never_ban": ["10.0.0.0/29"]})
    r = run(path, "ban", "10.0.0.5")
    assert r.returncode == 2 and "never-ban list" in one_line(r) and "enforce.never_ban" in r.stderr
    assert run(path, "allow", "fd70:6973:6e00:1::1", "--reason", "the XMPP server").returncode == 0
    r = run(path, "ban", V6NET)                              # the prefix holds the server: as harmful
    assert r.returncode == 2 and "the XMPP server" in one_line(r)
    assert run(path, "ban", "10.0.0.8").returncode == 0      # just outside the /29
    got = [(f.subject, f.status, f.exempt_reason) for f in flags_of(db)]
    assert got == [("10.0.0.5", "exempt", "10.0.0.0/29 (enforce.never_ban)"),
                   (V6NET, "exempt", "fd70:6973:6e00:1::1 (flags allow: the XMPP server)"),
                   ("10.0.0.8", "flagged", None)]
    assert "10.0.0.5" not in run(path, "list").stdout and "exempt" in run(path, "list", "--all").stdout


def test_release_by_id_subject_prefix_mac_and_connection(store_config):
    path, db = store_config
    for subject in ("10.0.0.10", "10.0.0.10:40000", "10.0.0.11", V6NET, "02:00:00:00:00:aa", "10.0.0.12:5000"):
        assert run(path, "ban", subject).returncode == 0
    ids = {f.subject: str(f.id) for f in flags_of(db)}
    r = run(path, "release", ids["10.0.0.11"])
    assert r.returncode == 0 and ids["10.0.0.11"] in r.stdout
    assert run(path, "release", "10.0.0.10").stdout.startswith("released 2 flag(s)")   # the address and its connection
    assert run(path, "release", V6NET).returncode == 0
    assert run(path, "release", "02:00:00:00:00:AA").returncode == 0
    assert run(path, "release", "10.0.0.12:5001").returncode == 1                   # another connection
    assert run(path, "release", "10.0.0.12:5000").returncode == 0
    assert {f.subject: f.status for f in flags_of(db)} == {s: "released" for s in ids}
    assert all(f.released_at is not None for f in flags_of(db))
    r = run(path, "release", ids["10.0.0.11"])
    assert r.returncode == 1 and one_line(r) == f"pisnoop: no active flag for {ids['10.0.0.11']}"
    r = run(path, "release", "not-a-client")
    assert r.returncode == 2 and "client 'not-a-client'" in one_line(r)
    assert "no active flags" in run(path, "list").stdout


def test_allow_list_and_remove(store_config):
    path, db = store_config
    with_config(path, enforce={"never_ban": ["192.0.2.0/24"], "never_ban_self": False})
    assert run(path, "ban", "10.0.5.5").returncode == 0
    r = run(path, "allow", "10.0.5.0/24", "--reason", "lab hosts")
    assert r.returncode == 0 and "1 active flag(s) on it are no longer enforced" in r.stdout
    assert db[store.NEVER_BAN].find_one({"_id": "10.0.5.0/24"})["reason"] == "lab hosts"
    assert run(path, "allow", "10.0.5.0/24", "--reason", "again").returncode == 0      # one entry per network
    assert db[store.NEVER_BAN].count_documents({}) == 1
    r = run(path, "allow", "--list")
    assert r.stdout.splitlines() == ["192.0.2.0/24 (enforce.never_ban)", "10.0.5.0/24 (flags allow: again)"]
    r = run(path, "allow", "--remove", "192.0.2.0/24")
    assert r.returncode == 2 and "enforce.never_ban" in one_line(r)
    assert run(path, "allow", "--remove", "10.0.5.0/24").returncode == 0
    r = run(path, "allow", "--remove", "10.0.5.0/24")
    assert r.returncode == 1 and "not on the stored never-ban list" in one_line(r)
    for bad, text in ((["10.0.5.1/24"], "without host bits"), (["nope"], "'nope'"), ([], "exactly one of"),
                      (["10.0.0.1", "--list"], "exactly one of")):
        r = run(path, "allow", *bad)
        assert r.returncode == 2 and text in one_line(r), r.stderr


def test_every_flags_command_exits_1_in_one_line_when_the_store_is_away(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "away.yaml"
    path.write_text(yaml.safe_dump({"mongodb": {"uri": f"mongodb://127.0.0.1:{port}", "timeout_ms": 200},
                                    "metrics": {"enabled": False}}))
    for args in (["list"], ["ban", "10.0.0.10"], ["release", "10.0.0.10"], ["allow", "10.0.0.10"],
                 ["allow", "--list"]):
        r = run(path, *args)
        assert r.returncode == 1 and "did not answer" in one_line(r), (args, r.stderr)
