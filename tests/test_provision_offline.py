"""The ready image's path on amd64: the playbook applied offline, then the root's first boot.

image/build.sh provisions an arm64 root that is not running, over the
repository's chroot connection with ``pisnoop_offline: true`` and the
wheelhouse: nothing is started and no bridge is made with ovs-vsctl. Here
the same run goes against a copy of the amd64 test root (natively, in the
default suite); then the root boots under systemd-nspawn for the first
time: ifupdown must make the bridge from /etc/network/interfaces.d/pisnoop,
NetworkManager must leave its ports alone, every service must report READY
and the bridge must forward. The kernel, the firmware and the first-boot
step of the image itself are proven by image/qemu-boot.sh (slow, by hand).
"""

from __future__ import annotations

import time

import pytest

from tests import container
from tests.container import recap
from tests.test_provision_container import (
    check_networkmanager_let_go,
    check_stored,
    services_ready,
    wait_stored,
    wait_switch,
)


@pytest.fixture(scope="module")
def first_boot():
    wheels = container.wheelhouse(container.host_arch())
    runs = {}

    def offline(ct):
        t0 = time.monotonic()
        runs["offline"] = ct.playbook(wheels=wheels, offline=True)
        runs["seconds"] = round(time.monotonic() - t0, 1)
        assert runs["offline"].returncode == 0, runs["offline"].stdout[-6000:] + runs["offline"].stderr[-2000:]

    ct = container.Container(container.host_arch(), boot_timeout=180)
    try:
        ct.start(prepare=offline)
        print(f"\noffline playbook run (chroot): {runs['seconds']} s; first boot to running {ct.boot_seconds} s")
        yield ct, runs
    finally:
        ct.stop()


def test_offline_run_starts_nothing(first_boot):
    ct, runs = first_boot
    out = runs["offline"].stdout
    counts = recap(out)
    assert counts["failed"] == 0 and counts["changed"] > 0
    for task in ("openvswitch : Read the bridge settings", "openvswitch : Add the ports with their OpenFlow numbers",
                 "pisnoop : Start the services"):
        assert _task_says(out, task).startswith("skipping"), (task, _task_says(out, task))
    assert _task_says(out, "pisnoop : Enable the services").startswith(("changed", "ok"))


def _task_says(out: str, task: str) -> str:
    """The first result line Ansible printed for ``task``."""
    after = out.split(f"TASK [{task}]", 1)
    assert len(after) == 2, f"no task {task!r} in the output"
    return next(line for line in after[1].splitlines()[1:] if line.strip())


def test_first_boot_makes_the_bridge_and_every_service_is_ready(first_boot):
    ct, _ = first_boot
    services_ready(ct)
    switch = wait_switch(ct)
    assert switch["fail_mode"] == "secure" and switch["controller"] == "tcp:127.0.0.1:6653"
    assert switch["ports"] == {"eth1": "1", "eth3": "3", "mirror0": "2"}
    check_networkmanager_let_go(ct)


def test_first_boot_forwards_and_stores(first_boot):
    ct, _ = first_boot
    wire = container.Wire(ct, b"OFF1")
    try:
        sent = wire.send(300, rate=200)
        wire.settle()
        assert len(wire.received) == len(sent)
        view = wait_stored(ct, wire, sent)
        assert check_stored(ct, wire, view) == set()
    finally:
        wire.close()


def test_online_run_after_the_offline_one_changes_nothing(first_boot):
    ct, _ = first_boot
    again = ct.playbook()
    counts = recap(again.stdout)
    assert again.returncode == 0 and counts["changed"] == 0, f"{counts}\n{again.stdout[-5000:]}"
