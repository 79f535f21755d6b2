"""Controller modules: each owns a slice of flowspace and answers switch events.

``start(now)`` gives a module's messages for a freshly connected switch,
``subscriptions`` names the events it wants, ``handle(event)`` returns the
module's own messages for one event. The core vets each module's list as
that module's, so a flow is judged against its emitter's flowspace whatever
cookie it carries, and concatenates the lists in module order. A module that
sends requests takes the core's xid allocator as a constructor argument, so
its xids never collide with the core's.
"""

from __future__ import annotations

from typing import Callable

from ..config_view import View
from .base import Module
from .enforce import Enforce
from .flowstats_ids import FlowstatsIds
from .l2switch import L2Switch
from .mirror import Mirror
from .ratelimit import RateLimit


def build(view: View, next_xid: Callable[[], int]) -> list[Module]:
    """The modules this config enables, in dispatch order; ``next_xid`` is the core's xid allocator."""
    mods: list[Module] = [Mirror(view), RateLimit(view), Enforce(view)]
    if view.cfg.flowstats_ids.enabled:
        mods.append(FlowstatsIds(view, next_xid))
    if view.cfg.switch.forwarding == "l2switch":
        mods.append(L2Switch(view))
    return mods
