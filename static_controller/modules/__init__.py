"""Controller modules: each owns a slice of flowspace and answers switch events.

The API follows the xmpp_ofc design: ``start(now)`` gives the module's initial
messages for a freshly connected switch, ``subscriptions`` names the events it
wants, ``handle(event, pending)`` receives one event plus the messages the
modules before it produced and returns the merged list.
"""

from __future__ import annotations

from ..config_view import View
from .base import Module
from .enforce import Enforce
from .flowstats_ids import FlowstatsIds
from .l2switch import L2Switch
from .mirror import Mirror
from .ratelimit import RateLimit


def build(view: View) -> list[Module]:
    """The modules this config enables, in dispatch order."""
    mods: list[Module] = [Mirror(view), RateLimit(view), Enforce(view)]
    if view.cfg.flowstats_ids.enabled:
        mods.append(FlowstatsIds(view))
    if view.cfg.switch.forwarding == "l2switch":
        mods.append(L2Switch(view))
    return mods
