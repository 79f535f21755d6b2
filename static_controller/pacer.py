"""Pacing for a switch with a small receive buffer: a byte window per barrier.

A switch like the Zodiac FX reads OpenFlow into a buffer of about 1,136
bytes (docs/ARCHITECTURE.md, "Facts: the Zodiac FX"); a push written in one
go overruns it. The pacer lets out at most ``window`` bytes (the closing
barrier included), ends each chunk with a barrier and holds the rest until
that barrier's reply says the switch has processed the chunk. With no
window (OVS) everything goes at once. Pure: message values in and out, the
encoded size from a function the glue gives.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Optional

from .messages import Barrier


class Pacer:
    def __init__(self, window: Optional[int], size: Callable[[object], int], next_xid: Callable[[], int]):
        self.window = window
        self.size = size
        self.next_xid = next_xid
        self.queue: collections.deque = collections.deque()
        self.waiting: Optional[int] = None     # the xid of the barrier closing the chunk in flight
        self.chunks = 0
        self.largest = 0                       # bytes of the largest chunk let out

    @property
    def held(self) -> int:
        return len(self.queue)

    def reset(self) -> None:
        """A new or lost connection: nothing is in flight and nothing held is still worth sending."""
        self.queue.clear()
        self.waiting = None

    def send(self, msgs: Iterable) -> list:
        """What may go to the switch now, in order; the rest is held for ``reply``."""
        if self.window is None:
            return list(msgs)
        self.queue.extend(msgs)
        return self._release()

    def reply(self, xid: int) -> list:
        """A barrier reply: when it closes the chunk in flight, the next chunk."""
        if self.window is None or xid != self.waiting:
            return []
        self.waiting = None
        return self._release()

    def _release(self) -> list:
        if self.waiting is not None or not self.queue:
            return []
        closing = Barrier(self.next_xid())
        room = self.window - self.size(closing)
        out, used = [], 0
        while self.queue:
            n = self.size(self.queue[0])
            if out and used + n > room:
                break
            out.append(self.queue.popleft())
            used += n
        if isinstance(out[-1], Barrier):          # the chunk ends with a barrier already: its reply is the signal
            self.waiting = out[-1].xid
        else:
            out.append(closing)
            used += self.size(closing)
            self.waiting = closing.xid
        self.chunks += 1
        self.largest = max(self.largest, used)
        return out
