"""Reading stored frames: follow new batches with a resume point, or one time range.

Following is by ``ins`` (when a batch reached the store). Writers set ``ins``
themselves, so a batch can become visible with an ``ins`` a little older than
one already read (two writers, a replayed spool, clock steps). The reader
therefore reads ``ins >= resume - GRACE`` every WINDOW_SCAN_EVERY seconds, and
in between ``ins >=`` the resume point's second, each time naming the batch ids
it has already read in that range so that only new ones come back. The resume
point, those ids and the step number are one document in ``state``, written
after the flows of the steps it covers (analyser/live.py).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Iterator, Optional

from appliance import store, timespec

GRACE = dt.timedelta(seconds=30)
# nx-27017's find() compares dates at whole seconds (floor): a ``$gte`` returns
# up to a second more, a ``$gt``/``$lt`` loses documents in the bound's second.
# Ids read are kept this much longer than GRACE so such extras are known.
SLACK = dt.timedelta(seconds=2)
WINDOW_SCAN_EVERY = 10.0  # seconds between full reads of the grace window (late batches)
# A step: up to STEP_BATCHES batches (a poll's worth at 100 Mb/s of small frames is ~75: one step, since the fast
# engine's cost per connection and step is fixed), cut after STEP_BYTES of frames (wire bytes: large frames).
STEP_BATCHES = 128
STEP_BYTES = 32 << 20


class Follower:
    """The persisted position of the analyser of one sensor in ``frames``."""

    def __init__(self, db, sensor: str, limit: int = STEP_BATCHES, frames_db=None):
        """``frames_db``: where ``frames`` is read (``store.frames_reader``: a secondary may serve it); the resume
        point is read and written through ``db`` (the primary)."""
        self.frames = (frames_db if frames_db is not None else db)[store.FRAMES]
        self.state = db[store.STATE]
        self.sensor = sensor
        self.limit = limit
        self.id = f"analyser:{sensor}"
        doc = self.state.find_one({"_id": self.id}) or {}
        self.resume: Optional[dt.datetime] = doc.get("resume")
        self.seen: dict[str, dt.datetime] = {i: t for i, t in doc.get("seen", [])}
        self.step: int = doc.get("step", 0)
        self.saved_step = self.step             # the step of the position in ``state``
        self._saved = {k: v for k, v in doc.items() if k != "pending"} or {"_id": self.id, "step": 0}
        self.unsaved: list[str] = []            # ids read since the position was saved
        got = doc.get("pending")
        # the writes of flows since the position was saved whose own position was not (a kill in each), oldest first
        self._pendings = sorted((g for g in got if isinstance(g, dict) and g.get("step", 0) > self.step),
                                key=lambda g: g["step"]) if isinstance(got, list) else []
        self.pendings = {g["step"]: frozenset(g["ids"]) for g in self._pendings}    # step -> its batch ids
        if self._pendings:
            self.step = self._pendings[-1]["step"]   # never reuse a step number
        self.late = 0
        self._next_window_scan = 0.0

    def rescan(self) -> None:
        """Make the next read scan the whole grace window (late batches included)."""
        self._next_window_scan = 0.0

    def next_batches(self) -> list[dict]:
        """The next batches not read yet, oldest ``ins`` first (at most ``limit``), whole documents.

        Each read is one query that names the ids already read in its range, so the store returns only new
        batches: nx-27017 decodes every whole document a query matches, even with a projection, and a read of
        the whole grace window (~4,400 batches at 100 Mb/s of small frames) cost more than the analysis."""
        if self.resume is None:
            query: dict = {"sensor": self.sensor}
        else:
            now = time.monotonic()
            if now >= self._next_window_scan:         # late batches: from the grace edge on
                self._next_window_scan = now + WINDOW_SCAN_EVERY
                since = self.resume - GRACE
            else:                                     # new batches: from the resume point's whole second on
                since = self.resume.replace(microsecond=0)
            known = [i for i, t in self.seen.items() if t >= since - SLACK]
            query = {"sensor": self.sensor, "ins": {"$gte": since}}
            if known:
                query["_id"] = {"$nin": known}
        out, size = [], 0
        cur = self.frames.find(query).sort([("ins", 1), ("_id", 1)]).limit(self.limit)
        try:
            for doc in cur:
                out.append(doc)
                size += doc.get("wire_bytes", 0)
                if size >= STEP_BYTES:
                    break                     # the rest is read again next time (not marked read)
        finally:
            cur.close()
        return out

    def advance(self, docs: list[dict], step: int) -> None:
        """Record ``docs`` as read by ``step``, in memory: the next reads go on after them; ``save`` keeps it."""
        for d in docs:
            if self.resume is not None and d["ins"] < self.resume:
                self.late += 1
            self.seen[d["_id"]] = d["ins"]
            self.unsaved.append(d["_id"])
        newest = max(d["ins"] for d in docs)
        if self.resume is None or newest > self.resume:
            self.resume = newest
        edge = self.resume - GRACE - SLACK
        self.seen = {i: t for i, t in self.seen.items() if t >= edge}
        self.step = step

    def save_pending(self) -> None:
        """Before flows are written with ``step``: the saved position, naming that step, the batches read since
        and the resume point they reach (``Flow.from_document`` reads it after a kill before ``save``), beside
        the pending writes of earlier runs killed before theirs (a flow document still of such a step holds
        those batches; step numbers go on after them)."""
        pending = {"step": self.step, "ids": list(self.unsaved), "upto": self.resume}
        self.state.replace_one({"_id": self.id}, {**self._saved, "pending": self._pendings + [pending]},
                               upsert=True)

    def save(self) -> None:
        """Write the position: the resume point, the ids read inside the grace window, the step."""
        doc = {"_id": self.id, "resume": self.resume, "seen": [[i, t] for i, t in self.seen.items()],
               "step": self.step, "updated_at": dt.datetime.now(dt.timezone.utc)}
        self.state.replace_one({"_id": self.id}, doc, upsert=True)
        self._saved, self.saved_step, self.unsaved = doc, self.step, []
        self._pendings, self.pendings = [], {}

    @property
    def recovering(self) -> bool:
        """A pending write of a run before this one is still being read again (the position must not move on
        before it is: its flows skip those batches until then)."""
        if not self._pendings:
            return False
        last = self._pendings[-1]                    # its batches include every earlier one's
        if self.pendings[last["step"]] <= self.seen.keys():
            return False
        return self.resume is None or self.resume <= last["upto"]   # past it: the rest is gone (retention)

    def lag_seconds(self) -> float:
        """How far the newest stored batch is ahead of what has been read (0 when caught up)."""
        query: dict = {"sensor": self.sensor}
        if self.resume is not None:       # only the batches from the resume point on (nx-27017 decodes each match)
            query["ins"] = {"$gte": self.resume.replace(microsecond=0)}
        newest = self.frames.find_one(query, {"ins": 1}, sort=[("ins", -1)])
        if newest is None or self.resume is None:
            return 0.0 if newest is None else (dt.datetime.now(dt.timezone.utc) - newest["ins"]).total_seconds()
        return max(0.0, (newest["ins"] - self.resume).total_seconds())


def range_query(sensor: str, lo: int, hi: Optional[int]) -> tuple[dict, list]:
    """The filter and sort of ``time_range``: both in the order of ``idx_frames_sensor_t1``.

    The index gives the order, so no sort runs in memory: MongoDB 4.4 refuses
    an in-memory sort over 100 MB, which an hour of frames documents exceeds.
    Within one snooper run batches do not overlap, so the order of their
    ends (t1) is the order of their starts.
    """
    query: dict = {"sensor": sensor, "t1": {"$gte": timespec.utc(lo)}}
    if hi is not None:
        query["t0"] = {"$lt": timespec.utc(hi) + SLACK}  # wider by SLACK (nx-27017); frames filtered exactly below
    return query, [("sensor", 1), ("t1", 1)]


def time_range(db, sensor: str, lo: int, hi: Optional[int], chunk: int = 64) -> Iterator[list]:
    """Lists of ``(batch_id, 0, frames)`` covering capture times in [lo, hi) ns, oldest first."""
    query, order = range_query(sensor, lo, hi)
    out = []
    for doc in db[store.FRAMES].find(query).sort(order):
        out.append((doc["_id"], 0, _between(store.batch_frames(doc), lo, hi)))
        if len(out) >= chunk:
            yield out
            out = []
    if out:
        yield out


def _between(frames, lo: int, hi: Optional[int]):
    """The frames of a batch inside the range; the others become empty, so frame indexes stay those of the batch."""
    for f in frames:
        yield f if lo <= f[0] and (hi is None or f[0] < hi) else _OUTSIDE


_OUTSIDE = (0, 0, b"")
