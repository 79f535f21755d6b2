"""Shared fixtures: the real virtual appliance, the embedded store, the CLI.

Every fixture that creates something removes it, and ``assert_gone`` checks
that a run left no namespace, link, daemon or directory behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import netns
from lab.virtual import VirtualAppliance

REPO = Path(__file__).resolve().parent.parent
PISNOOP = [sys.executable, "-m", "appliance.cli"]


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
    from appliance import store
    db = store.database(va.config.mongodb)
    yield db
    db.client.close()
