"""The playbook against a real Debian 12 booted with systemd as PID 1 (systemd-nspawn -b).

One container per module (booting and provisioning cost minutes): the
first playbook run happens in the fixture, the tests then check what it
left and run the playbook again. The services need the real commands from
the controller, snooper and analyser branches: until they are merged the
service tests FAIL (the unit starts a command that does not exist).

The arm64 module (test_provision_arm64.py) runs the same checks on an
arm64 root under qemu-user-static.
"""

from __future__ import annotations

import json
import time

import pytest

from tests import container
from tests.container import recap

SERVICES = ["controller", "snooper", "analyser"]
BRANCH = {s: s for s in SERVICES}


def provision(arch: str, *extra: str):
    """Boot a fresh container for ``arch``, run the playbook once; yield (container, first run, seconds)."""
    root, record = container.base_root(arch)
    wheels = container.wheelhouse(arch)
    print(f"\n{arch} root: debootstrap {record['debootstrap_seconds']} s + package download "
          f"{record['download_seconds']} s (built {record['built_at']})")
    with container.Container(arch, boot_timeout=600 if arch != container.host_arch() else 180) as ct:
        print(f"{arch} boot to running: {ct.boot_seconds} s")
        t0 = time.monotonic()
        first = ct.playbook(*extra, wheels=wheels)
        seconds = round(time.monotonic() - t0, 1)
        print(f"{arch} first playbook run: {seconds} s")
        yield ct, first, seconds


@pytest.fixture(scope="module")
def provisioned():
    yield from provision(container.host_arch())


# --- the checks, shared with the arm64 module ---------------------------------------------------

def check_first_run(provisioned) -> None:
    ct, first, _ = provisioned
    if first.returncode != 0 and "Unable to start service pisnoop-" in first.stdout:
        missing = _missing_commands(ct)
        hint = f"; the installed pisnoop lacks {', '.join(missing)}: merge those branches" if missing else ""
        raise AssertionError(f"a service did not start{hint}\n{first.stdout[-4000:]}")
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    counts = recap(first.stdout)
    assert counts["failed"] == 0 and counts["unreachable"] == 0 and counts["changed"] > 0


def check_bridge(provisioned, emulated: bool = False) -> None:
    ct, first, _ = provisioned
    sh = ct.sh
    assert sh("ovs-vsctl br-exists ovsbr0", check=False).returncode == 0
    assert sh("ovs-vsctl get-fail-mode ovsbr0").stdout.strip() == "secure"
    assert sh("ovs-vsctl get-controller ovsbr0").stdout.strip() == "tcp:127.0.0.1:6653"
    assert sh("ovs-vsctl get controller ovsbr0 max_backoff").stdout.strip() == "1000"
    assert sh("ovs-vsctl get bridge ovsbr0 protocols").stdout.strip() == "[OpenFlow13]"
    want = {"eth1": "1", "eth3": "3", "mirror0": "2"}
    requested = {i: sh(f"ovs-vsctl get interface {i} ofport_request").stdout.strip() for i in want}
    assert requested == want
    ports = {i: sh(f"ovs-vsctl get interface {i} ofport").stdout.strip() for i in want}
    if emulated and ports != want:
        # qemu-user cannot run the userspace datapath on a veth (the tap of mirror0 works): show why, for the record
        log = sh("grep -E 'eth1|eth3' /var/log/openvswitch/ovs-vswitchd.log | tail -4", check=False).stdout
        print(f"\n{ct.arch}: OpenFlow ports under emulation {ports}; ovs-vswitchd says:\n{log}")
    else:
        assert ports == want
    addrs = json.loads(sh("ip -j addr show dev mirror0").stdout)[0]["addr_info"]
    v4 = [a["local"] for a in addrs if a["family"] == "inet"]
    assert v4 == ["169.254.77.1"], addrs  # link-local only
    assert not [a for a in addrs if a["family"] == "inet6" and a.get("scope") == "global"]
    interfaces = sh("cat /etc/network/interfaces.d/pisnoop").stdout
    assert "ovs_type OVSBridge" in interfaces and "fail_mode=secure" in interfaces
    assert "max_backoff=1000" in interfaces and "tcp:127.0.0.1:6653" in interfaces


def check_config(provisioned) -> None:
    ct, first, _ = provisioned
    out = ct.sh("/opt/pisnoop/venv/bin/pisnoop check-config /etc/pisnoop/pisnoop.yaml --print").stdout
    assert "target: ovs" in out and "interface: mirror0" in out and "sensor: pisnoop-ct" in out
    mode = ct.sh("stat -c '%U:%G %a' /etc/pisnoop/pisnoop.yaml").stdout.strip()
    assert mode == "root:pisnoop 640"


def check_units(provisioned) -> None:
    ct, first, _ = provisioned
    for s in SERVICES + ["store"]:
        unit = f"pisnoop-{s}.service"
        assert ct.sh(f"systemctl is-enabled {unit}", check=False).stdout.strip() == "enabled", unit
        verify = ct.sh(f"systemd-analyze verify /etc/systemd/system/{unit}", check=False)
        assert verify.returncode == 0 and verify.stdout == "" and verify.stderr == "", verify.stdout + verify.stderr


def _service_state(ct, unit: str) -> dict:
    out = ct.sh(f"systemctl show {unit} -p ActiveState -p SubState -p MainPID -p NRestarts -p Result").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _missing_commands(ct, services=SERVICES) -> list[str]:
    missing = []
    for s in services:
        if ct.sh(f"/opt/pisnoop/venv/bin/pisnoop {s} --help", check=False).returncode != 0:
            missing.append(f"`pisnoop {s}` (branch {BRANCH[s]})")
    return missing


def check_services_ready(provisioned) -> None:
    """Type=notify: ActiveState=active only after the service sent READY=1."""
    ct, first, _ = provisioned
    missing = _missing_commands(ct)
    assert not missing, "the installed pisnoop lacks " + ", ".join(missing) + ": merge those branches"
    deadline = time.monotonic() + 120
    states = {}
    while time.monotonic() < deadline:
        states = {s: _service_state(ct, f"pisnoop-{s}.service") for s in SERVICES + ["store"]}
        if all(st["ActiveState"] == "active" and st["SubState"] == "running" for st in states.values()):
            return
        time.sleep(2)
    logs = ct.sh("journalctl -b --no-pager -n 80 -u 'pisnoop-*'", check=False).stdout
    raise AssertionError(f"not all services active: {states}\n{logs[-5000:]}")


def check_second_run_changes_nothing(provisioned, *extra: str) -> None:
    ct, first, _ = provisioned
    t0 = time.monotonic()
    second = ct.playbook(*extra)
    print(f"\n{ct.arch} second playbook run: {round(time.monotonic() - t0, 1)} s")
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    counts = recap(second.stdout)
    assert counts["changed"] == 0 and counts["failed"] == 0, f"{counts}\n{second.stdout[-6000:]}"


def check_bad_variable_fails_with_message(provisioned) -> None:
    ct, first, _ = provisioned
    before = ct.sh("sha256sum /etc/pisnoop/pisnoop.yaml").stdout
    bad = ct.playbook("-e", json.dumps({"pisnoop_settings": {"xmpp": {"server_port": 70000}}}))
    assert bad.returncode != 0
    assert "xmpp.server_port: got 70000; expected a TCP port from 1 to 65535" in bad.stdout, bad.stdout[-4000:]
    assert ct.sh("sha256sum /etc/pisnoop/pisnoop.yaml").stdout == before  # the old config stays


def check_watchdog_restarts_frozen_service(provisioned, service: str) -> None:
    ct, first, _ = provisioned
    missing = _missing_commands(ct, [service])
    assert not missing, "the installed pisnoop lacks " + ", ".join(missing) + ": merge that branch"
    unit = f"pisnoop-{service}.service"
    before = _service_state(ct, unit)
    assert before["ActiveState"] == "active", before
    ct.sh(f"kill -STOP {before['MainPID']}")
    deadline = time.monotonic() + 120
    now = before
    while time.monotonic() < deadline:
        now = _service_state(ct, unit)
        if (now["MainPID"] not in ("0", before["MainPID"]) and now["ActiveState"] == "active"
                and int(now["NRestarts"]) > int(before["NRestarts"])):
            break
        time.sleep(2)
    log = ct.sh(f"journalctl -b --no-pager -u {unit} -n 30", check=False).stdout
    assert int(now["NRestarts"]) > int(before["NRestarts"]) and now["ActiveState"] == "active", f"{now}\n{log}"
    assert "Watchdog timeout" in log or "watchdog" in log.lower(), log


# --- amd64 (the host's architecture) ----------------------------------------------------------------

def test_first_run_provisions(provisioned):
    check_first_run(provisioned)


def test_bridge_secure_with_controller_and_pinned_ports(provisioned):
    check_bridge(provisioned)


def test_config_written_and_valid(provisioned):
    check_config(provisioned)


def test_units_enabled_and_verify_clean(provisioned):
    check_units(provisioned)


def test_services_report_ready(provisioned):
    check_services_ready(provisioned)


def test_second_run_changes_nothing(provisioned):
    check_second_run_changes_nothing(provisioned)


def test_bad_variable_fails_the_play_with_the_message(provisioned):
    check_bad_variable_fails_with_message(provisioned)


def test_watchdog_restarts_a_frozen_service(provisioned):
    check_watchdog_restarts_frozen_service(provisioned, "controller")


def test_status_reads_the_services_from_systemd(provisioned):
    """`pisnoop status` on the provisioned appliance: each service's state and restarts come from systemd, and a
    stopped unit is the line that says so (exit 1)."""
    ct, first, _ = provisioned
    check_services_ready(provisioned)
    status = "/opt/pisnoop/venv/bin/pisnoop --config /etc/pisnoop/pisnoop.yaml status"
    res = ct.sh(status, check=False)
    print("\n" + res.stdout + res.stderr)
    print(ct.sh("journalctl -b --no-pager -n 15 -u pisnoop-controller; ovs-vsctl show; "
                "ovs-vsctl get bridge ovsbr0 datapath_id", check=False).stdout)
    lines = {ln[4:17].strip(): ln for ln in res.stdout.splitlines() if ln.startswith(" ")}
    for s in SERVICES:
        restarts = _service_state(ct, f"pisnoop-{s}.service")["NRestarts"]
        assert "up (running), ready, last heartbeat" in lines[s], res.stdout
        assert lines[s].endswith(f"restarts {restarts} (systemd)"), res.stdout
    ct.sh("systemctl stop pisnoop-snooper.service")
    try:
        res = ct.sh(status + " --json", check=False)
        doc = json.loads(res.stdout)
        assert res.returncode == 1 and "snooper: pisnoop-snooper.service is inactive" in doc["problems"], res.stdout
        text = ct.sh(status, check=False).stdout
        assert " !! snooper       inactive (dead), not ready" in text, text
    finally:
        ct.sh("systemctl start pisnoop-snooper.service")
    check_services_ready(provisioned)


def test_systemctl_reload_applies_a_threshold_and_a_bad_file_keeps_the_running_config(provisioned):
    """`systemctl reload` (ExecReload: SIGHUP) in the booted appliance: the analyser applies a new threshold
    without a restart, a bad file is one line and changes nothing, the other services reload too."""
    ct, _first, _ = provisioned
    check_services_ready(provisioned)
    conf = "/etc/pisnoop/pisnoop.yaml"
    py = "/opt/pisnoop/venv/bin/python"
    before = {s: _service_state(ct, f"pisnoop-{s}.service") for s in ("analyser", "controller", "snooper")}
    ct.sh(f"cp -p {conf} {conf}.orig")      # -p: the file keeps its owner and mode (the services read it)
    try:
        ct.sh(f"{py} -c \"import yaml; p='{conf}'; d=yaml.safe_load(open(p)) or {{}}; "
              f"d.setdefault('xmpp', {{}})['threshold_ppm'] = 77; open(p, 'w').write(yaml.safe_dump(d))\"")
        ct.sh("systemctl reload pisnoop-analyser.service pisnoop-controller.service pisnoop-snooper.service")
        log = ""
        for _ in range(50):
            log = ct.sh("journalctl -b --no-pager -u pisnoop-analyser.service", check=False).stdout
            if "-> 77" in log:
                break
            time.sleep(0.2)
        assert f"reload of {conf}: applied xmpp.threshold_ppm" in log and "-> 77" in log, log[-3000:]
        ct.sh(f"printf 'xmpp:\\n  threshold_ppm: -1\\n' > {conf}")
        ct.sh("systemctl reload pisnoop-analyser.service")
        for _ in range(50):
            log = ct.sh("journalctl -b --no-pager -u pisnoop-analyser.service", check=False).stdout
            if "reload refused" in log:
                break
            time.sleep(0.2)
        refused = [ln for ln in log.splitlines() if "reload refused, the config in force is unchanged" in ln]
        assert len(refused) == 1 and "xmpp.threshold_ppm" in refused[0], log[-3000:]
        for s, state in before.items():
            now = _service_state(ct, f"pisnoop-{s}.service")
            assert (now["ActiveState"], now["MainPID"], now["NRestarts"]) == \
                ("active", state["MainPID"], state["NRestarts"]), (s, now)
    finally:
        ct.sh(f"mv {conf}.orig {conf} && systemctl reload pisnoop-analyser.service", check=False)
