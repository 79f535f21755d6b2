"""Helpers for controller tests and the push benchmark: run the real
``pisnoop controller`` against a virtual appliance, small TCP peers inside
the hosts' namespaces, flow-table snapshots without counters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from lab.procs import stop_pid

REPO = Path(__file__).resolve().parent.parent

ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
print("listening", flush=True)
def serve(c):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
    except OSError: pass
    finally: c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, sys, time
src, dst, port, n, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
sport = int(sys.argv[6]) if len(sys.argv) > 6 else 0
out = {"ok": 0, "error": None, "sport": None}
try:
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); c.settimeout(1.5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.bind((src, sport)); out["sport"] = c.getsockname()[1]
    c.connect((dst, port))
    for i in range(n):
        msg = b"<m%06d/>" % i
        c.sendall(msg)
        got = b""
        while len(got) < len(msg):
            d = c.recv(len(msg) - len(got))
            if not d: raise OSError("closed")
            got += d
        out["ok"] += 1
        if gap: time.sleep(gap)
    c.close()
except OSError as e:
    out["error"] = f"{e.__class__.__name__}: {e}"
print(json.dumps(out), flush=True)
"""


def start_echo_server(va, port: int):
    proc = va.popen("upstream", [sys.executable, "-c", ECHO_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc


def tcp_client(va, src: str, port: int, n: int = 1, gap: float = 0.0, sport: int = 0, dst: str = "10.0.0.1",
               timeout: float = 60) -> dict:
    res = va.exec("inside", [sys.executable, "-c", CLIENT, src, dst, str(port), str(n), str(gap), str(sport)],
                  check=False, timeout=timeout)
    return json.loads(res.stdout.strip().splitlines()[-1])


class ControllerProcess:
    """``python -m appliance.cli --config va.config_path controller`` as a subprocess."""

    def __init__(self, va, config_path=None, env: dict | None = None):
        self.va = va
        self.extra_env = env or {}
        self.extra_args: list[str] = []
        self.config_path = str(config_path or va.config_path)
        self.log_path = va.run_dir / f"controller-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ControllerProcess":
        env = dict(os.environ)
        env.pop("PISNOOP_CONFIG", None)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(self.extra_env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", self.config_path,
                                      *self.extra_args, "controller"], cwd=str(REPO), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pushes(self) -> int:
        return self.log.count("full set pushed")

    def wait_pushed(self, count: int = 1, timeout: float = 30.0) -> float:
        """Wait until the ``count``-th full push; return its features->barrier time in ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"controller exited with {self.proc.returncode}:\n{self.log[-2000:]}")
            times = re.findall(r"features-reply -> barrier-reply ([0-9.]+) ms", self.log)
            if len(times) >= count:
                return float(times[count - 1])
            time.sleep(0.05)
        raise AssertionError(f"no full push #{count} within {timeout} s:\n{self.log[-2000:]}")

    def wait_log(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log.count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log[-2000:]}")
            time.sleep(0.05)

    def kill(self, hard: bool = True) -> None:
        if self.proc and self.proc.poll() is None:
            if hard:
                self.proc.kill()
                self.proc.wait(10)
            else:
                stop_pid(self.proc.pid)
                self.proc.wait(10)

    def __enter__(self) -> "ControllerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill(hard=False)


def connected(va) -> bool:
    return va.vsctl("--columns=is_connected", "--format=csv", "--no-headings", "list", "controller").strip() == "true"


_VOLATILE = re.compile(r"(duration|n_packets|n_bytes|packet_count|byte_count|flow_count|packet_in_count|"
                       r"byte_in_count|duration_nsec)=[0-9.]+s?,? ?")


def table_snapshot(va) -> tuple[list[str], list[str]]:
    """dump-flows and dump-meters without counters and durations, sorted."""
    flows = [_VOLATILE.sub("", line).strip() for line in va.ofctl("dump-flows").splitlines() if "cookie=" in line]
    meters = [line.strip() for line in va.ofctl("dump-meters").splitlines()[1:] if line.strip()]
    return sorted(flows), meters


def flows_matching(va, *needles: str) -> list[str]:
    return [line for line in va.ofctl("dump-flows").splitlines() if all(n in line for n in needles)]


def wait_for(pred, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            return got
        time.sleep(step)


def process_usage(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process, read from /proc."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def settled_usage(pid: int, want: tuple[int, int] | None = None, timeout: float = 5.0) -> tuple[int, int]:
    """``process_usage`` once it stops moving (or equals ``want``): a thread that is ending takes a moment."""
    deadline = time.monotonic() + timeout
    last = process_usage(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = process_usage(pid)
        if now == want or (want is None and now == last):
            return now
        last = now
    return last


def kill_connections(port: int) -> int:
    """Abort (RST) every TCP connection toward ``port`` on 127.0.0.1 (``ss -K``); how many there were."""
    res = subprocess.run(["ss", "-K", "-tn", "dst", "127.0.0.1", "dport", "=", str(port)], capture_output=True,
                         text=True, check=False)
    return sum(1 for line in res.stdout.splitlines() if "ESTAB" in line)


def established(port: int) -> int:
    res = subprocess.run(["ss", "-tnH", "state", "established", "dst", "127.0.0.1", "dport", "=", str(port)],
                         capture_output=True, text=True, check=False)
    return len([line for line in res.stdout.splitlines() if line.strip()])
