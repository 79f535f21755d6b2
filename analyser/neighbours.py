"""Who is who on the inside segment: which MAC carries which addresses, which prefixes are shared, which MACs route.

An abuser can rotate addresses (IPv6 privacy addresses, a whole /64 behind a
router), so the XMPP rule also counts per host and per prefix; the aggregate
must be the abuser's and no one else's (docs/ARCHITECTURE.md, "Aggregates"):

* a host on the inside segment is its MAC: one MAC, many addresses. Every
  host there shares the LAN's prefix, so that prefix is never a subject;
* a MAC that carries the addresses of several prefixes nobody else uses,
  or whose packets arrive with a forwarded TTL/hop limit (not 64, 128 or
  255) from a prefix nobody else uses, or that ``xmpp.routers`` names, is a
  router: its MAC is never a subject, its clients are counted per prefix
  (``xmpp.prefix_length_v6``, ``prefix_length_v4``);
* a prefix is shared (never a subject) when ``xmpp.lan_prefixes`` holds it or
  verified connections came from it through two MACs or more.

Learned from verified connections only (a spoofed source proves nothing),
so an attacker cannot make itself a router with addresses that do not route
back to it. ``gen`` changes whenever an address may move to another
aggregate; flows cache their keys per ``gen``.
"""

from __future__ import annotations

import ipaddress
from typing import Optional

from .parse import mac_text

HOST_TTLS = (64, 128, 255)     # initial TTL / hop limit of Linux, macOS, Windows, network gear: not forwarded
SEGMENT_V4 = 24                # IPv4 segment used to tell a shared LAN prefix when prefix_length_v4 is 32
MAX_MACS = 65536
MAX_ADDRESSES = 1024           # per MAC


class Neighbours:
    def __init__(self, xmpp):
        self.length = {4: xmpp.prefix_length_v4, 6: xmpp.prefix_length_v6}
        self.segment_len = {4: xmpp.prefix_length_v4 if xmpp.prefix_length_v4 < 32 else SEGMENT_V4,
                            6: xmpp.prefix_length_v6}
        self.lan = tuple(ipaddress.ip_network(n) for n in xmpp.lan_prefixes)
        self.configured_routers = frozenset(bytes.fromhex(m.replace(":", "")) for m in xmpp.routers)
        self.addrs: dict[bytes, dict[str, None]] = {}
        self.segment_macs: dict[str, set] = {}
        self.mac_segments: dict[bytes, set] = {}
        self.forwarded: dict[bytes, set] = {}      # mac -> segments its forwarded packets came from
        self._seg: dict[str, tuple] = {}
        self.gen = 0

    def _segment(self, addr: str) -> tuple[str, Optional[str]]:
        """(the address's segment, its ban prefix or None when prefixes are not aggregated for its family)."""
        got = self._seg.get(addr)
        if got is None:
            ip = ipaddress.ip_address(addr)
            seg = str(ipaddress.ip_network(f"{addr}/{self.segment_len[ip.version]}", strict=False))
            n = self.length[ip.version]
            pfx = str(ipaddress.ip_network(f"{addr}/{n}", strict=False)) if n < ip.max_prefixlen else None
            if len(self._seg) > 4 * MAX_MACS:
                self._seg.clear()
            got = self._seg[addr] = (seg, pfx)
        return got

    def learn(self, mac: bytes, addr: str, ttl: int) -> None:
        """A verified connection from ``addr`` through ``mac`` with this TTL / hop limit."""
        if not mac:
            return
        known = self.addrs.get(mac)
        if known is None:
            if len(self.addrs) >= MAX_MACS:
                return
            known = self.addrs[mac] = {}
        seg, _ = self._segment(addr)
        changed = False
        if addr not in known:
            if len(known) >= MAX_ADDRESSES:
                del known[next(iter(known))]
            known[addr] = None
            changed = changed or len(known) == 2      # from now on a host window of its own (see keys)
        macs = self.segment_macs.setdefault(seg, set())
        if mac not in macs:
            macs.add(mac)
            self.mac_segments.setdefault(mac, set()).add(seg)
            changed = True
        if ttl not in HOST_TTLS:
            fw = self.forwarded.setdefault(mac, set())
            if seg not in fw:
                fw.add(seg)
                changed = True
        if changed:
            self.gen += 1

    def shared(self, seg: str) -> bool:
        if len(self.segment_macs.get(seg, ())) >= 2:
            return True
        net = ipaddress.ip_network(seg)
        return any(net.version == n.version and (net.subnet_of(n) or n.subnet_of(net)) for n in self.lan)

    def router(self, mac: bytes) -> bool:
        if mac in self.configured_routers:
            return True
        own = [s for s in self.mac_segments.get(mac, ()) if not self.shared(s)]
        by_family = {4: 0, 6: 0}
        for s in own:
            by_family[6 if ":" in s else 4] += 1
        if max(by_family.values()) >= 2:
            return True
        return any(not self.shared(s) for s in self.forwarded.get(mac, ()))

    def keys(self, mac: bytes, addr: str) -> tuple[Optional[bytes], Optional[str]]:
        """(host key: the MAC, or None for a router or a host of one address, whose address window is its host
        window; prefix key: a prefix behind a router, or None)."""
        if not mac:
            return None, None
        if not self.router(mac):
            return (mac if len(self.addrs.get(mac, ())) >= 2 else None), None
        seg, pfx = self._segment(addr)
        return None, (pfx if pfx is not None and not self.shared(seg) else None)

    def addresses(self, mac: bytes) -> list[str]:
        """The addresses the host was seen with (the never-ban check of a MAC subject)."""
        return list(self.addrs.get(mac, ()))

    def describe(self) -> dict:
        """For the status document and the report."""
        return {"hosts": len(self.addrs), "routers": sorted(mac_text(m) for m in self.addrs if self.router(m)),
                "shared_prefixes": sorted(s for s in self.segment_macs if self.shared(s))}


MAX_SERVERS = 1024
MAX_CLIENTS = 1 << 20


class Servers:
    """The XMPP server addresses seen answering: never banned when ``enforce.never_ban_servers`` is on.

    An address counts as a server when it answered a verified handshake on
    a server port and was never itself the client of a verified connection
    toward a server port: an attacker can answer its own forged SYNs and look
    like a server, but the moment it talks to the real server from that
    address it is a client, and loses the exemption before its packets count.
    """

    def __init__(self):
        self.answered: dict[str, int] = {}
        self.clients: set = set()
        self.gen = 0

    def connection(self, client: str, server: str) -> None:
        """A verified connection from ``client`` toward a server port of ``server``."""
        if client not in self.clients and len(self.clients) < MAX_CLIENTS:
            self.clients.add(client)
            if client in self.answered:
                self.gen += 1
        n = self.answered.get(server)
        if n is None:
            if len(self.answered) >= MAX_SERVERS:
                return
            self.gen += 1
        self.answered[server] = (n or 0) + 1

    def addresses(self) -> list[str]:
        if len(self.clients) >= MAX_CLIENTS:
            return []          # too many clients to be sure a server address was never one
        return sorted(a for a in self.answered if a not in self.clients)
