"""The closed loop, end to end: the scenarios behind ``pisnoop demo``, their tests and the benchmark.

A virtual appliance; the controller, snooper and analyser as separate
processes started the way systemd starts them (``Type=notify``: each gets its
own NOTIFY_SOCKET and is ready when it says READY=1); Prosody on the upstream
host, TLS on both families; benign slixmpp clients chatting at a human rate
and an attack (``ATTACKS``, planned in ``plan``):

* ``flood`` (the default): one abusive client on the inside host floods over IPv4;
* ``ipv6``: an IPv6 flooder on a neighbour host, beside an IPv4 and an IPv6 benign client;
* ``spoof``: a neighbour host floods SYNs and made-up data segments toward 5222 in the
  names (IPv4 and IPv6) of a benign client; the victim must never be banned;
* ``rotate``: a neighbour host rotating 40 privacy addresses in the LAN's /64 (to be
  caught as that host, by MAC) and, behind the router, a client rotating inside its
  /64 (to be caught as that prefix), while a benign host in the same LAN /64 and a
  benign client of the router's other prefix chat;
* ``reconnect``: a client logging in again after every few messages, each connection
  under the per-connection line, with the default thresholds.

The scenario waits until every target of the attack is flagged and its
packets hit a drop (or limit) flow at the switch, keeps the benign clients
chatting a little longer, then stops everything and gathers the evidence
into a ``Result``, with the detection-to-block latency of each target: from
the captured frame that crossed the threshold (the flag's evidence) to the
install of the flow that enforces it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from analyser import parse
from appliance import config as config_mod
from appliance import store

from . import xmpplab
from .virtual import VirtualAppliance

SERVICES = ("controller", "snooper", "analyser")
ATTACKS = ("flood", "ipv6", "spoof", "rotate", "reconnect")
BENIGN_BASE = 11          # benign clients use 10.0.0.11, .12, ... (and <lan>::11, ...)
ABUSER_IP = "10.0.0.66"   # the flood's abusive client, on the inside host as before
RECONNECT_IP = "10.0.0.67"


@dataclasses.dataclass(frozen=True)
class Options:
    attack: str = "flood"
    benign: int = 3
    benign_per_minute: float = 6.0     # messages per minute per benign client
    abusive_per_second: float = 20.0
    warmup: float = 8.0                # seconds of benign chat before the attack
    after_block: float = 8.0           # seconds the benign clients go on after the block (>= 2.5 to prove it)
    timeout: float = 120.0             # give up waiting for the block after this long
    spoof_seconds: float = 15.0        # how long the spoofer floods (nothing is to be blocked)
    out_dir: Path = Path("demo-out")
    evidence: bool = True              # export the attack's pcap and the report
    settings: dict = dataclasses.field(default_factory=dict)   # config on top of the demo's ({section: {...}})


@dataclasses.dataclass(frozen=True)
class Client:
    """One slixmpp client of a plan."""
    user: str
    host: str                 # the virtual appliance's host role it runs on
    source: str
    server: str
    port: int = 5222
    direct_tls: bool = False
    per_second: float = 0.1
    session_messages: int = 0


@dataclasses.dataclass(frozen=True)
class Target:
    """What an attack must get banned: an address, a prefix (``client_ip``) or a host (``client_mac``)."""
    label: str
    field: str                # flagdoc field: client_ip or client_mac
    value: str


@dataclasses.dataclass
class Plan:
    attack: str
    lan: bool
    benign: list[Client]
    attackers: list[Client]                                   # XMPP clients that attack
    generators: list[tuple[str, str, list[str]]]              # (name, host role, argv of lab.attacks)
    targets: list[Target]
    protected: list[str]                                      # addresses and MACs no ban may cover
    victims: list[str] = dataclasses.field(default_factory=list)   # spoof: the addresses spoofed


@dataclasses.dataclass
class TargetResult:
    target: Target
    flag: dict | None = None
    flagged_at: float | None = None      # wall time the scenario saw the flag
    blocked_at: float | None = None      # wall time it saw packets hit the flow
    drop_packets: int = 0
    crossing_ns: int | None = None       # the captured frame that crossed the threshold
    installed_ns: int | None = None      # the install time of the enforcing flow

    @property
    def latency(self) -> float | None:
        """Detection-to-block: threshold-crossing frame to the install of the flow that enforces the flag."""
        if self.crossing_ns is None or self.installed_ns is None:
            return None
        return (self.installed_ns - self.crossing_ns) / 1e9


@dataclasses.dataclass
class Result:
    attack: str
    blocked: bool
    flag: dict | None
    sent: dict[str, int]
    received: dict[str, int]
    abuser_jid: str | None
    attacker_jids: list[str]
    benign_jids: list[str]
    drop_packets: int
    snooper: dict
    flagged_ips: list[str]
    abuser_frames_stored: int
    abuser_received_at_block: int
    received_at_block: dict[str, int]
    targets: dict[str, TargetResult]
    banned_protected: list[dict]
    flags: list[dict]
    generators: dict[str, dict]
    analyser: dict
    client_reports: dict[str, dict]
    frames_by_family: dict[int, int]
    timeline: dict[str, float]
    files: dict[str, str]
    errors: list[str]
    victims: list[str] = dataclasses.field(default_factory=list)

    @property
    def unaccounted(self) -> int | None:
        return self.snooper.get("unaccounted")


class NotifyListener:
    """A NOTIFY_SOCKET of our own, as systemd gives one to a Type=notify service."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                return self.messages
            self.messages.extend(data.decode(errors="replace").splitlines())

    def ready(self) -> bool:
        return "READY=1" in self.poll()

    def close(self) -> None:
        self.sock.close()


def service_config(base: config_mod.Config | None = None, settings: dict | None = None) -> config_mod.Config:
    """The demo's config: defaults with short polling, XMPP on 5222 and 5223 (both are the lab server's),
    plus ``settings`` ({section: {key: value}}) on top; the thresholds stay the defaults."""
    data = config_mod.to_dict(base or config_mod.Config())
    data["enforce"]["poll_interval"] = 0.25
    data["analyser"]["poll_interval"] = 0.25
    data["snooper"]["batch_interval"] = 0.25
    data["snooper"]["status_interval"] = 1.0
    data["analyser"]["status_interval"] = 1.0
    data["xmpp"]["server_ports"] = [5222, xmpplab.DIRECT_TLS_PORT]
    for section, values in (settings or {}).items():
        data[section] = _merge(data.get(section, {}), values)
    return config_mod.from_dict(data, "<demo>")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def unit_nice(name: str) -> int:
    """The ``Nice=`` of the service's unit in systemd/ (0 when it sets none), for the lab to run it as systemd does."""
    text = (Path(__file__).resolve().parent.parent / "systemd" / f"pisnoop-{name}.service").read_text()
    m = re.search(r"^Nice=(-?\d+)\s*$", text, re.M)
    return int(m.group(1)) if m else 0


class ServiceSet:
    """The three services as child processes of ours, each with its own log and notify socket and its unit's
    ``Nice=`` (a unit's CPUWeight= needs systemd's cgroups: not applied here)."""

    def __init__(self, va: VirtualAppliance):
        self.va = va
        self.procs: dict[str, subprocess.Popen] = {}
        self.notify: dict[str, NotifyListener] = {}
        self.log_dir = va.run_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)

    def start(self, name: str, timeout: float = 30.0) -> None:
        listener = NotifyListener(self.va.run_dir / f"notify-{name}.sock")
        self.notify[name] = listener
        env = dict(os.environ, NOTIFY_SOCKET=str(listener.path), PYTHONUNBUFFERED="1")
        env.pop("WATCHDOG_USEC", None)
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "--config", str(self.va.config_path), name],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=str(Path(__file__).resolve().parent.parent))
        log.close()
        nice = unit_nice(name)
        if nice:                                    # before the interpreter starts threads: they inherit it
            os.setpriority(os.PRIO_PROCESS, self.procs[name].pid, nice)
        deadline = time.monotonic() + timeout
        while not listener.ready():
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not report READY=1 within {timeout:.0f} s: {self.log_tail(name)}")
            time.sleep(0.05)

    def log_tail(self, name: str, n: int = 600) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def drain(self) -> None:
        """Read the notify sockets: a full datagram queue would block the services' sd_notify."""
        for listener in self.notify.values():
            listener.poll()

    def check_alive(self) -> list[str]:
        return [f"{n} exited with {p.returncode}" for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, timeout: float = 20.0) -> list[str]:
        """SIGTERM in reverse data-flow order, so the snooper flushes before the analyser's last pass."""
        problems = []
        for name in ("snooper", "analyser", "controller"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append(f"{name} did not stop on SIGTERM within {timeout:.0f} s")
            if proc.returncode not in (0, -signal.SIGTERM):
                problems.append(f"{name} exited with {proc.returncode}: {self.log_tail(name, 300)}")
        for listener in self.notify.values():
            listener.close()
        return problems


def plan(attack: str, va: VirtualAppliance, opts: Options) -> Plan:
    """Who chats, who attacks and what must end up banned, for one attack on ``va``."""
    up = va.hosts["upstream"]
    rate = opts.benign_per_minute / 60.0
    if attack == "flood":
        benign = [Client(f"benign{i + 1}", "inside", f"10.0.0.{BENIGN_BASE + i}", up.ip, per_second=rate)
                  for i in range(opts.benign)]
        mallory = Client("mallory", "inside", ABUSER_IP, up.ip, per_second=opts.abusive_per_second)
        return Plan(attack, False, benign, [mallory], [], [Target("flooder", "client_ip", ABUSER_IP)],
                    [c.source for c in benign])
    v4, v6 = f"10.0.0.{BENIGN_BASE}", va.addr6(0, BENIGN_BASE)
    # benign clients: IPv4 STARTTLS, IPv6 direct TLS (and more of both as asked), on the inside host
    benign = [Client("benign1", "inside", v4, up.ip, per_second=rate),
              Client("benign2", "inside", v6, up.ip6, port=xmpplab.DIRECT_TLS_PORT, direct_tls=True, per_second=rate)]
    for i in range(2, opts.benign):
        six = i % 2 == 1
        benign.append(Client(f"benign{i + 1}", "inside", va.addr6(0, BENIGN_BASE + i) if six
                             else f"10.0.0.{BENIGN_BASE + i}", up.ip6 if six else up.ip, per_second=rate))
    protected = [c.source for c in benign] + [va.mac("inside")]
    if attack == "ipv6":
        flooder = va.addr6(0, 0x66)
        return Plan(attack, True, benign, [Client("mallory", "neighbour", flooder, up.ip6,
                                                  per_second=opts.abusive_per_second)], [],
                    [Target("IPv6 flooder", "client_ip", flooder)], protected)
    if attack == "reconnect":
        return Plan(attack, True, benign, [Client("mallory", "neighbour", RECONNECT_IP, up.ip,
                                                  per_second=opts.abusive_per_second, session_messages=4)], [],
                    [Target("reconnecting client", "client_ip", RECONNECT_IP)], protected)
    if attack == "spoof":
        victims = [v4, v6]
        argv = [sys.executable, "-m", "lab.attacks", "spoof", "--victim", v4, "--victim", v6, "--server", up.ip,
                "--server", up.ip6, "--dst-mac", va.mac("upstream"), "--duration", str(opts.spoof_seconds)]
        return Plan(attack, True, benign, [], [("spoofer", "neighbour", argv)], [], protected, victims)
    if attack == "rotate":
        c2 = va.hosts["client2"]
        benign.append(Client("benign-c2", "client2", c2.ip6, up.ip6, per_second=rate))
        protected += [c2.ip6, c2.ip]
        rot = [sys.executable, "-m", "lab.attacks", "rotate", "--server", up.ip6, "--count", "40",
               "--duration", str(opts.timeout)]
        gens = [("rotator-lan", "neighbour", rot + ["--prefix", str(va.lan6)]),
                ("rotator-routed", "client1", rot + ["--prefix", str(va.prefix6(1))])]
        return Plan(attack, True, benign, [], gens,
                    [Target("rotating host", "client_mac", va.mac("neighbour")),
                     Target("rotating prefix", "client_ip", str(va.prefix6(1)))], protected)
    raise ValueError(f"attack {attack!r}: expected one of {', '.join(ATTACKS)}")


def ban_flows(va: VirtualAppliance, subject: str) -> list[str]:
    """The switch's flows that drop or limit ``subject`` (an address, ADDR/LEN or a MAC), as dump-flows prints them."""
    pat = re.compile(r"=" + re.escape(subject) + r"[, ]")
    return [line for line in va.ofctl("dump-flows").splitlines()
            if pat.search(line) and ("actions=drop" in line or "meter:" in line)]


def drop_packets(va: VirtualAppliance, subject: str) -> int:
    """Packets that hit the controller's flows dropping (or limiting) ``subject``."""
    return sum(int(m.group(1)) for line in ban_flows(va, subject) if (m := re.search(r"n_packets=(\d+)", line)))


def install_ns(va: VirtualAppliance, subject: str) -> int | None:
    """When the first flow enforcing ``subject`` was installed (dump time minus its age)."""
    dumped = time.time_ns()
    ages = [float(m.group(1)) for line in ban_flows(va, subject) if (m := re.search(r"duration=([\d.]+)s", line))]
    return dumped - int(max(ages) * 1e9) if ages else None


def covers(flag: dict, protected: str) -> bool:
    """Whether a flag's subject covers a protected address or MAC."""
    if flag.get("client_mac"):
        return flag["client_mac"] == protected.lower()
    try:
        return ipaddress.ip_address(protected) in ipaddress.ip_network(flag.get("client_ip"), strict=False)
    except ValueError:
        return False


def _target_flag(db, t: Target) -> dict | None:
    return db[store.FLAGS].find_one({t.field: t.value, "status": "flagged"})


def snooper_counters(db) -> dict:
    """The snooper's last status document: its counters plus the frames it cannot account for."""
    doc = db[store.STATUS].find_one({"component": "snooper"}) or {}
    out = dict(doc.get("counters") or {})
    for key in ("unaccounted", "spool_frames", "pending_frames"):
        if key in doc:
            out[key] = doc[key]
    return out


class Stage:
    """A running lab on ``va``: the three services, Prosody with accounts, the sink, clients and generators."""

    def __init__(self, va: VirtualAppliance, users: list[str], duration: float):
        self.va, self.duration = va, duration
        up = va.hosts["upstream"]
        self.server = xmpplab.ProsodyServer(va.run_dir / "xmpp", up.netns, up.ip, ip6=up.ip6)
        self.services = ServiceSet(va)
        self.procs: dict[str, subprocess.Popen] = {}
        self.reports = va.run_dir / "clients"
        self.reports.mkdir(exist_ok=True)
        self.db = store.database(va.config.mongodb, "pisnoop-demo")
        self.users = users

    @property
    def sink_jid(self) -> str:
        return f"sink@{self.server.domain}"

    def jid(self, user: str) -> str:
        return f"{user}@{self.server.domain}"

    def start(self) -> "Stage":
        for name in SERVICES:
            self.services.start(name)
        self.server.start(["sink", *self.users])
        up = self.va.hosts["upstream"]
        self.procs["sink"] = self.va.popen("upstream", xmpplab.client_command(
            "sink", self.sink_jid, up.ip, 5222, cafile=self.server.cert, duration=self.duration + 10,
            report=self.reports / "sink.json"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        xmpplab.wait_online(self.reports / "sink.json")
        return self

    def client(self, c: Client, wait: bool = False) -> None:
        """Start one chat client (its source address added to its host first)."""
        host = self.va.hosts[c.host]
        if c.source not in (host.ip, host.ip6):
            six = ":" in c.source
            self.va.exec(c.host, ["ip", *(["-6"] if six else []), "addr", "add", f"{c.source}/{64 if six else 24}",
                                  "dev", host.ifname, *(["nodad"] if six else [])])
        report = self.reports / f"{c.user}.json"
        self.procs[c.user] = self.va.popen(c.host, xmpplab.client_command(
            "chat", self.jid(c.user), c.server, c.port, cafile=self.server.cert, direct_tls=c.direct_tls,
            source_ip=c.source, to=self.sink_jid, rate=c.per_second, duration=self.duration, report=report,
            session_messages=c.session_messages), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            xmpplab.wait_online(report)

    def generator(self, name: str, host: str, argv: list[str]) -> None:
        log = open(self.va.run_dir / "logs" / f"{name}.log", "ab")
        self.procs[name] = self.va.popen(host, argv + ["--report", str(self.reports / f"{name}.json")],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         cwd=str(Path(__file__).resolve().parent.parent))
        log.close()

    def report(self, name: str) -> dict:
        return xmpplab.read_report(self.reports / f"{name}.json")

    def received(self) -> dict[str, int]:
        return dict(self.report("sink").get("received", {}))

    def wait(self, seconds: float, tick: Callable[[str], None] = lambda s: None) -> None:
        end = time.monotonic() + seconds
        while True:
            self.services.drain()
            tick(self.status_line())
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.5, left))

    def status_line(self) -> str:
        try:
            c = snooper_counters(self.db)
            flows = self.db[store.FLOWS].estimated_document_count()
            flags = self.db[store.FLAGS].count_documents({"status": "flagged"})
        except Exception as exc:  # the line is for people; a store hiccup is shown, not raised
            return f"store: {exc.__class__.__name__}"
        msgs = sum(self.received().values())
        return (f"captured {c.get('captured', 0):>7}  stored {c.get('stored', 0):>7}  dup {c.get('duplicates', 0):>5}  "
                f"flows {flows:>4}  flags {flags}  msgs at server {msgs:>5}")

    def stop_clients(self, errors: list[str]) -> None:
        """SIGTERM every client and generator but the sink (each writes its final report), then let the sink count."""
        for name, proc in self.procs.items():
            if name != "sink" and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            if name != "sink":
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    errors.append(f"client {name} did not stop on SIGTERM")
        time.sleep(1.5)  # let the sink count what was already on the way

    def close(self) -> list[str]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        problems = self.services.stop()
        self.server.stop()
        self.db.client.close()
        return problems


def run(opts: Options = Options(), on_tick: Callable[[str], None] | None = None,
        keep: bool = False) -> tuple[Result, VirtualAppliance]:
    """Run one attack's scenario; the caller owns the returned appliance (``va.down()``)."""
    if opts.attack not in ATTACKS:
        raise ValueError(f"attack {opts.attack!r}: expected one of {', '.join(ATTACKS)}")
    va = VirtualAppliance(service_config(settings=opts.settings), lan=opts.attack != "flood")
    va.up()
    try:
        return _run(va, opts, on_tick or (lambda s: None)), va
    except BaseException:
        if not keep:
            va.down()
        raise


def _run(va: VirtualAppliance, opts: Options, tick: Callable[[str], None]) -> Result:
    errors: list[str] = []
    timeline: dict[str, float] = {"start": time.time()}
    p = plan(opts.attack, va, opts)
    total = opts.warmup + opts.timeout + opts.after_block + 30
    stage = Stage(va, [c.user for c in p.benign + p.attackers], total)
    targets = {t.label: TargetResult(t) for t in p.targets}
    try:
        stage.start()
        timeline["services_ready"] = time.time()
        for c in p.benign:
            stage.client(c)
        stage.wait(opts.warmup, tick)
        timeline["flood_start"] = time.time()
        for c in p.attackers:
            stage.client(c)
        for name, host, argv in p.generators:
            stage.generator(name, host, argv)
        deadline = time.monotonic() + (opts.spoof_seconds + 2 if not p.targets else opts.timeout)
        done_at = None
        while time.monotonic() < deadline:
            stage.wait(0.5, tick)
            for tr in targets.values():
                _check_target(va, stage.db, tr)
            if p.targets and all(tr.blocked_at for tr in targets.values()):
                break
            if stage.services.check_alive():
                errors += stage.services.check_alive()
                break
            gens_done = p.generators and all(stage.procs[n].poll() is not None for n, _h, _a in p.generators)
            if gens_done:     # the attack is over: what it was to trigger has a few seconds more to show
                done_at = done_at or time.monotonic()
                if time.monotonic() - done_at > (0 if not p.targets else 5):
                    break
        blocked = bool(p.targets) and all(tr.blocked_at for tr in targets.values())
        received_at_block: dict[str, int] = {}
        if blocked:
            timeline["blocked"] = max(tr.blocked_at for tr in targets.values())
            timeline["flagged"] = max(tr.flagged_at for tr in targets.values())
            # what was already past the switch reaches the sink within ~2 s (its report is rewritten every second)
            settle = min(2.5, opts.after_block)
            stage.wait(settle, tick)
            got = stage.received()
            received_at_block = {stage.jid(c.user): got.get(stage.jid(c.user), 0) for c in p.attackers}
            stage.wait(opts.after_block - settle, tick)
        elif not p.targets:
            stage.wait(opts.after_block, tick)
        timeline["stop"] = time.time()
        stage.stop_clients(errors)
        reports = {c.user: stage.report(c.user) for c in p.benign + p.attackers}
        sent = {stage.jid(u): r.get("sent", 0) for u, r in reports.items()}
        received = stage.received()
        gens = {name: stage.report(name) for name, _h, _a in p.generators}
        errors += stage.services.stop()
        db = stage.db
        counters = snooper_counters(db)
        analyser_status = _plain(db[store.STATUS].find_one({"component": "analyser"})) or {}
        flags = [_plain(f) for f in db[store.FLAGS].find({})]
        banning = [f for f in flags if f.get("status") != "exempt"]
        banned_protected = [f for f in banning if any(covers(f, a) for a in p.protected + p.victims)]
        for tr in targets.values():
            tr.drop_packets = drop_packets(va, tr.target.value)
            tr.flag = _plain(db[store.FLAGS].find_one({tr.target.field: tr.target.value}, sort=[("flagged_at", 1)]))
        first = next(iter(targets.values()), None)
        ip_target = next((t for t in p.targets if t.field == "client_ip"), None)
        shown = ip_target.value if ip_target else next(iter(p.victims), None)
        files = _evidence(va, Path(opts.out_dir), timeline["start"], shown, errors) if opts.evidence else {}
        frames_from, by_family = _stored_frames(db, ip_target.value if ip_target else None)
        attacker_jids = [stage.jid(c.user) for c in p.attackers]
        return Result(
            attack=opts.attack, blocked=blocked if p.targets else not banned_protected,
            flag=first.flag if first else None, sent=sent, received=received,
            abuser_jid=attacker_jids[0] if attacker_jids else None, attacker_jids=attacker_jids,
            benign_jids=[stage.jid(c.user) for c in p.benign],
            drop_packets=sum(tr.drop_packets for tr in targets.values()), snooper=counters,
            flagged_ips=sorted({f["client_ip"] for f in banning if f.get("client_ip")}),
            abuser_frames_stored=frames_from,
            abuser_received_at_block=next(iter(received_at_block.values()), 0), received_at_block=received_at_block,
            targets=targets, banned_protected=banned_protected, flags=flags, generators=gens,
            analyser=analyser_status, client_reports=reports, frames_by_family=by_family, timeline=timeline,
            files=files, errors=errors, victims=p.victims)
    finally:
        stage.close()


def _check_target(va: VirtualAppliance, db, tr: TargetResult) -> None:
    if tr.blocked_at:
        return
    flag = _target_flag(db, tr.target)
    if flag and tr.flagged_at is None:
        tr.flagged_at = time.time()
        tr.crossing_ns = (flag.get("evidence") or {}).get("last_packet_ns")
    if flag and drop_packets(va, tr.target.value) > 0:
        tr.blocked_at = time.time()
        tr.installed_ns = install_ns(va, tr.target.value)


def _stored_frames(db, ip: str | None) -> tuple[int, dict[int, int]]:
    """Stored frames whose source is within ``ip`` (the evidence kept of the blocked client), and the
    stored IP frames per family (the mirror copies both)."""
    net = ipaddress.ip_network(ip, strict=False) if ip else None
    n, fam = 0, {4: 0, 6: 0}
    for doc in db[store.FRAMES].find({}, {"data": 1}):
        for fr in store.batch_frames(doc):
            pkt = parse.parse(*fr)
            if isinstance(pkt, parse.Packet):
                src = ipaddress.ip_address(pkt.src)
                fam[src.version] += 1
                if net is not None and src.version == net.version and src in net:
                    n += 1
    return n, fam


def _evidence(va, out: Path, since: float, host: str | None, errors: list[str]) -> dict[str, str]:
    """The attack's frames as a pcap (``host``: one address) and the report (text and PNG) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    env = dict(os.environ)
    cwd = str(Path(__file__).resolve().parent.parent)
    base = [sys.executable, "-m", "appliance.cli", "--config", str(va.config_path)]
    if host and "/" not in host:
        pcap = out / "attack.pcap"
        res = subprocess.run(base + ["export-pcap", "--since", f"{since - 1:.3f}", "--host", host, "-o", str(pcap)],
                             capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
        if res.returncode == 0:
            files["pcap"] = str(pcap)
        else:
            errors.append(f"export-pcap failed: {res.stderr.strip()[-300:]}")
    res = subprocess.run(base + ["report", "-o", str(out)],
                         capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    if res.returncode == 0:
        files["report"] = str(out)
        (out / "report.txt").write_text(res.stdout)
        for p in sorted(out.glob("*.png")):
            files["png"] = str(p)
    else:
        errors.append(f"report failed: {res.stderr.strip()[-300:]}")
    return files


def _plain(doc):
    if doc is None:
        return None
    return json.loads(json.dumps(doc, default=lambda o: o.isoformat() if isinstance(o, dt.datetime) else str(o)))
