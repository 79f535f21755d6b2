"""A real XMPP server and real clients for the demo and the end-to-end tests.

Prosody (Debian's) runs on the upstream host of a virtual appliance with a
throwaway config, data directory, accounts and TLS certificate, listening on
IPv4 and IPv6 and requiring encryption as real servers do: STARTTLS on 5222,
direct TLS on 5223 (``lab/tlscert.py``). slixmpp clients run on the inside
host, each from its own source address so that the analyser can tell them
apart, over either family and either port, trusting only the run's
certificate. A "sink" account on the server side counts the messages that
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

from . import tlscert
from .procs import stop_pid

DOMAIN = "pisnoop.test"
PASSWORD = "demo-only-password"

_CONFIG = """-- written by pisnoop for a throwaway test server
run_as_root = true
pidfile = "{run}/prosody.pid"
data_path = "{run}/data"
log = {{ info = "{run}/prosody.log"; error = "{run}/prosody.err" }}
certificates = "{run}/certs"
ssl = {{ certificate = "{cert}"; key = "{key}" }}
daemonize = false
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ {tls_port} }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
interfaces = {{ {interfaces} }}
modules_enabled = {{ "roster"; "saslauth"; "tls"; "disco"; "ping"; "presence"; "message"; "posix" }}
modules_disabled = {{ "s2s"; "offline"; "limits"; "c2s_limits" }}
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
authentication = "internal_plain"
storage = "internal"
VirtualHost "{domain}"
    ssl = {{ certificate = "{cert}"; key = "{key}" }}
"""

DIRECT_TLS_PORT = 5223


class ProsodyServer:
    """Prosody on ``ip`` (and ``ip6``) inside network namespace ``ns``: STARTTLS on ``port``, TLS on ``tls_port``.

    ``cert`` (the run's throwaway certificate, made by ``start``) is what the
    clients pin.
    """

    def __init__(self, run_dir: Path, ns: str, ip: str, port: int = 5222, domain: str = DOMAIN,
                 ip6: str | None = None, tls_port: int = DIRECT_TLS_PORT):
        self.run_dir, self.ns, self.ip, self.port, self.domain = Path(run_dir), ns, ip, port, domain
        self.ip6, self.tls_port = ip6, tls_port
        self.cfg = self.run_dir / "prosody.cfg.lua"
        self.cert: Path | None = None
        self.pid: int | None = None

    def _prepare(self) -> None:
        if shutil.which("prosody") is None:
            raise RuntimeError("prosody is not installed (run ./setup.sh)")
        (self.run_dir / "data").mkdir(parents=True, exist_ok=True)
        made = tlscert.make(self.run_dir / "certs", self.domain)
        self.cert = made.cert
        interfaces = "; ".join(f'"{a}"' for a in (self.ip, self.ip6) if a)
        self.cfg.write_text(_CONFIG.format(run=self.run_dir, port=self.port, tls_port=self.tls_port,
                                           interfaces=interfaces, domain=self.domain, cert=made.cert, key=made.key))

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
        while not all(self._listening(a, p) for a in (self.ip, self.ip6) if a for p in (self.port, self.tls_port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prosody did not start: {self.log_tail()}")
            time.sleep(0.1)
        return self

    def _listening(self, ip: str, port: int) -> bool:
        with netns.enter(self.ns):
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        s.settimeout(0.3)
        try:
            s.connect((ip, port))
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


def client_command(role: str, jid: str, server_ip: str, port: int, *, cafile: Path, direct_tls: bool = False,
                   source_ip: str | None = None, to: str | None = None, rate: float = 1.0, duration: float = 30.0,
                   report: Path | None = None, session_messages: int = 0) -> list[str]:
    """The argv of one XMPP client process (``python -m lab.xmppclient``).

    ``cafile`` is the server's certificate, the only one the client trusts;
    ``direct_tls`` speaks TLS from the first byte (port 5223) instead of STARTTLS.
    ``session_messages`` > 0 makes the client close its stream and log in
    again after that many messages (reconnect spam).
    """
    argv = [sys.executable, "-m", "lab.xmppclient", "--role", role, "--jid", jid, "--password", PASSWORD,
            "--server", server_ip, "--port", str(port), "--rate", str(rate), "--duration", str(duration),
            "--cafile", str(cafile), "--tls", "direct" if direct_tls else "starttls"]
    if session_messages:
        argv += ["--session-messages", str(session_messages)]
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
