"""The Zodiac FX's OpenFlow side over TCP: it connects to the controller, as the switch does.

One thread runs what the firmware's main loop runs (openflow/openflow.c):
``task_openflow`` with its 500 ms timer, ``of_receive`` with its 1,136-byte
packet buffer, ``of13_message``. ``tick`` is that timer's period; every
firmware timing is counted in ticks, so a fast tick makes a fast switch:

* echo request once the controller has been silent for more than 4 ticks,
  every tick after that; connection closed (FIN) after more than 12 ticks of
  silence, or at the first echo time when no FEATURES_REQUEST came
  (openflow.c:384-403, config/config_zodiac.h:50-51);
* reconnect 4 ticks after a drop (openflow.c:405-411); a refused connect is
  retried at the same pace;
* flows, meters and groups wiped on every drop and on every connect, secure
  fail mode (openflow.c:364, 389, 400, 433);
* flow timeouts checked every 4 ticks, one flow per check (of_helper.c:139-163);
  the firmware's second is 2 ticks (of_helper.c:141).

The receive buffer (openflow.c:83-229, config/lwipopts.h:226): a TCP segment
(``segment`` bytes, the MSS 536) is appended to a 2*536+64 = 1,136-byte
buffer and every whole message in it is handled; a segment that does not fit
is dropped without a word (``return ERR_ABRT`` without ``tcp_abort``): its
bytes are acknowledged by TCP and lost, the stream is misaligned from there,
and the receive window (4*536 = 2,144 bytes, lwipopts.h:232) never gets them
back (``tcp_recved`` is not called), so once 2,144 bytes are lost the
controller can send nothing more and the heartbeat closes the link.
A *burst* is what the controller sends without waiting: the bytes between
two replies of the switch (or after ``burst_gap`` seconds of quiet). The
segments of a burst can reach the firmware as one chain (after a lost
segment, lwIP hands the re-ordered segments over together), so with
``burst_policy="drop"`` (the default) the bytes of a burst beyond the buffer
are dropped like a segment that does not fit; ``"record"`` only counts them.
Every burst size and every overflow is recorded.

A remote FIN is never answered with a FIN: of_receive's close test is
``(err = ERR_OK) && (p == NULL)``, always false (openflow.c:224); the model
keeps such sockets half open, at most ``MEMP_NUM_TCP_PCB`` - 2 of them
(config/lwipopts.h:117), the oldest aborted with a RST when more come.
"""

from __future__ import annotations

import collections
import select
import socket
import struct
import threading
import time

from . import wire
from .table import MAX_OF_STATS, OPENFLOW_PORTS, STATS_BUFFER, ZodiacTable

RX_BUFFER = 2 * 536 + 64     # PACKET_BUFFER_SIZE, openflow.c:83
TCP_MSS = 536                # config/lwipopts.h:226
TCP_WND = 4 * TCP_MSS        # config/lwipopts.h:232
HB_INTERVAL, HB_TIMEOUT = 2, 6   # config/config_zodiac.h:50-51 (seconds = 2 ticks each)
HALF_OPEN_MAX = 12 - 2       # MEMP_NUM_TCP_PCB (lwipopts.h:117) less the listener and the web server's
REPLY_TYPES = {wire.HELLO, wire.ERROR, wire.ECHO_REPLY, wire.FEATURES_REPLY, wire.GET_CONFIG_REPLY,
               wire.MULTIPART_REPLY, wire.BARRIER_REPLY, wire.ROLE_REPLY}


class ZodiacSwitch:
    """A Zodiac FX (firmware v0.86) on the OpenFlow side; see the package docstring for the API."""

    def __init__(self, controller: tuple[str, int], mac: str = "70:b3:d5:6c:d8:88", tick: float = 0.5,
                 rx_buffer: int = RX_BUFFER, segment: int = TCP_MSS, window: int = TCP_WND,
                 burst_gap: float = 0.2, burst_policy: str = "drop", connect_timeout: float = 1.0):
        if burst_policy not in ("drop", "record"):
            raise ValueError("burst_policy is 'drop' or 'record'")
        self.controller = controller
        self.mac = bytes(int(x, 16) for x in mac.split(":"))
        self.tick, self.rx_buffer, self.segment, self.window = tick, rx_buffer, segment, window
        self.burst_gap, self.burst_policy, self.connect_timeout = burst_gap, burst_policy, connect_timeout
        self.table = ZodiacTable()
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.sock: socket.socket | None = None
        self.half_open: collections.deque = collections.deque()
        self.ticks = 2                     # totaltime: the firmware has been up a second
        self.update_interval = 2
        self.timer_alt = 0
        self.heartbeat = 0
        self.tcp_wait = 0
        self.reconnect_at: float | None = 0.0   # monotonic time of the next connect, None: stay away
        self.of_version = 0
        self.rcv_freq = False
        self.switch_config = b""
        self._reset_counters()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._requests: collections.deque = collections.deque()

    # -- counters -----------------------------------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self.connects = self.disconnects = self.messages = self.errors_sent = 0
        self.overflows = self.lost_bytes = self.flow_removed_sent = self.echo_requests_sent = 0
        self.by_type: collections.Counter = collections.Counter()
        self.errors: list[tuple] = []          # (type, code, xid, offending message type)
        self.bursts: list[int] = []
        self.burst = 0
        self.burst_last = 0.0
        self.disconnect_reasons: list[str] = []
        self.connect_failures = 0

    def counters(self) -> dict:
        with self.lock:
            return {"connects": self.connects, "disconnects": self.disconnects, "messages": self.messages,
                    "errors_sent": self.errors_sent, "overflows": self.overflows, "lost_bytes": self.lost_bytes,
                    "max_burst": max(self.bursts + [self.burst]), "bursts": len(self.bursts) + bool(self.burst),
                    "flow_removed_sent": self.flow_removed_sent, "echo_requests_sent": self.echo_requests_sent,
                    "half_open": len(self.half_open), "connect_failures": self.connect_failures,
                    "by_type": dict(self.by_type)}

    def burst_sizes(self) -> list[int]:
        with self.lock:
            return self.bursts + ([self.burst] if self.burst else [])

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self) -> "ZodiacSwitch":
        self._thread = threading.Thread(target=self._run, name="zodiac-model", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        with self.lock:
            self._close(rst=True)
            while self.half_open:
                _abort(self.half_open.popleft())

    def __enter__(self) -> "ZodiacSwitch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def drop(self, kind: str = "rst", reconnect: float | None = None) -> None:
        """End the connection now, as a cable pull (``"rst"``) or a close (``"fin"``); the switch wipes its
        tables and comes back after ``reconnect`` seconds (None: the firmware's 4 ticks, False: not until
        ``reconnect_now``)."""
        if kind not in ("rst", "fin"):
            raise ValueError("kind is 'rst' or 'fin'")
        done = threading.Event()
        self._requests.append((kind, reconnect, done))
        done.wait(10)

    def reconnect_now(self) -> None:
        with self.lock:
            self.reconnect_at = time.monotonic()

    def wait(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(self)`` holds (checked whenever the switch changes); False on timeout."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.05))
        return True

    # -- snapshots ----------------------------------------------------------------------------------------------------
    def flows(self):
        with self.lock:
            return self.table.views()

    def meters(self) -> dict:
        with self.lock:
            return {m.meter_id: (m.flags, m.bands) for m in self.table.live_meters()}

    def groups(self) -> dict:
        with self.lock:
            return {g.group_id: g.type for g in self.table.groups if g is not None}

    def where(self, in_port: int, **headers):
        with self.lock:
            return self.table.where(in_port, now=self.ticks // 2, **headers)

    # -- the loop -----------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick
        while not self._stop.is_set():
            self._serve_requests()
            now = time.monotonic()
            if self.sock is None and self.reconnect_at is not None and now >= self.reconnect_at:
                self._connect()
            timeout = max(0.0, min(next_tick - now, 0.05))
            readable = []
            if self.sock is not None and self.lost_bytes < self.window:
                try:
                    readable, _, _ = select.select([self.sock], [], [], timeout)
                except (OSError, ValueError):
                    readable = []
            else:
                time.sleep(timeout)
            if readable:
                self._read()
            if time.monotonic() >= next_tick:
                next_tick += self.tick
                with self.changed:
                    self._on_tick()
                    self.changed.notify_all()

    def _serve_requests(self) -> None:
        while self._requests:
            kind, reconnect, done = self._requests.popleft()
            with self.changed:
                if self.sock is not None:
                    self._close(rst=kind == "rst")
                    self._lost(f"test drop ({kind})", reconnect)
                elif reconnect is not False:
                    self.reconnect_at = time.monotonic() + (reconnect or 0) if reconnect is not None else \
                        time.monotonic() + 4 * self.tick
                self.changed.notify_all()
            done.set()

    def _connect(self) -> None:
        try:
            s = socket.create_connection(self.controller, timeout=self.connect_timeout)
        except OSError:
            with self.lock:
                self.connect_failures += 1
                self.reconnect_at = time.monotonic() + 4 * self.tick
            return
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # tcp_nagle_disable, openflow.c:354
        s.settimeout(5.0)
        with self.changed:
            self.sock = s
            self.connects += 1
            self.packet_buffer = bytearray()                     # TCPready, openflow.c:424-437
            self.packet_off = 0
            self.lost_bytes = 0
            self.heartbeat = 0
            self.table.clear()
            self.of_version = 0
            self.rcv_freq = False
            self._send(wire.message(wire.HELLO, 1))               # OF_hello, openflow.c:253-272
            self.changed.notify_all()

    def _close(self, rst: bool) -> None:
        s, self.sock = self.sock, None
        if s is None:
            return
        if rst:
            _abort(s)
        else:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            s.close()

    def _lost(self, reason: str, reconnect=None) -> None:
        """The firmware noticed the connection is gone: wipe (secure mode) and plan the reconnect."""
        self.disconnects += 1
        self.disconnect_reasons.append(reason)
        self.table.clear()
        self._end_burst()
        self.tcp_wait = 0
        if reconnect is False:
            self.reconnect_at = None
        elif reconnect is None:
            self.reconnect_at = time.monotonic() + 4 * self.tick
        else:
            self.reconnect_at = time.monotonic() + reconnect

    def _on_tick(self) -> None:
        """task_openflow's 500 ms block (openflow.c:379-412) and nnOF_timer (of_helper.c:139-163)."""
        self.ticks += 1
        self.update_interval += 1
        if self.update_interval // 2 > 1:
            if self.timer_alt == 1:
                for out in self.table.expire(self.ticks // 2):
                    self._emit(out, b"")
            self.timer_alt ^= 1
            self.update_interval = 2
        if self.sock is not None:
            if self.heartbeat > HB_INTERVAL * 2:
                if not self.rcv_freq:
                    self._close(rst=False)
                    self._lost("handshake failed (no features request)")
                    return
                self._send(wire.header(wire.ECHO_REQUEST, 8, 0xD2040000, self.of_version))   # xid 1234 unswapped
                self.echo_requests_sent += 1
            self.heartbeat += 1
            if self.heartbeat > HB_TIMEOUT * 2:
                self._close(rst=False)
                self._lost("no heartbeat")

    def _read(self) -> None:
        try:
            data = self.sock.recv(self.segment)
        except (ConnectionResetError, OSError):
            with self.changed:
                self._close(rst=True)
                self._lost("reset by the controller")
                self.changed.notify_all()
            return
        with self.changed:
            if not data:
                self._half_close()
            else:
                self._segment(data)
            self.changed.notify_all()

    def _half_close(self) -> None:
        """A FIN from the controller: the firmware never closes its side (openflow.c:224)."""
        s, self.sock = self.sock, None
        self.half_open.append(s)
        while len(self.half_open) > HALF_OPEN_MAX:
            _abort(self.half_open.popleft())
        self._lost("closed by the controller")

    def _end_burst(self) -> None:
        if self.burst:
            self.bursts.append(self.burst)
        self.burst = 0

    def _segment(self, data: bytes) -> None:
        """of_receive (openflow.c:141-229) for one segment."""
        self.heartbeat = 0
        now = time.monotonic()
        if self.burst and now - self.burst_last > self.burst_gap:
            self._end_burst()
        self.burst_last = now
        self.burst += len(data)
        over_burst = self.burst > self.rx_buffer
        if over_burst:
            self.overflows += 1
        if len(self.packet_buffer) + len(data) > self.rx_buffer or (over_burst and self.burst_policy == "drop"):
            if not over_burst:
                self.overflows += 1
            self.lost_bytes += len(data)
            return
        self.packet_buffer += data
        buf = self.packet_buffer
        while self.packet_off < len(buf):
            if len(buf) - self.packet_off < 4:
                break
            version, mtype, length = buf[self.packet_off], buf[self.packet_off + 1], \
                struct.unpack_from("!H", buf, self.packet_off + 2)[0]
            if length == 0 or version == 0 or version > 6 or mtype > 30:
                return                     # "Invalid OpenFlow packet, aborting": the buffer stays as it is
            if self.packet_off + length > len(buf):
                break
            msg = bytes(buf[self.packet_off:self.packet_off + length])
            self.packet_off += length
            self._message(msg)
            if self.sock is None:
                return
        del buf[:self.packet_off]
        self.packet_off = 0

    # -- messages -----------------------------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.sock is None:
            return
        if data[1] in REPLY_TYPES:
            self._end_burst()
        try:
            self.sock.sendall(data)
        except OSError:
            pass                           # the loop notices the dead socket at its next read

    def _emit(self, out, msg: bytes) -> None:
        if out.kind == "error":
            self.errors_sent += 1
            self.errors.append((out.err_type, out.code, wire.HEADER.unpack_from(msg)[3], msg[1]))
            self._send(wire.error_message(msg, out.err_type, out.code))
        elif out.kind == "flow_removed" and self.sock is not None:
            self.flow_removed_sent += 1
            self._send(_flow_removed(out.flow, out.reason, self.ticks // 2))

    def _message(self, msg: bytes) -> None:
        version, mtype, _length, xid = wire.HEADER.unpack_from(msg)
        self.messages += 1
        self.by_type[mtype] += 1
        if mtype == wire.HELLO:                 # openflow.c:184-198 (of_version 0 in the config: negotiate)
            self.of_version = 4 if version >= 4 else (1 if version == 1 else self.of_version)
            return
        if mtype == wire.ECHO_REQUEST:           # openflow.c:200-202, answered in any state
            self._send(bytes([msg[0], wire.ECHO_REPLY]) + msg[2:])
            return
        if self.of_version != 4:
            return                               # OpenFlow 1.0 is not modelled; before HELLO nothing is handled
        now = self.ticks // 2
        try:
            self._of13(msg, mtype, xid, now)
        except (struct.error, IndexError, ValueError):
            self.by_type["undecodable"] += 1     # the firmware would read past the message; the model skips it

    def _of13(self, msg: bytes, mtype: int, xid: int, now: int) -> None:
        """of13_message (openflow_13.c:665-794): what it does not list it ignores, without an error."""
        if mtype == wire.FEATURES_REQUEST:
            self.rcv_freq = True
            self._send(wire.message(wire.FEATURES_REPLY, xid, self._features()))
        elif mtype == wire.SET_CONFIG:
            self.switch_config = msg[8:12]
        elif mtype == wire.GET_CONFIG_REQUEST:
            self._send(wire.message(wire.GET_CONFIG_REPLY, xid, struct.pack("!HH", 0, 256)))
        elif mtype == wire.ROLE_REQUEST:
            self._send(wire.message(wire.ROLE_REPLY, xid, struct.pack("!I4xQ", 2, 0)))
        elif mtype == wire.FLOW_MOD:
            for out in self.table.flow_mod(wire.decode_flow_mod(msg), now):
                self._emit(out, msg)
        elif mtype == wire.GROUP_MOD:
            for out in self.table.group_mod(msg, now):
                self._emit(out, msg)
        elif mtype == wire.METER_MOD:
            for out in self.table.meter_mod(wire.decode_meter_mod(msg), now):
                self._emit(out, msg)
        elif mtype == wire.BARRIER_REQUEST:
            self._send(wire.message(wire.BARRIER_REPLY, xid))
        elif mtype == wire.MULTIPART_REQUEST:
            self._multipart(msg, xid, now)

    def _features(self) -> bytes:
        """features_reply13 (openflow_13.c:802-822): the MAC in a little-endian word shifted by 16, unswapped."""
        dpid = (int.from_bytes(self.mac + b"\0\0", "little") << 16) & (2 ** 64 - 1)
        return dpid.to_bytes(8, "little") + struct.pack("!IBB2xII", 0, 10, 0, 1 | 2 | 4 | 8, 0)

    def _multipart(self, msg: bytes, xid: int, now: int) -> None:
        mp_type, flags = struct.unpack_from("!HH", msg, 8)
        if flags != 0:
            return                                # openflow_13.c:701-705
        body = None
        if mp_type == wire.MP_DESC:
            body = b"".join(s.encode().ljust(n, b"\0") for s, n in (
                ("Northbound Networks", 256), ("Zodiac-FX Rev.A", 256), ("0.86", 256), ("none", 32),
                ("World's smallest OpenFlow switch!", 256)))
        elif mp_type == wire.MP_FLOW:
            self._flow_stats(xid, now)
            return
        elif mp_type == wire.MP_AGGREGATE:
            f = self.table.flows
            body = struct.pack("!QQI4x", sum(x.packets for x in f), sum(x.bytes for x in f), len(f))
        elif mp_type == wire.MP_PORT_DESC:
            body = b"".join(_port(p) for p in OPENFLOW_PORTS)
        elif mp_type == wire.MP_TABLE:
            body = b"".join(struct.pack("!B3xIQQ", t, sum(1 for f in self.table.flows if f.table_id == t), 0, 0)
                            for t in range(10))
        elif mp_type == wire.MP_PORT_STATS:
            body = b"".join(struct.pack("!I4x", p) + bytes(104) for p in OPENFLOW_PORTS)
        elif mp_type in (wire.MP_METER, wire.MP_METER_CONFIG):
            body = self._meter_body(msg, mp_type, now)
            if body is None:
                return
        elif mp_type == wire.MP_METER_FEATURES:      # openflow_13.c:1702-1737
            body = struct.pack("!IIIBB2x", 8, (1 << wire.MBT_DSCP_REMARK) | (1 << wire.MBT_DROP),
                               wire.MF_KBPS | wire.MF_PKTPS, 3, 0)
        if body is not None:
            self._send(wire.multipart_reply(xid, mp_type, body))

    def _meter_body(self, msg: bytes, mp_type: int, now: int) -> bytes | None:
        """multi_meter_stats_reply13 / multi_meter_config_reply13 (openflow_13.c:1373-1700): counters are never
        kept by the model (zero), the band packet/byte fields are swapped in the firmware anyway; for ALL
        the flow count is that of meter 0xffffffff (get_bound_flows(req_id), 1423)."""
        req_id = struct.unpack_from("!I", msg, 16)[0]
        live = self.table.live_meters()
        if req_id != wire.M_ALL:
            live = [m for m in live if m.meter_id == req_id]
            if not live:
                self._emit(_err(wire.ET_METER_MOD_FAILED, wire.MMFC_UNKNOWN_METER), msg)
                return None
        out = b""
        for m in live:
            if mp_type == wire.MP_METER:
                out += struct.pack("!IH6xIQQII", m.meter_id, 40 + 16 * len(m.bands), self.table.bound_flows(req_id),
                                   0, 0, now - m.time_added // 1, 0) + bytes(16 * len(m.bands))
            else:
                out += struct.pack("!HHI", 8 + 16 * len(m.bands), m.flags, m.meter_id)
                out += b"".join(struct.pack("!HHII4x", t, 16, rate, burst) for t, rate, burst, _p in m.bands)
        return out

    def _flow_stats(self, xid: int, now: int) -> None:
        """multi_flow_reply13 and multi_flow_more_reply13 (openflow_13.c:908-994): the request's filters are
        ignored; 15 flows per reply; a page is cut where its flows pass 2,048 bytes (of_helper.c:1450)."""
        flows = self.table.flows
        n = len(flows)
        if n <= MAX_OF_STATS:
            self._send(wire.multipart_reply(xid, wire.MP_FLOW, _flow_stats_body(flows, now)))
            return
        self._send(wire.multipart_reply(xid, wire.MP_FLOW, _flow_stats_body(flows[:MAX_OF_STATS], now), more=True))
        start = MAX_OF_STATS
        while True:
            more = start + MAX_OF_STATS < n
            page = flows[start:start + MAX_OF_STATS] if more else flows[start:n]
            reply = wire.multipart_reply(xid, wire.MP_FLOW, _flow_stats_body(page, now), more=more)
            if len(reply) < STATS_BUFFER:
                self._send(reply)
            if not more:
                return
            start += MAX_OF_STATS


def _err(err_type: int, code: int):
    from .table import Out
    return Out("error", err_type, code)


def _abort(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


def _port(p: int) -> bytes:
    """multi_portdesc_reply13 (openflow_13.c:1038-1090): name eth<index>, a random MAC, 100 Mb/s copper."""
    import os
    return struct.pack("!I4x6s2x16sIIIIIIII", p, os.urandom(6), f"eth{p - 1}".encode(), 0, 4, 8 | 2048, 0, 0, 0, 0, 0)


def _match_bytes(flow) -> bytes:
    m = struct.pack("!HH", 1, flow.match_len) + (flow.oxm or flow.pad4)
    return m + bytes(wire.align8(len(m)) - len(m))


def _flow_stats_body(flows, now: int) -> bytes:
    out = b""
    for f in flows:
        entry = struct.pack("!HBxIIHHHH4xQQQ", f.msg_len, f.table_id, now - f.duration, 0, f.priority, f.idle_timeout,
                            f.hard_timeout, f.flags, f.cookie, f.packets, f.bytes) + _match_bytes(f) + f.instructions
        if len(out) + len(entry) > STATS_BUFFER:
            break
        out += entry
    return out


def _flow_removed(f, reason: int, now: int) -> bytes:
    """flowrem_notif13 (openflow_13.c:2880-2920); xid 0."""
    body = struct.pack("!QHBBIIHHQQ", f.cookie, f.priority, reason, f.table_id, now - f.duration, 0, f.idle_timeout,
                       f.hard_timeout, f.packets, f.bytes) + _match_bytes(f)
    return wire.message(wire.FLOW_REMOVED, 0, body)
