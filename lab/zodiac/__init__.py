"""A Zodiac FX model switch, built from its firmware's source (NorthboundNetworks/ZodiacFX v0.86).

The Zodiac FX cannot run here; this is what the controller gets instead: an
OpenFlow 1.3 switch over TCP that behaves, message by message, as the
firmware does, bugs included (docs/ARCHITECTURE.md, "Facts: the Zodiac FX",
lists the facts and the guesses; each module cites file:line).

The API (stable: the controller's tests use it)::

    from lab.zodiac import ZodiacSwitch
    sw = ZodiacSwitch(("127.0.0.1", port), tick=0.5).start()   # it connects to the controller, reconnects
    sw.wait(lambda s: s.connects >= 1, timeout=10)              # any predicate on the switch
    sw.flows()            # [FlowView(table_id, priority, cookie, match, instructions, flags, ...)], array order
    sw.meters()           # {meter_id: (flags, bands)}; bands are (type, rate, burst, prec_level)
    sw.groups()           # {group_id: type}
    sw.where(1, eth_type=0x0800, ipv4_src="10.0.0.5", ip_proto=6, tcp_dst=5222)
                          # Where(ports, controller, meters, flows, dropped_by); over_rate={meter ids} (or True)
                          # makes the meters' DROP bands drop the packet
    sw.counters()         # connects, disconnects, messages, errors_sent, overflows, lost_bytes, max_burst,
                          # bursts, flow_removed_sent, echo_requests_sent, half_open, connect_failures, by_type
    sw.burst_sizes()      # every burst seen, in bytes; sw.errors: [(type, code, xid, msg type)] sent
    sw.drop("rst" | "fin", reconnect=None | seconds | False); sw.reconnect_now(); sw.stop()

``tick`` is the firmware's 500 ms timer; every firmware timing (echo after
~2.5 s of silence, close after ~6.5 s, reconnect after 2 s, flow timeouts
checked every 2 s, one firmware second = 2 ticks) scales with it.
``ZodiacTable`` (``lab.zodiac.table``) is the pure part: flows, meters,
groups, the block pool and ``where()``, usable without a socket.
"""

from .switch import ZodiacSwitch
from .table import FlowView, Where, ZodiacTable

__all__ = ["ZodiacSwitch", "ZodiacTable", "FlowView", "Where"]
