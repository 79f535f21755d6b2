"""The module contract and the table layout every module shares."""

from __future__ import annotations

import hashlib
from typing import ClassVar

from ..config_view import View
from ..flowspace import Flowspace

# Table 0 copies to the mirror port, table 1 meters/drops, table 2 forwards. A meter
# instruction runs before the outputs of the same flow, so a metered drop is mirrored
# only if the mirror copy is output in table 0 and metering done in table 1
# (docs/ARCHITECTURE.md).
T_MIRROR, T_POLICY, T_FORWARD = 0, 1, 2

COOKIE_MASK = 0xFF << 56


def cookie_base(module_id: int) -> int:
    return module_id << 56


def digest(text: str, bits: int) -> int:
    """A stable ``bits``-bit number for ``text``: cookie room for what does not fit (an IPv6 address)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> (64 - bits)


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

    def handle(self, event) -> list:
        """This module's own messages for ``event``: the core vets them as this module's and merges."""
        return []

    def refused(self, f, now: float) -> None:
        """A flow of this module that the core or the switch refused: it is not on the switch (no reply needed)."""

    def ready(self) -> bool:
        """Whether the module knows its full flow set (stale flows may then be removed)."""
        return True

    def counters(self) -> dict:
        return {}
