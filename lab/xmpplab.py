"""A real XMPP server and real clients for the demo and the end-to-end tests.

Prosody (Debian's) runs on the upstream host of a virtual appliance with a
throwaway config, data directory and accounts; slixmpp clients run on the
inside host, each from its own source address so that the analyser can tell
them apart. A "sink" account on the server side counts the messages that
actually arrived, per sender: that is how the demo proves who got through.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from appliance import netns

from .procs import stop_pid

DOMAIN = "pisnoop.test"
PASSWORD = "demo-only-password"

_CONFIG = """-- written by pisnoop for a throwaway test server
run_as_root = true
pidfile = "{run}/prosody.pid"
data_path = "{run}/data"
log = {{ info = "{run}/prosody.log"; error = "{run}/prosody.err" }}
certificates = "{run}/certs"
daemonize = false
c2s_ports = {{ {port} }}
c2s_interfaces = {{ "{ip}" }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
interfaces = {{ "{ip}" }}
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "presence"; "message"; "posix" }}
modules_disabled = {{ "s2s"; "offline"; "limits"; "tls"; "c2s_limits" }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
storage = "internal"
VirtualHost "{domain}"
"""


class ProsodyServer:
    """Prosody bound to ``ip:port`` inside network namespace ``ns``."""

    def __init__(self, run_dir: Path, ns: str, ip: str, port: int = 5222, domain: str = DOMAIN):
        self.run_dir, self.ns, self.ip, self.port, self.domain = Path(run_dir), ns, ip, port, domain
        self.cfg = self.run_dir / "prosody.cfg.lua"
        self.pid: int | None = None

    def _prepare(self) -> None:
        if shutil.which("prosody") is None:
            raise RuntimeError("prosody is not installed (run ./setup.sh)")
        (self.run_dir / "data").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "certs").mkdir(exist_ok=True)
        self.cfg.write_text(_CONFIG.format(run=self.run_dir, port=self.port, ip=self.ip, domain=self.domain))

    def register(self, user: str, password: str = PASSWORD) -> str:
        netns.run(["prosodyctl", "--config", str(self.cfg), "register", user, self.domain, password], timeout=30)
        return f"{user}@{self.domain}"

    def start(self, users: list[str], timeout: float = 20.0) -> "ProsodyServer":
        self._prepare()
        for u in users:
            self.register(u)
        out = open(self.run_dir / "prosody.stdout", "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "prosody", "--config", str(self.cfg), "-F"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        while not self._listening():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prosody did not start: {self.log_tail()}")
            time.sleep(0.1)
        return self

    def _listening(self) -> bool:
        with netns.enter(self.ns):
            s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect((self.ip, self.port))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def log_tail(self) -> str:
        parts = []
        for name in ("prosody.err", "prosody.stdout", "prosody.log"):
            p = self.run_dir / name
            if p.exists():
                parts.append(p.read_text(errors="replace")[-400:])
        return " | ".join(parts) or "no log"

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid)
            self.pid = None


def client_command(role: str, jid: str, server_ip: str, port: int, *, source_ip: str | None = None,
                   to: str | None = None, rate: float = 1.0, duration: float = 30.0,
                   report: Path | None = None) -> list[str]:
    """The argv of one XMPP client process (``python -m lab.xmppclient``)."""
    argv = [sys.executable, "-m", "lab.xmppclient", "--role", role, "--jid", jid, "--password", PASSWORD,
            "--server", server_ip, "--port", str(port), "--rate", str(rate), "--duration", str(duration)]
    if source_ip:
        argv += ["--source", source_ip]
    if to:
        argv += ["--to", to]
    if report:
        argv += ["--report", str(report)]
    return argv


def read_report(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def wait_online(report: Path, timeout: float = 30.0) -> None:
    """Wait until a client's report says its session is up (messages to an offline sink are lost)."""
    deadline = time.monotonic() + timeout
    while not read_report(report).get("online"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"XMPP client with report {report} did not come online within {timeout:.0f} s")
        time.sleep(0.1)
