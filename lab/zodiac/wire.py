"""OpenFlow 1.3 bytes as the Zodiac FX reads and writes them (struct only, no os-ken).

The model decodes the controller's messages itself because the firmware
compares raw bytes (matches by ``memcmp``, some fields without ``ntohs``): an
os-ken decode would hide exactly what the firmware gets wrong. File:line
references are to ZodiacFX/src/ of NorthboundNetworks/ZodiacFX v0.86.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

OFP_VERSION = 4
HEADER = struct.Struct("!BBHI")

# message types (openflow_spec/openflow_spec13.h)
HELLO, ERROR, ECHO_REQUEST, ECHO_REPLY = 0, 1, 2, 3
FEATURES_REQUEST, FEATURES_REPLY = 5, 6
GET_CONFIG_REQUEST, GET_CONFIG_REPLY, SET_CONFIG = 7, 8, 9
PACKET_IN, FLOW_REMOVED, PORT_STATUS, PACKET_OUT, FLOW_MOD, GROUP_MOD = 10, 11, 12, 13, 14, 15
MULTIPART_REQUEST, MULTIPART_REPLY = 18, 19
BARRIER_REQUEST, BARRIER_REPLY = 20, 21
ROLE_REQUEST, ROLE_REPLY = 24, 25
METER_MOD = 29

# multipart types
MP_DESC, MP_FLOW, MP_AGGREGATE, MP_TABLE, MP_PORT_STATS = 0, 1, 2, 3, 4
MP_GROUP, MP_GROUP_DESC, MP_GROUP_FEATURES = 6, 7, 8
MP_METER, MP_METER_CONFIG, MP_METER_FEATURES, MP_TABLE_FEATURES, MP_PORT_DESC = 9, 10, 11, 12, 13
MPF_REPLY_MORE = 1

# errors (openflow_spec13.h:397-500)
ET_FLOW_MOD_FAILED, ET_GROUP_MOD_FAILED, ET_METER_MOD_FAILED = 5, 6, 12
FMFC_TABLE_FULL, FMFC_BAD_TABLE_ID, FMFC_OVERLAP = 1, 2, 3
GMFC_GROUP_EXISTS, GMFC_BAD_BUCKET = 0, 12
MMFC_METER_EXISTS, MMFC_UNKNOWN_METER, MMFC_OUT_OF_METERS, MMFC_OUT_OF_BANDS = 1, 3, 10, 11

# flow_mod commands and flags
FC_ADD, FC_MODIFY, FC_MODIFY_STRICT, FC_DELETE, FC_DELETE_STRICT = 0, 1, 2, 3, 4
FF_SEND_FLOW_REM, FF_CHECK_OVERLAP, FF_RESET_COUNTS = 1, 2, 4
RR_IDLE_TIMEOUT, RR_HARD_TIMEOUT, RR_DELETE = 0, 1, 2
TT_ALL = 0xFF

# instructions and actions
IT_GOTO_TABLE, IT_WRITE_METADATA, IT_WRITE_ACTIONS, IT_APPLY_ACTIONS, IT_CLEAR_ACTIONS, IT_METER = 1, 2, 3, 4, 5, 6
AT_OUTPUT, AT_GROUP, AT_SET_FIELD = 0, 22, 25
P_MAX, P_IN_PORT, P_FLOOD, P_ALL, P_CONTROLLER, P_ANY = 0xFFFFFF00, 0xFFFFFFF8, 0xFFFFFFFB, 0xFFFFFFFC, 0xFFFFFFFD, \
    0xFFFFFFFF
G_ANY = 0xFFFFFFFF

# meters
MC_ADD, MC_MODIFY, MC_DELETE = 0, 1, 2
MF_KBPS, MF_PKTPS, MF_BURST, MF_STATS = 1, 2, 4, 8
MBT_DROP, MBT_DSCP_REMARK = 1, 2
M_ALL = 0xFFFFFFFF

# OXM basic class fields: number -> (name, value length)
OXM_FIELDS = {
    0: ("in_port", 4), 3: ("eth_dst", 6), 4: ("eth_src", 6), 5: ("eth_type", 2), 6: ("vlan_vid", 2),
    7: ("vlan_pcp", 1), 8: ("ip_dscp", 1), 9: ("ip_ecn", 1), 10: ("ip_proto", 1), 11: ("ipv4_src", 4),
    12: ("ipv4_dst", 4), 13: ("tcp_src", 2), 14: ("tcp_dst", 2), 15: ("udp_src", 2), 16: ("udp_dst", 2),
    21: ("arp_op", 2), 22: ("arp_spa", 4), 23: ("arp_tpa", 4), 24: ("arp_sha", 6), 25: ("arp_tha", 6),
    26: ("ipv6_src", 16), 27: ("ipv6_dst", 16),
}
OXM_NUMBER = {name: num for num, (name, _) in OXM_FIELDS.items()}


def header(msg_type: int, length: int, xid: int, version: int = OFP_VERSION) -> bytes:
    return HEADER.pack(version, msg_type, length, xid)


def message(msg_type: int, xid: int, body: bytes = b"", version: int = OFP_VERSION) -> bytes:
    return header(msg_type, 8 + len(body), xid, version) + body


def align8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass(frozen=True)
class Oxm:
    """One match field as sent: ``raw`` is the whole TLV (header, value, mask)."""

    field: int
    hasmask: bool
    value: bytes
    mask: bytes | None
    raw: bytes

    @property
    def name(self) -> str:
        return OXM_FIELDS.get(self.field, (f"oxm{self.field}", 0))[0]

    @property
    def header(self) -> int:
        return struct.unpack_from("!I", self.raw)[0]


def decode_oxms(buf: bytes) -> list[Oxm]:
    """The TLVs of a match's oxm_fields; a truncated tail ends the list."""
    out, off = [], 0
    while off + 4 <= len(buf):
        cls, fh, ln = struct.unpack_from("!HBB", buf, off)
        if off + 4 + ln > len(buf):
            break
        val = buf[off + 4:off + 4 + ln]
        field, hasmask = fh >> 1, bool(fh & 1)
        if cls == 0x8000:
            half = ln // 2 if hasmask else ln
            out.append(Oxm(field, hasmask, val[:half], val[half:] if hasmask else None, buf[off:off + 4 + ln]))
        else:
            out.append(Oxm(-1, hasmask, val, None, buf[off:off + 4 + ln]))
        off += 4 + ln
    return out


def encode_value(name: str, value) -> bytes:
    """A header value as OXM bytes: MACs as 'aa:bb:..', addresses as text, numbers as ints."""
    num = OXM_NUMBER[name]
    ln = OXM_FIELDS[num][1]
    if isinstance(value, bytes):
        return value
    if name in ("eth_src", "eth_dst", "arp_sha", "arp_tha"):
        return bytes(int(x, 16) for x in str(value).split(":"))
    if name in ("ipv4_src", "ipv4_dst", "arp_spa", "arp_tpa", "ipv6_src", "ipv6_dst"):
        return ipaddress.ip_address(value).packed
    return int(value).to_bytes(ln, "big")


def decode_value(name: str, raw: bytes):
    if name in ("eth_src", "eth_dst", "arp_sha", "arp_tha"):
        return ":".join(f"{b:02x}" for b in raw)
    if name in ("ipv4_src", "ipv4_dst", "arp_spa", "arp_tpa", "ipv6_src", "ipv6_dst"):
        return str(ipaddress.ip_address(raw))
    return int.from_bytes(raw, "big")


@dataclass(frozen=True)
class Action:
    type: int
    port: int | None = None      # OUTPUT
    group: int | None = None     # GROUP
    raw: bytes = b""


@dataclass(frozen=True)
class Instruction:
    type: int
    table: int | None = None     # GOTO_TABLE
    meter: int | None = None     # METER
    actions: tuple[Action, ...] = ()
    raw: bytes = b""


def _tlvs(buf: bytes):
    """(type, raw) of each type/length element (actions, instructions); a bad length ends the walk."""
    off = 0
    while off + 4 <= len(buf):
        t, ln = struct.unpack_from("!HH", buf, off)
        if ln < 4 or off + ln > len(buf):
            return
        yield t, buf[off:off + ln]
        off += ln


def decode_actions(buf: bytes) -> tuple[Action, ...]:
    out = []
    for t, raw in _tlvs(buf):
        if t == AT_OUTPUT and len(raw) >= 8:
            out.append(Action(t, port=struct.unpack_from("!I", raw, 4)[0], raw=raw))
        elif t == AT_GROUP and len(raw) >= 8:
            out.append(Action(t, group=struct.unpack_from("!I", raw, 4)[0], raw=raw))
        else:
            out.append(Action(t, raw=raw))
    return tuple(out)


def decode_instructions(buf: bytes) -> tuple[Instruction, ...]:
    out = []
    for t, raw in _tlvs(buf):
        if t == IT_GOTO_TABLE:
            out.append(Instruction(t, table=raw[4] if len(raw) > 4 else None, raw=raw))
        elif t == IT_METER:
            out.append(Instruction(t, meter=struct.unpack_from("!I", raw, 4)[0] if len(raw) >= 8 else None, raw=raw))
        elif t in (IT_APPLY_ACTIONS, IT_WRITE_ACTIONS):
            out.append(Instruction(t, actions=decode_actions(raw[8:]), raw=raw))
        else:
            out.append(Instruction(t, raw=raw))
    return tuple(out)


@dataclass(frozen=True)
class FlowMod:
    """A flow_mod as received; ``msg`` keeps every byte (the firmware compares them)."""

    xid: int
    cookie: int
    cookie_mask: int
    table_id: int
    command: int
    idle_timeout: int
    hard_timeout: int
    priority: int
    out_port: int
    out_group: int
    flags: int
    match_len: int
    msg: bytes

    @property
    def oxm_bytes(self) -> bytes:
        return self.msg[52:48 + self.match_len] if self.match_len > 4 else b""

    @property
    def instruction_bytes(self) -> bytes:
        return self.msg[align8(48 + self.match_len):]


FLOW_MOD_BODY = struct.Struct("!QQBBHHHIIIH2xHH")


def decode_flow_mod(msg: bytes) -> FlowMod:
    xid = HEADER.unpack_from(msg)[3]
    (cookie, mask, table, cmd, idle, hard, prio, _buf, out_port, out_group, flags, _mtype,
     mlen) = FLOW_MOD_BODY.unpack_from(msg, 8)
    return FlowMod(xid, cookie, mask, table, cmd, idle, hard, prio, out_port, out_group, flags, mlen, msg)


@dataclass(frozen=True)
class MeterMod:
    xid: int
    command: int
    flags: int
    meter_id: int
    n_bands: int
    bands: tuple[tuple[int, int, int, int], ...]   # (type, rate, burst_size, prec_level)


def decode_meter_mod(msg: bytes) -> MeterMod:
    """Bands counted from the length as the firmware does (openflow_13.c:2542): (len - 16) / 16."""
    xid = HEADER.unpack_from(msg)[3]
    length = HEADER.unpack_from(msg)[2]
    cmd, flags, mid = struct.unpack_from("!HHI", msg, 8)
    n = max(0, (length - 16)) // 16
    bands = []
    for i in range(n):
        off = 16 + 16 * i
        if off + 16 > len(msg):
            break
        t, _ln, rate, burst = struct.unpack_from("!HHII", msg, off)
        bands.append((t, rate, burst, msg[off + 12] if t == MBT_DSCP_REMARK else 0))
    return MeterMod(xid, cmd, flags, mid, n, tuple(bands))


def error_message(msg: bytes, err_type: int, code: int) -> bytes:
    """ERROR with the first 64 bytes of the offending message (openflow_13.c:2853-2870)."""
    xid = HEADER.unpack_from(msg)[3]
    return message(ERROR, xid, struct.pack("!HH", err_type, code) + msg[:64])


def multipart_reply(xid: int, mp_type: int, body: bytes, more: bool = False) -> bytes:
    return message(MULTIPART_REPLY, xid, struct.pack("!HH4x", mp_type, MPF_REPLY_MORE if more else 0) + body)
