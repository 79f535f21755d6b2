"""A batch on its way to the store: the unit the writer inserts and the spool keeps."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import NamedTuple


class Batch(NamedTuple):
    sensor: str
    run: str
    seq: int
    frames: list  # of (ts_ns, wire_len, data), or a framebatch.Packed (the capture engine's)


def new_run_id() -> str:
    """Sortable by start time (spool files replay in run, then seq order) and unique."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
