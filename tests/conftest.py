"""Shared fixtures: the real virtual appliance, the embedded store, a config for it, the CLI.

Every fixture that creates something removes it, and ``assert_gone`` checks
that a run left no namespace, link, daemon or directory behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from appliance import config, netns, store
from lab import procs
from lab.virtual import VirtualAppliance

REPO = Path(__file__).resolve().parent.parent
PISNOOP = [sys.executable, "-m", "appliance.cli"]


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """SIGTERM (`timeout`, a CI runner giving up) ends the run like Ctrl-C: pytest then tears the fixtures down,
    so no embedded store, appliance or container outlives it."""
    signal.signal(signal.SIGTERM, _interrupt)


def pisnoop(*args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the real ``pisnoop`` command line."""
    full_env = dict(os.environ)
    full_env.pop("PISNOOP_CONFIG", None)
    if env:
        full_env.update(env)
    return subprocess.run([*PISNOOP, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(REPO), **kw)


def assert_gone(va: VirtualAppliance) -> None:
    """Nothing of this run remains: namespaces, links, daemons, run directory."""
    assert not va.run_dir.exists(), f"{va.run_dir} left behind"
    left_ns = [ns for ns in netns.list_namespaces() if ns.startswith(va.prefix)]
    assert not left_ns, f"namespaces left: {left_ns}"
    links = [link for link in os.listdir("/sys/class/net") if link.startswith(va.prefix)]
    assert not links, f"links left: {links}"
    for name, pid in va.state["pids"].items():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert str(va.run_dir).encode() not in cmd and va.prefix.encode() not in cmd, f"{name} pid {pid} still runs"


@pytest.fixture
def va():
    """A fresh virtual appliance with the embedded store, torn down after the test."""
    appliance = VirtualAppliance()
    with appliance:
        yield appliance
    assert_gone(appliance)


@pytest.fixture
def store_db(va):
    """A pymongo database on the virtual appliance's embedded store."""
    db = store.database(va.config.mongodb)
    yield db
    db.client.close()


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory):
    """An embedded store of its own for one test module (no namespaces needed)."""
    es = procs.EmbeddedStore(tmp_path_factory.mktemp("store") / "store").start()
    yield es
    es.stop()


@pytest.fixture
def store_config(embedded_store, tmp_path):
    """``(config path, db)``: a config naming a fresh database on ``embedded_store``, its spool and reports under
    ``tmp_path``, metrics off; the database is dropped afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    path = tmp_path / "pisnoop.yaml"
    path.write_text(yaml.safe_dump({"mongodb": {"uri": embedded_store.uri, "database": name},
                                    "snooper": {"spool_dir": str(tmp_path / "spool")},
                                    "analyser": {"report_dir": str(tmp_path / "reports")},
                                    "metrics": {"enabled": False}}))
    db = store.database(config.load(path).mongodb)
    yield path, db
    db.client.drop_database(name)
    db.client.close()
