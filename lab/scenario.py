"""The closed loop, end to end: the scenario behind ``pisnoop demo``, its test and its benchmark.

A virtual appliance; the controller, snooper and analyser as separate
processes started the way systemd starts them (``Type=notify``: each gets its
own NOTIFY_SOCKET and is ready when it says READY=1); Prosody on the upstream
host; benign slixmpp clients chatting at a human rate and one abusive client
flooding, each from its own address on the inside host. The scenario waits
until the abusive client is flagged and its packets hit the drop flow, keeps
the benign clients chatting a little longer, then stops everything and
gathers the evidence into a ``Result``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
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
BENIGN_BASE = 11          # benign clients use 10.0.0.11, .12, ...
ABUSER_IP = "10.0.0.66"


@dataclasses.dataclass(frozen=True)
class Options:
    benign: int = 3
    benign_per_minute: float = 6.0     # messages per minute per benign client
    abusive_per_second: float = 20.0
    warmup: float = 8.0                # seconds of benign chat before the flood
    after_block: float = 8.0           # seconds the benign clients go on after the block (>= 2.5 to prove it)
    timeout: float = 120.0             # give up waiting for the block after this long
    out_dir: Path = Path("demo-out")


@dataclasses.dataclass
class Result:
    blocked: bool
    flag: dict | None
    sent: dict[str, int]
    received: dict[str, int]
    abuser_jid: str
    benign_jids: list[str]
    drop_packets: int
    snooper: dict
    flagged_ips: list[str]
    abuser_frames_stored: int
    abuser_received_at_block: int
    timeline: dict[str, float]
    files: dict[str, str]
    errors: list[str]

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


def service_config(base: config_mod.Config | None = None) -> config_mod.Config:
    """The demo's config: defaults with a short ban so the whole run stays short."""
    data = config_mod.to_dict(base or config_mod.Config())
    data["enforce"]["poll_interval"] = 0.25
    data["analyser"]["poll_interval"] = 0.25
    data["snooper"]["batch_interval"] = 0.25
    data["snooper"]["status_interval"] = 1.0
    data["analyser"]["status_interval"] = 1.0
    return config_mod.from_dict(data, "<demo>")


class ServiceSet:
    """The three services as child processes of ours, each with its own log and notify socket."""

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


def drop_packets(va: VirtualAppliance, ip: str) -> int:
    """Packets that hit the controller's flows dropping (or limiting) ``ip``."""
    total = 0
    for line in va.ofctl("dump-flows").splitlines():
        if f"nw_src={ip}" in line and ("actions=drop" in line or "meter:" in line):
            m = re.search(r"n_packets=(\d+)", line)
            if m:
                total += int(m.group(1))
    return total


def snooper_counters(db) -> dict:
    """The snooper's last status document: its counters plus the frames it cannot account for."""
    doc = db[store.STATUS].find_one({"component": "snooper"}) or {}
    out = dict(doc.get("counters") or {})
    for key in ("unaccounted", "spool_frames", "pending_frames"):
        if key in doc:
            out[key] = doc[key]
    return out


def run(opts: Options = Options(), on_tick: Callable[[str], None] | None = None,
        keep: bool = False) -> tuple[Result, VirtualAppliance]:
    """Run the whole scenario; the caller owns the returned appliance (``va.down()``)."""
    va = VirtualAppliance(service_config())
    va.up()
    try:
        return _run(va, opts, on_tick or (lambda s: None)), va
    except BaseException:
        if not keep:
            va.down()
        raise


def _run(va: VirtualAppliance, opts: Options, tick: Callable[[str], None]) -> Result:
    cfg = va.config
    errors: list[str] = []
    timeline: dict[str, float] = {"start": time.time()}
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    up = va.hosts["upstream"]
    benign_ips = [f"10.0.0.{BENIGN_BASE + i}" for i in range(opts.benign)]
    for ip in benign_ips + [ABUSER_IP]:
        va.exec("inside", ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
    benign_users = [f"benign{i + 1}" for i in range(opts.benign)]
    server = xmpplab.ProsodyServer(va.run_dir / "xmpp", up.netns, up.ip, cfg.xmpp.server_port, ip6=up.ip6)
    services = ServiceSet(va)
    clients: dict[str, subprocess.Popen] = {}
    db = store.database(cfg.mongodb, "pisnoop-demo")
    try:
        for name in SERVICES:
            services.start(name)
        timeline["services_ready"] = time.time()
        server.start(["sink", "mallory", *benign_users])
        sink_jid = f"sink@{server.domain}"
        total = opts.warmup + opts.timeout + opts.after_block + 30
        reports = va.run_dir / "clients"
        reports.mkdir()
        clients["sink"] = va.popen("upstream", xmpplab.client_command(
            "sink", sink_jid, up.ip, cfg.xmpp.server_port, cafile=server.cert, duration=total + 10,
            report=reports / "sink.json"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        xmpplab.wait_online(reports / "sink.json")
        for user, ip in zip(benign_users, benign_ips):
            clients[user] = va.popen("inside", xmpplab.client_command(
                "chat", f"{user}@{server.domain}", up.ip, cfg.xmpp.server_port, cafile=server.cert, source_ip=ip,
                to=sink_jid,
                rate=opts.benign_per_minute / 60.0, duration=total, report=reports / f"{user}.json"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(opts.warmup, va, db, services, reports, tick, errors)
        timeline["flood_start"] = time.time()
        clients["mallory"] = va.popen("inside", xmpplab.client_command(
            "chat", f"mallory@{server.domain}", up.ip, cfg.xmpp.server_port, cafile=server.cert, source_ip=ABUSER_IP,
            to=sink_jid,
            rate=opts.abusive_per_second, duration=total, report=reports / "mallory.json"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        blocked = False
        deadline = time.monotonic() + opts.timeout
        received_at_block = 0
        while time.monotonic() < deadline:
            _wait(0.5, va, db, services, reports, tick, errors)
            flag = db[store.FLAGS].find_one({"client_ip": ABUSER_IP, "status": "flagged"})
            if flag and "flagged" not in timeline:
                timeline["flagged"] = time.time()
            if flag and drop_packets(va, ABUSER_IP) > 0:
                timeline["blocked"] = time.time()
                blocked = True
                break
            if services.check_alive():
                errors += services.check_alive()
                break
        if blocked:
            # what was already past the switch reaches the sink within ~2 s (its report is rewritten every second)
            settle = min(2.5, opts.after_block)
            _wait(settle, va, db, services, reports, tick, errors)
            received_at_block = _received(reports).get(f"mallory@{server.domain}", 0)
            _wait(opts.after_block - settle, va, db, services, reports, tick, errors)
        timeline["stop"] = time.time()
        for name, proc in clients.items():
            if name != "sink":
                proc.send_signal(signal.SIGTERM)
        for name, proc in clients.items():  # each writes its final report on SIGTERM
            if name != "sink":
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    errors.append(f"client {name} did not stop on SIGTERM")
        time.sleep(1.5)  # let the sink count what was already on the way
        sent = {}
        for name in ["mallory", *benign_users]:
            sent[f"{name}@{server.domain}"] = xmpplab.read_report(reports / f"{name}.json").get("sent", 0)
        received = _received(reports)
        errors += services.stop()
        counters = snooper_counters(db)
        flag = db[store.FLAGS].find_one({"client_ip": ABUSER_IP}, sort=[("flagged_at", -1)])
        flagged_ips = sorted({f["client_ip"] for f in db[store.FLAGS].find({}, {"client_ip": 1})})
        files = _evidence(va, out, timeline["start"], errors)
        abuser_frames = _count_frames_from(db, ABUSER_IP)
        return Result(blocked=blocked, flag=_plain(flag), sent=sent, received=received,
                      abuser_jid=f"mallory@{server.domain}", benign_jids=[f"{u}@{server.domain}" for u in benign_users],
                      drop_packets=drop_packets(va, ABUSER_IP), snooper=counters, flagged_ips=flagged_ips,
                      abuser_frames_stored=abuser_frames, abuser_received_at_block=received_at_block,
                      timeline=timeline, files=files, errors=errors)
    finally:
        for proc in clients.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        services.stop()
        server.stop()
        db.client.close()


def _received(reports: Path) -> dict[str, int]:
    return dict(xmpplab.read_report(reports / "sink.json").get("received", {}))


def _wait(seconds: float, va, db, services: ServiceSet, reports: Path, tick, errors: list[str]) -> None:
    end = time.monotonic() + seconds
    while True:
        services.drain()
        tick(status_line(va, db, reports))
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.5, left))


def status_line(va, db, reports: Path) -> str:
    try:
        c = snooper_counters(db)
        flows = db[store.FLOWS].estimated_document_count()
        flags = db[store.FLAGS].count_documents({"status": "flagged"})
    except Exception as exc:  # the line is for people; a store hiccup is shown, not raised
        return f"store: {exc.__class__.__name__}"
    got = _received(reports)
    msgs = sum(got.values())
    return (f"captured {c.get('captured', 0):>7}  stored {c.get('stored', 0):>7}  dup {c.get('duplicates', 0):>5}  "
            f"flows {flows:>4}  flags {flags}  msgs at server {msgs:>5}  "
            f"drop-flow pkts {drop_packets(va, ABUSER_IP):>5}")


def _count_frames_from(db, ip: str) -> int:
    """Frames stored whose IPv4 source is ``ip`` (the evidence kept of the blocked client)."""
    n = 0
    for doc in db[store.FRAMES].find({}, {"data": 1}):
        for fr in store.batch_frames(doc):
            pkt = parse.parse(*fr)
            if isinstance(pkt, parse.Packet) and pkt.src == ip:
                n += 1
    return n


def _evidence(va, out: Path, since: float, errors: list[str]) -> dict[str, str]:
    files = {}
    env = dict(os.environ)
    cwd = str(Path(__file__).resolve().parent.parent)
    base = [sys.executable, "-m", "appliance.cli", "--config", str(va.config_path)]
    pcap = out / "attack.pcap"
    res = subprocess.run(base + ["export-pcap", "--since", f"{since - 1:.3f}", "--host", ABUSER_IP, "-o", str(pcap)],
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
