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

import collections
import hashlib
import json
import re
import shutil
import threading
import time

import pytest

from appliance import netns
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
        if arch == container.host_arch():
            ct.nm_before = nm_owns_every_port(ct)
        else:  # qemu-user: NetworkManager does not come up; the emulated run proves the rest
            nm = ct.sh("systemctl is-active NetworkManager; journalctl -b -u NetworkManager -n 3 -o cat", check=False)
            print(f"{arch}: NetworkManager under emulation: {' / '.join(nm.stdout.split(chr(10))[:4])}")
        t0 = time.monotonic()
        first = ct.playbook(*extra, wheels=wheels)
        seconds = round(time.monotonic() - t0, 1)
        print(f"{arch} first playbook run: {seconds} s")
        yield ct, first, seconds


def nm_owns_every_port(ct, timeout: float = 60) -> dict[str, str]:
    """Before the playbook NetworkManager manages every interface, as on Raspberry Pi OS: wait for it, return it."""
    deadline = time.monotonic() + timeout
    devices: dict[str, str] = {}
    while time.monotonic() < deadline:
        devices = ct.nm_devices() if ct.sh("nmcli -t general status", check=False).returncode == 0 else {}
        if devices.get("eth0") == "connected" and all(devices.get(i, "unmanaged") != "unmanaged"
                                                      for i in ("eth1", "eth3")):
            return devices
        time.sleep(1)
    raise AssertionError(f"NetworkManager does not manage every interface before the playbook: {devices}")


# the dashboard runs once it has a login (pisnoop_web_enabled): a throwaway pbkdf2 hash of a throwaway password
WEB_PASSWORD_HASH = ("pbkdf2_sha256$600000$000102030405060708090a0b0c0d0e0f$"
                     + hashlib.pbkdf2_hmac("sha256", b"pw-container", bytes(range(16)), 600000).hex())
WEB_PROBE = """import urllib.request as u
class N(u.HTTPRedirectHandler):
    def redirect_request(self, *a):
        return None
for p in ("/", "/login"):
    try:
        r = u.build_opener(N).open("http://127.0.0.1:8088" + p)
    except u.HTTPError as e:
        r = e
    print(p, r.status, r.headers.get("Location"), r.headers.get("X-Frame-Options"))
"""
WEB_SETTINGS = ("-e", json.dumps({"pisnoop_settings": {"web": {"password_hash": WEB_PASSWORD_HASH}}}))


@pytest.fixture(scope="module")
def provisioned():
    yield from provision(container.host_arch(), *WEB_SETTINGS)


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
    services_ready(ct)


def services_ready(ct, timeout: float = 120) -> dict[str, dict]:
    """Wait until every service is active and running (for Type=notify: after READY=1); return their states."""
    deadline = time.monotonic() + timeout
    states = {}
    while time.monotonic() < deadline:
        states = {s: _service_state(ct, f"pisnoop-{s}.service") for s in SERVICES + ["store"]}
        if all(st["ActiveState"] == "active" and st["SubState"] == "running" for st in states.values()):
            return states
        time.sleep(1)
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


def check_bad_variable_fails_with_message(provisioned, tmp_path) -> None:
    """A bad variable fails the play on the control node before any task touches the appliance: even from
    a newer checkout (a wheel that differs from the installed one) the code, the config and the running
    services stay as they were."""
    ct, first, _ = provisioned
    newer = newer_checkout(tmp_path)
    before = _installed(ct)
    bad = ct.playbook("-e", json.dumps({"pisnoop_settings": {"xmpp": {"server_ports": [5222, 70000]}}}), source=newer)
    assert bad.returncode != 0
    assert "xmpp.server_ports[1]: got 70000; expected a TCP port from 1 to 65535" in bad.stdout, bad.stdout[-4000:]
    tasks = re.split(r"^TASK \[", bad.stdout, flags=re.M)[1:]
    failed = [t.split("]", 1)[0] for t in tasks if "\nfatal:" in t]
    assert failed == ["pisnoop : Check pisnoop.yaml as this play would write it (pisnoop check-config of this "
                      "checkout)"], bad.stdout[-4000:]
    counts = recap(bad.stdout)
    assert counts["changed"] == 0 and counts["failed"] == 1, f"{counts}\n{bad.stdout[-4000:]}"
    assert _installed(ct) == before


def newer_checkout(tmp_path):
    """A copy of this checkout whose wheel differs from the installed one (one comment line more)."""
    out = tmp_path / "newer"
    shutil.copytree(container.REPO, out, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.so", "*.egg-info", "build", "demo-out", "*.img", ".pytest_cache"))
    with open(out / "appliance" / "__init__.py", "a") as f:
        f.write("# a newer checkout (tests/test_provision_container.py)\n")
    return out


def _installed(ct) -> dict:
    """What a play that changes nothing leaves as it was: the wheel, the config, the services' processes."""
    return {"dist": ct.sh("sha256sum /opt/pisnoop/dist/*.whl").stdout,
            "config": ct.sh("sha256sum /etc/pisnoop/pisnoop.yaml").stdout,
            "pids": {s: _service_state(ct, f"pisnoop-{s}.service")["MainPID"] for s in SERVICES + ["store"]}}


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
    check_second_run_changes_nothing(provisioned, *WEB_SETTINGS)


def test_the_dashboard_runs_hardened_and_wants_a_login(provisioned):
    """pisnoop-web: enabled and ready (Type=notify), exposure at most 2.0 on the booted system, every page behind
    the login page, the login form served with its security headers."""
    ct, first, _ = provisioned
    unit = "pisnoop-web.service"
    assert ct.sh(f"systemctl is-enabled {unit}", check=False).stdout.strip() == "enabled"
    deadline = time.monotonic() + 60
    while _service_state(ct, unit)["SubState"] != "running" and time.monotonic() < deadline:
        time.sleep(1)
    assert _service_state(ct, unit)["ActiveState"] == "active", ct.sh(f"journalctl -b -u {unit} -n 20", check=False)
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)",
                      ct.sh(f"systemd-analyze security --no-pager {unit}", check=False).stdout)
    assert level and float(level.group(1)) <= 2.0, level
    out = ct.sh(f"python3 - <<'EOF'\n{WEB_PROBE}EOF\n").stdout.splitlines()
    assert out[0].startswith("/ 303 ") and out[0].split()[2].endswith("/login"), out
    assert out[1] == "/login 200 None DENY", out


def test_bad_variable_fails_the_play_with_the_message(provisioned, tmp_path):
    check_bad_variable_fails_with_message(provisioned, tmp_path)


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


# --- NetworkManager, reboots, power loss (amd64) -------------------------------------------------------

NM_UNMANAGED = ("eth1", "eth3", "mirror0", "ovsbr0")


def check_networkmanager_let_go(ct) -> None:
    """The bridge's ports and the mirror are unmanaged; the management link is still NetworkManager's and up."""
    devices = ct.nm_devices()
    assert {i: devices.get(i) for i in NM_UNMANAGED} == dict.fromkeys(NM_UNMANAGED, "unmanaged"), devices
    assert devices.get("eth0") == "connected", devices
    assert ct.sh("nmcli -g GENERAL.CONNECTION device show eth0").stdout.strip() == "management"
    netns.run(["ping", "-c", "1", "-W", "3", "10.77.0.2"], ns=ct.hosts["eth0"])  # the management link works


def wait_switch(ct, want: dict | None = None, timeout: float = 90) -> dict:
    """The switch once the controller is connected and has pushed its flows (equal to ``want`` when given)."""
    deadline = time.monotonic() + timeout
    now: dict = {}
    while time.monotonic() < deadline:
        now = ct.switch()
        if now["connected"] == "true" and now["flows"] and (want is None or now == want):
            return now
        time.sleep(1)
    raise AssertionError(f"switch not as before: now {now}\nbefore {want}")


def check_boot(ct, probe, before: dict, what: str) -> dict:
    """After power-on: the first frame ``probe`` got across, only once the controller was READY; every
    service READY; the switch as ``before``; NetworkManager still off the ports. Returns the services' states."""
    first = probe.first_after(ct.powered_on_at, timeout=120)
    probe.halt()
    assert first is not None, "nothing forwarded within 120 s of power-on"
    print(f"\n{what}: boot to running {ct.boot_seconds} s; power-on to first forwarded frame {first:.2f} s")
    states = services_ready(ct)
    check_secure_until_controller(ct, first)
    assert wait_switch(ct, before) == before
    check_networkmanager_let_go(ct)
    return states


def check_secure_until_controller(ct, first: float) -> None:
    """Secure fail mode: the first frame after power-on crossed after the controller was up (READY=1), not before."""
    ready_us = int(ct.sh("systemctl show -p ActiveEnterTimestampMonotonic --value pisnoop-controller").stdout)
    ready = ready_us / 1e6 - ct.powered_on_at  # CLOCK_MONOTONIC is the host's inside the container
    print(f"controller ready {ready:.2f} s after power-on, first frame forwarded at {first:.2f} s")
    assert 0 < ready <= first, (ready, first)


def counted_drops(ct) -> int:
    """Frames each snooper run counted as lost (ring, full spool), from its last status line in the journal."""
    out = ct.sh("journalctl -u pisnoop-snooper -o cat --no-pager", check=False).stdout
    runs: list[int] = []
    for line in out.splitlines():
        if "capturing on" in line:
            runs.append(0)
        m = re.search(r"kernel_dropped=(\d+) spool_full=(\d+)", line)
        if m and runs:
            runs[-1] = int(m.group(1)) + int(m.group(2))
    return sum(runs)


def check_stored(ct, wire, view: dict) -> set[int]:
    """Every frame that crossed the bridge is stored once, but for counted drops; return the missing ones."""
    seqs = collections.Counter(view["seqs"])
    assert not [s for s, n in seqs.items() if n > 1], "frames stored twice"
    assert set(seqs) <= set(wire.sent)
    missing = set(wire.received) - set(seqs)
    drops = counted_drops(ct)
    print(f"\nframes sent {len(wire.sent)}, crossed the bridge {len(wire.received)}, stored {len(seqs)}, "
          f"counted drops {drops}")
    return missing


def wait_stored(ct, wire, seqs: list[int], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = ct.store(wire.tag)
        if set(seqs) <= set(view["seqs"]) or time.monotonic() > deadline:
            return view
        time.sleep(1)


def wait_analyser(ct, wire, pred, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = ct.store(wire.tag)
        if pred(view) or time.monotonic() > deadline:
            return view
        time.sleep(1)


def caught_up(view: dict) -> bool:
    newest = max((b[1] for b in view["batches"]), default=None)
    return newest is not None and view["state"]["resume"] is not None and abs(view["state"]["resume"] - newest) < 1e-3


@pytest.fixture
def wire(provisioned):
    ct = provisioned[0]
    made = []

    def make(tag: bytes):
        made.append(container.Wire(ct, tag))
        return made[-1]
    yield make
    for w in made:
        w.close()


def test_networkmanager_managed_every_port_before(provisioned):
    ct = provisioned[0]
    assert ct.nm_before["eth0"] == "connected"
    assert ct.nm_before["eth1"] != "unmanaged" and ct.nm_before["eth3"] != "unmanaged", ct.nm_before


def test_networkmanager_lets_go_of_the_bridge_ports_only(provisioned):
    check_networkmanager_let_go(provisioned[0])


def test_bridge_forwards_and_every_frame_is_stored(provisioned, wire):
    ct = provisioned[0]
    services_ready(ct)
    wait_switch(ct)
    w = wire(b"FWD1")
    sent = w.send(400, rate=200)
    w.settle()
    assert len(w.received) == len(sent), f"the bridge forwarded {len(w.received)} of {len(sent)}"
    view = wait_stored(ct, w, sent)
    missing = check_stored(ct, w, view)
    assert len(missing) <= counted_drops(ct), f"lost without a count: {sorted(missing)[:20]}"


def test_snooper_restart_under_traffic_loses_no_frame(provisioned, wire):
    """`systemctl restart pisnoop-snooper` (what an upgrade does) with frames crossing the bridge: systemd keeps
    the capture socket (FileDescriptorStoreMax=1), the new run reads on in the same ring, every frame is stored
    once and none is even counted as dropped."""
    ct = provisioned[0]
    services_ready(ct)
    wait_switch(ct)
    before = _service_state(ct, "pisnoop-snooper.service")["MainPID"]
    w = wire(b"RST1")
    sender = threading.Thread(target=w.send, args=(1200, 300))
    sender.start()
    time.sleep(1.5)
    drops_before = counted_drops(ct)
    ct.sh("systemctl restart pisnoop-snooper.service")
    sender.join(30)
    w.settle()
    assert len(w.received) == len(w.sent), f"the bridge forwarded {len(w.received)} of {len(w.sent)}"
    view = wait_stored(ct, w, w.sent)
    missing = check_stored(ct, w, view)
    log = ct.sh("journalctl -b -u pisnoop-snooper -o cat --no-pager", check=False).stdout
    assert "capture ring kept from the previous run" in log, log[-3000:]
    assert _service_state(ct, "pisnoop-snooper.service")["MainPID"] != before
    assert not missing, f"lost across the restart: {sorted(missing)[:20]}"
    assert counted_drops(ct) == drops_before


def test_clean_reboot_keeps_switch_frames_and_analyser_position(provisioned, wire):
    """Reboot with frames in the spool: the same switch after boot, the spool replayed, nothing lost."""
    ct = provisioned[0]
    services_ready(ct)
    before = wait_switch(ct)
    w = wire(b"RBT1")
    phase1 = w.send(300, rate=200)
    view = wait_stored(ct, w, phase1)
    view = wait_analyser(ct, w, caught_up)
    assert caught_up(view), view["state"]
    read_before = {b[0] for b in view["batches"]}
    ct.sh("systemctl stop pisnoop-store")
    phase2 = w.send(300, rate=200)  # the snooper spools these: the store is away
    w.settle()
    time.sleep(2)
    assert int(ct.sh("ls /var/lib/pisnoop/spool | grep -c 'psb$'", check=False).stdout.strip() or 0) > 0

    probe = wire(b"PRB1")
    probe.stream(rate=50)
    ct.reboot()
    states = check_boot(ct, probe, before, "clean reboot")
    inherited = ct.sh("journalctl -b -u pisnoop-snooper -o cat --no-pager | grep 'from before'", check=False).stdout
    held = re.search(r"\((\d+) frames\) from before", inherited)
    assert held and int(held.group(1)) >= len(phase2), inherited  # phase 2, and probe frames sent before the reboot
    phase3 = w.send(300, rate=200)
    w.settle()
    view = wait_stored(ct, w, phase1 + phase2 + phase3)
    missing = check_stored(ct, w, view)
    assert len(missing) <= counted_drops(ct), f"lost without a count: {sorted(missing)[:20]}"
    assert ct.sh("ls /var/lib/pisnoop/spool | grep -c 'psb$'", check=False).stdout.strip() == "0"
    # the analyser went on from its saved position: it read only the batches that came after it
    view = wait_analyser(ct, w, lambda v: caught_up(v) and v["analyser"]["counters"].get("batches") == len(
        [b for b in v["batches"] if b[0] not in read_before]))
    new = [b for b in view["batches"] if b[0] not in read_before]
    assert view["analyser"]["counters"].get("batches") == len(new), (view["analyser"], len(new), states)
    assert view["analyser"]["counters"].get("frames") == sum(b[2] for b in new)


def test_power_loss_while_capturing(provisioned, wire):
    """SIGKILL to the container's init while frames flow and the store is up: what the store had stays."""
    ct = provisioned[0]
    services_ready(ct)
    before = wait_switch(ct)
    w = wire(b"PWR1")
    phase1 = w.send(300, rate=200)
    wait_stored(ct, w, phase1)
    rate = 100
    w.stream(rate=rate)
    time.sleep(3)
    acked = ct.store(w.tag)  # what the store has acknowledged just before the power goes
    probe = wire(b"PRB2")
    probe.stream(rate=50)
    ct.power_cut()
    w.halt()
    stream_sent = [s for s in w.sent if s not in phase1]
    ct.boot()
    check_boot(ct, probe, before, "power loss")
    killed = ct.sh("journalctl -b -1 -u pisnoop-snooper -o cat --no-pager | grep -c 'final:'", check=False)
    assert killed.stdout.strip() == "0", "the snooper of the boot before was not killed: it wrote a final status"
    phase3 = w.send(300, rate=200)
    w.settle()
    view = wait_stored(ct, w, phase1 + phase3)
    stored = set(view["seqs"])
    assert set(acked["seqs"]) <= stored, "frames the store had acknowledged are gone"
    missing = check_stored(ct, w, view)
    newest_acked = max(acked["seqs"])
    assert all(s > newest_acked for s in missing), f"lost frames older than the last acknowledged one: {missing}"
    assert len(missing) <= 2 * rate, f"{len(missing)} frames lost: more than 2 s of traffic in flight"
    print(f"power loss: {len(stream_sent)} frames sent while capturing, {len(missing)} lost in flight (in memory "
          f"when the power went: not yet fsync'd)")
    # the analyser resumed from its saved position: not from the first batch, and it caught up
    view = wait_analyser(ct, w, caught_up)
    assert caught_up(view)
    after_acked = [b for b in view["batches"] if b[1] > (acked["state"]["resume"] or 0)]
    assert view["analyser"]["counters"].get("batches", 0) <= len(after_acked) < len(view["batches"])


def test_bridge_made_by_ifupdown_at_boot(provisioned, wire):
    """What the image's first boot relies on: with no bridge in Open vSwitch's database, ifupdown makes it
    at boot from /etc/network/interfaces.d/pisnoop, the same as the playbook made it."""
    ct = provisioned[0]
    services_ready(ct)
    before = wait_switch(ct)
    ct.sh("ovs-vsctl del-br ovsbr0")
    ct.reboot()
    services_ready(ct)
    assert wait_switch(ct, before) == before
    assert ct.sh("ovs-vsctl get controller ovsbr0 max_backoff").stdout.strip() == "1000"
    assert ct.sh("ovs-vsctl get bridge ovsbr0 other_config:datapath-id").stdout.strip() == '"0000000000000001"'
    check_networkmanager_let_go(ct)
    w = wire(b"IFU1")
    sent = w.send(200, rate=200)
    w.settle()
    assert len(w.received) == len(sent)
