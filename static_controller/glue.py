"""Translation between the core's messages and os-ken's, and nothing else."""

from __future__ import annotations

import struct

from . import messages as m
from .ryu_api import ofproto_v1_3 as ofp13

REASONS = {0: "idle_timeout", 1: "hard_timeout", 2: "delete", 3: "group_delete", 4: "meter_delete"}
UNITS = {"pktps": 1 << 1, "kbps": 1 << 0}          # OFPMF_PKTPS, OFPMF_KBPS
OFPMF_BURST = 1 << 2
OFPT_FLOW_MOD, OFPT_METER_MOD = ofp13.OFPT_FLOW_MOD, ofp13.OFPT_METER_MOD

# the code names of each OpenFlow 1.3 error type, as os-ken's ofproto module spells them
_CODE_PREFIX = {"OFPET_HELLO_FAILED": "OFPHFC_", "OFPET_BAD_REQUEST": "OFPBRC_", "OFPET_BAD_ACTION": "OFPBAC_",
                "OFPET_BAD_INSTRUCTION": "OFPBIC_", "OFPET_BAD_MATCH": "OFPBMC_", "OFPET_FLOW_MOD_FAILED": "OFPFMFC_",
                "OFPET_GROUP_MOD_FAILED": "OFPGMFC_", "OFPET_PORT_MOD_FAILED": "OFPPMFC_",
                "OFPET_TABLE_MOD_FAILED": "OFPTMFC_", "OFPET_QUEUE_OP_FAILED": "OFPQOFC_",
                "OFPET_SWITCH_CONFIG_FAILED": "OFPSCFC_", "OFPET_ROLE_REQUEST_FAILED": "OFPRRFC_",
                "OFPET_METER_MOD_FAILED": "OFPMMFC_", "OFPET_TABLE_FEATURES_FAILED": "OFPTFFC_"}


def _error_names() -> dict:
    names = {}
    for type_name, prefix in _CODE_PREFIX.items():
        t = getattr(ofp13, type_name)
        for attr in dir(ofp13):
            if attr.startswith(prefix) and isinstance(getattr(ofp13, attr), int):
                names.setdefault((t, getattr(ofp13, attr)), attr)
    return names


ERROR_NAMES = _error_names()


def _match(parser, match: tuple):
    return parser.OFPMatch(**{k: v for k, v in match})


def _actions(dp, actions: tuple) -> list:
    ofp, parser = dp.ofproto, dp.ofproto_parser
    out = []
    for act in actions:
        if act[0] != "output":
            raise ValueError(f"unknown action {act!r}")
        port = act[1]
        max_len = ofp.OFPCML_NO_BUFFER if port == ofp.OFPP_CONTROLLER else 0
        out.append(parser.OFPActionOutput(port, max_len))
    return out


def to_ofp(dp, msg):
    """One os-ken message for one core message."""
    ofp, parser = dp.ofproto, dp.ofproto_parser
    if isinstance(msg, m.Flow):
        inst = []
        if msg.meter is not None:
            inst.append(parser.OFPInstructionMeter(msg.meter, ofp.OFPIT_METER))
        if msg.actions:
            inst.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, _actions(dp, msg.actions)))
        if msg.goto is not None:
            inst.append(parser.OFPInstructionGotoTable(msg.goto))
        command = ofp.OFPFC_ADD if msg.command == "add" else ofp.OFPFC_DELETE_STRICT
        return parser.OFPFlowMod(dp, cookie=msg.cookie, cookie_mask=0 if msg.command == "add" else 0xFFFFFFFFFFFFFFFF,
                                 table_id=msg.table, command=command, idle_timeout=msg.idle_timeout,
                                 hard_timeout=msg.hard_timeout, priority=msg.priority, buffer_id=ofp.OFP_NO_BUFFER,
                                 out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
                                 flags=ofp.OFPFF_SEND_FLOW_REM if msg.send_flow_removed else 0,
                                 match=_match(parser, msg.match), instructions=inst)
    if isinstance(msg, m.Meter):
        flags = UNITS[msg.unit] | (OFPMF_BURST if msg.burst else 0)
        bands = [parser.OFPMeterBandDrop(rate=b.rate, burst_size=b.burst) for b in msg.bands]
        command = ofp.OFPMC_ADD if msg.command == "add" else ofp.OFPMC_MODIFY
        return parser.OFPMeterMod(dp, command=command, flags=flags, meter_id=msg.meter_id, bands=bands)
    if isinstance(msg, m.PacketOut):
        buffer_id = ofp.OFP_NO_BUFFER if msg.buffer_id is None else msg.buffer_id
        data = msg.data if buffer_id == ofp.OFP_NO_BUFFER else None
        return parser.OFPPacketOut(dp, buffer_id=buffer_id, in_port=msg.in_port, actions=_actions(dp, msg.actions),
                                   data=data)
    if isinstance(msg, m.FlowStatsRequest):
        out = parser.OFPFlowStatsRequest(dp, 0, ofp.OFPTT_ALL if msg.table is None else msg.table, ofp.OFPP_ANY,
                                         ofp.OFPG_ANY, msg.cookie, msg.cookie_mask, parser.OFPMatch())
    elif isinstance(msg, m.MeterConfigRequest):
        out = parser.OFPMeterConfigStatsRequest(dp, 0, ofp.OFPM_ALL)
    elif isinstance(msg, m.MeterStatsRequest):
        out = parser.OFPMeterStatsRequest(dp, 0, ofp.OFPM_ALL)
    elif isinstance(msg, m.Barrier):
        out = parser.OFPBarrierRequest(dp)
    else:
        raise TypeError(f"no translation for {msg!r}")
    out.set_xid(msg.xid)
    return out


def encoded_len(dp, msg) -> int:
    """Bytes one core message takes on the wire (what the pacer counts)."""
    ofp = to_ofp(dp, msg)
    ofp.serialize()
    return len(ofp.buf)


# --- decoding what the switch sent -----------------------------------------------


def match_of(ofp_match) -> tuple:
    return m.freeze_match(ofp_match.items())


def _more(msg) -> bool:
    return bool(msg.flags & msg.datapath.ofproto.OFPMPF_REPLY_MORE)


def flow_stats(msg) -> m.FlowStats:
    rows = tuple(m.FlowStat(s.table_id, s.priority, match_of(s.match), s.cookie, s.packet_count, s.byte_count,
                            s.duration_sec + s.duration_nsec / 1e9, s.idle_timeout, s.hard_timeout)
                 for s in msg.body)
    return m.FlowStats(msg.xid, rows, _more(msg))


def meter_config(msg) -> m.MeterConfig:
    rows = []
    for c in msg.body:
        unit = "kbps" if c.flags & UNITS["kbps"] else "pktps"
        bands = tuple(m.Band(b.rate, b.burst_size if c.flags & OFPMF_BURST else 0) for b in c.bands)
        rows.append((c.meter_id, unit, bands))
    return m.MeterConfig(msg.xid, tuple(rows), _more(msg))


def meter_stats(msg) -> m.MeterStats:
    rows = tuple((s.meter_id, s.packet_in_count, tuple(b.packet_band_count for b in s.band_stats)) for s in msg.body)
    return m.MeterStats(msg.xid, rows, _more(msg))


def flow_removed(msg) -> m.FlowRemoved:
    return m.FlowRemoved(msg.cookie, msg.table_id, msg.priority, match_of(msg.match),
                         REASONS.get(msg.reason, str(msg.reason)))


def packet_in(msg) -> m.PacketIn:
    ofp = msg.datapath.ofproto
    buffer_id = None if msg.buffer_id == ofp.OFP_NO_BUFFER else msg.buffer_id
    return m.PacketIn(msg.cookie, msg.table_id, msg.match["in_port"], bytes(msg.data), buffer_id)


def error(msg) -> m.Error:
    """The error plus what can be read back from the echoed request (cookie of a flow-mod, id of a meter-mod)."""
    data = bytes(msg.data or b"")
    cookie = meter_id = None
    request = "other"
    if len(data) >= 8:
        kind = data[1]
        if kind == OFPT_FLOW_MOD and len(data) >= 16:
            request, cookie = "flow_mod", struct.unpack_from("!Q", data, 8)[0]
        elif kind == OFPT_METER_MOD and len(data) >= 16:
            request, meter_id = "meter_mod", struct.unpack_from("!I", data, 12)[0]
    return m.Error(msg.xid, msg.type, msg.code, cookie, meter_id, request, ERROR_NAMES.get((msg.type, msg.code)))
