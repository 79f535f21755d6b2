"""A ``mongodb.uri`` with credentials: the services work through it, and its password shows nowhere.

nx-27017 has no authentication (it answers ``saslStart`` without a payload), so the store sits behind the
lab's SCRAM front (``lab/authproxy.py``: MongoDB's SCRAM-SHA-1/256 conversation, unauthenticated commands
refused with code 13). One appliance runs its three services with the password in its URI and
``read_preference: secondaryPreferred``; then every output of the run is searched for the password: each
command's stdout and stderr (check-config --print, a refused config, a wrong password, a store away, status,
status --fleet, flags, report), every file the run left (the services' logs, the store's log), every document
in the store.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import bson
import yaml
from pymongo.read_preferences import ReadPreference

from appliance import config as config_mod
from appliance import store
from appliance.redact import redact
from lab import scenario
from lab.authproxy import AuthProxy
from lab.virtual import VirtualAppliance
from tests.conftest import REPO, assert_gone, pisnoop
from tests.ctlutil import start_echo_server, tcp_client, wait_for

USER = "pisnoop"


def test_redact_masks_the_password_of_every_uri_form():
    assert redact("mongodb://u:p@h:1/db?replicaSet=rs0") == "mongodb://u:***@h:1/db?replicaSet=rs0"
    masked = "at mongodb+srv://u:***@c.example/?tls=true ok"
    assert redact("at mongodb+srv://u:p@ss%40x@c.example/?tls=true ok") == masked
    assert redact("got 'mongodb://u:a b@h/'; expected") == "got 'mongodb://u:***@h/'; expected"   # a refused URI
    assert redact("mongodb://h1,h2:27018/?w=majority") == "mongodb://h1,h2:27018/?w=majority"
    assert redact("mongodb://u@h/?authMechanism=MONGODB-X509") == "mongodb://u@h/?authMechanism=MONGODB-X509"
    assert redact("mongodb://h/?password=zz&w=1") == "mongodb://h/?password=***&w=1"
    # a raw '@' then '/' or '?' in a password (pymongo even takes the first as host 'ss'), secrets in options
    assert redact("mongodb://user:p@ss/w0rd@h/") == "mongodb://user:***@h/"
    assert redact("mongodb://user:p@ss?w0rd@h/?w=1") == "mongodb://user:***@h/?w=1"
    assert redact("mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN:tok123&w=1") == \
        "mongodb://h/?authMechanismProperties=***&w=1"
    assert redact("mongodb://h/?tlsCertificateKeyFilePassword=zz") == "mongodb://h/?tlsCertificateKeyFilePassword=***"
    two = "at mongodb://a:b@h:1/ and mongodb://c:d@k/ ok"
    assert redact(two) == "at mongodb://a:***@h:1/ and mongodb://c:***@k/ ok"


def test_flags_are_written_with_majority_and_read_from_the_primary_frames_as_configured(embedded_store):
    cfg = config_mod.from_dict({"mongodb": {"uri": embedded_store.uri, "read_preference": "secondaryPreferred"}})
    db = store.database(cfg.mongodb)
    try:
        flags = store.flags(db)
        assert flags.write_concern.document["w"] == "majority" and flags.write_concern.document["wtimeout"] >= 1000
        assert flags.read_preference == ReadPreference.PRIMARY
        assert store.frames_reader(db, cfg.mongodb).read_preference == ReadPreference.SECONDARY_PREFERRED
        fid = flags.insert_one({"probe": 1}).inserted_id       # a standalone (nx-27017) takes w: majority too
        assert flags.find_one({"_id": fid})["probe"] == 1
        flags.delete_one({"_id": fid})
    finally:
        db.client.close()


def test_a_password_in_the_uri_works_and_reaches_no_log_status_document_error_or_printout(embedded_store, tmp_path):
    password = "pw-" + secrets.token_hex(8)
    with AuthProxy(embedded_store.port, USER, password) as proxy:
        uri = proxy.uri(password)
        base = scenario.service_config(settings={"mongodb": {"database": "a" + secrets.token_hex(5),
                                                             "read_preference": "secondaryPreferred"}})
        va = VirtualAppliance(base, prefix="pf" + secrets.token_hex(2), store_uri=uri)
        outputs: list[str] = []
        services = None
        with va:
            assert va.config.mongodb.uri == uri and password in va.config_path.read_text()
            services = scenario.ServiceSet(va)
            echo = start_echo_server(va, 5222)
            try:
                for name in ("controller", "snooper", "analyser"):
                    services.start(name)
                db = store.database(va.config.mongodb)
                sensor = va.config.snooper.sensor
                assert tcp_client(va, "10.0.0.10", 5222, n=5)["ok"] == 5
                assert wait_for(lambda: (db[store.STATUS].find_one({"_id": f"analyser:{sensor}"}) or {})
                                .get("counters", {}).get("frames", 0) > 0, 20, 0.3), services.log_tail("analyser")
                assert wait_for(lambda: db[store.STATUS].count_documents({}) == 3, 10, 0.3)
                assert proxy.accepted >= 3 and proxy.refused == 0      # every service authenticated

                cfgp = str(va.config_path)
                runs = [pisnoop("--config", cfgp, "check-config", "--print"),
                        pisnoop("--config", cfgp, "status"), pisnoop("--config", cfgp, "status", "--fleet"),
                        pisnoop("--config", cfgp, "flags", "ban", "10.0.0.99", "--fleet"),
                        pisnoop("--config", cfgp, "flags", "list", "--all-sensors"),
                        pisnoop("--config", cfgp, "report", "--since", "10m", "-o", str(tmp_path))]
                printed = runs[0].stdout
                assert runs[0].returncode == 0 and f"{USER}:***@" in printed
                assert [r.returncode for r in runs[1:]] == [0, 0, 0, 0, 0], [r.stderr for r in runs]
                wrong = _variant(va, tmp_path / "wrong.yaml", uri.replace(password, "not-" + password))
                away = _variant(va, tmp_path / "away.yaml",
                                f"mongodb://{USER}:{password}@127.0.0.1:{_closed_port()}/?authSource=admin")
                bad = _variant(va, tmp_path / "bad.yaml", uri.replace("@", " @"))
                badopt = _variant(va, tmp_path / "badopt.yaml", uri + "&tls=true&ssl=false")
                errs = [pisnoop("--config", str(wrong), "flags", "list"), pisnoop("--config", str(away), "status"),
                        pisnoop("--config", str(away), "flags", "list"),
                        pisnoop("--config", str(bad), "check-config"),
                        pisnoop("--config", str(badopt), "flags", "list")]
                assert [r.returncode for r in errs] == [1, 1, 1, 2, 2], [(r.returncode, r.stderr) for r in errs]
                assert "Authentication failed" in errs[0].stderr and f"{USER}:***@" in errs[3].stderr, errs
                assert f"mongodb.uri mongodb://{USER}:***@" in errs[4].stderr and "conflicting" in errs[4].stderr
                assert [len(r.stderr.strip().splitlines()) for r in errs] == [1, 0, 1, 1, 1], [r.stderr for r in errs]
                assert f"UNREACHABLE at mongodb://{USER}:***@127.0.0.1:" in errs[1].stdout, errs[1].stdout
                assert proxy.refused >= 1
                runs += errs
                docs = [d for c in db.list_collection_names() for d in db[c].find()]
                assert any(d.get("_id") == f"controller:{sensor}" for d in docs)
                outputs += [r.stdout + r.stderr for r in runs]
                db.client.close()
            finally:
                problems = services.stop() if services else []
                echo.kill()
                echo.wait()
            assert not problems, problems
            files = [p for p in va.run_dir.rglob("*") if p.is_file() and p != va.config_path and not p.is_socket()]
            files += [p for p in Path(embedded_store.data_dir).glob("*.log")]
            assert any(p.name == "analyser.log" for p in files) and any(p.name == "controller.log" for p in files)
            found = [str(p) for p in files if password.encode() in p.read_bytes()]
            found += [f"output {i}" for i, text in enumerate(outputs) if password in text]
            found += [f"document {d.get('_id')}" for d in docs if password.encode() in bson.encode(d)]
            assert not found, found
            assert len(docs) >= 4 and all(outputs)
        assert_gone(va)


def _variant(va, path: Path, uri: str) -> Path:
    data = yaml.safe_load(va.config_path.read_text())
    data["mongodb"]["uri"] = uri
    data["mongodb"]["timeout_ms"] = 500
    path.write_text(yaml.safe_dump(data))
    return path


def _closed_port() -> int:
    from lab.procs import free_port
    return free_port()


def test_the_config_file_is_readable_by_root_and_the_service_user_only():
    """The playbook writes /etc/pisnoop/pisnoop.yaml (it holds mongodb.uri's credentials) root:pisnoop 0640."""
    tasks = yaml.safe_load((REPO / "ansible/roles/pisnoop/tasks/main.yml").read_text())
    [task] = [t for t in tasks if t.get("ansible.builtin.template", {}).get("dest") == "/etc/pisnoop/pisnoop.yaml"]
    t = task["ansible.builtin.template"]
    assert (t["owner"], t["group"], t["mode"]) == ("root", "pisnoop", "0640")
    assert task["diff"] is False            # ansible-playbook --diff would print the password otherwise
    units = [(REPO / "systemd" / f"pisnoop-{n}.service").read_text() for n in ("controller", "snooper", "analyser")]
    assert all("User=pisnoop" in u for u in units)
