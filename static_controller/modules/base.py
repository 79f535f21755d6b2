"""The module contract and the table layout every module shares."""

from __future__ import annotations

from typing import ClassVar, Iterable

from ..config_view import View
from ..flowspace import Flowspace

# Table 0 copies to the mirror port, table 1 meters/drops, table 2 forwards:
# a metered or dropped frame has already been mirrored (DESIGN.md: a meter
# instruction runs before the outputs of the same flow).
T_MIRROR, T_POLICY, T_FORWARD = 0, 1, 2

COOKIE_MASK = 0xFF << 56


def cookie_base(module_id: int) -> int:
    return module_id << 56


class Module:
    """One job on the switch; subclasses set ``name``, ``module_id`` and ``flowspace``."""

    name: ClassVar[str] = "module"
    module_id: ClassVar[int] = 0
    subscriptions: ClassVar[frozenset] = frozenset()

    def __init__(self, view: View):
        self.view = view
        self.cfg = view.cfg
        self.flowspace: Flowspace = self.declare()

    @property
    def cookie(self) -> int:
        return cookie_base(self.module_id)

    def declare(self) -> Flowspace:
        raise NotImplementedError

    def start(self, now: float) -> list:
        """Messages for a switch that just connected (the whole set, every time)."""
        return []

    def handle(self, event, pending: list) -> list:
        """Messages to send for ``event``, merged with ``pending`` from earlier modules."""
        return pending

    def ready(self) -> bool:
        """Whether the module knows its full flow set (stale flows may then be removed)."""
        return True

    def counters(self) -> dict:
        return {}


def merged(mine: Iterable, pending: list) -> list:
    return list(mine) + list(pending)
