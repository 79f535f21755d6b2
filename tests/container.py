"""Debian 12 containers for the provisioning tests.

A debootstrap root per architecture is built once and cached (a fresh CI
machine builds it: ~1 min amd64, ~3-4 min arm64 under qemu-user-static).
The packages the playbook installs are downloaded into the root's apt cache
at build time, so the booted container installs them itself with no network:
it only has its own network namespace with the appliance's ports (veth
pairs eth1, eth3). Each test run boots a fresh copy of the root with
``systemd-nspawn -b`` (systemd as PID 1); ``--register=no --keep-unit``
because the host has no systemd to register with.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
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
# what the playbook installs (roles base and openvswitch): only downloaded at build time
PLAYBOOK_PACKAGES = ["ifupdown", "iproute2", "procps", "tcpdump", "python3-venv", "python3-systemd",
                     "openvswitch-switch"]
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
    key = {"suite": SUITE, "arch": arch, "base": BASE_PACKAGES}
    root = CACHE / f"debian12-{arch}"
    stamp = CACHE / f"debian12-{arch}.json"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
    with _Lock(CACHE / f"debian12-{arch}.lock"):
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
    tmp = CACHE / f"debian12-{arch}.building"
    for old in (tmp, root):
        if old.exists():
            shutil.rmtree(old)
    stamp.unlink(missing_ok=True)
    t0 = time.monotonic()
    _run(["debootstrap", f"--arch={arch}", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
          SUITE, str(tmp), MIRROR], timeout=3600)
    _run(["chroot", str(tmp), "apt-get", "update", "-qq"], env=env)
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


class Container:
    """A fresh copy of a cached root, booted with systemd as PID 1 in a network namespace of its own."""

    def __init__(self, arch: str, boot_timeout: float = 300.0):
        self.arch = arch
        self.boot_timeout = boot_timeout
        self.name = "ps" + secrets.token_hex(2)
        self.dir = WORK / self.name
        self.root = self.dir / "root"
        self.netns = f"{self.name}-ct"
        self.log = self.dir / "console.log"
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.boot_seconds: float | None = None

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

    def start(self) -> None:
        base, _ = base_root(self.arch)
        foreign_arch_ready(self.arch)
        self.dir.mkdir(parents=True)
        _run(["cp", "-a", "--reflink=auto", str(base), str(self.root)], timeout=600)
        netns.run(["ip", "netns", "add", self.netns])
        for port in ("eth1", "eth3"):  # the bridge's ports; the peers stay unplugged inside
            netns.run(["ip", "link", "add", port, "type", "veth", "peer", "name", f"{port}p"], ns=self.netns)
            netns.run(["ip", "link", "set", f"{port}p", "up"], ns=self.netns)
        t0 = time.monotonic()
        with open(self.log, "wb") as log:
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
                return
            time.sleep(1)
        raise ContainerError(f"container {self.name} did not finish booting within {self.boot_timeout:.0f} s "
                             f"(state {state!r}); console: {self.log}")

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
            for sig, wait in ((signal.SIGTERM, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 20)):
                os.kill(self.proc.pid, sig)  # the nspawn we started: 1st TERM halts the container, 2nd forces it
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if netns.exists(self.netns):
            netns.run(["ip", "netns", "del", self.netns], check=False)
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

    def playbook(self, *extra: str, wheels: Path | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
        """Run ansible/site.yml against this container over the nsenter connection."""
        inv = self.dir / "inventory.ini"
        inv.write_text(f"[pisnoop]\n{self.leader} ansible_connection=nsenter "
                       "ansible_python_interpreter=/usr/bin/python3\n")
        variables = {
            "pisnoop_ovs_datapath_type": "netdev",  # no openvswitch kernel module in a container
            "pisnoop_apt_update": False,             # no network inside: the debs wait in the apt cache
            "pisnoop_mongodb_local": True,           # the embedded store, as a unit in the container
            "pisnoop_sensor": "pisnoop-ct",
            "pisnoop_wheelhouse": str(wheels or wheelhouse(self.arch)),
        }
        (self.dir / "vars.json").write_text(json.dumps(variables))
        bindir = Path(sys.executable).parent
        env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible" / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCAL_TEMP=str(self.dir / "ansible-tmp"),
                   PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        return subprocess.run([str(bindir / "ansible-playbook"), "-i", str(inv), str(REPO / "ansible" / "site.yml"),
                               "-e", f"@{self.dir / 'vars.json'}", *extra],
                              capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def recap(output: str) -> dict[str, int]:
    """The PLAY RECAP counters of a one-host playbook run."""
    m = re.search(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output)
    if not m:
        raise AssertionError(f"no PLAY RECAP in the playbook output:\n{output[-3000:]}")
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups())))
