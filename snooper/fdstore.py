"""Keep the capture ring across a restart: systemd's file descriptor store.

The kernel fills the ring of an AF_PACKET socket whether or not a process is
reading it. A snooper that gives its socket to systemd (``FDSTORE=1`` with
``FileDescriptorStoreMax=`` in the unit) gets the same socket back on its next
start (``LISTEN_FDS``/``LISTEN_FDNAMES``), so the frames that reached the
mirror port while it restarted (an upgrade, a ``systemctl restart``) wait in
the ring, and the kernel's drop counter covers any that did not fit
(docs/ARCHITECTURE.md, "Facts: systemd").

The name under which the socket is stored says what it is: interface index,
ring geometry, snaplen and filter. A new run adopts only a socket whose name
is the one it would have made itself; any other (the interface was recreated,
the config changed the ring) is closed and removed from the store, after
counting the frames still waiting in its ring.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import socket
from typing import Mapping, NamedTuple

from appliance import service

from .ring import frames_waiting, kernel_stats

PREFIX = "ring"
LISTEN_FDS_START = 3


class RingShape(NamedTuple):
    netns: int          # the network namespace's inode: interface indexes are per namespace
    ifindex: int
    block_size: int
    block_count: int
    block_timeout_ms: int
    snaplen: int
    filter_id: str

    def name(self) -> str:
        return ".".join(map(str, (PREFIX, *self)))

    @classmethod
    def parse(cls, name: str) -> "RingShape | None":
        parts = name.split(".")
        if len(parts) != 8 or parts[0] != PREFIX or not all(p.isdigit() for p in parts[1:7]):
            return None
        return cls(*map(int, parts[1:7]), parts[7])


def shape(netns_inode: int, ifindex: int, block_size: int, block_count: int, block_timeout_ms: int, snaplen: int,
          bpf_filter: str) -> RingShape:
    """The shape of the ring this config makes (the filter by a short digest: names stay short and plain)."""
    return RingShape(netns_inode, ifindex, block_size, block_count, block_timeout_ms, snaplen,
                     hashlib.sha256(bpf_filter.encode()).hexdigest()[:12])


def passed(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """``{name: fd}`` of what systemd passed to this process (empty when nothing was, or it was for another PID)."""
    env = os.environ if environ is None else environ
    try:
        count = int(env.get("LISTEN_FDS", "0"))
        pid = int(env.get("LISTEN_PID", "0"))
    except ValueError:
        return {}
    if count <= 0 or pid != os.getpid():
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":")
    return {(names[i] if i < len(names) and names[i] else f"unknown{i}"): LISTEN_FDS_START + i for i in range(count)}


def forget_environment() -> None:
    """Children (tcpdump compiling the filter) must not think the fds are for them."""
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)


def store(sock: socket.socket, name: str) -> bool:
    """Give systemd a duplicate of ``sock`` under ``name``; False when not under systemd or the unit keeps none."""
    return service.notify(f"FDSTORE=1\nFDNAME={name}", fds=[sock.fileno()])


def remove(name: str) -> bool:
    return service.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def waiting_frames(fd: int, ring: RingShape) -> int:
    """Frames waiting in a stored ring we will not read (its shape is not ours any more)."""
    try:
        mm = mmap.mmap(fd, ring.block_size * ring.block_count, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError):
        return 0
    try:
        return frames_waiting(mm, ring.block_size, ring.block_count)
    finally:
        mm.close()


def _dropped(fd: int) -> int:
    try:
        copy = os.dup(fd)
    except OSError:
        return 0
    try:
        sock = socket.socket(fileno=copy)
    except OSError:             # not a socket at all
        os.close(copy)
        return 0
    with sock:
        try:
            return kernel_stats(sock)[1]
        except OSError:
            return 0


def _bound_to(sock: socket.socket) -> str:
    try:
        return sock.getsockname()[0]
    except OSError:
        return ""


class Discarded(NamedTuple):
    name: str
    waiting: int        # frames in its ring, never read
    dropped: int        # frames the kernel dropped on it for want of room since it was last read


class Adopted(NamedTuple):
    sock: socket.socket | None      # the stored socket whose shape is ``want``, to read on
    discarded: list[Discarded]      # every other stored fd, closed


def adopt(want: RingShape, ifname: str, environ: Mapping[str, str] | None = None) -> Adopted:
    """Take the stored socket of shape ``want``, still bound to ``ifname``; close (and remove from the store) every
    other passed fd. A socket whose interface went away is unbound by the kernel (its name reads ``''``)."""
    sock, discarded = None, []
    for name, fd in passed(environ).items():
        if sock is None and name == want.name():
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                sock = None
            if sock is not None and sock.family == socket.AF_PACKET and _bound_to(sock) == ifname:
                continue
            if sock is not None:
                sock.detach()
                sock = None
        other = RingShape.parse(name)
        discarded.append(Discarded(name, waiting_frames(fd, other) if other else 0, _dropped(fd)))
        try:
            os.close(fd)
        except OSError:
            pass
        remove(name)
    if environ is None:
        forget_environment()
    return Adopted(sock, discarded)
