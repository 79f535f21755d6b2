"""The capture socket: AF_PACKET with a PACKET_MMAP TPACKET_V3 receive ring.

The kernel writes whole blocks of frames into a ring shared with us; we walk
a block with ``struct.unpack_from`` and hand it back by clearing its status
word. No syscall per frame: that is what lets Python keep up (docs/ARCHITECTURE.md, "Facts: capture":
~0.24 us a frame against ~1.3 us for ``recv``).

The socket is created with protocol 0 (receives nothing), gets its filter and
ring, and only then is bound with ETH_P_ALL, so no frame that the filter
would reject slips in before the filter is attached.

A socket kept by systemd across a restart (``snooper/fdstore.py``) already has
its filter, ring and binding: the ring is only mapped again, and reading
starts at the oldest block the kernel handed over (by block sequence number),
since where the previous process stopped is not known.
"""

from __future__ import annotations

import mmap
import select
import socket
import struct
import subprocess
import threading
import time

from appliance import netns
from appliance.errors import BadInput

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
PACKET_MR_PROMISC = 1
SO_ATTACH_FILTER = 26

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40

# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1
_BLOCK = struct.Struct("<III I I")            # version, priv, block_status, num_pkts, offset_to_first_pkt
_BLOCK_STATUS_OFF = 8
_BLOCK_SEQ = struct.Struct("<Q")              # tpacket_hdr_v1.seq_num: the block's number since the ring was made
_BLOCK_SEQ_OFF = 24
# struct tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac (then net, rxhash, vlan_tci at +32, vlan_tpid)
_PKT = struct.Struct("<IIIIIIH")
_VLAN = struct.Struct("<IH")
_VLAN_OFF = 32
_PKT_HDR = 48                                 # sizeof(struct tpacket3_hdr): a header must fit in the block
_STATS = struct.Struct("<III")                # tp_packets (incl. drops), tp_drops, tp_freeze_q_cnt
_MAX_BPF_SNAP = 262144


class CaptureError(BadInput):
    """The capture socket could not be set up; the message says which step and why."""


def compile_bpf(expression: str, snaplen: int) -> bytes:
    """A ``struct sock_fprog`` payload for ``expression`` (tcpdump syntax), accepting at most ``snaplen`` bytes.

    The kernel truncates each accepted frame to the program's return value,
    so the snaplen is enforced before the frame is even copied into the ring.
    """
    argv = ["tcpdump", "-ddd", "-y", "EN10MB", "-s", str(snaplen)]
    if expression.strip():
        argv.append(expression)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        raise CaptureError("bpf_filter needs tcpdump to compile it: not installed") from None
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CaptureError(f"bpf_filter {expression!r} does not compile: {msg}")
    lines = proc.stdout.split("\n")
    count = int(lines[0])
    insns = b"".join(struct.pack("<HBBI", *map(int, line.split())) for line in lines[1:1 + count])
    return insns


class Ring:
    """One TPACKET_V3 capture ring on ``ifname`` (inside ``ns`` when given)."""

    def __init__(self, ifname: str, ns: str | None, block_size: int, block_count: int,
                 block_timeout_ms: int, snaplen: int = 65535, bpf_filter: str = "", promisc: bool = True,
                 sock: socket.socket | None = None):
        self.ifname = ifname
        self.block_size = block_size
        self.block_count = block_count
        self.snaplen = snaplen
        self.block = 0
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.kernel_freezes = 0
        self.bad_headers = 0
        self.socket_errors = 0
        self._stats_lock = threading.Lock()
        self.adopted = sock is not None
        self._resync = self.adopted
        if sock is not None:        # kept by systemd: filter, ring and binding are the previous run's
            self.sock = sock
            try:
                self._map()
            except BaseException:
                self.sock.close()
                raise
            return
        with netns.enter(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                self._setup(block_timeout_ms, bpf_filter, promisc)
            except BaseException:
                self.sock.close()
                raise

    def _setup(self, block_timeout_ms: int, bpf_filter: str, promisc: bool) -> None:
        s = self.sock
        try:
            socket.if_nametoindex(self.ifname)
        except OSError:
            raise CaptureError(f"interface {self.ifname} does not exist") from None
        if bpf_filter or self.snaplen < _MAX_BPF_SNAP:
            prog = compile_bpf(bpf_filter, self.snaplen)
            self._filter_buf = prog  # keep the buffer alive while the kernel copies it
            import ctypes
            cbuf = ctypes.create_string_buffer(prog, len(prog))
            fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(cbuf))
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        # tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov, sizeof_priv, feature_req_word
        frame_size = 2048
        frames = self.block_size // frame_size * self.block_count
        req = struct.pack("IIIIIII", self.block_size, self.block_count, frame_size, frames, block_timeout_ms, 0, 0)
        try:
            s.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        except OSError as exc:
            raise CaptureError(f"PACKET_RX_RING {self.block_count} x {self.block_size} B: {exc.strerror}") from None
        self._map()
        if promisc:
            mreq = struct.pack("iHH8s", socket.if_nametoindex(self.ifname), PACKET_MR_PROMISC, 0, b"")
            s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        s.bind((self.ifname, ETH_P_ALL))

    def _map(self) -> None:
        try:
            self.mm = mmap.mmap(self.sock.fileno(), self.block_size * self.block_count, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise CaptureError(f"mapping the ring {self.block_count} x {self.block_size} B: {exc.strerror}") from None
        self.poller = select.poll()
        self.poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR)

    def waiting(self) -> int:
        """Frames the kernel has put in the ring and nobody has read yet."""
        return frames_waiting(self.mm, self.block_size, self.block_count)

    def _oldest_ready(self) -> int | None:
        """The ready block with the lowest sequence number: where an adopted ring's reading starts."""
        best = None
        for i in range(self.block_count):
            base = i * self.block_size
            if self.mm[base + _BLOCK_STATUS_OFF] & TP_STATUS_USER:
                seq = _BLOCK_SEQ.unpack_from(self.mm, base + _BLOCK_SEQ_OFF)[0]
                if best is None or seq < best[0]:
                    best = (seq, i)
        return None if best is None else best[1]

    def read_stats(self) -> tuple[int, int, int]:
        """Fold the kernel's counters (reset on every read) into running totals and return them."""
        with self._stats_lock:
            if self.sock.fileno() < 0:
                return self.kernel_packets, self.kernel_drops, self.kernel_freezes
            packets, drops, freezes = kernel_stats(self.sock)
            self.kernel_packets += packets
            self.kernel_drops += drops
            self.kernel_freezes += freezes
            return self.kernel_packets, self.kernel_drops, self.kernel_freezes

    def wait(self, timeout_ms: int) -> bool:
        """True when the next block is ready (after waiting at most ``timeout_ms``)."""
        if self._resync:
            return self._find_start(timeout_ms)
        if self.mm[self.block * self.block_size + _BLOCK_STATUS_OFF] & TP_STATUS_USER:
            return True
        self._poll(timeout_ms)
        return bool(self.mm[self.block * self.block_size + _BLOCK_STATUS_OFF] & TP_STATUS_USER)

    def _poll(self, timeout_ms: int) -> None:
        """Wait for the kernel; a pending socket error (the link went down: ENETDOWN) is read, which clears it,
        else every poll would return at once and the capture loop would spin."""
        for _fd, events in self.poller.poll(timeout_ms):
            if events & select.POLLERR:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.socket_errors += 1
                    time.sleep(timeout_ms / 1000)      # the link is down: do not spin while it stays down

    def _find_start(self, timeout_ms: int) -> bool:
        """An adopted ring: wait for any ready block and start at the oldest one; in order from then on."""
        start = self._oldest_ready()
        if start is None:
            self._poll(timeout_ms)
            start = self._oldest_ready()
        if start is None:
            return False
        self.block, self._resync = start, False
        return True

    def ready(self) -> int | None:
        """The offset of the next block in ``mm`` when the kernel has handed it over, else None."""
        if self._resync and not self._find_start(0):
            return None
        base = self.block * self.block_size
        return base if self.mm[base + _BLOCK_STATUS_OFF] & TP_STATUS_USER else None

    def release(self) -> None:
        """Give the current block back to the kernel and move on to the next.

        Its frame count is cleared first: a released block that the kernel has
        not opened again must not look like one being filled (``frames_waiting``).
        """
        base = self.block * self.block_size + _BLOCK_STATUS_OFF
        self.mm[base + 4:base + 8] = b"\0\0\0\0"
        self.mm[base:base + 4] = b"\0\0\0\0"
        self.block = (self.block + 1) % self.block_count

    def read_block(self, out: list) -> int | None:
        """Append ``(ts_ns, wire_len, data)`` for each frame of the next ready block to ``out``; None if none is ready.

        The block goes back to the kernel before returning. A frame whose
        header points outside the block is counted in ``bad_headers``.
        """
        base = self.ready()
        if base is None:
            return None
        done, bad = walk_block(self.mm, base, self.block_size, self.snaplen, out)
        self.bad_headers += bad
        self.release()
        return done

    def close(self) -> None:
        with self._stats_lock:
            try:
                self.mm.close()
            except (AttributeError, BufferError):
                pass
            self.sock.close()


def kernel_stats(sock: socket.socket) -> tuple[int, int, int]:
    """The socket's (packets, drops, freezes) since the last read: the kernel resets them on every read.

    A socket without a TPACKET_V3 ring answers the older two-counter form.
    """
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
    return _STATS.unpack(raw) if len(raw) == _STATS.size else (*struct.unpack("<II", raw[:8]), 0)


def frames_waiting(mm, block_size: int, block_count: int) -> int:
    """Frames in a mapped ring not read yet: every ready block's, and those of the block being filled.

    The block being filled is the one opened last (highest sequence number);
    while it is the kernel's its ``num_pkts`` counts up frame by frame. A
    block handed back keeps its old count, so only that one is added.
    """
    total, newest = 0, (-1, 0, 0)       # (seq, status, num_pkts) of the block opened last
    for i in range(block_count):
        base = i * block_size
        _v, _p, status, num, _off = _BLOCK.unpack_from(mm, base)
        seq = _BLOCK_SEQ.unpack_from(mm, base + _BLOCK_SEQ_OFF)[0]
        if status & TP_STATUS_USER:
            total += num
        if seq > newest[0]:
            newest = (seq, status, num)
    return total + (0 if newest[1] & TP_STATUS_USER else newest[2])


def walk_block(buf, base: int, bsize: int, snaplen: int, out: list) -> tuple[int, int]:
    """Append ``(ts_ns, wire_len, data)`` for each frame of the block at ``base`` to ``out``: (frames, bad headers).

    The Python half of the capture engine (snooper/engine.py); snooper/_fastcap.c walks a block the same way.
    """
    _v, _p, _status, num, off = _BLOCK.unpack_from(buf, base)
    unpack = _PKT.unpack_from
    append = out.append
    end = base + bsize
    off += base
    done = 0
    for _ in range(num):
        if off + _PKT_HDR > end:
            return done, num - done
        nxt, sec, nsec, cap, wire, pstatus, mac = unpack(buf, off)
        start = off + mac
        if start + cap > end or cap > wire or (pstatus & TP_STATUS_VLAN_VALID and wire > 0xFFFFFFFB):
            return done, num - done
        if pstatus & TP_STATUS_VLAN_VALID:
            tci, tpid = _VLAN.unpack_from(buf, off + _VLAN_OFF)
            data = _with_vlan(buf[start:start + cap], tci,
                              tpid if pstatus & TP_STATUS_VLAN_TPID_VALID else 0x8100)[:snaplen]
            wire += 4
        else:
            data = buf[start:start + (cap if cap < snaplen else snaplen)]
        append((sec * 1_000_000_000 + nsec, wire, data))
        done += 1
        if not nxt:
            break
        off += nxt
    return done, 0


def _with_vlan(frame: bytes, tci: int, tpid: int) -> bytes:
    """Put back the 802.1Q tag that the NIC/veth stripped into the ring header."""
    return frame[:12] + struct.pack("!HH", tpid, tci & 0xFFFF) + frame[12:]
