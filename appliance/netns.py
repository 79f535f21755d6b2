"""Running commands and opening sockets inside network namespaces.

``enter()`` moves only the calling thread (setns(2) is per thread), so a
process can open a socket in one namespace and keep talking to the store in
another: the snooper opens its capture socket in the mirror namespace of the
virtual appliance this way, and the controller relay its listening socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from typing import Iterator, Sequence

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


class CommandFailed(RuntimeError):
    """A helper command (ip, ovs-vsctl, ...) failed; the message carries its stderr."""


def run(cmd: Sequence[str], ns: str | None = None, check: bool = True, timeout: float = 30.0,
        env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    argv = list(cmd)
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise CommandFailed(f"{argv[0]}: command not found (is it installed?)") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise CommandFailed(f"{' '.join(argv)}: exit {proc.returncode}: {msg[-1] if msg else 'no output'}")
    return proc


def exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def enter(ns: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace ``ns``."""
    if not ns:
        yield
        return
    path = os.path.join(NETNS_DIR, ns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CommandFailed(f"network namespace {ns!r} does not exist") from None
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)

