"""Debian 12 containers for the provisioning tests.

A debootstrap root per architecture is built once and cached (a fresh CI
machine builds it: ~1 min amd64, ~3-4 min arm64 under qemu-user-static).
The packages the playbook installs are downloaded into the root's apt cache
at build time, so the booted container installs them itself with no network:
it only has its own network namespace with the appliance's ports. Each
test run boots a fresh copy of the root with ``systemd-nspawn -b`` (systemd
as PID 1); ``--register=no --keep-unit`` because the host has no systemd to
register with.

The root runs NetworkManager as Raspberry Pi OS bookworm does: before the
playbook it manages every interface (``eth0`` management with a static
keyfile connection, ``eth1``/``eth3`` with its automatic DHCP connections).
Each port is a veth pair whose other end is a host of its own (namespaces
``psXXXX-in``, ``-up``, ``-mg``), so traffic crosses the bridge from outside
the container. The container can be rebooted (``reboot``) or lose its power
(``power_cut``: SIGKILL to its init, every process of it dies at once) and
boot again on the same root and links.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from appliance import netns

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PISNOOP_TEST_CACHE", "/var/cache/pisnoop-test"))
WORK = Path(os.environ.get("PISNOOP_TEST_WORK", "/var/tmp/pisnoop-ct"))
MIRROR = os.environ.get("PISNOOP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# the root itself: systemd as init and what Ansible needs to run modules
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-apt", "ca-certificates"]
# installed with apt after debootstrap (which cannot pick between alternatives such as logind | default-logind):
# NetworkManager, which owns every interface of Raspberry Pi OS bookworm before the playbook runs
SYSTEM_PACKAGES = ["network-manager"]
# what the playbook installs (roles base and openvswitch): only downloaded at build time
PLAYBOOK_PACKAGES = ["ifupdown", "iproute2", "procps", "tcpdump", "python3-venv", "python3-systemd",
                     "gcc", "libc6-dev", "python3-dev", "libxxhash-dev", "openvswitch-switch"]
# the wheels for the venv: pyproject's dependencies minus systemd-python (Debian's python3-systemd), plus the store
_PLATFORMS = {
    "amd64": ["manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64"],
    "arm64": ["manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64"],
}
_LINUX_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


class ContainerError(RuntimeError):
    """The container could not be built, booted or reached; the message says why."""


def host_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]


def _run(cmd: list[str], timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ContainerError(f"{' '.join(cmd[:6])}...: exit {proc.returncode}:\n{tail}")
    return proc


class _Lock:
    """One builder at a time per cache entry (parallel test runs share the cache)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def foreign_arch_ready(arch: str) -> None:
    """Make sure binfmt_misc runs ``arch`` binaries through qemu-user-static (fix-binary flag)."""
    if arch == host_arch():
        return
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], timeout=30)
    name = f"qemu-{_LINUX_ARCH[arch]}"
    entry = binfmt / name
    if not entry.exists() or "enabled" not in entry.read_text():
        if shutil.which("update-binfmts") is None:
            raise ContainerError("update-binfmts not found: install binfmt-support and qemu-user-static (setup.sh)")
        _run(["update-binfmts", "--enable", name], timeout=30)
    flags = re.search(r"^flags: *(\S*)", entry.read_text(), re.M)
    if not flags or "F" not in flags.group(1):
        raise ContainerError(f"{entry}: the qemu interpreter is registered without the F (fix-binary) flag; "
                             "a container could not find it")


def base_root(arch: str) -> tuple[Path, dict]:
    """The cached Debian 12 root for ``arch`` (built when missing); returns it and its build record."""
    key = {"suite": SUITE, "arch": arch, "base": BASE_PACKAGES, "system": SYSTEM_PACKAGES}
    # named by its key: checkouts that want other roots (branches, older commits) never rebuild each other's
    name = f"debian12-{arch}-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    root = CACHE / name
    stamp = CACHE / f"{name}.json"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
    with _Lock(CACHE / f"{name}.lock"):
        record = json.loads(stamp.read_text()) if stamp.exists() and root.is_dir() else {}
        if record.get("key") != key:
            record = _debootstrap(arch, root, stamp, key, env)
        if record.get("downloaded") != PLAYBOOK_PACKAGES:
            foreign_arch_ready(arch)
            t0 = time.monotonic()
            _run(["chroot", str(root), "apt-get", "install", "-y", "-qq", "--download-only", "--no-install-recommends",
                  *PLAYBOOK_PACKAGES], env=env)
            record.update(downloaded=PLAYBOOK_PACKAGES, download_seconds=round(time.monotonic() - t0, 1))
            stamp.write_text(json.dumps(record, indent=1))
        return root, record


def _debootstrap(arch: str, root: Path, stamp: Path, key: dict, env: dict) -> dict:
    foreign_arch_ready(arch)
    if shutil.which("debootstrap") is None:
        raise ContainerError("debootstrap not found: install it (setup.sh lists it)")
    tmp = root.with_name(root.name + ".building")
    for old in (tmp, root):
        if old.exists():
            shutil.rmtree(old)
    stamp.unlink(missing_ok=True)
    t0 = time.monotonic()
    _run(["debootstrap", f"--arch={arch}", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
          SUITE, str(tmp), MIRROR], timeout=3600)
    _run(["chroot", str(tmp), "apt-get", "update", "-qq"], env=env)
    _run(["chroot", str(tmp), "apt-get", "install", "-y", "-qq", "--no-install-recommends", *SYSTEM_PACKAGES],
         env=env)
    _run(["chroot", str(tmp), "apt-get", "clean"], env=env)
    (tmp / "etc/machine-id").write_text("")  # a fresh id at each boot of a copy
    tmp.rename(root)
    record = {"key": key, "debootstrap_seconds": round(time.monotonic() - t0, 1),
              "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    stamp.write_text(json.dumps(record, indent=1))
    return record


def wheelhouse(arch: str) -> Path:
    """Wheels of pisnoop's dependencies for ``arch`` / CPython 3.11 (Debian 12), cached."""
    import tomllib
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    deps = [d for d in deps if not d.startswith("systemd-python")] + ["nx-27017>=0.8.1"]
    out = CACHE / f"wheels-{arch}"
    stamp = CACHE / f"wheels-{arch}.json"
    with _Lock(CACHE / f"wheels-{arch}.lock"):
        if stamp.exists() and out.is_dir() and json.loads(stamp.read_text()).get("deps") == deps:
            return out
        if out.exists():
            shutil.rmtree(out)
        plats = [a for p in _PLATFORMS[arch] for a in ("--platform", p)]
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
              *plats, "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "-d", str(out), *deps],
             timeout=1800)
        stamp.write_text(json.dumps({"deps": deps}))
        return out


# NetworkManager's connection for the management link, as Raspberry Pi OS keeps the imager's settings
MANAGEMENT_KEYFILE = """[connection]
id=management
type=ethernet
interface-name=eth0
autoconnect=true

[ipv4]
method=manual
address1=10.77.0.2/24

[ipv6]
method=disabled
"""
MANAGEMENT_PEER = "10.77.0.1/24"
# each link of the container and the host at its other end (namespace psXXXX-<suffix>, interface eth0 there)
LINKS = {"eth0": "mg", "eth1": "in", "eth3": "up"}
REBOOT_EXIT = 133  # systemd-nspawn's exit status when the container asked for a reboot


class Container:
    """A fresh copy of a cached root, booted with systemd as PID 1 in a network namespace of its own."""

    def __init__(self, arch: str, boot_timeout: float = 300.0):
        self.arch = arch
        self.boot_timeout = boot_timeout
        self.name = "ps" + secrets.token_hex(2)
        self.dir = WORK / self.name
        self.root = self.dir / "root"
        self.netns = f"{self.name}-ct"
        self.hosts = {ifname: f"{self.name}-{suffix}" for ifname, suffix in LINKS.items()}
        self.log = self.dir / "console.log"
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.boot_seconds: float | None = None
        self.powered_on_at: float | None = None  # time.monotonic() when this boot's nspawn started
        self.boots = 0

    # --- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "Container":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, prepare=None) -> None:
        """Copy the root, wire the links, call ``prepare(self)`` (the root is not running yet), boot."""
        base, _ = base_root(self.arch)
        foreign_arch_ready(self.arch)
        self.dir.mkdir(parents=True)
        _run(["cp", "-a", "--reflink=auto", str(base), str(self.root)], timeout=600)
        conn = self.root / "etc/NetworkManager/system-connections/management.nmconnection"
        conn.parent.mkdir(parents=True, exist_ok=True)
        conn.write_text(MANAGEMENT_KEYFILE)
        conn.chmod(0o600)
        (self.root / "var/log/journal").mkdir(parents=True, exist_ok=True)  # the boot before a reboot stays readable
        self._wire()
        if prepare is not None:
            prepare(self)
        self.boot()

    def _wire(self) -> None:
        netns.run(["ip", "netns", "add", self.netns])
        for ifname, host in self.hosts.items():
            netns.run(["ip", "netns", "add", host])
            for knob in ("all", "default"):  # no router solicitations from the hosts
                netns.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{knob}.disable_ipv6=1"], ns=host)
            netns.run(["ip", "-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", ifname,
                       "netns", self.netns])
            for ns, dev in ((host, "eth0"), (self.netns, ifname)):
                netns.run(["ethtool", "-K", dev, "tx", "off"], ns=ns, check=False)
            netns.run(["ip", "-n", host, "link", "set", "lo", "up"])
            netns.run(["ip", "-n", host, "link", "set", "eth0", "up"])
        netns.run(["ip", "-n", self.hosts["eth0"], "addr", "add", MANAGEMENT_PEER, "dev", "eth0"])

    def boot(self) -> float:
        """Power on: systemd-nspawn on the root; wait until systemd is running; return the seconds it took."""
        self.powered_on_at = t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
                 f"--network-namespace-path=/run/netns/{self.netns}", "-M", self.name, "--hostname=pisnoop-ct",
                 # CAP_NET_ADMIN: nspawn grants it only with --private-network, and ovs-vswitchd needs it
                 "--capability=CAP_NET_ADMIN", "--console=read-only"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.leader = self._find_leader()
        state = ""
        while time.monotonic() - t0 < self.boot_timeout:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                self.boot_seconds = round(time.monotonic() - t0, 1)
                self.boots += 1
                return self.boot_seconds
            time.sleep(1)
        raise ContainerError(f"container {self.name} did not finish booting within {self.boot_timeout:.0f} s "
                             f"(state {state!r}); console: {self.log}")

    def reboot(self, timeout: float = 180) -> float:
        """``systemctl reboot`` inside, wait for the container to go down, boot it again; return the boot seconds."""
        self.sh("systemctl reboot", check=False)
        rc = self._wait_down(timeout)
        if rc != REBOOT_EXIT:
            raise ContainerError(f"systemd-nspawn ended with {rc}, not {REBOOT_EXIT} (reboot): {self.log}")
        self._links_reset()
        return self.boot()

    def power_cut(self) -> None:
        """Power loss: SIGKILL to the container's init kills every process of it at once; the links go down."""
        os.kill(self.leader, signal.SIGKILL)
        self._wait_down(60)
        self._links_reset()

    def _wait_down(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"container {self.name} still up {timeout:.0f} s after it was told to go down; "
                                 f"console: {self.log}") from None

    def _links_reset(self) -> None:
        """What a power cycle does to the NICs: down, no addresses (the taps of OVS went with ovs-vswitchd)."""
        for ifname in self.hosts:
            netns.run(["ip", "link", "set", ifname, "down"], ns=self.netns)
            netns.run(["ip", "addr", "flush", "dev", ifname], ns=self.netns)

    def _find_leader(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode}: "
                                     f"{self.log.read_text()[-2000:]}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.2)
        raise ContainerError("systemd-nspawn started no container init within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Under qemu-user the clean halt never ended within the 60 s (67 s of each arm64 run's teardown); the
            # root is thrown away after this, so there the halt is forced after a second.
            first = 60 if self.arch == host_arch() else 1
            for sig, wait in ((signal.SIGTERM, first), (signal.SIGTERM, 20), (signal.SIGKILL, 20)):
                os.kill(self.proc.pid, sig)  # the nspawn we started: 1st TERM halts the container, 2nd forces it
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for ns in (self.netns, *self.hosts.values()):
            if netns.exists(ns):
                netns.run(["ip", "netns", "del", ns], check=False)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- inside ------------------------------------------------------------
    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a shell command inside the container (all its namespaces)."""
        argv = ["nsenter", "--target", str(self.leader), "--mount", "--uts", "--ipc", "--net", "--pid", "--root",
                "--wdns=/", "--", "/bin/sh", "-c", script]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        if check and proc.returncode != 0:
            raise ContainerError(f"in {self.name}: {script!r}: exit {proc.returncode}: "
                                 f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
        return proc

    def playbook(self, *extra: str, wheels: Path | None = None, source: Path = REPO, offline: bool = False,
                 timeout: float = 3600) -> subprocess.CompletedProcess:
        """Run ``source``'s ansible/site.yml (this checkout's by default) against this container over nsenter,
        or (``offline``) against its root before it boots, over the chroot connection, as image/build.sh does."""
        inv = self.dir / "inventory.ini"
        host = (f"{self.root} ansible_connection=pisnoop_chroot" if offline
                else f"{self.leader} ansible_connection=nsenter")
        inv.write_text(f"[pisnoop]\n{host} ansible_python_interpreter=/usr/bin/python3\n")
        variables = {
            "pisnoop_ovs_datapath_type": "netdev",  # no openvswitch kernel module in a container
            "pisnoop_apt_update": False,             # no network inside: the debs wait in the apt cache
            "pisnoop_mongodb_local": True,           # the embedded store, as a unit in the container
            "pisnoop_sensor": "pisnoop-ct",
            "pisnoop_wheelhouse": str(wheels or wheelhouse(self.arch)),
        }
        if offline:
            variables.update(pisnoop_offline=True, pisnoop_start_services=False)
        (self.dir / "vars.json").write_text(json.dumps(variables))
        bindir = Path(sys.executable).parent
        env = dict(os.environ, ANSIBLE_CONFIG=str(source / "ansible" / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCAL_TEMP=str(self.dir / "ansible-tmp"),
                   PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        argv = [str(bindir / "ansible-playbook"), "-i", str(inv), str(source / "ansible" / "site.yml"),
                "-e", f"@{self.dir / 'vars.json'}", *extra]
        if not offline:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        mounted = []
        try:  # what a chroot needs: /proc (Ansible tells a chroot by it), /sys, /dev
            for fs, where, opts in (("proc", "proc", ["-t", "proc"]), ("sysfs", "sys", ["-t", "sysfs"]),
                                    ("/dev", "dev", ["--bind"])):
                _run(["mount", *opts, fs, str(self.root / where)], timeout=30)
                mounted.append(self.root / where)
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        finally:
            for m in reversed(mounted):
                subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=30)

    # --- what a test reads -------------------------------------------------
    def nm_devices(self) -> dict[str, str]:
        """``nmcli device``: {interface: state} (e.g. connected, unmanaged)."""
        out = self.sh("nmcli -t -f DEVICE,STATE device").stdout
        return dict(line.rsplit(":", 1) for line in out.splitlines() if ":" in line)

    def switch(self) -> dict:
        """What must survive a reboot: fail mode, controller and its connection, OpenFlow ports, flows, meters."""
        sh = self.sh
        flows = sh("ovs-ofctl -O OpenFlow13 --no-stats dump-flows ovsbr0").stdout.splitlines()
        meters = sh("ovs-ofctl -O OpenFlow13 dump-meters ovsbr0").stdout.splitlines()
        return {
            "fail_mode": sh("ovs-vsctl get-fail-mode ovsbr0").stdout.strip(),
            "controller": sh("ovs-vsctl get-controller ovsbr0").stdout.strip(),
            "connected": sh("ovs-vsctl get controller ovsbr0 is_connected").stdout.strip(),
            "ports": {i: sh(f"ovs-vsctl get interface {i} ofport").stdout.strip() for i in ("eth1", "eth3", "mirror0")},
            "flows": sorted(f.strip() for f in flows if "cookie=" in f),
            "meters": sorted(m.strip() for m in meters if m.strip().startswith("meter=")),
        }

    def store(self, tag: bytes) -> dict:
        """The store, read inside with the installed pisnoop: marked frames of ``tag`` (seq numbers, in store
        order, and by capture run), every batch (id, ins, n), the snooper's status, the analyser's state and
        status."""
        script = self.root / "root/pisnoop-read-store.py"
        if not script.exists():
            script.write_text(READ_STORE)
        out = self.sh(f"/opt/pisnoop/venv/bin/python /root/pisnoop-read-store.py {tag.hex()}", timeout=180).stdout
        return json.loads(out)


# Run inside the container by Container.store (the installed pisnoop's own store client and frame unpacking).
READ_STORE = r'''
import json, struct, sys
from appliance import config, store
cfg = config.load("/etc/pisnoop/pisnoop.yaml")
db = store.database(cfg.mongodb)
tag, sensor = bytes.fromhex(sys.argv[1]), cfg.snooper.sensor
seqs, batches, runs = [], [], {}
for doc in db[store.FRAMES].find({"sensor": sensor}).sort([("run", 1), ("seq", 1)]):
    batches.append([doc["_id"], doc["ins"].timestamp(), doc["n"]])
    for f in store.batch_frames(doc):
        d = bytes(f.data if hasattr(f, "data") else f[2])
        if d[12:14] == b"\x88\xb5" and d[14:14 + len(tag)] == tag:
            seqs.append(struct.unpack_from("!Q", d, 14 + len(tag))[0])
            runs.setdefault(doc["run"], []).append(seqs[-1])
def doc(coll, _id):
    return db[coll].find_one({"_id": _id}) or {}
state = doc(store.STATE, "analyser:" + sensor)
an = doc(store.STATUS, "analyser:" + sensor)
sn = doc(store.STATUS, "snooper:" + sensor)
print(json.dumps({"seqs": seqs, "batches": batches, "runs": runs,
                  "state": {"resume": state["resume"].timestamp() if state.get("resume") else None,
                            "seen": [i for i, _ in state.get("seen", [])], "step": state.get("step", 0)},
                  "analyser": {"counters": an.get("counters", {}), "step": an.get("step")},
                  "snooper": {"run": sn.get("run"), "counters": sn.get("counters", {})}}))
'''


class Wire:
    """Marked frames (``tag`` + sequence number) from the inside host across the bridge to the upstream host.

    ``received`` maps each sequence number to when it first arrived at the
    upstream host (time.monotonic()); the mirror port gets the same frames
    (the controller's flows output both in one action list).
    """

    def __init__(self, ct: Container, tag: bytes):
        from tests import snooperutil
        self.tag = tag
        self.sent: list[int] = []
        self.received: dict[int, float] = {}
        self.duplicates = 0
        inside, upstream = ct.hosts["eth1"], ct.hosts["eth3"]
        self._frame = lambda seq: snooperutil.marked_frame(snooperutil.mac_of(upstream, "eth0"),
                                                           snooperutil.mac_of(inside, "eth0"), tag, seq)
        self._head = self._frame(0)[:14 + len(tag)]
        self.tx = snooperutil.raw_socket(inside, "eth0")
        with netns.enter(upstream):
            self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(snooperutil.ETHERTYPE))
            self.rx.bind(("eth0", snooperutil.ETHERTYPE))
        self.rx.settimeout(0.2)
        self._stop = threading.Event()
        self._streaming = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stream: threading.Thread | None = None

    def _read(self) -> None:
        n = len(self._head)
        while not self._stop.is_set():
            try:
                data = self.rx.recv(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            if data[:n] != self._head:
                continue
            seq = struct.unpack_from("!Q", data, n)[0]
            if seq in self.received:
                self.duplicates += 1
            else:
                self.received[seq] = time.monotonic()

    def send(self, count: int, rate: float = 200.0) -> list[int]:
        """Send ``count`` frames at about ``rate`` a second; return their sequence numbers."""
        start, first = time.monotonic(), len(self.sent)
        for i in range(count):
            seq = len(self.sent) + 1
            self.tx.send(self._frame(seq))
            self.sent.append(seq)
            ahead = (i + 1) / rate - (time.monotonic() - start)
            if ahead > 0.002:
                time.sleep(ahead)
        return self.sent[first:]

    def stream(self, rate: float) -> None:
        """Keep sending at ``rate`` a second in the background until ``halt()``."""
        self._streaming.set()

        def loop():
            while self._streaming.is_set():
                self.send(1, rate=1e9)
                time.sleep(1.0 / rate)
        self._stream = threading.Thread(target=loop, daemon=True)
        self._stream.start()

    def halt(self) -> None:
        self._streaming.clear()
        if self._stream is not None:
            self._stream.join(10)
            self._stream = None

    def first_after(self, t0: float, timeout: float) -> float | None:
        """Seconds from ``t0`` to the first frame received after it (None if none within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [t for t in list(self.received.values()) if t >= t0]
            if later:
                return min(later) - t0
            time.sleep(0.05)
        return None

    def settle(self, quiet: float = 1.0) -> None:
        """Wait until nothing new arrived for ``quiet`` seconds."""
        n = -1
        while n != len(self.received):
            n = len(self.received)
            time.sleep(quiet)

    def close(self) -> None:
        self.halt()
        self._stop.set()
        self._reader.join(5)
        self.tx.close()
        self.rx.close()


def recap(output: str) -> dict[str, int]:
    """The PLAY RECAP counters of a one-host playbook run."""
    m = re.search(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output)
    if not m:
        raise AssertionError(f"no PLAY RECAP in the playbook output:\n{output[-3000:]}")
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups())))
