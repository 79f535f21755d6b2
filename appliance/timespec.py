"""The one parser of ``--since``/``--until`` times, for every command that takes them.

A time is ns since the epoch (an int: stored frames carry ns, and epoch
seconds such as ``1700000000.123456789`` must select exactly those frames);
``utc`` gives the datetime for queries on datetime fields.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from fractions import Fraction

from .errors import BadInput

FORMS = ("ISO 8601 (2026-11-21T07:00:00Z, UTC if no zone), epoch seconds (1700000000.5), now, "
         "or a span back from now (30m or -30m; s, m, h, d)")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
NS = 1_000_000_000
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SPAN = re.compile(r"-?(\d+(?:\.\d+)?)([smhd])")
_EPOCH_S = re.compile(r"\d+(?:\.\d+)?")


class TimeSpecError(BadInput):
    """A time argument in none of the accepted forms."""


def parse(text: str, option: str = "time", now_ns: int | None = None) -> int:
    """ns since the epoch of ``text``; spans and ``now`` count back from ``now_ns`` (default: the clock)."""
    t = text.strip()
    now = time.time_ns() if now_ns is None else now_ns
    if t == "now":
        return now
    if m := _SPAN.fullmatch(t):
        return now - int(Fraction(m.group(1)) * _UNIT_S[m.group(2)] * NS)
    if _EPOCH_S.fullmatch(t):
        return int(Fraction(t) * NS)
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise TimeSpecError(f"{option} {text!r}: expected {FORMS}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return (when - EPOCH) // dt.timedelta(microseconds=1) * 1000


def is_span(text: str) -> bool:
    """Whether ``text`` is a span back from now (``30m``, ``-30m``)."""
    return _SPAN.fullmatch(text.strip()) is not None


def utc(ns: int) -> dt.datetime:
    """The aware UTC datetime of ``ns`` (truncated to the µs a datetime holds; exact, no float on the way).

    The one conversion of frame times to dates: the ``frames`` document's ``t0``/``t1``, flow records, flag
    evidence and every query on them."""
    return EPOCH + dt.timedelta(microseconds=ns // 1000)
