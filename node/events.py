"""The node's event bus: recent task, node and leader events with sequence numbers.

The replica publishes what each applied command changed (on the Raft tick thread);
the leader publishes node up/down and leader changes; watchers (WatchTasks, the HTTP
event stream) and waiters read them by sequence number.
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Any


class EventBus:
    """Recent events with sequence numbers, for watchers and waiters.

    Thread-safe. :meth:`publish` stamps each event dict with the next ``seq`` (in
    place) and wakes waiters; at most ``maxlen`` recent events are kept."""

    def __init__(self, maxlen: int = 50_000) -> None:
        self._events: collections.deque = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self.seq = 0

    def publish(self, events: list[dict[str, Any]]) -> None:
        with self._cond:
            for e in events:
                self.seq += 1
                e["seq"] = self.seq
                self._events.append(e)
            self._cond.notify_all()

    def since(self, seq: int, timeout_s: float) -> list[dict[str, Any]]:
        """Events after seq, waiting up to timeout_s for the first one."""
        with self._cond:
            if self.seq <= seq:
                self._cond.wait(timeout_s)
            if self.seq <= seq:
                return []
            # The newest (self.seq - seq) events, walked from the right: slicing from
            # the left walks the whole buffer (50k events) under the lock, which
            # stalled the Raft tick thread's publish once the buffer was full.
            n = min(self.seq - seq, len(self._events))
            out = list(itertools.islice(reversed(self._events), n))
            out.reverse()
            return out

    def wait(self, timeout_s: float) -> None:
        with self._cond:
            self._cond.wait(timeout_s)


def event(kind: str, status: str, node: str = "", task_id: str = "", chunk: int = -1,
          at: float = 0.0) -> dict[str, Any]:
    """One event in the bus's shape (node and leader events carry no task)."""
    return {"kind": kind, "task_id": task_id, "status": status, "chunk": chunk, "node": node,
            "at": at}


__all__ = ["EventBus", "event"]
