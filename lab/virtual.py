"""The virtual appliance: the Pi, its three wires and a store, in namespaces.

One run gets a unique prefix (``ps`` + 4 hex digits) and a private run
directory. It brings up:

* namespace ``<p>-sw`` (the Pi's switch side): ovs-vswitchd with its own
  OVS_RUNDIR, bridge ``<p>br`` with ``datapath_type=netdev``,
  ``fail_mode=secure``, OpenFlow 1.3, a fixed datapath id, out-of-band
  control and controller target ``tcp:127.0.0.1:<listen_port>`` with
  ``max_backoff`` (set in the same command: docs/ARCHITECTURE.md, "Facts: Open vSwitch");
* hosts ``<p>-in`` (port 1) and ``<p>-up`` (port 3), dual stack: IPv4 in
  10.0.0.0/24 and IPv6 in the run's LAN /64, a /64 of a unique local /48 drawn
  per run (fd00::/8, never a global prefix); ``<p>-mi`` (port 2, interface
  ``mirror0``) with a link-local IPv4 address only and IPv6 off, so the mirror
  sends nothing (no router solicitation, DAD or MLD), as on the Pi
  (``interfaces.d``). Each is wired by a veth pair with TX checksum offload
  off on both ends. The switch's namespace has IPv6 off too (its veth ends
  would otherwise send MLD into the bridge);
* with ``lan=True``, the inside segment becomes a LAN: a learning bridge in
  ``<p>-ln`` joins port 1, the inside host, a neighbour host ``<p>-nb`` (its
  own MAC, 10.0.0.20 and ``<ula>::20``: the attacker's seat) and a router
  ``<p>-rt``, which routes two client prefixes (10.1.N.0/24 and
  ``<ula>:N::/64``, N = 1, 2) of hosts ``<p>-c1`` and ``<p>-c2`` behind it:
  their frames reach the switch with the router's MAC;
* a relay carrying the switch's controller connection out of ``<p>-sw`` to
  the controller listening on 127.0.0.1 in the caller's namespace;
* ovsdb-server and the embedded store (nx-27017) on 127.0.0.1; or, with
  ``store_uri``, no store: the appliance joins one that runs (two appliances,
  one store: each its own prefix, bridge, namespaces and ``sensor``).

``state.json`` in the run directory records every PID and name as soon as it
exists, so ``down()`` (or ``pisnoop virtual down`` from another process) can
tear down a half-built run too. The context manager turns SIGTERM into an
exception so that ``with VirtualAppliance() as va:`` cleans up on SIGINT,
SIGTERM and test failures alike.
"""

from __future__ import annotations

import dataclasses
import ipaddress
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
HOST_SUFFIX6 = {"inside": 0x10, "upstream": 0x1}    # the hosts' IPv6 interface ids in the LAN /64
ROUTER_IP, ROUTER_SUFFIX6 = f"{SUBNET}.254", 0xfe
NEIGHBOUR_IP, NEIGHBOUR_SUFFIX6 = f"{SUBNET}.20", 0x20
ROUTED_NETS = (1, 2)                                # client prefixes behind the router: 10.1.N.0/24, <ula>:N::/64
MIRROR_ADDRESS = "169.254.77.2/16"
HOST_IF = "eth0"
MIRROR_IF = "mirror0"
LAN_BRIDGE = "lan"
_DUAL_STACK_SYSCTLS = ("net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
                       # addresses usable at once, no router discovery: the lab's traffic is what the test sends
                       "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                       "net.ipv6.conf.default.router_solicitations=0", "net.ipv6.conf.default.accept_ra=0")


def ula_prefix() -> ipaddress.IPv6Network:
    """A random unique local /48 (RFC 4193: fd00::/8 + 40 random bits) for one run."""
    return ipaddress.IPv6Network(((0xFD << 120) | (secrets.randbits(40) << 80), 48))


def base_dir() -> Path:
    return Path(os.environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR))


class VirtualApplianceError(RuntimeError):
    pass


@dataclasses.dataclass
class Host:
    role: str
    netns: str
    ifname: str
    ofport: int | None     # its switch port, None for a host behind the LAN bridge or the router
    ip: str | None
    ip6: str | None = None


class VirtualAppliance:
    """Bring up with ``up()`` or ``with``; tear down with ``down()``."""

    def __init__(self, base: config_mod.Config | None = None, prefix: str | None = None,
                 with_store: bool = True, root: str | os.PathLike | None = None, lan: bool = False,
                 store_uri: str | None = None, sensor: str | None = None):
        """``store_uri``: a second (third, ...) appliance on a store that already runs (another appliance's
        ``store.uri``): no store of its own, its config names that one. ``sensor``: its ``snooper.sensor``
        (default: the prefix), the name its documents carry in the shared store."""
        self.base = base or config_mod.Config()
        self.prefix = prefix or ("ps" + secrets.token_hex(2))
        if not self.prefix.isalnum() or len(self.prefix) > 8:
            raise VirtualApplianceError(f"prefix {self.prefix!r}: expected up to 8 letters or digits")
        if store_uri is not None and with_store:
            with_store = False            # the shared store is the one
        self.store_uri = store_uri
        self.sensor = sensor or self.prefix
        self.run_dir = Path(root or base_dir()) / self.prefix
        self.with_store = with_store
        self.lan = lan
        self.ula = ula_prefix()
        self.lan6 = self.prefix6(0)
        self.state: dict[str, Any] = {"prefix": self.prefix, "pids": {}, "namespaces": [], "links": [],
                                      "ula": str(self.ula)}
        p = self.prefix
        ports = self.base.switch.ports
        self.sw_ns = f"{p}-sw"
        self.lan_ns = f"{p}-ln"
        self.bridge = f"{p}br"
        self.hosts = {
            "inside": Host("inside", f"{p}-in", HOST_IF, ports.inside, ADDRESSES["inside"],
                           self.addr6(0, HOST_SUFFIX6["inside"])),
            "mirror": Host("mirror", f"{p}-mi", MIRROR_IF, ports.mirror, MIRROR_ADDRESS.split("/")[0]),
            "upstream": Host("upstream", f"{p}-up", HOST_IF, ports.upstream, ADDRESSES["upstream"],
                             self.addr6(0, HOST_SUFFIX6["upstream"])),
        }
        if lan:
            self.hosts["neighbour"] = Host("neighbour", f"{p}-nb", HOST_IF, None, NEIGHBOUR_IP,
                                           self.addr6(0, NEIGHBOUR_SUFFIX6))
            self.hosts["router"] = Host("router", f"{p}-rt", HOST_IF, None, ROUTER_IP, self.addr6(0, ROUTER_SUFFIX6))
            for n in ROUTED_NETS:
                self.hosts[f"client{n}"] = Host(f"client{n}", f"{p}-c{n}", HOST_IF, None, f"10.1.{n}.10",
                                                self.addr6(n, 0x10))
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

    def prefix6(self, n: int) -> ipaddress.IPv6Network:
        """The run's /64 number ``n``: 0 is the LAN (inside and upstream), N the router's client prefix N."""
        return ipaddress.IPv6Network((int(self.ula.network_address) | (n << 64), 64))

    def addr6(self, n: int, interface_id: int) -> str:
        return str(self.prefix6(n)[interface_id])

    def exec(self, role: str, cmd: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a command on one of the hosts (``inside``, ``mirror``, ``upstream``; with a LAN ``neighbour``,
        ``router``, ``clientN``)."""
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

    def _add_ns(self, name: str, dual_stack: bool = False) -> None:
        run(["ip", "netns", "add", name])
        self.state["namespaces"].append(name)
        self._save()
        run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], ns=name)
        if dual_stack:
            run(["sysctl", "-q", "-w", *_DUAL_STACK_SYSCTLS], ns=name)
        run(["ip", "link", "set", "lo", "up"], ns=name)

    def _veth(self, a: str, a_ns: str, b: str, b_ns: str, b_ifname: str) -> None:
        """A veth pair ``a`` (in ``a_ns``) -- ``b`` (in ``b_ns``, renamed ``b_ifname``), TX offload off, ``a`` up."""
        self.state["links"] += [a, b]
        self._save()
        run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        run(["ip", "link", "set", a, "netns", a_ns])
        run(["ip", "link", "set", b, "netns", b_ns])
        if b != b_ifname:
            run(["ip", "link", "set", b, "name", b_ifname], ns=b_ns)
        run(["ethtool", "-K", a, "tx", "off"], ns=a_ns)
        run(["ethtool", "-K", b_ifname, "tx", "off"], ns=b_ns)
        run(["ip", "link", "set", a, "up"], ns=a_ns)

    def _addresses(self, host: Host, v4_len: int = 24) -> None:
        run(["ip", "addr", "add", f"{host.ip}/{v4_len}", "dev", host.ifname], ns=host.netns)
        if host.ip6:
            run(["ip", "-6", "addr", "add", f"{host.ip6}/64", "dev", host.ifname, "nodad"], ns=host.netns)
        run(["ip", "link", "set", host.ifname, "up"], ns=host.netns)

    def _bring_up(self) -> None:
        p = self.prefix
        self._add_ns(self.sw_ns)
        if self.lan:
            self._add_ns(self.lan_ns)
            run(["ip", "link", "add", LAN_BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0",
                 "mcast_snooping", "0"], ns=self.lan_ns)
            run(["ip", "link", "set", LAN_BRIDGE, "up"], ns=self.lan_ns)
        for host in self.hosts.values():
            self._add_ns(host.netns, dual_stack=host.ip6 is not None)
        # wires: switch-side end "<p>-pN" in the switch namespace, host end in the host's
        for host in self.hosts.values():
            if host.ofport is None:
                continue
            sw_end, host_end = f"{p}-p{host.ofport}", f"{p}-h{host.ofport}"
            if host.role == "inside" and self.lan:
                self._veth(sw_end, self.sw_ns, host_end, self.lan_ns, f"{p}-h{host.ofport}")
                self._lan_port(host_end)
                self._veth(f"{p}-l1", self.lan_ns, f"{p}-i1", host.netns, host.ifname)
                self._lan_port(f"{p}-l1")
            else:
                self._veth(sw_end, self.sw_ns, host_end, host.netns, host.ifname)
            if host.role == "mirror":
                run(["ip", "addr", "add", MIRROR_ADDRESS, "dev", host.ifname], ns=host.netns)
                run(["ip", "link", "set", host.ifname, "up"], ns=host.netns)
            else:
                self._addresses(host)
        if self.lan:
            self._bring_up_lan()
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

    def _lan_port(self, ifname: str) -> None:
        run(["ip", "link", "set", ifname, "master", LAN_BRIDGE, "up"], ns=self.lan_ns)

    def _bring_up_lan(self) -> None:
        """The neighbour and the router on the LAN, the router's two client prefixes, routed back by upstream."""
        p, rt, up, nb = self.prefix, self.hosts["router"], self.hosts["upstream"], self.hosts["neighbour"]
        self._veth(f"{p}-l3", self.lan_ns, f"{p}-n0", nb.netns, nb.ifname)
        self._lan_port(f"{p}-l3")
        self._addresses(nb)
        self._veth(f"{p}-l2", self.lan_ns, f"{p}-r0", rt.netns, rt.ifname)
        self._lan_port(f"{p}-l2")
        self._addresses(rt)
        run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"], ns=rt.netns)
        for n in ROUTED_NETS:
            client = self.hosts[f"client{n}"]
            self._veth(f"{p}-r{n}", rt.netns, f"{p}-k{n}", client.netns, client.ifname)
            run(["ip", "addr", "add", f"10.1.{n}.1/24", "dev", f"{p}-r{n}"], ns=rt.netns)
            run(["ip", "-6", "addr", "add", f"{self.addr6(n, 1)}/64", "dev", f"{p}-r{n}", "nodad"], ns=rt.netns)
            self._addresses(client)
            run(["ip", "route", "add", "default", "via", f"10.1.{n}.1"], ns=client.netns)
            run(["ip", "-6", "route", "add", "default", "via", self.addr6(n, 1)], ns=client.netns)
            run(["ip", "route", "add", f"10.1.{n}.0/24", "via", ROUTER_IP], ns=up.netns)
            run(["ip", "-6", "route", "add", str(self.prefix6(n)), "via", rt.ip6], ns=up.netns)

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
        wired = [h for h in self.hosts.values() if h.ofport is not None]
        for host in wired:
            port = f"{self.prefix}-p{host.ofport}"
            args += ["--", "add-port", br, port, "--", "set", "interface", port, f"ofport_request={host.ofport}"]
        self.vsctl(*args)
        self.vsctl("set-controller", br, f"tcp:127.0.0.1:{listen_port}", "--",
                   "set", "controller", br, f"max_backoff={max_backoff_ms}", "connection_mode=out-of-band")
        # wait until every port has its requested number: flows can be pushed after that
        deadline = time.monotonic() + 20
        want = {f"{self.prefix}-p{h.ofport}": h.ofport for h in wired}
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
        data["snooper"]["sensor"] = self.sensor
        data["snooper"]["spool_dir"] = str(self.run_dir / "spool")
        data["analyser"]["report_dir"] = str(self.run_dir / "reports")
        if self.store:
            data["mongodb"]["uri"] = self.store.uri
        elif self.store_uri:
            data["mongodb"]["uri"] = self.store_uri
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

    def mac(self, role: str) -> str:
        host = self.hosts[role]
        return self.exec(role, ["cat", f"/sys/class/net/{host.ifname}/address"]).stdout.strip()

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
