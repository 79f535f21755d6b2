"""A step's records as arrays: its packed batches joined, each record's header fields and the first HEAD bytes
of its frame, for the fast engine (analyser/fast.py).

Two implementations with the same results byte for byte (tests/test_gather.py): ``analyser._fastread`` in C
(one pass: join, walk, gather, and the frame shape and endpoints fast.py reads next) and the pure path here (a
walk of the ``<qII`` record headers of appliance/framebatch.py, then a numpy gather). ``gather`` picks the C
one when it is built; ``PISNOOP_FASTREAD=off`` forces the pure one, ``=on`` refuses to run without C. ``group``
is numpy.unique's grouping of the step's connections, in C with a hash table.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import NamedTuple

import numpy as np

from appliance.errors import BadInput

try:
    from . import _fastread
except ImportError:  # not built (a pure install): numpy does the same, slower
    _fastread = None

ENV = "PISNOOP_FASTREAD"
PAD = 104                     # zero bytes after a step's records: the words read around the last one stay inside
HEAD = 72                     # bytes of each frame read as a matrix: Ethernet + IPv6 + TCP's fixed header fit
LITTLE = sys.byteorder == "little"        # the records' lengths are little-endian (appliance/framebatch.py)
_CAP = struct.Struct("<I")
U = np.uint64
ENDS = ("sh", "sl", "dh", "dl", "sx", "dx", "sport", "dport", "hs", "hd")    # fast.py _endpoints' keys
MORE = ("seq", "ack", "win", "mac")     # fast.py _Frames.seg's fields


class Records(NamedTuple):
    """The step's records. ``buf``: the blobs joined, then ``-len % 8 + PAD`` zero bytes; per record its offset
    in ``buf``, ``owner`` (the index of its blob), ``ts``, ``wl``, ``cap`` (int64) and ``head``, an (n, HEAD)
    uint8 matrix of the bytes after its header (past a shorter frame's end: the next record's or the pad);
    ``errors``: per blob the text of its first damaged record, or None (the records before it count). The
    arrays are read-only.

    ``shape`` and ``ends``: what fast.py's ``_read_shape`` and ``_endpoints`` compute from ``cap`` and ``head``,
    and ``more`` what its ``_Frames.seg`` reads of some frames, when the C pass computed them with the rest (else
    None: fast.py computes them)."""

    buf: bytes
    offs: np.ndarray
    owner: np.ndarray
    ts: np.ndarray
    wl: np.ndarray
    cap: np.ndarray
    head: np.ndarray
    errors: list
    shape: tuple | None = None
    ends: dict | None = None
    more: dict | None = None


def available() -> bool:
    return _fastread is not None


def use_c(mode: str | None = None) -> bool:
    """Whether ``gather`` takes the C path: unless it is missing or ``mode``/``$PISNOOP_FASTREAD`` says off."""
    mode = (mode or os.environ.get(ENV) or "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise BadInput(f"{ENV}: got {mode!r}; expected auto, on or off")
    if mode == "on" and _fastread is None:
        raise BadInput(f"{ENV}=on but analyser._fastread is not built (pip install -e . or python -m appliance.cext)")
    return mode != "off" and _fastread is not None


def gather(blobs: list, mode: str | None = None) -> Records:
    """The records of ``blobs`` (bytes-like packed batches, in order) as arrays."""
    if not use_c(mode):
        return _gather_numpy(blobs)
    buf, offs, owner, ts, wl, cap, head, errors, fields = _fastread.gather(blobs)
    i64 = (np.frombuffer(a, dtype=np.int64) for a in (offs, owner, ts, wl, cap))
    f = [np.frombuffer(a, dtype=bool if k < 4 else np.int64 if k < 8 or 18 <= k < 21 else U)
         for k, a in enumerate(fields)]
    bulk, v6, udp, synrst, l4, end, doff, tflags = f[:8]
    return Records(buf, *i64, np.frombuffer(head, dtype=np.uint8).reshape(-1, HEAD), errors,
                   (bulk, v6, l4, end, doff, tflags, udp, synrst), dict(zip(ENDS, f[8:18])), dict(zip(MORE, f[18:])))


def group(keys: np.ndarray, mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_index=True, return_inverse=True)[1:]`` of uint64 ``keys``: per distinct key (in
    ascending order) its first position, per key its group. In C a hash table: no sort of the whole step."""
    if not use_c(mode):
        _, rep, inv = np.unique(keys, return_index=True, return_inverse=True)
        return rep, inv.reshape(-1)
    rep, inv = _fastread.group(np.ascontiguousarray(keys, dtype=U))
    return np.frombuffer(rep, dtype=np.int64), np.frombuffer(inv, dtype=np.int64)


def records(blob, base: int, offs: list):
    """Append the offsets (plus ``base``) of the records of ``blob``; the text of a damaged record, or None.

    The same checks as ``framebatch.unpack``: the records before a damaged one count. The walk reads each
    record's length through four 32-bit views of the blob (one per alignment), ~40% cheaper than
    ``struct.unpack_from``; a blob whose walk does not end exactly at its end is walked again the slow way."""
    n = len(blob)
    if LITTLE and n >= 16:
        views = tuple(memoryview(blob)[k:k + (n - k) // 4 * 4].cast("I") for k in range(4))
        got: list = []
        append = got.append
        off, end = 0, n - 15
        try:
            while off < end:
                append(off)
                p = off + 12
                off = p + 4 + views[p & 3][p >> 2]
        except IndexError:
            off = -1
        if off == n:
            offs.extend([base + o for o in got] if base else got)
            return None
    off = 0
    cap = _CAP.unpack_from
    append = offs.append
    while off < n:
        if n - off < 16:
            return f"truncated record header at byte {off}"
        size = cap(blob, off + 12)[0]
        if off + 16 + size > n:
            return f"record at byte {off} claims {size} bytes, {n - off - 16} left"
        append(base + off)
        off += 16 + size
    return None


def _gather_numpy(blobs: list) -> Records:
    offs: list = []
    owner: list = []
    errors: list = []
    base = 0
    for i, blob in enumerate(blobs):
        k = len(offs)
        errors.append(records(blob, base, offs))
        owner.extend([i] * (len(offs) - k))
        base += len(blob)
    buf = b"".join([*blobs, bytes(-base % 8 + PAD)])
    words = np.frombuffer(buf, dtype=np.uint64)
    offs_a = np.array(offs, dtype=np.int64)
    # each record's 16-byte header and the first HEAD bytes of its frame, as unaligned 8-byte words: one gather of
    # the aligned words around them, then each pair of neighbours shifted into place
    span = (16 + HEAD) // 8
    r = ((offs_a & 7) * 8).astype(np.uint64)[:, None]
    w = words[(offs_a >> 3)[:, None] + np.arange(span + 1)]
    w = (w[:, :-1] >> r) | ((w[:, 1:] << U(8)) << (U(56) - r))    # two shifts: r == 0 takes nothing of hi
    out = Records(buf, offs_a, np.array(owner, dtype=np.int64), np.ascontiguousarray(w[:, 0]).view(np.int64),
                  (w[:, 1] & U(0xFFFFFFFF)).astype(np.int64), (w[:, 1] >> U(32)).astype(np.int64),
                  np.ascontiguousarray(w[:, 2:]).view(np.uint8), errors)
    for a in out[1:7]:
        a.flags.writeable = False
    return out
