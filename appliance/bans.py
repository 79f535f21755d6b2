"""How long a ban lasts: the one place that knows the escalation rule.

Like fail2ban's ``bantime.increment``: the n-th offence within the memory
window lasts ``ban_seconds * factor**(n-1)``, capped at ``max_seconds``. The
analyser writes the result into the flag; the controller obeys the flag.
"""

from __future__ import annotations

from .config import Enforce


def ban_seconds(enforce: Enforce, previous_offences: int) -> int:
    """Ban length for an offence that follows ``previous_offences`` recent ones."""
    if previous_offences < 0:
        raise ValueError("previous_offences must be >= 0")
    esc = enforce.escalation
    # Cap the exponent first so a long offender history cannot overflow a float.
    length = enforce.ban_seconds * (esc.factor ** min(previous_offences, 64))
    return int(min(length, esc.max_seconds))
