"""The same playbook against an arm64 Debian 12 root under qemu-user-static (slow: minutes).

Needs binfmt_misc with the qemu-aarch64 interpreter registered with the
fix-binary flag (setup.sh installs qemu-user-static and binfmt-support; the
container helper mounts binfmt_misc and enables the entry when needed).
Same checks as on amd64, except the watchdog test (the mechanism is
systemd's and already proven on amd64).
"""

from __future__ import annotations

import pytest

from tests import test_provision_container as checks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def provisioned():
    yield from checks.provision("arm64")


def test_arm64_first_run_provisions(provisioned):
    checks.check_first_run(provisioned)


def test_arm64_bridge_secure_with_controller_and_pinned_ports(provisioned):
    checks.check_bridge(provisioned, emulated=True)


def test_arm64_config_written_and_valid(provisioned):
    checks.check_config(provisioned)


def test_arm64_units_enabled_and_verify_clean(provisioned):
    checks.check_units(provisioned)


def test_arm64_services_report_ready(provisioned):
    checks.check_services_ready(provisioned)


def test_arm64_second_run_changes_nothing(provisioned):
    checks.check_second_run_changes_nothing(provisioned)
