"""The image's first boot (image/pisnoop-firstboot) against a root folder, and the image scripts' syntax.

The first-boot step runs with ``PISNOOP_FIRSTBOOT_ROOT`` pointing at a
folder laid out like the image (the playbook's config, /etc/hosts, the
firmware partition's pisnoop.txt): it writes there and records the
commands it would run. Building the image and booting it under
qemu-system-aarch64 take far longer than the suite may: image/build.sh and
image/qemu-boot.sh, run by hand (image/README.md has the measured times).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

FIRSTBOOT = REPO / "image" / "pisnoop-firstboot"
# the keys the playbook writes (roles/pisnoop/vars/main.yml), as the image has them
IMAGE_CONFIG = {
    "switch": {"target": "ovs", "datapath_id": 1, "bridge": "ovsbr0",
               "ports": {"inside": 1, "mirror": 2, "upstream": 3, "management": None},
               "controller": {"listen_host": "127.0.0.1", "listen_port": 6653, "max_backoff_ms": 1000}},
    "snooper": {"interface": "mirror0", "sensor": "pisnoop", "spool_dir": "/var/lib/pisnoop/spool"},
    "analyser": {"report_dir": "/var/lib/pisnoop/reports"},
    "mongodb": {"uri": "mongodb://127.0.0.1:27017", "database": "pisnoop"},
}


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "root"
    for d in ("boot/firmware", "etc/pisnoop", "etc/ssh", "etc/network/interfaces.d", "var/lib", "root"):
        (root / d).mkdir(parents=True)
    (root / "etc/pisnoop/pisnoop.yaml").write_text(yaml.safe_dump(IMAGE_CONFIG, sort_keys=False))
    (root / "etc/pisnoop/pisnoop.yaml").chmod(0o640)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tpisnoop\n")
    (root / "etc/hostname").write_text("pisnoop\n")
    return root


def firstboot(root: Path, settings: str | None) -> subprocess.CompletedProcess:
    if settings is not None:
        (root / "boot/firmware/pisnoop.txt").write_text(settings)
    env = dict(os.environ, PISNOOP_FIRSTBOOT_ROOT=str(root), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(FIRSTBOOT)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def commands(root: Path) -> list[str]:
    path = root / "firstboot-commands"
    return path.read_text().splitlines() if path.exists() else []


def test_defaults_without_a_settings_file(image_root):
    out = firstboot(image_root, None).stdout
    assert "no " in out and "defaults" in out
    assert (image_root / "etc/network/interfaces.d/management").read_text().endswith(
        "auto eth0\niface eth0 inet dhcp\n")
    assert commands(image_root) == ["grow-root", "ssh-keygen -A"] or commands(image_root) == ["ssh-keygen -A",
                                                                                               "grow-root"]
    assert yaml.safe_load((image_root / "etc/pisnoop/pisnoop.yaml").read_text()) == IMAGE_CONFIG  # untouched
    assert (image_root / "var/lib/pisnoop-firstboot/done").exists()


def test_static_address_host_name_remote_store_and_key(image_root):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZ0ZXN0a2V5 admin@laptop"
    firstboot(image_root, "# the lab Pi\nhostname=snoop-7\nmanagement=192.168.50.7/24  # static\n"
                          "gateway=192.168.50.1\ndns=192.168.50.1, 9.9.9.9\n"
                          "store_uri=mongodb://store.lab:27017/?replicaSet=rs0\n"
                          f"ssh_authorized_key={key}\n")
    assert (image_root / "etc/network/interfaces.d/management").read_text().splitlines()[1:] == [
        "auto eth0", "iface eth0 inet static", "    address 192.168.50.7/24", "    gateway 192.168.50.1"]
    assert (image_root / "etc/resolv.conf").read_text() == "nameserver 192.168.50.1\nnameserver 9.9.9.9\n"
    assert (image_root / "etc/hostname").read_text() == "snoop-7\n"
    assert "127.0.1.1\tsnoop-7" in (image_root / "etc/hosts").read_text()
    cfg = yaml.safe_load((image_root / "etc/pisnoop/pisnoop.yaml").read_text())
    assert cfg["mongodb"]["uri"] == "mongodb://store.lab:27017/?replicaSet=rs0"
    assert cfg["snooper"]["sensor"] == "snoop-7"
    assert cfg["switch"] == IMAGE_CONFIG["switch"]
    assert oct((image_root / "etc/pisnoop/pisnoop.yaml").stat().st_mode & 0o777) == "0o640"
    assert (image_root / "root/.ssh/authorized_keys").read_text() == key + "\n"
    cmds = commands(image_root)
    assert "hostname snoop-7" in cmds
    assert cmds[-2:] == ["systemctl disable --quiet pisnoop-store.service",
                         "systemctl --no-block stop pisnoop-store.service"]
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "check-config",
                           str(image_root / "etc/pisnoop/pisnoop.yaml")], capture_output=True, text=True,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr


def test_bad_lines_are_skipped_and_a_refused_store_keeps_the_config(image_root):
    out = firstboot(image_root, "colour=blue\nmanagement=10.1.2.3\nstore_uri=http://store.lab/\n"
                                "hostname=-bad-\n").stdout
    assert "pisnoop.txt:1: skipped 'colour=blue'" in out
    assert "no prefix length" in out
    assert "pisnoop.txt refused, config kept" in out and "mongodb.uri" in out
    assert "is not a host name" in out
    assert (image_root / "etc/network/interfaces.d/management").read_text().endswith("iface eth0 inet dhcp\n")
    assert yaml.safe_load((image_root / "etc/pisnoop/pisnoop.yaml").read_text()) == IMAGE_CONFIG
    assert not [c for c in commands(image_root) if "pisnoop-store" in c]  # the embedded store stays


def test_first_boot_runs_once_before_the_network_and_the_services():
    unit = (REPO / "image" / "pisnoop-firstboot.service").read_text()
    assert "ConditionPathExists=!/var/lib/pisnoop-firstboot/done" in unit
    before = " ".join(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("Before="))
    for other in ("network-pre.target", "ssh.service", "openvswitch-switch.service", "pisnoop-store.service",
                  "pisnoop-controller.service", "pisnoop-snooper.service", "pisnoop-analyser.service"):
        assert other in before.split(), other


@pytest.mark.parametrize("script", ["build.sh", "qemu-boot.sh"])
def test_image_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / "image" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(REPO / "image" / script, os.X_OK)
