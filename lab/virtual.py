"""The virtual appliance: the Pi, its three wires and a store, in namespaces.

One run gets a unique prefix (``ps`` + 4 hex digits) and a private run
directory. It brings up:

* namespace ``<p>-sw`` (the Pi's switch side): ovs-vswitchd with its own
  OVS_RUNDIR, bridge ``<p>br`` with ``datapath_type=netdev``,
  ``fail_mode=secure``, OpenFlow 1.3, a fixed datapath id, out-of-band
  control and controller target ``tcp:127.0.0.1:<listen_port>`` with
  ``max_backoff`` (set in the same command: docs/ARCHITECTURE.md, "Facts: Open vSwitch");
* hosts ``<p>-in`` (port 1), ``<p>-mi`` (port 2, interface ``mirror0`` with a
  link-local IPv4 address only) and ``<p>-up`` (port 3), each wired by a veth
  pair with TX checksum offload off on both ends and IPv6 off (no stray
  router solicitations on the mirror);
* a relay carrying the switch's controller connection out of ``<p>-sw`` to
  the controller listening on 127.0.0.1 in the caller's namespace;
* ovsdb-server and the embedded store (nx-27017) on 127.0.0.1.

``state.json`` in the run directory records every PID and name as soon as it
exists, so ``down()`` (or ``pisnoop virtual down`` from another process) can
tear down a half-built run too. The context manager turns SIGTERM into an
exception so that ``with VirtualAppliance() as va:`` cleans up on SIGINT,
SIGTERM and test failures alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance import config as config_mod
from appliance import netns
from appliance.netns import CommandFailed, run

from .procs import EmbeddedStore, alive, free_port, stop_pid

BASE_DIR_ENV = "PISNOOP_VIRTUAL_DIR"
DEFAULT_BASE_DIR = "/run/pisnoop-virtual"
OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"

SUBNET = "10.0.0"
ADDRESSES = {"inside": f"{SUBNET}.10", "upstream": f"{SUBNET}.1"}
MIRROR_ADDRESS = "169.254.77.2/16"
HOST_IF = "eth0"
MIRROR_IF = "mirror0"


def base_dir() -> Path:
    return Path(os.environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR))


class VirtualApplianceError(RuntimeError):
    pass


@dataclasses.dataclass
class Host:
    role: str
    netns: str
    ifname: str
    ofport: int
    ip: str | None


class VirtualAppliance:
    """Bring up with ``up()`` or ``with``; tear down with ``down()``."""

    def __init__(self, base: config_mod.Config | None = None, prefix: str | None = None,
                 with_store: bool = True, root: str | os.PathLike | None = None):
        self.base = base or config_mod.Config()
        self.prefix = prefix or ("ps" + secrets.token_hex(2))
        if not self.prefix.isalnum() or len(self.prefix) > 8:
            raise VirtualApplianceError(f"prefix {self.prefix!r}: expected up to 8 letters or digits")
        self.run_dir = Path(root or base_dir()) / self.prefix
        self.with_store = with_store
        self.state: dict[str, Any] = {"prefix": self.prefix, "pids": {}, "namespaces": [], "links": []}
        p = self.prefix
        ports = self.base.switch.ports
        self.sw_ns = f"{p}-sw"
        self.bridge = f"{p}br"
        self.hosts = {
            "inside": Host("inside", f"{p}-in", HOST_IF, ports.inside, ADDRESSES["inside"]),
            "mirror": Host("mirror", f"{p}-mi", MIRROR_IF, ports.mirror, MIRROR_ADDRESS.split("/")[0]),
            "upstream": Host("upstream", f"{p}-up", HOST_IF, ports.upstream, ADDRESSES["upstream"]),
        }
        self.config: config_mod.Config | None = None
        self.config_path = self.run_dir / "pisnoop.yaml"
        self.store: EmbeddedStore | None = None

    # --- environment for the OVS tools --------------------------------------

    @property
    def ovs_env(self) -> dict[str, str]:
        d = str(self.run_dir / "ovs")
        return {"OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d, "OVS_SYSCONFDIR": d,
                "OVS_PKGDATADIR": "/usr/share/openvswitch"}

    @property
    def db_sock(self) -> str:
        return f"unix:{self.run_dir / 'ovs' / 'db.sock'}"

    def vsctl(self, *args: str, timeout: float = 20.0) -> str:
        return run(["ovs-vsctl", f"--db={self.db_sock}", "--timeout=15", *args], env=self.ovs_env,
                   timeout=timeout).stdout

    def ofctl(self, *args: str, timeout: float = 20.0) -> str:
        """``ovs-ofctl -O OpenFlow13 CMD <bridge> ARGS``: the bridge name goes after the command."""
        cmd, *rest = args
        return run(["ovs-ofctl", "-O", "OpenFlow13", cmd, self.bridge, *rest], env=self.ovs_env, timeout=timeout).stdout

    def appctl(self, *args: str) -> str:
        target = self.run_dir / "ovs" / "ovs-vswitchd.ctl"
        return run(["ovs-appctl", "-t", str(target), *args], env=self.ovs_env).stdout

    def exec(self, role: str, cmd: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a command on one of the hosts (``inside``, ``mirror``, ``upstream``)."""
        return run(cmd, ns=self.hosts[role].netns, check=check, timeout=timeout)

    def popen(self, role: str, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[role].netns, *cmd], **kw)

    # --- up / down -------------------------------------------------------------

    def up(self) -> "VirtualAppliance":
        if self.run_dir.exists():
            raise VirtualApplianceError(f"{self.run_dir} exists: prefix {self.prefix} is in use "
                                        f"(pisnoop virtual down {self.prefix})")
        self._preflight()
        self.run_dir.mkdir(parents=True)
        (self.run_dir / "ovs").mkdir()
        self._save()
        try:
            self._bring_up()
        except BaseException:
            self.down()
            raise
        return self

    def _preflight(self) -> None:
        missing = [t for t in ("ip", "ethtool", "ovs-vsctl", "ovs-vswitchd", "ovsdb-server", "ovsdb-tool", "ovs-ofctl")
                   if shutil.which(t) is None]
        if missing:
            raise VirtualApplianceError("missing tools: " + ", ".join(missing) + " (run ./setup.sh)")
        if os.geteuid() != 0:
            raise VirtualApplianceError("the virtual appliance needs root (network namespaces, veths, OVS)")

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.state["namespaces"].append(name)
        self._save()
        run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], ns=name)
        run(["ip", "link", "set", "lo", "up"], ns=name)

    def _bring_up(self) -> None:
        p = self.prefix
        for ns in [self.sw_ns] + [h.netns for h in self.hosts.values()]:
            self._add_ns(ns)
        # wires: switch-side end "<p>-pN" in the switch namespace, host end in the host's
        for host in self.hosts.values():
            sw_end, host_end = f"{p}-p{host.ofport}", f"{p}-h{host.ofport}"
            self.state["links"] += [sw_end, host_end]
            self._save()
            run(["ip", "link", "add", sw_end, "type", "veth", "peer", "name", host_end])
            run(["ip", "link", "set", sw_end, "netns", self.sw_ns])
            run(["ip", "link", "set", host_end, "netns", host.netns])
            run(["ip", "link", "set", host_end, "name", host.ifname], ns=host.netns)
            run(["ethtool", "-K", sw_end, "tx", "off"], ns=self.sw_ns)
            run(["ethtool", "-K", host.ifname, "tx", "off"], ns=host.netns)
            run(["ip", "link", "set", sw_end, "up"], ns=self.sw_ns)
            if host.role == "mirror":
                run(["ip", "addr", "add", MIRROR_ADDRESS, "dev", host.ifname], ns=host.netns)
            else:
                run(["ip", "addr", "add", f"{host.ip}/24", "dev", host.ifname], ns=host.netns)
            run(["ip", "link", "set", host.ifname, "up"], ns=host.netns)
        self._start_ovs()
        cfg_ctl = self.base.switch.controller
        controller_port = free_port()
        self._start_relay(cfg_ctl.listen_port, controller_port)
        self._make_bridge(cfg_ctl.listen_port, cfg_ctl.max_backoff_ms)
        if self.with_store:
            self.store = EmbeddedStore(self.run_dir / "store")
            self.store.start()
            self.state["pids"]["store"] = self.store.pid
            self.state["store_uri"] = self.store.uri
            self._save()
        self._write_config(controller_port)

    def _start_ovs(self) -> None:
        ovs = self.run_dir / "ovs"
        env = self.ovs_env
        run(["ovsdb-tool", "create", str(ovs / "conf.db"), OVS_SCHEMA], env=env)
        run(["ovsdb-server", str(ovs / "conf.db"), f"--remote=punix:{ovs / 'db.sock'}",
             f"--pidfile={ovs / 'ovsdb-server.pid'}", f"--unixctl={ovs / 'ovsdb-server.ctl'}",
             f"--log-file={ovs / 'ovsdb-server.log'}", "--detach", "--no-chdir"], env=env)
        self.state["pids"]["ovsdb-server"] = int((ovs / "ovsdb-server.pid").read_text())
        self._save()
        self.vsctl("--no-wait", "init")
        run(["ovs-vswitchd", self.db_sock, f"--pidfile={ovs / 'ovs-vswitchd.pid'}",
             f"--unixctl={ovs / 'ovs-vswitchd.ctl'}", f"--log-file={ovs / 'ovs-vswitchd.log'}",
             "--detach", "--no-chdir"], ns=self.sw_ns, env=env, timeout=60)
        self.state["pids"]["ovs-vswitchd"] = int((ovs / "ovs-vswitchd.pid").read_text())
        self._save()

    def _make_bridge(self, listen_port: int, max_backoff_ms: int) -> None:
        br = self.bridge
        dpid = f"{self.base.switch.datapath_id:016x}"
        args = ["add-br", br, "--", "set", "bridge", br, "datapath_type=netdev", "fail_mode=secure",
                "protocols=OpenFlow13", f"other-config:datapath-id={dpid}", "other-config:disable-in-band=true"]
        for host in self.hosts.values():
            port = f"{self.prefix}-p{host.ofport}"
            args += ["--", "add-port", br, port, "--", "set", "interface", port, f"ofport_request={host.ofport}"]
        self.vsctl(*args)
        self.vsctl("set-controller", br, f"tcp:127.0.0.1:{listen_port}", "--",
                   "set", "controller", br, f"max_backoff={max_backoff_ms}", "connection_mode=out-of-band")
        # wait until every port has its requested number: flows can be pushed after that
        deadline = time.monotonic() + 20
        want = {f"{self.prefix}-p{h.ofport}": h.ofport for h in self.hosts.values()}
        while True:
            got = {name: self._ofport(name) for name in want}
            if got == want:
                return
            if time.monotonic() > deadline:
                raise VirtualApplianceError(f"bridge ports did not come up as requested: {got}")
            time.sleep(0.1)

    def _ofport(self, iface: str) -> int:
        try:
            return int(self.vsctl("get", "interface", iface, "ofport").strip())
        except (CommandFailed, ValueError):
            return -1

    def _start_relay(self, listen_port: int, controller_port: int) -> None:
        log = open(self.run_dir / "relay.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "lab.relay", "--netns", self.sw_ns,
                                 "--listen", f"127.0.0.1:{listen_port}", "--to", f"127.0.0.1:{controller_port}"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
        log.close()
        self.state["pids"]["relay"] = proc.pid
        self._save()
        deadline = time.monotonic() + 10
        while b"relay ready" not in (self.run_dir / "relay.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise VirtualApplianceError("controller relay did not start: "
                                            f"{(self.run_dir / 'relay.log').read_text()[-300:]}")
            time.sleep(0.05)

    def _write_config(self, controller_port: int) -> None:
        data = config_mod.to_dict(self.base)
        data["switch"]["bridge"] = self.bridge
        data["switch"]["controller"]["listen_host"] = "127.0.0.1"
        data["switch"]["controller"]["listen_port"] = controller_port
        data["snooper"]["interface"] = MIRROR_IF
        data["snooper"]["netns"] = self.hosts["mirror"].netns
        data["snooper"]["sensor"] = self.prefix
        data["snooper"]["spool_dir"] = str(self.run_dir / "spool")
        data["analyser"]["report_dir"] = str(self.run_dir / "reports")
        if self.store:
            data["mongodb"]["uri"] = self.store.uri
        m = data["metrics"]
        m["controller_port"], m["snooper_port"], m["analyser_port"] = (free_port() for _ in range(3))
        self.config = config_mod.from_dict(data, str(self.config_path))
        self.config_path.write_text("# written by the pisnoop virtual appliance " + self.prefix + "\n"
                                    + config_mod.dump(self.config))
        self.state["config"] = str(self.config_path)
        self._save()

    def _save(self) -> None:
        if self.run_dir.exists():
            tmp = self.run_dir / "state.json.tmp"
            tmp.write_text(json.dumps(self.state, indent=1))
            tmp.replace(self.run_dir / "state.json")

    def down(self) -> list[str]:
        """Tear everything down; return what could not be removed (empty when clean)."""
        return teardown(self.run_dir, self.state)

    # --- context manager with signal safety ---------------------------------

    def __enter__(self) -> "VirtualAppliance":
        self._old_term = None
        if _main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _raise_on_term)
        return self.up()

    def __exit__(self, *exc) -> None:
        try:
            left = self.down()
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
        if left and exc[0] is None:
            raise VirtualApplianceError("teardown left: " + "; ".join(left))

    # --- questions -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return status_of(self.run_dir)

    def ping(self, src: str, dst_ip: str, count: int = 1, timeout: float = 1.0) -> bool:
        res = self.exec(src, ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout), "-i", "0.2", dst_ip],
                        check=False, timeout=count * (timeout + 1) + 5)
        return res.returncode == 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks and context managers run."""


def _raise_on_term(signum, frame):
    raise _Terminated()


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {"prefix": run_dir.name, "pids": {}, "namespaces": [], "links": []}


def teardown(run_dir: Path, state: dict[str, Any] | None = None) -> list[str]:
    """Remove one run: daemons by PID, namespaces, links, run directory."""
    state = state if state is not None else _read_state(run_dir)
    left: list[str] = []
    # the relay and the store first, then vswitchd before ovsdb-server
    for name in ("relay", "store", "ovs-vswitchd", "ovsdb-server"):
        pid = state.get("pids", {}).get(name)
        if pid and _is_ours(pid, run_dir, name):
            stop_pid(pid)
            if alive(pid):
                left.append(f"{name} pid {pid}")
    # whatever else still names this run's directory is ours too (e.g. a store a test restarted)
    for pid in _pids_naming(run_dir):
        stop_pid(pid)
        if alive(pid):
            left.append(f"pid {pid} ({run_dir})")
    for ns in state.get("namespaces", []):
        if netns.exists(ns):
            res = run(["ip", "netns", "del", ns], check=False)
            if res.returncode != 0:
                left.append(f"netns {ns}: {res.stderr.strip()}")
    for link in state.get("links", []):
        if Path(f"/sys/class/net/{link}").exists():
            run(["ip", "link", "del", link], check=False)
            if Path(f"/sys/class/net/{link}").exists():
                left.append(f"link {link}")
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_dir.exists():
            left.append(f"directory {run_dir}")
    return left


def _pids_naming(run_dir: Path) -> list[int]:
    """Processes whose command line contains this run's directory (unique per run, so ours)."""
    needle = (str(run_dir) + "/").encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry))
    return found


def _is_ours(pid: int, run_dir: Path, name: str) -> bool:
    """Only end a PID whose command line names our run directory or our store port (never a stranger)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if name == "relay":
        return "lab.relay" in cmdline and run_dir.name in cmdline
    return str(run_dir) in cmdline


def status_of(run_dir: Path) -> dict[str, Any]:
    state = _read_state(run_dir)
    pids = {name: {"pid": pid, "alive": bool(pid) and alive(pid)} for name, pid in state.get("pids", {}).items()}
    out: dict[str, Any] = {"prefix": state.get("prefix", run_dir.name), "run_dir": str(run_dir),
                           "config": state.get("config"), "store": state.get("store_uri"), "daemons": pids,
                           "namespaces": {ns: netns.exists(ns) for ns in state.get("namespaces", [])}}
    if pids.get("ovsdb-server", {}).get("alive"):
        prefix = out["prefix"]
        env = {"OVS_RUNDIR": str(run_dir / "ovs")}
        db = f"--db=unix:{run_dir / 'ovs' / 'db.sock'}"
        br = f"{prefix}br"
        fail = run(["ovs-vsctl", db, "get-fail-mode", br], env=env, check=False).stdout.strip()
        ports = run(["ovs-vsctl", db, "--columns=name,ofport", "--format=csv", "--no-headings", "list", "interface"],
                    env=env, check=False).stdout.split()
        conn = run(["ovs-vsctl", db, "--columns=is_connected", "--format=csv", "--no-headings", "list", "controller"],
                   env=env, check=False).stdout.strip()
        out["bridge"] = {"name": br, "fail_mode": fail, "ports": sorted(ports), "controller_connected": conn == "true"}
        if pids.get("ovs-vswitchd", {}).get("alive"):
            flows = run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", br], env=env, check=False).stdout
            out["bridge"]["flows"] = sum(1 for line in flows.splitlines() if "cookie=" in line)
    return out


def list_runs(root: str | os.PathLike | None = None) -> list[Path]:
    d = Path(root or base_dir())
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir())
