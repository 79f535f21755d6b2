"""The provisioning files on their own: lint, syntax, unit verification, unit exposure.

The units are verified with ``systemd-analyze verify --root`` on a scratch
tree holding this machine's unit files plus ours and an executable where
the units expect ``/opt/pisnoop/venv/bin``: verify checks that the command
exists, and the host has no /opt/pisnoop (the container test verifies the
same units against the real install).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
UNITS = sorted((REPO / "systemd").glob("*.service"))
SERVICE_UNITS = ["pisnoop-controller.service", "pisnoop-snooper.service", "pisnoop-analyser.service"]
MAX_EXPOSURE = 2.0
BIN = Path(sys.executable).parent


def _ansible_env() -> dict:
    return dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1", NO_COLOR="1",
                PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")


def test_the_three_service_units_exist():
    names = [u.name for u in UNITS]
    for name in SERVICE_UNITS:
        assert name in names


def test_playbook_syntax_check():
    proc = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "site.yml"], cwd=ANSIBLE,
                          capture_output=True, text=True, env=_ansible_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr


def test_ansible_lint_production_profile():
    proc = subprocess.run([str(BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor"], cwd=ANSIBLE,
                          capture_output=True, text=True, env=_ansible_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unitroot")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    venv_bin = root / "opt/pisnoop/venv/bin"
    venv_bin.mkdir(parents=True)
    (root / "bin").mkdir()
    # bash: the store's ExecStartPost; kill: ExecReload=/bin/kill -HUP $MAINPID
    for exe in (venv_bin / "pisnoop", venv_bin / "nx-27017", root / "bin/bash", root / "bin/kill"):
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    return root


@pytest.mark.parametrize("unit", [u.name for u in UNITS])
def test_unit_verifies_silently(unit, verify_root):
    proc = subprocess.run(["systemd-analyze", "verify", f"--root={verify_root}", f"/etc/systemd/system/{unit}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr


def exposure(unit: Path) -> float:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    return float(m.group(1))


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_exposure_at_most_2(unit):
    level = exposure(unit)
    print(f"{unit.name}: exposure {level}")
    assert level <= MAX_EXPOSURE


@pytest.mark.parametrize("unit", [REPO / "systemd" / n for n in SERVICE_UNITS], ids=lambda u: u.name)
def test_service_unit_contract(unit):
    """Type=notify with a watchdog, restarts on failure, never root, ordered after OVS and the network."""
    text = unit.read_text()
    for line in ("Type=notify", "Restart=on-failure", "User=pisnoop", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+s?$", text, re.M)
    after = re.search(r"^After=(.*)$", text, re.M).group(1).split()
    assert "openvswitch-switch.service" in after and "network-online.target" in after
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M).group(1).split()
    assert caps == (["CAP_NET_RAW", "CAP_NET_ADMIN"] if "snooper" in unit.name else [])


def test_capture_comes_first_on_busy_cores():
    """Only the snooper is raised (Nice among processes, CPUWeight among units): its ring's drops are lost frames,
    the analyser's lag is caught up from the store."""
    for unit in SERVICE_UNITS:
        text = (REPO / "systemd" / unit).read_text()
        nice, weight = (re.findall(rf"^{k}=(-?\d+)$", text, re.M) for k in ("Nice", "CPUWeight"))
        if "snooper" in unit:
            assert [int(nice[0]), int(weight[0])] == [-5, 400], unit
        else:
            assert nice == weight == [], unit
