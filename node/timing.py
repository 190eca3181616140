"""Timing: the leader's clock-driven work, as pure decisions and their carrying out.

A delayed task (spec ``run_at``) waits in the replicated state outside the queue
(``SchedulerState.scheduled``). The state never reads a clock, so the leader
decides when a task is due, from a view of the replica and its own wall clock
(:func:`due_starts`: pure, property-tested and run by ``tests/sim``), and proposes
one :class:`~taskandgo.consensus.commands.StartDue` command that queues them;
applying it releases only tasks still scheduled and due by the replicated clock,
so a command repeated by a new leader, or proposed twice, changes nothing.

:class:`Timekeeper` carries the decisions out on the leader thread of
``node/scheduling.py`` (one :meth:`Timekeeper.step` per pass of its loop); the
constructor starts nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from taskandgo.consensus.commands import StartDue
from taskandgo.consensus.state import SchedulerState

log = logging.getLogger("taskandgo.node")

#: A start_due command releases at most this many tasks (the rest go in the next).
MAX_STARTS = 5000
#: A release proposed and not applied within this long is proposed again.
START_RETRY_S = 2.0
#: RAFT_PROTOCOL of delayed tasks (consensus/raft.py): the submit's run_at and
#: write_start_due.
DELAYED_PROTOCOL = 5


# ---------------------------------------------------------------------- decisions


def due_starts(scheduled: Iterable[tuple[str, float]], now: float,
               in_flight: frozenset[str] = frozenset(),
               limit: int = MAX_STARTS) -> tuple[str, ...]:
    """Which delayed tasks to release now: those whose ``run_at`` is at or before
    ``now`` (the leader's wall clock), not already in a release in flight, earliest
    first (ties by id, so the answer does not depend on the order of ``scheduled``),
    at most ``limit``."""
    due = sorted((at, tid) for tid, at in scheduled if at <= now and tid not in in_flight)
    return tuple(tid for _at, tid in due[:max(0, limit)])


def lateness_s(run_at: float, released_at: float) -> float:
    """How late a delayed task was released: never negative (a leader whose clock is
    ahead releases it early by its skew, which is not lateness)."""
    return max(0.0, released_at - run_at)


# ---------------------------------------------------------------------- carrying out


class Timekeeper:
    """The leader's delayed-task releases. ``propose(command, callback)`` proposes
    a replicated command (Replica.propose); ``observe(name, seconds)`` records a
    metric. Called only from the leader thread (:meth:`step`, :meth:`reset`);
    callbacks run on the Raft tick thread and only touch ``_starting``."""

    def __init__(self, read: Callable[[Callable[[SchedulerState], Any]], Any],
                 propose: Callable[..., None], *,
                 observe: Callable[[str, float], None],
                 clock: Callable[[], float] = time.time) -> None:
        self._read = read
        self._propose = propose
        self._observe = observe
        self._clock = clock
        self._lock = threading.Lock()
        # task id -> monotonic time its release was proposed (cleared when applied)
        self._starting: dict[str, float] = {}

    def reset(self) -> None:
        """A new leader: nothing of its own in flight."""
        with self._lock:
            self._starting.clear()

    def step(self) -> None:
        """One pass: propose the release of every delayed task that is due."""
        wall = self._clock()
        mono = time.monotonic()
        with self._lock:
            for tid in [t for t, at in self._starting.items() if mono - at > START_RETRY_S]:
                del self._starting[tid]
            in_flight = frozenset(self._starting)

        def view(s: SchedulerState) -> list[tuple[str, float]]:
            # Only what is due (a copy of the whole map each pass would cost the
            # tick thread's lock time in proportion to every delayed task).
            return [(t, at) for t, at in s.scheduled.items() if at <= wall] \
                if s.scheduled else []

        ids = due_starts(self._read(view), wall, in_flight)
        if not ids:
            return
        run_at = dict(self._read(lambda s: [(t, s.scheduled.get(t, wall)) for t in ids]))
        with self._lock:
            for tid in ids:
                self._starting[tid] = mono

        def done(result: Any, err: int) -> None:
            with self._lock:
                for tid in ids:
                    self._starting.pop(tid, None)
            if err == 0 and isinstance(result, list):
                at = self._clock()
                for tid in result:
                    self._observe("start_lateness", lateness_s(run_at.get(tid, at), at))

        self._propose(StartDue(ids, wall), callback=done)


__all__ = ["DELAYED_PROTOCOL", "MAX_STARTS", "Timekeeper", "due_starts", "lateness_s"]
