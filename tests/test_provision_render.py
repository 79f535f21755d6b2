"""The two files made from the playbook's variables, for both targets, without a host.

Renders ``pisnoop.yaml.j2`` and ``interfaces.d/pisnoop.j2`` with Ansible's
own template module on the control node (connection local, into a scratch
folder) from ``group_vars`` as the playbook sees them, then checks the YAML
with ``pisnoop check-config``: the ovs default and the Zodiac FX variant
(no OVS stanzas, controller on the switch-facing address, management port 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import pisnoop
from tests.container import recap

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent


def _ansible_env(**more: str) -> dict:
    """The environment of an Ansible command run here: the project's ansible.cfg, no colours, and ``more``."""
    return dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1", **more)


def render(tmp_path: Path, groups: list[str], extra: dict | None = None) -> tuple[str, str]:
    var_files = [f"@{ANSIBLE / 'group_vars' / g}.yml" for g in groups] + [f"@{ANSIBLE / 'roles/pisnoop/vars/main.yml'}"]
    (tmp_path / "extra.json").write_text(json.dumps({"pisnoop_source": str(REPO), **(extra or {})}))
    out = {}
    for name, src in (("pisnoop.yaml", ANSIBLE / "roles/pisnoop/templates/pisnoop.yaml.j2"),
                      ("interfaces", REPO / "interfaces.d/pisnoop.j2")):
        args = []
        for f in var_files:
            args += ["-e", f]
        proc = subprocess.run([str(BIN / "ansible"), "localhost", "-c", "local", "-m", "ansible.builtin.template",
                               "-a", f"src={src} dest={tmp_path / name} mode=0644", *args,
                               "-e", f"@{tmp_path / 'extra.json'}"],
                              capture_output=True, text=True, timeout=120, cwd=ANSIBLE,
                              env=_ansible_env(ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
                                               ANSIBLE_LOCALHOST_WARNING="False"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[name] = (tmp_path / name).read_text()
    return out["pisnoop.yaml"], out["interfaces"]


def test_ovs_default(tmp_path):
    conf, ifaces = render(tmp_path, ["all"], {"inventory_hostname": "pi4-snoop.lan"})
    check = pisnoop("check-config", str(tmp_path / "pisnoop.yaml"))
    assert check.returncode == 0, check.stderr
    data = yaml.safe_load(conf)
    assert data["switch"]["target"] == "ovs" and data["switch"]["controller"]["listen_host"] == "127.0.0.1"
    assert data["switch"]["ports"] == {"inside": 1, "mirror": 2, "upstream": 3, "management": None}
    assert data["snooper"]["interface"] == "mirror0" and data["snooper"]["sensor"] == "pi4-snoop-lan"
    assert "ovs_type OVSBridge" in ifaces and "fail_mode=secure" in ifaces and "protocols=OpenFlow13" in ifaces
    assert "set-controller ${IFACE} tcp:127.0.0.1:6653 -- set controller ${IFACE} max_backoff=1000" in ifaces
    assert "datapath-id=0000000000000001" in ifaces
    for iface, port in (("eth1", 1), ("eth3", 3), ("mirror0", 2)):
        assert f"iface {iface} inet" in ifaces and f"ofport_request={port}" in ifaces
    assert "address 169.254.77.1/16" in ifaces


def test_zodiacfx_variant(tmp_path):
    conf, ifaces = render(tmp_path, ["all", "pisnoop_zodiacfx"], {"inventory_hostname": "pi-zodiac"})
    check = pisnoop("check-config", str(tmp_path / "pisnoop.yaml"))
    assert check.returncode == 0, check.stderr
    data = yaml.safe_load(conf)
    assert data["switch"]["target"] == "zodiacfx"
    assert data["switch"]["controller"]["listen_host"] == "10.0.1.8"
    assert data["switch"]["ports"]["management"] == 4
    assert data["snooper"]["interface"] == "eth2"
    assert "ovs_" not in ifaces
    assert "iface eth1 inet static\n    address 10.0.1.8/24" in ifaces
    assert "iface eth2 inet static\n    address 169.254.77.1/16" in ifaces


def test_settings_merge_over_generated_keys(tmp_path):
    conf, _ = render(tmp_path, ["all"], {"inventory_hostname": "x",
                                        "pisnoop_settings": {"xmpp": {"threshold_ppm": 200},
                                                             "enforce": {"action": "limit"},
                                                             "snooper": {"snaplen": 256}}})
    data = yaml.safe_load(conf)
    assert data["xmpp"] == {"threshold_ppm": 200} and data["enforce"] == {"action": "limit"}
    assert data["snooper"]["snaplen"] == 256 and data["snooper"]["interface"] == "mirror0"  # merged, not replaced
    assert pisnoop("check-config", str(tmp_path / "pisnoop.yaml")).returncode == 0


def test_bad_setting_is_refused_by_check_config(tmp_path):
    render(tmp_path, ["all"], {"inventory_hostname": "x",
                               "pisnoop_settings": {"xmpp": {"server_ports": [5222, 70000]}}})
    check = pisnoop("check-config", str(tmp_path / "pisnoop.yaml"))
    assert check.returncode == 2
    assert "xmpp.server_ports[1]: got 70000; expected a TCP port from 1 to 65535" in check.stderr


@pytest.mark.parametrize("check_mode", [False, True])
def test_a_bad_setting_fails_the_play_on_the_control_node_before_any_task_reaches_the_host(tmp_path, check_mode):
    """site.yml's first task checks the config the play would write with this checkout's check-config, on the
    control node (in a --check run too). The host here cannot be reached (a PID that cannot exist, for the nsenter
    connection): a bad setting fails the play with no attempt on it; a good one passes the check, and then the
    play's first task on the host finds it unreachable."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    (tmp_path / "inventory.ini").write_text(f"[pisnoop]\nnowhere ansible_host={pid_max + 1} "
                                            "ansible_connection=nsenter ansible_python_interpreter=/usr/bin/python3\n")

    def play(settings: dict) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.ini"), "site.yml",
                               *(["--check"] if check_mode else []),
                               "-e", json.dumps({"pisnoop_settings": settings})],
                              capture_output=True, text=True, timeout=300, cwd=ANSIBLE,
                              env=_ansible_env(ANSIBLE_GATHERING="explicit", ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
                                               PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"))
    bad = play({"xmpp": {"server_ports": [5222, 70000]}})
    assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-2000:]
    assert "xmpp.server_ports[1]: got 70000; expected a TCP port from 1 to 65535" in bad.stdout, bad.stdout[-3000:]
    assert recap(bad.stdout) == {"ok": 3, "changed": 0, "unreachable": 0, "failed": 1}, bad.stdout[-3000:]
    good = play({"xmpp": {"server_ports": [5222, 5223]}})
    counts = recap(good.stdout)
    assert good.returncode == 4 and counts["unreachable"] == 1 and counts["failed"] == 0, good.stdout[-3000:]
    assert "TASK [base : Install the base packages]" in good.stdout.split("UNREACHABLE!")[0], good.stdout[-3000:]
