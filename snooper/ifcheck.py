"""Mirror interface safety: the snooper listens, it must never be a routed interface.

A mirror port that carries an ordinary address could answer ARP or route
traffic, and a snooper started on the wrong interface would quietly store a
LAN's traffic. So the interface must exist and carry nothing but link-local
addresses (IPv4 169.254.0.0/16, IPv6 fe80::/10); otherwise the snooper
refuses to start (exit 2). An interface that is down is only warned about:
it may come up later.
"""

from __future__ import annotations

import ipaddress
import json
import logging

from appliance import netns


class UnsafeInterface(Exception):
    """The interface must not be captured on; the message says why."""


def check(ifname: str, ns: str | None, log: logging.Logger | None = None) -> list[str]:
    """Raise ``UnsafeInterface`` if ``ifname`` (in ``ns``) is missing or routable; return warnings."""
    where = f" in network namespace {ns}" if ns else ""
    if ns and not netns.exists(ns):
        raise UnsafeInterface(f"network namespace {ns} does not exist")
    res = netns.run(["ip", "-j", "addr", "show", "dev", ifname], ns=ns, check=False)
    if res.returncode != 0:
        raise UnsafeInterface(f"interface {ifname}{where} does not exist")
    try:
        info = json.loads(res.stdout)[0]
    except (ValueError, IndexError):
        raise UnsafeInterface(f"interface {ifname}{where}: cannot read its addresses") from None
    for a in info.get("addr_info", []):
        addr = ipaddress.ip_address(a.get("local", "").split("%")[0])
        if not addr.is_link_local:
            raise UnsafeInterface(f"interface {ifname}{where} has address {addr}/{a.get('prefixlen')}: "
                                  "a mirror interface may only carry link-local addresses (169.254.0.0/16, fe80::/10)")
    warnings = []
    if "UP" not in info.get("flags", []):
        warnings.append(f"interface {ifname}{where} is down: no frames until it is up")
    for w in warnings:
        if log:
            log.warning(w)
    return warnings
