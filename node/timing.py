"""Timing: the leader's clock-driven work, as pure decisions and their carrying out.

A delayed task (spec ``run_at``) waits in the replicated state outside the queue
(``SchedulerState.scheduled``). The state never reads a clock, so the leader
decides when a task is due, from a view of the replica and its own wall clock
(:func:`due_starts`: pure, property-tested and run by ``tests/sim``), and proposes
one :class:`~taskandgo.consensus.commands.StartDue` command that queues them;
applying it releases only tasks still scheduled and due by the replicated clock,
so a command repeated by a new leader, or proposed twice, changes nothing.

A periodic schedule (``SchedulerState.schedules``: a cron expression, a time zone and
a task template) is fired the same way: :func:`due_fires` names the next slot of
each schedule that is due (cron arithmetic by croniter, time zones by zoneinfo: see
:func:`next_slot`), and one :class:`~taskandgo.consensus.commands.FireSchedules`
command carries them. Each fire is keyed by (schedule, slot) and applied at most once
(a slot at or before the schedule's last fired slot is a no-op), so exactly one task
per slot whichever node leads and however often leaders change. A slot due within
the schedule's catch-up window (``catchup_s``: a failover, a busy leader) is fired
even late, each in turn; a backlog older than that (the cluster was down) is
*missed*: the missed-slot policy fires the latest slot once (``latest``) or skips
to the next (``skip``), never a burst of every missed slot.

:class:`Timekeeper` carries the decisions out on the leader thread of
``node/scheduling.py`` (one :meth:`Timekeeper.step` per pass of its loop); the
constructor starts nothing.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import threading
import time
import zoneinfo
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from croniter import croniter
from taskandgo.consensus.commands import FireSchedules, StartDue
from taskandgo.consensus.state import SchedulerState

log = logging.getLogger("taskandgo.node")

#: A start_due command releases at most this many tasks (the rest go in the next).
MAX_STARTS = 5000
#: A release proposed and not applied within this long is proposed again.
START_RETRY_S = 2.0
#: RAFT_PROTOCOL of delayed tasks (consensus/raft.py): the submit's run_at and
#: write_start_due.
DELAYED_PROTOCOL = 5
#: RAFT_PROTOCOL of periodic schedules (write_timetable_change, write_timetable_fire).
SCHEDULES_PROTOCOL = 6
#: RAFT_PROTOCOL of task dependencies (a submit's after; consensus/state.py _finish).
DEPENDENCY_PROTOCOL = 7
#: A fire command carries at most this many slots.
MAX_FIRES = 5000
#: A fire proposed and not applied within this long is proposed again.
FIRE_RETRY_S = 2.0
#: The default catch-up window: slots at most this late are each fired (a leader
#: change takes a second or two); a backlog older than that is missed.
DEFAULT_CATCHUP_S = 10.0


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


class BadCron(ValueError):
    """A cron expression or time zone that cannot be used (the message says why)."""


@functools.lru_cache(maxsize=4096)
def _cron(expr: str, tz: str) -> tuple[croniter, zoneinfo.ZoneInfo, threading.Lock]:
    # Parsing an expression costs about a millisecond; stepping a parsed one from a
    # new start about a tenth of that: parse each (expression, zone) once.
    zone = zone_of(tz)
    try:
        it = croniter(expr, datetime.datetime.fromtimestamp(0, zone))
    except (ValueError, KeyError) as exc:  # croniter's errors are ValueError subclasses
        raise BadCron(f"{expr!r}: {exc}") from None
    return it, zone, threading.Lock()


def zone_of(tz: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone ``tz`` (``UTC``, ``Europe/Berlin``), or BadCron."""
    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise BadCron(f"unknown time zone {tz!r} (an IANA name such as UTC or "
                      "Europe/Berlin)") from None


def check_cron(expr: str, tz: str) -> None:
    """BadCron unless ``expr`` is a cron expression this release fires: 5 fields
    (minute hour day month weekday), 6 (and seconds last), or ``@hourly``-style
    names; and ``tz`` an IANA time zone."""
    fields = expr.split()
    if not fields or (not expr.startswith("@") and len(fields) not in (5, 6)) \
            or (expr.startswith("@") and len(fields) != 1):
        raise BadCron(f"{expr!r}: expected 5 fields (minute hour day-of-month month "
                      "day-of-week), 6 with seconds last, or @hourly, @daily, @weekly, "
                      "@monthly, @yearly")
    if not croniter.is_valid(expr):
        raise BadCron(f"{expr!r} is not a valid cron expression")
    _cron(expr, tz)
    if next_slot(expr, tz, time.time()) is None:
        raise BadCron(f"{expr!r} never fires")


@functools.lru_cache(maxsize=65536)
def next_slot(expr: str, tz: str, after: float) -> float | None:
    """The first slot of ``expr`` in time zone ``tz`` strictly after ``after``
    (seconds since the epoch), or None if it never comes (within croniter's search).
    Pure (cached): cron arithmetic on wall time in ``tz``, so a daily 02:30 follows
    the zone's daylight-saving changes as croniter does."""
    it, zone, lock = _cron(expr, tz)
    with lock:
        try:
            it.set_current(datetime.datetime.fromtimestamp(after, zone), force=True)
            return float(it.get_next(float))
        except (ValueError, OverflowError):
            return None


def last_slot_at(expr: str, tz: str, at: float) -> float | None:
    """The latest slot of ``expr`` at or before ``at`` (None if none is found)."""
    it, zone, lock = _cron(expr, tz)
    with lock:
        try:
            # Slots are whole seconds: the latest at or before ``at`` is the latest at
            # or before its whole second, and get_prev is strictly before its start.
            it.set_current(datetime.datetime.fromtimestamp(math.floor(at) + 0.001, zone),
                           force=True)
            return float(it.get_prev(float))
        except (ValueError, OverflowError):
            return None


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """What due_fires reads of a schedule in the replica."""

    id: str
    cron: str
    tz: str
    last_slot: float
    paused: bool = False
    missed: str = "latest"
    catchup_s: float = DEFAULT_CATCHUP_S
    priority: int = 0  # of the tasks it fires (its template's)


@dataclass(frozen=True, slots=True)
class Fire:
    """Fire ``slot`` of schedule ``schedule_id``; ``run`` False: a missed slot the
    policy skips (the schedule moves past it without a task)."""

    schedule_id: str
    slot: float
    run: bool = True


def due_fires(schedules: Iterable[ScheduleView], now: float,
              busy: frozenset[str] = frozenset(), limit: int = MAX_FIRES) -> tuple[Fire, ...]:
    """The fires due at ``now`` (the leader's wall clock), at most one per schedule
    (its next slot after its last; the one after comes once that has applied), none
    for a paused schedule or one with a fire in flight (``busy``), at most
    ``limit``, in schedule id order:

    * the next slot is due and at most ``catchup_s`` late: fire it (a leader change
      delays slots, it loses none);
    * it is later than that (a backlog: the cluster was down or the schedule's leader
      could not fire): it and every slot since are missed; ``latest`` fires the
      latest slot at or before ``now`` once, ``skip`` moves past it without a task.
    """
    out: list[Fire] = []
    for sc in sorted(schedules, key=lambda v: v.id):
        if len(out) >= limit:
            break
        if sc.paused or sc.id in busy:
            continue
        nxt = next_slot(sc.cron, sc.tz, sc.last_slot)
        if nxt is None or nxt > now:
            continue
        if now - nxt <= sc.catchup_s:
            out.append(Fire(sc.id, nxt))
            continue
        latest = last_slot_at(sc.cron, sc.tz, now)
        out.append(Fire(sc.id, nxt if latest is None or latest < nxt else latest,
                        sc.missed == "latest"))
    return tuple(out)


def next_due(schedules: Iterable[ScheduleView]) -> float | None:
    """The earliest next slot of the schedules that are not paused (None: none)."""
    slots = [n for v in schedules if not v.paused
             and (n := next_slot(v.cron, v.tz, v.last_slot)) is not None]
    return min(slots, default=None)


def next_slots(schedules: Iterable[ScheduleView]) -> list[tuple[ScheduleView, float]]:
    """Every schedule that is not paused with its next slot (those with none left
    are left out)."""
    return [(v, n) for v in schedules if not v.paused
            and (n := next_slot(v.cron, v.tz, v.last_slot)) is not None]


def near_slots(nexts: Iterable[tuple[ScheduleView, float]],
               wall: float) -> list[tuple[float, int]]:
    """(next slot, priority) of the schedules (with their next slots, see
    :func:`next_slots`) whose next slot is due or comes within ARRIVAL_HORIZON_S of
    ``wall``, and a little more: the leader looks at every schedule about once a
    second."""
    soon = wall + ARRIVAL_HORIZON_S + _NEAR_EXTRA_S
    return [(n, v.priority) for v, n in nexts if n <= soon]


def arriving_priorities(timed: Iterable[tuple[float, int]], wall: float,
                        horizon_s: float | None = None) -> frozenset[int]:
    """Priorities of the tasks the state will queue by itself within ``horizon_s`` of
    ``wall`` (default ARRIVAL_HORIZON_S): ``timed`` is (when, priority) of delayed
    tasks and of schedules' next slots. No submit, so no hold, comes before such a
    task: the leader counts these priorities among the queued ones (as retries
    waiting for their backoff), so prefetch windows are off, and have drained, by
    the time a more urgent one is queued."""
    soon = wall + (ARRIVAL_HORIZON_S if horizon_s is None else horizon_s)
    return frozenset(p for at, p in timed if at <= soon)


#: How long before a delayed task's time or a schedule's slot its priority turns
#: prefetch windows off (see arriving_priorities): a window holds a fraction of a
#: second of work, so it has drained by then.
ARRIVAL_HORIZON_S = 2.0
#: Schedules' next slots are looked at about once a second: those within this much
#: more than the horizon are kept between looks.
_NEAR_EXTRA_S = 1.5


#: What cluster_clock remembers: the replicated clock it last saw, the monotonic time
#: it first saw it, and the last time it answered.
ClockAnchor = tuple[float, float, float]


def cluster_clock(wall: float, mono: float, replicated_now: float,
                  anchor: ClockAnchor | None) -> tuple[float, ClockAnchor]:
    """The time a leader decides by: its wall clock, but never behind the replicated
    clock (the latest wall time any command carried) plus the time elapsed on its
    monotonic clock since it first saw that value, and never going back. A leader
    whose wall clock runs behind the cluster's (by a clock step, a bad NTP sync)
    would otherwise release delayed tasks and fire slots late by the difference.
    Returns the time and the anchor to pass next time."""
    if anchor is None or anchor[0] != replicated_now:
        anchor = (replicated_now, mono, anchor[2] if anchor is not None else 0.0)
    now = max(wall, replicated_now + max(0.0, mono - anchor[1]), anchor[2])
    return now, (anchor[0], anchor[1], now)


def lateness_s(run_at: float, released_at: float) -> float:
    """How late a delayed task was released: never negative (a leader whose clock is
    ahead releases it early by its skew, which is not lateness)."""
    return max(0.0, released_at - run_at)


# ---------------------------------------------------------------------- carrying out


class Timekeeper:
    """The leader's delayed-task releases and schedule fires. ``propose(command,
    callback)`` proposes a replicated command (Replica.propose); ``observe(name,
    value)`` records a metric (``schedule_fire:<outcome>`` counts a fire). Called
    only from the leader thread (:meth:`step`, :meth:`reset`); callbacks run on the
    Raft tick thread and only touch the in-flight maps."""

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
        # schedule id -> monotonic time a fire of it was proposed (cleared when applied)
        self._firing: dict[str, float] = {}
        self._fires_checked = 0.0
        # What the last look at every schedule saw: the schedules' identity and
        # revision, and the earliest next slot then. Until one of them changes or that
        # slot comes, nothing can be due (a look at 10,000 schedules costs the tick
        # thread milliseconds of lock time); one look a second in any case.
        self._seen: tuple[int, int] = (0, -1)
        self._due_at = 0.0
        self._full_at = 0.0
        self._anchor: ClockAnchor | None = None
        # (when, priority) of delayed tasks and schedules' next slots coming soon, and
        # what they make of the priorities about to be queued (see arriving_priorities;
        # read by the planner on the same thread).
        self._near_starts: list[tuple[float, int]] = []
        self._near_fires: list[tuple[float, int]] = []
        self.arriving: frozenset[int] = frozenset()

    def reset(self) -> None:
        """A new leader: nothing of its own in flight."""
        with self._lock:
            self._starting.clear()
            self._firing.clear()
            self._seen = (0, -1)
            self._anchor = None
            self._near_fires = []

    def step(self) -> None:
        """One pass: release the delayed tasks that are due, fire the schedule slots
        that are due (by :func:`cluster_clock`)."""
        mono = time.monotonic()
        replicated = self._read(lambda s: s.now)
        wall, self._anchor = cluster_clock(self._clock(), mono, replicated, self._anchor)
        self._step_starts(wall, mono)
        self._step_fires(wall, mono)
        self.arriving = arriving_priorities((*self._near_starts, *self._near_fires), wall)

    def _step_fires(self, wall: float, mono: float) -> None:
        if mono - self._fires_checked < 0.02:
            return  # a few passes share one look at every schedule
        self._fires_checked = mono
        with self._lock:
            expired = [k for k, at in self._firing.items() if mono - at > FIRE_RETRY_S]
            for sid in expired:
                del self._firing[sid]
            busy = frozenset(self._firing)
        seen = self._read(lambda s: (id(s.schedules), getattr(s, "schedule_rev", 0)))
        if seen == self._seen and wall < self._due_at and not expired \
                and mono - self._full_at < 1.0:
            return

        def view(s: SchedulerState) -> tuple[tuple[int, int], list[ScheduleView]]:
            return (id(s.schedules), getattr(s, "schedule_rev", 0)), [
                ScheduleView(sid, sc["cron"], sc["tz"], sc["last_slot"], sc["paused"],
                             sc["missed"], sc["catchup_s"],
                             int(sc["template"].get("priority", 0) or 0))
                for sid, sc in s.schedules.items()]

        self._seen, views = self._read(view)
        self._full_at = mono
        nexts = next_slots(views)
        self._near_fires = near_slots(nexts, wall)
        fires = due_fires(views, wall, busy)
        if not fires:
            due = min((n for v, n in nexts if v.id not in busy), default=None)
            self._due_at = float("inf") if due is None else due
            return
        self._due_at = 0.0  # look again once these have applied
        with self._lock:
            for f in fires:
                self._firing[f.schedule_id] = mono

        def done(result: Any, err: int) -> None:
            with self._lock:
                for f in fires:
                    self._firing.pop(f.schedule_id, None)
            if err == 0 and isinstance(result, list):
                at = self._clock()
                for _sid, slot, outcome, _tid in result:
                    self._observe("schedule_fire:" + str(outcome), 1.0)
                    if outcome == "fired":
                        self._observe("schedule_lateness", lateness_s(slot, at))

        self._propose(FireSchedules(tuple((f.schedule_id, f.slot, f.run) for f in fires), wall),
                      callback=done)

    def _step_starts(self, wall: float, mono: float) -> None:
        """Propose the release of every delayed task that is due at ``wall``."""
        with self._lock:
            for tid in [t for t, at in self._starting.items() if mono - at > START_RETRY_S]:
                del self._starting[tid]
            in_flight = frozenset(self._starting)

        def view(s: SchedulerState) -> tuple[list[tuple[str, float]], list[tuple[float, int]]]:
            # Only what is due or near (a copy of the whole map each pass would cost
            # the tick thread's lock time in proportion to every delayed task).
            if not s.scheduled:
                return [], []
            soon = wall + ARRIVAL_HORIZON_S
            near = [(t, at) for t, at in s.scheduled.items() if at <= soon]
            return [(t, at) for t, at in near if at <= wall], [
                (at, task.priority) for t, at in near if (task := s.tasks.get(t)) is not None]

        due, self._near_starts = self._read(view)
        ids = due_starts(due, wall, in_flight)
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


__all__ = [
    "ARRIVAL_HORIZON_S",
    "DEFAULT_CATCHUP_S",
    "DELAYED_PROTOCOL",
    "DEPENDENCY_PROTOCOL",
    "MAX_FIRES",
    "MAX_STARTS",
    "SCHEDULES_PROTOCOL",
    "BadCron",
    "ClockAnchor",
    "Fire",
    "ScheduleView",
    "Timekeeper",
    "arriving_priorities",
    "check_cron",
    "cluster_clock",
    "due_fires",
    "due_starts",
    "last_slot_at",
    "lateness_s",
    "near_slots",
    "next_due",
    "next_slot",
    "next_slots",
    "zone_of",
]
