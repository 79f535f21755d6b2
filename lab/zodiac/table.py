"""The Zodiac FX's OpenFlow 1.3 state, pure: flows, meters, groups, the block pool, ``where()``.

No sockets, no clock: every operation takes ``now``, the firmware's seconds
(``totaltime/2``, of_helper.c:141), and returns the messages the switch would
send back (errors, flow-removed). References are file:line in ZodiacFX/src/
of NorthboundNetworks/ZodiacFX v0.86 (the last release, tag v0.86).

What it holds, as the firmware does:

* 480 flows shared by 10 tables (config/config_zodiac.h:41,45), kept in one
  array in arrival order; a removal moves the last flow into the hole
  (openflow/of_helper.c:1175-1208), so order changes.
* Every flow takes a 56-byte block for its flow_mod, one for its match
  (when not empty) and one for its instructions, from one pool of 1,024
  blocks in 32 bags of 16/24/56/72/96 bytes (config/conf_membag.h:52-60),
  smallest free block that fits (ASF membag.c membag_alloc); nothing over
  96 bytes fits, so such a flow is refused as TABLE_FULL
  (openflow_13.c:2109-2148). A refusal after the first block leaks the blocks
  already taken until the next wipe (membag_init in clear_flows).
* ADD: TABLE_FULL when 480 flows exist, even for a replacement
  (openflow_13.c:2042); BAD_TABLE_ID above table 9 (2050); the same
  table+priority+match (raw bytes, compared over the *old* match's length,
  2058-2106) is replaced, its counters carried over; CHECK_OVERLAP and
  RESET_COUNTS are read without ntohs (2065, 2071), so they test bits 9 and
  10 of the flags, not bits 1 and 2.
* MODIFY and MODIFY_STRICT are ignored (openflow_13.c:2014-2020).
* DELETE / DELETE_STRICT (2164-2375): the cookie test is
  ``(cookie & mask) != flow_cookie & mask`` (C precedence: the flow is kept
  only when the cookies differ AND bit 56 of the mask is set); an out_port or
  out_group other than ANY matches no flow (the instruction walk compares
  un-swapped types); DELETE matches by field_match13 (of_helper.c:1010),
  DELETE_STRICT by priority and raw match bytes; FLOW_REMOVED is sent when the
  request or the flow has SEND_FLOW_REM.
* Timeouts (of_helper.c:1242-1286): checked every 2 s (every other 1-second
  stats event, of_helper.c:139-163, command.c:456), one flow removed per
  check; idle counts from the last match, hard from the add.
* Meters (openflow_13.c:2513-2843): 8 slots, scans stop at the first empty
  slot; ADD: OUT_OF_METERS when slot 8 is used, METER_EXISTS, bands counted
  from the length, OUT_OF_BANDS over 3 bands or when the 40+16n-byte block is
  not there; the flags are stored unchecked (BURST and STATS are accepted,
  only the meter-features reply says KBPS|PKTPS, 1727); MODIFY of an unknown
  meter: UNKNOWN_METER (12, 3); DELETE of an unknown meter: nothing.
* Groups (openflow_13.c:1923-1994): ids 1-4, else or when active
  GROUP_EXISTS; one stored bucket list of at most 64 bytes (BAD_BUCKET),
  the type is not checked; MODIFY ignored; the datapath runs the first
  bucket's actions only (openflow_13.c:264-313).
* The pipeline (openflow_13.c:120-663, of_helper.c:359-735): highest priority
  wins, the earlier flow on a tie; Meter, then Apply-Actions, then Goto-Table
  (forward only); Write-Actions are stored and never run; output to the
  in_port is dropped, IN_PORT/FLOOD/ALL/CONTROLLER as the firmware does;
  match fields it does not know (IPv6 among them) never match, and on a
  non-IPv4 packet ip_proto and the L4 ports are not parsed (of_helper.c:322-340).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from . import wire

MAX_FLOWS = 480          # config/config_zodiac.h:41
MAX_TABLES = 10          # config/config_zodiac.h:45
MAX_GROUPS = 4           # config/config_zodiac.h:47
MAX_BUCKETS = 4          # config/config_zodiac.h:48
MAX_METERS = 8           # config/config_zodiac.h:55
MAX_BANDS = 3            # config/config_zodiac.h:56
MAX_OF_STATS = 15        # config/config_zodiac.h:53 (flows per flow-stats reply)
TOTAL_PORTS = 4          # config/config_zodiac.h:36
OPENFLOW_PORTS = (1, 2, 3)   # command.c:441-444: ports 1-3 OpenFlow, port 4 native
NATIVE_PORTS = (4,)
FLOW_MOD_BLOCK = 56      # sizeof(struct ofp13_flow_mod)
METER_ENTRY = 40         # sizeof(struct meter_entry13), openflow/openflow.h:78-89
BAND_SIZE = 16           # sizeof(struct ofp13_meter_band_drop)
BUCKET_BYTES = 64        # struct action_bucket.data, openflow/openflow.h:126-131
STATS_BUFFER = 2048      # statsbuffer in multi_flow_reply13, openflow_13.c:911
# config/conf_membag.h:52-60: 32 bags of 32 blocks
MEMBAGS = (16,) * 4 + (24,) * 8 + (56,) * 8 + (72,) * 8 + (96,) * 4
BLOCKS_PER_BAG = 32


class BlockPool:
    """The membag pool: smallest free block that fits, nothing over 96 bytes."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.free = [BLOCKS_PER_BAG] * len(MEMBAGS)

    def alloc(self, size: int) -> int | None:
        best = None
        for i, bsize in enumerate(MEMBAGS):
            if self.free[i] and bsize >= size and (best is None or MEMBAGS[best] > bsize):
                best = i
        if best is not None:
            self.free[best] -= 1
        return best

    def release(self, bag: int | None) -> None:
        if bag is not None:
            self.free[bag] += 1

    @property
    def used(self) -> int:
        return BLOCKS_PER_BAG * len(MEMBAGS) - sum(self.free)


@dataclass
class Flow:
    table_id: int
    priority: int
    cookie: int
    flags: int
    idle_timeout: int
    hard_timeout: int
    match_len: int
    oxm: bytes                   # the match's oxm_fields (b"" when empty)
    pad4: bytes                  # the 4 bytes of ofp13_match.oxm_fields kept in the flow_mod copy
    instructions: bytes
    msg_len: int                 # the flow_mod's header length (flow stats reuse it)
    blocks: list = field(default_factory=list)
    packets: int = 0
    bytes: int = 0
    duration: int = 0            # the second it was added
    lastmatch: int = 0

    @property
    def match(self) -> dict:
        return match_dict(self.oxm)

    @property
    def parsed_instructions(self) -> tuple[wire.Instruction, ...]:
        return wire.decode_instructions(self.instructions)


def match_dict(oxm: bytes) -> dict:
    """OXM bytes as {name: value} or {name: (value, mask)}."""
    out = {}
    for f in wire.decode_oxms(oxm):
        v = wire.decode_value(f.name, f.value)
        out[f.name] = (v, wire.decode_value(f.name, f.mask)) if f.hasmask else v
    return out


@dataclass(frozen=True)
class FlowView:
    """A flow as tests see it: no blocks, instructions summarised."""

    table_id: int
    priority: int
    cookie: int
    match: tuple
    instructions: tuple
    flags: int
    idle_timeout: int
    hard_timeout: int
    packets: int
    bytes: int


def describe_instructions(insts) -> tuple:
    out = []
    for i in insts:
        if i.type == wire.IT_GOTO_TABLE:
            out.append(("goto", i.table))
        elif i.type == wire.IT_METER:
            out.append(("meter", i.meter))
        elif i.type in (wire.IT_APPLY_ACTIONS, wire.IT_WRITE_ACTIONS):
            kind = "apply" if i.type == wire.IT_APPLY_ACTIONS else "write"
            out.append((kind, tuple(("output", a.port) if a.type == wire.AT_OUTPUT else
                                    ("group", a.group) if a.type == wire.AT_GROUP else ("action", a.type)
                                    for a in i.actions)))
        else:
            out.append(("instruction", i.type))
    return tuple(out)


@dataclass
class Meter:
    meter_id: int
    flags: int
    bands: tuple
    block: int | None
    time_added: int


@dataclass
class Group:
    group_id: int
    type: int
    bucket: int | None           # index into the 4 bucket slots, None when none was free or too long
    time_added: int


@dataclass(frozen=True)
class Where:
    """Where a packet goes: output ports, whether a copy goes to the controller, the meters it passed,
    the flows it hit (table, priority, cookie), and why it stopped when it was dropped."""

    ports: tuple
    controller: bool
    meters: tuple
    flows: tuple
    dropped_by: str | None


@dataclass(frozen=True)
class Out:
    """Something the switch sends because of a table operation."""

    kind: str                    # "error" | "flow_removed"
    err_type: int = 0
    code: int = 0
    flow: Flow | None = None
    reason: int = 0


def _error(err_type: int, code: int) -> list[Out]:
    return [Out("error", err_type, code)]


class ZodiacTable:
    """Flows, meters and groups of one Zodiac FX, with the firmware's rules and bugs."""

    def __init__(self):
        self.pool = BlockPool()
        self.flows: list[Flow] = []
        self.meters: list[Meter | None] = [None] * MAX_METERS
        self.groups: list[Group | None] = [None] * MAX_GROUPS
        self.buckets: list[bytes | None] = [None] * MAX_BUCKETS
        self.leaked_blocks = 0

    # -- wipe ---------------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """clear_flows (of_helper.c:1292-1344): flows, meters, groups and the whole pool."""
        self.pool.reset()
        self.flows.clear()
        self.meters = [None] * MAX_METERS
        self.groups = [None] * MAX_GROUPS
        self.buckets = [None] * MAX_BUCKETS
        self.leaked_blocks = 0

    # -- flows --------------------------------------------------------------------------------------------------------
    def flow_mod(self, fm: wire.FlowMod, now: int) -> list[Out]:
        """flow_mod13 (openflow_13.c:2003-2031): ADD, DELETE, DELETE_STRICT; MODIFY ignored."""
        if fm.command == wire.FC_ADD:
            return self._add(fm, now)
        if fm.command == wire.FC_DELETE:
            return self._delete(fm, strict=False)
        if fm.command == wire.FC_DELETE_STRICT:
            return self._delete(fm, strict=True)
        return []

    @staticmethod
    def _same(flow: Flow, fm: wire.FlowMod) -> bool:
        """The raw match compare of openflow_13.c:2062/2085 (and 2356/2362): the old flow's length decides."""
        if flow.priority != fm.priority or flow.table_id != fm.table_id:
            return False
        if not flow.oxm:
            return flow.pad4 == fm.msg[52:56]
        return fm.msg[52:52 + len(flow.oxm)] == flow.oxm

    def _add(self, fm: wire.FlowMod, now: int) -> list[Out]:
        if len(self.flows) > MAX_FLOWS - 1:
            return _error(wire.ET_FLOW_MOD_FAILED, wire.FMFC_TABLE_FULL)
        if fm.table_id > MAX_TABLES - 1:
            return _error(wire.ET_FLOW_MOD_FAILED, wire.FMFC_BAD_TABLE_ID)
        raw_flags = ((fm.flags & 0xFF) << 8) | (fm.flags >> 8)    # ptr_fm->flags read without ntohs
        carried = None
        q = 0
        while q < len(self.flows):
            if self._same(self.flows[q], fm):
                if raw_flags & wire.FF_CHECK_OVERLAP:
                    return _error(wire.ET_FLOW_MOD_FAILED, wire.FMFC_OVERLAP)
                old = self.flows[q]
                carried = None if raw_flags & wire.FF_RESET_COUNTS else (old.packets, old.bytes)
                self._remove(q)
            q += 1                # the C loop goes on without q-- (openflow_13.c:2058)
        mod_block = self.pool.alloc(FLOW_MOD_BLOCK)
        if mod_block is None:
            return _error(wire.ET_FLOW_MOD_FAILED, wire.FMFC_TABLE_FULL)
        blocks = [mod_block]
        oxm = fm.oxm_bytes
        if fm.match_len > 4:
            b = self.pool.alloc(fm.match_len - 4)
            if b is None:
                self.leaked_blocks += len(blocks)
                return _error(wire.ET_FLOW_MOD_FAILED, wire.FMFC_TABLE_FULL)
            blocks.append(b)
        inst = fm.instruction_bytes
        if len(inst) > 0:
            b = self.pool.alloc(len(inst))
            if b is None:
                self.leaked_blocks += len(blocks)
                return _error(wire.ET_FLOW_MOD_FAILED, wire.FMFC_TABLE_FULL)
            blocks.append(b)
        flow = Flow(fm.table_id, fm.priority, fm.cookie, fm.flags, fm.idle_timeout, fm.hard_timeout, fm.match_len,
                    oxm, fm.msg[52:56], inst, len(fm.msg), blocks, duration=now, lastmatch=now)
        if carried:
            flow.packets, flow.bytes = carried
        self.flows.append(flow)
        return []

    def _remove(self, q: int) -> None:
        """remove_flow13 (of_helper.c:1175-1208): free the blocks, move the last flow into the hole."""
        for b in self.flows[q].blocks:
            self.pool.release(b)
        last = self.flows.pop()
        if q < len(self.flows):
            self.flows[q] = last

    def _delete(self, fm: wire.FlowMod, strict: bool) -> list[Out]:
        out: list[Out] = []
        req_oxm = fm.oxm_bytes
        q = 0
        while q < len(self.flows):
            f = self.flows[q]
            q += 1
            if fm.table_id != wire.TT_ALL and fm.table_id != f.table_id:
                continue
            if strict and fm.priority != f.priority:
                continue
            if fm.cookie_mask and (fm.cookie & fm.cookie_mask) != f.cookie and (fm.cookie_mask >> 56) & 1:
                continue
            if fm.out_port != wire.P_ANY or fm.out_group != wire.G_ANY:
                continue          # the instruction walk never finds an output (openflow_13.c:2189-2212)
            if strict:
                if not self._same_match(f, fm):
                    continue
            elif not field_match(req_oxm, f.oxm):
                continue
            if fm.flags & wire.FF_SEND_FLOW_REM or f.flags & wire.FF_SEND_FLOW_REM:
                out.append(Out("flow_removed", flow=f, reason=wire.RR_DELETE))
            q -= 1
            self._remove(q)
        return out

    @staticmethod
    def _same_match(flow: Flow, fm: wire.FlowMod) -> bool:
        if not flow.oxm:
            return flow.pad4 == fm.msg[52:56]
        return fm.msg[52:52 + len(flow.oxm)] == flow.oxm

    def expire(self, now: int) -> list[Out]:
        """flow_timeouts (of_helper.c:1242-1286): the first expired flow only."""
        for i, f in enumerate(self.flows):
            if f.idle_timeout and f.lastmatch > 0 and now - f.lastmatch >= f.idle_timeout:
                reason = wire.RR_IDLE_TIMEOUT
            elif f.hard_timeout and f.lastmatch > 0 and now - f.duration >= f.hard_timeout:
                reason = wire.RR_HARD_TIMEOUT
            else:
                continue
            out = [Out("flow_removed", flow=f, reason=reason)] if f.flags & wire.FF_SEND_FLOW_REM else []
            self._remove(i)
            return out
        return []

    # -- meters -------------------------------------------------------------------------------------------------------
    def _meter_index(self, meter_id: int) -> int | None:
        for i, m in enumerate(self.meters):
            if m is None:
                return None
            if m.meter_id == meter_id:
                return i
        return None

    def meter_mod(self, mm: wire.MeterMod, now: int) -> list[Out]:
        """meter_mod13 (openflow_13.c:2484-2505)."""
        if mm.command == wire.MC_ADD:
            return self._meter_add(mm, now)
        if mm.command == wire.MC_MODIFY:
            return self._meter_modify(mm)
        if mm.command == wire.MC_DELETE:
            self._meter_delete(mm.meter_id)
        return []

    def _meter_add(self, mm: wire.MeterMod, now: int) -> list[Out]:
        if self.meters[MAX_METERS - 1] is not None:
            return _error(wire.ET_METER_MOD_FAILED, wire.MMFC_OUT_OF_METERS)
        i = 0
        while i < MAX_METERS and self.meters[i] is not None:
            if self.meters[i].meter_id == mm.meter_id:
                return _error(wire.ET_METER_MOD_FAILED, wire.MMFC_METER_EXISTS)
            i += 1
        if mm.n_bands > MAX_BANDS:
            return _error(wire.ET_METER_MOD_FAILED, wire.MMFC_OUT_OF_BANDS)
        block = self.pool.alloc(METER_ENTRY + BAND_SIZE * mm.n_bands)
        if block is None:
            return _error(wire.ET_METER_MOD_FAILED, wire.MMFC_OUT_OF_BANDS)
        self.meters[i] = Meter(mm.meter_id, mm.flags, mm.bands, block, now)
        return []

    def _meter_modify(self, mm: wire.MeterMod) -> list[Out]:
        i = self._meter_index(mm.meter_id)
        if i is None:
            return _error(wire.ET_METER_MOD_FAILED, wire.MMFC_UNKNOWN_METER)
        if mm.n_bands > MAX_BANDS:
            return _error(wire.ET_METER_MOD_FAILED, wire.MMFC_OUT_OF_BANDS)
        old = self.meters[i]
        self.pool.release(old.block)
        block = self.pool.alloc(METER_ENTRY + BAND_SIZE * mm.n_bands)
        if block is None:
            self.meters[i] = None     # the slot stays empty: later scans stop there (openflow_13.c:2677-2685)
            return _error(wire.ET_METER_MOD_FAILED, wire.MMFC_OUT_OF_BANDS)
        self.meters[i] = Meter(old.meter_id, mm.flags, mm.bands, block, old.time_added)
        return []

    def _meter_delete(self, meter_id: int) -> None:
        if meter_id == wire.M_ALL:
            for i, m in enumerate(self.meters):
                if m is None:
                    break
                self.pool.release(m.block)
                self.meters[i] = None
            return
        loc = self._meter_index(meter_id)
        if loc is None:
            return
        self.pool.release(self.meters[loc].block)
        self.meters[loc] = None
        last = loc
        while last + 1 < MAX_METERS and self.meters[last + 1] is not None:
            last += 1
        if last != loc:
            self.meters[loc], self.meters[last] = self.meters[last], None

    def live_meters(self) -> list[Meter]:
        """The meters the firmware's scans see: up to the first empty slot."""
        out = []
        for m in self.meters:
            if m is None:
                break
            out.append(m)
        return out

    def bound_flows(self, meter_id: int) -> int:
        """get_bound_flows (of_helper.c:1678-1707); the last meter instruction of a flow counts."""
        n = 0
        for f in self.flows:
            meters = [i.meter for i in f.parsed_instructions if i.type == wire.IT_METER]
            if meters and meters[-1] == meter_id:
                n += 1
        return n

    # -- groups -------------------------------------------------------------------------------------------------------
    def group_mod(self, msg: bytes, now: int) -> list[Out]:
        """group_mod13 (openflow_13.c:1895-1994): ADD and DELETE; MODIFY ignored."""
        cmd, gtype, gid = struct.unpack_from("!HBxI", msg, 8)
        if cmd == 0:
            if gid < 1 or gid > MAX_GROUPS or self.groups[gid - 1] is not None:
                return _error(wire.ET_GROUP_MOD_FAILED, wire.GMFC_GROUP_EXISTS)
            group = Group(gid, gtype, None, now)
            self.groups[gid - 1] = group
            for b in range(MAX_BUCKETS):
                if self.buckets[b] is None:
                    data = msg[16:]
                    if len(data) > BUCKET_BYTES:
                        return _error(wire.ET_GROUP_MOD_FAILED, wire.GMFC_BAD_BUCKET)
                    self.buckets[b] = data
                    group.bucket = b
                    break
            return []
        if cmd == 2 and 1 <= gid <= MAX_GROUPS and self.groups[gid - 1] is not None:
            g = self.groups[gid - 1]
            if g.bucket is not None:
                self.buckets[g.bucket] = None
            self.groups[gid - 1] = None
        return []

    def group_actions(self, gid: int) -> tuple[wire.Action, ...]:
        """The first bucket's actions: the datapath walks one bucket (openflow_13.c:271-311)."""
        if not 1 <= gid <= MAX_GROUPS or self.groups[gid - 1] is None or self.groups[gid - 1].bucket is None:
            return ()
        data = self.buckets[self.groups[gid - 1].bucket]
        if len(data) < 16:
            return ()
        blen = struct.unpack_from("!H", data)[0]
        return wire.decode_actions(data[16:blen])

    # -- the pipeline -------------------------------------------------------------------------------------------------
    def where(self, in_port: int, over_rate=(), count: bool = False, now: int = 0, **headers) -> Where:
        """Where a packet with these headers goes (nnOF13_tablelookup, openflow_13.c:120-663).

        ``headers``: eth_src, eth_dst, eth_type, vlan_vid, ip_proto, ipv4_src/dst, ipv6_src/dst, tcp_src/dst,
        udp_src/dst, ip_dscp. ``over_rate``: meter ids (or True for all) whose rate this packet exceeds, so
        their DROP band drops it. ``count``: update the flows' counters and last-match time, as a real
        packet does (idle timeouts count from it)."""
        pkt = _packet(in_port, headers)
        ports: list[int] = []
        meters: list[int] = []
        hit: list[tuple] = []
        controller = False
        table_id = 0
        while True:
            i = self._lookup(table_id, pkt)
            if i is None:
                return Where(tuple(ports), controller, tuple(meters), tuple(hit), "table-miss" if not ports else None)
            f = self.flows[i]
            hit.append((f.table_id, f.priority, f.cookie))
            if count:
                f.packets += 1
                f.bytes += int(headers.get("size", 64))
                f.lastmatch = now
            insts = {}
            for inst in f.parsed_instructions:
                insts[inst.type] = inst       # the last one of a type wins (openflow_13.c:150-154)
            if not insts:
                return Where(tuple(ports), controller, tuple(meters), tuple(hit), "drop-flow" if not ports else None)
            m = insts.get(wire.IT_METER)
            if m is not None:
                meters.append(m.meter)
                if self._meter_drops(m.meter, over_rate):
                    return Where(tuple(ports), controller, tuple(meters), tuple(hit), "meter")
            a = insts.get(wire.IT_APPLY_ACTIONS)
            if a is not None:
                controller |= self._apply(a.actions, in_port, ports)
            g = insts.get(wire.IT_GOTO_TABLE)
            if g is None:
                return Where(tuple(ports), controller, tuple(meters), tuple(hit), None)
            if table_id >= g.table:
                return Where(tuple(ports), controller, tuple(meters), tuple(hit), "goto-backwards")
            table_id = g.table

    def _meter_drops(self, meter_id: int, over_rate) -> bool:
        i = self._meter_index(meter_id)
        if i is None:
            return False
        over = over_rate is True or meter_id in (over_rate or ())
        return over and any(b[0] == wire.MBT_DROP for b in self.meters[i].bands)

    def _apply(self, actions, in_port: int, ports: list) -> bool:
        controller = False
        for act in actions:
            if act.type == wire.AT_OUTPUT:
                controller |= _output(act.port, in_port, ports)
            elif act.type == wire.AT_GROUP:
                for ga in self.group_actions(act.group):
                    if ga.type == wire.AT_OUTPUT:
                        controller |= _output(ga.port, in_port, ports)
        return controller

    def _lookup(self, table_id: int, pkt: dict) -> int | None:
        """flowmatch13 (of_helper.c:359-735): highest priority, the earlier flow on a tie."""
        best = None
        for i, f in enumerate(self.flows):
            if f.table_id != table_id:
                continue
            if best is not None and self.flows[best].priority >= f.priority:
                continue
            if _matches(f.oxm, pkt):
                best = i
        return best

    # -- views --------------------------------------------------------------------------------------------------------
    def views(self) -> list[FlowView]:
        return [FlowView(f.table_id, f.priority, f.cookie, tuple(sorted(f.match.items())),
                         describe_instructions(f.parsed_instructions), f.flags, f.idle_timeout, f.hard_timeout,
                         f.packets, f.bytes) for f in self.flows]


def _output(port: int, in_port: int, ports: list) -> bool:
    """The OUTPUT action (openflow_13.c:229-260)."""
    if port < wire.P_MAX and port != in_port:
        ports.append(port)
    elif port == wire.P_IN_PORT:
        ports.append(in_port)
    elif port == wire.P_CONTROLLER:
        return True
    elif port in (wire.P_FLOOD, wire.P_ALL):
        ports.extend(p for p in range(1, TOTAL_PORTS + 1) if p not in NATIVE_PORTS and p != in_port)
    return False


def _packet(in_port: int, headers: dict) -> dict:
    """The fields packet_fields_parser fills (of_helper.c:282-357): L3/L4 only for IPv4."""
    pkt = {"in_port": in_port.to_bytes(4, "big")}
    for k, v in headers.items():
        if k in wire.OXM_NUMBER and v is not None:
            pkt[k] = wire.encode_value(k, v)
    if "eth_type" not in pkt:
        if "ipv4_src" in pkt or "ipv4_dst" in pkt:
            pkt["eth_type"] = wire.encode_value("eth_type", 0x0800)
        elif "ipv6_src" in pkt or "ipv6_dst" in pkt:
            pkt["eth_type"] = wire.encode_value("eth_type", 0x86DD)
    if pkt.get("eth_type") != b"\x08\x00":
        for k in ("ip_proto", "tcp_src", "tcp_dst", "udp_src", "udp_dst", "ipv4_src", "ipv4_dst", "ip_dscp"):
            pkt.pop(k, None)
    proto = pkt.get("ip_proto", b"\x00")[0]
    for k, p in (("tcp_src", 6), ("tcp_dst", 6), ("udp_src", 17), ("udp_dst", 17)):
        if k in pkt and proto != p:
            pkt.pop(k)
    return pkt


SUPPORTED = {"in_port", "eth_dst", "eth_src", "eth_type", "ip_dscp", "ip_proto", "ipv4_src", "ipv4_dst", "tcp_src",
             "tcp_dst", "udp_src", "udp_dst", "vlan_vid", "vlan_pcp", "arp_op", "arp_spa", "arp_tpa", "arp_sha",
             "arp_tha"}


def _matches(oxm: bytes, pkt: dict) -> bool:
    for f in wire.decode_oxms(oxm):
        if f.name not in SUPPORTED:
            return False              # default: priority_match = -1 (of_helper.c:732)
        have = pkt.get(f.name)
        if f.name == "vlan_vid":
            have = have or b"\x00\x00"
        if have is None:
            have = bytes(len(f.value))    # the parser leaves absent fields zero
        if f.hasmask:
            if bytes(a & m for a, m in zip(have, f.mask)) != f.value:
                return False
        elif have != f.value:
            return False
    return True


def field_match(req: bytes, have: bytes) -> bool:
    """field_match13 (of_helper.c:1010-1172) simplified: every request field present in the flow with the same
    header and the same bytes (the prerequisite and mask checks with their precedence slips are not modelled)."""
    if not req:
        return True
    flow_fields = {f.header: f.raw for f in wire.decode_oxms(have)}
    return all(flow_fields.get(f.header) == f.raw for f in wire.decode_oxms(req))


def ip_net(value) -> tuple:
    """An address or network as the (value, mask) a masked match carries."""
    net = ipaddress.ip_network(value, strict=False)
    return str(net.network_address), str(net.netmask)
