"""The views the leader's decisions read and the actions they return (node/
decisions.py): frozen values, built by node/scheduling.py from the replica and the
worker table (and by tests/sim under a simulated clock). No behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from taskandgo.strategies import Assignment, QueuedUnit
from taskandgo.strategies.placement import Amounts

#: (task_id, chunk): one unit of work (chunk -1 is a whole task).
UnitKey = tuple[str, int]
#: (task_id, chunk, attempt, fencing token): one attempt at a unit.
AttemptKey = tuple[str, int, int, int]
#: A prefetch window holds about this much work (seconds per slot, at the recent
#: run time), up to the worker's --prefetch.
PREFETCH_WORK_S = 0.2


# ---------------------------------------------------------------------- views


@dataclass(frozen=True)
class WorkerView:
    """A worker as the leader last heard of it (its heartbeat, and when).

    ``capacity`` is slots plus the worker's --prefetch (0 means just ``slots``);
    ``last_seen`` is on the clock of the caller's ``now``; ``last_seen_wall`` is
    wall-clock time, compared with units' wall-clock ``started_at``.
    ``resources``: its capacity per resource (cpu cores, memory bytes, named ones;
    none from a node of an earlier release: it takes no unit with a request);
    ``labels``: its node labels (sorted pairs)."""

    node_id: str
    slots: int
    capacity: int = 0
    last_seen: float = 0.0
    last_seen_wall: float = 0.0
    accepting: bool = True
    down: bool = False
    running: frozenset[AttemptKey] = frozenset()
    resources: Amounts = ()
    labels: tuple[tuple[str, str], ...] = ()


class RunningView(NamedTuple):
    """A unit the replica holds as running (or waiting in a prefetch window) on
    ``worker``. ``priority`` None: its task is unknown (it counts for no priority).
    Immutable; a named tuple rather than a frozen dataclass because the leader
    builds one per running unit on every planning round, under the replica's lock."""

    task_id: str
    chunk: int
    worker: str
    priority: int | None = None
    attempt: int = 0
    token: int = 0
    started_at: float = 0.0  # wall clock

    @property
    def key(self) -> AttemptKey:
        return (self.task_id, self.chunk, self.attempt, self.token)


class InFlight(NamedTuple):
    """An assignment proposed (in an assign command) and not applied yet, and its
    unit's priority (None: not known). A named tuple: the leader keeps one per unit
    it proposes and hands them all to every planning round."""

    task_id: str
    chunk: int
    worker: str
    priority: int | None = None
    request: Amounts = ()


@dataclass(frozen=True)
class Floor:
    """While a hold's submit is in progress: plan nothing below ``priority`` until
    every task of ``task_ids`` is in the replica, or until ``until`` at the latest.
    No ``task_ids`` (a hold from a node of an earlier release): until any unit at
    or above ``priority`` is queued."""

    priority: int
    until: float
    task_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PlanView:
    """What planning one round looks at.

    ``workers``: the live workers (see :func:`live_workers`), in a stable order.
    ``queued``: the head of the queue in priority order (at least
    :func:`queue_depth_needed` units of it, or all). ``queued_priorities``: every
    priority with a queued unit, and of every retry waiting for its backoff (it
    comes back to the queue on its own: windows must not hold anything below it).
    ``running``: every running unit. ``completing``:
    (task_id, chunk, worker) of units whose result is being committed (they no
    longer hold a slot). ``held``: per worker, how many attempts it still holds
    that are no longer its to run (see :func:`stale_held`); each holds a slot
    until the worker drops it."""

    now: float
    workers: tuple[WorkerView, ...]
    queued: tuple[QueuedUnit, ...] = ()
    queued_priorities: frozenset[int] = frozenset()
    running: tuple[RunningView, ...] = ()
    in_flight: tuple[InFlight, ...] = ()
    completing: frozenset[tuple[str, int, str]] = frozenset()
    floor: Floor | None = None
    run_ewma: float | None = None
    prefetch_work_s: float = PREFETCH_WORK_S
    held: Mapping[str, int] = field(default_factory=dict)
    #: Recent run time per kind of unit (see :func:`unit_kind`): windows are sized
    #: by the kinds at the queue's head (:func:`window_run_s`). None: by ``run_ewma``,
    #: one average over every unit.
    run_s_by_kind: Mapping[str, float] | None = None
    #: Priorities of assignments committed and not yet delivered to their workers.
    undelivered: frozenset[int] = frozenset()
    #: ``running`` summed up (see :func:`summarize_running`), given in its place by
    #: the leader: building a RunningView per running unit every round cost it more
    #: than planning. None: planning sums up ``running``.
    running_summary: RunningSummary | None = None
    #: For each concurrency key with a limit, how many more units holding it may be
    #: assigned (see :func:`key_room`); None: no limits.
    key_room: Mapping[str, int] | None = None


class RunningSummary(NamedTuple):
    """The running units as planning counts them: per worker, how many run there
    and are not completing (``busy``); the priorities of all of them, completing
    ones included (a failed one comes back as a retry); per worker, the resources
    the running and not completing units requested, and the attempts it still holds
    that are no longer its to run (``used``; see decisions.with_held_requests)."""

    busy: Mapping[str, int]
    priorities: frozenset[int]
    used: Mapping[str, Mapping[str, float]] = {}


@dataclass(frozen=True)
class LeaseView:
    """What a lease check looks at. ``workers``: every worker in the leader's table
    (live or not); ``leader_since``: when this node became leader (same clock as
    ``now``); ``recent``: requeues proposed lately (attempt -> when); ``missing``:
    attempts a live worker did not report at the last checks (attempt -> the check
    that first found it missing; same clock as ``now``)."""

    now: float
    lease_s: float
    grace_s: float
    leader_since: float
    workers: tuple[WorkerView, ...]
    running: tuple[RunningView, ...]
    recent: Mapping[AttemptKey, float] = field(default_factory=dict)
    missing: Mapping[AttemptKey, float] = field(default_factory=dict)


class ReplicaUnit(NamedTuple):
    """What the replica holds for a unit a worker reports running (a named tuple:
    looked up for many reported units every planning round)."""

    status: str
    token: int
    worker: str | None  # who the replica has it running on (None: nobody)


# ---------------------------------------------------------------------- actions


@dataclass(frozen=True)
class PlanActions:
    """Assignments to propose (one assign command), and whether the priority floor
    in the view is lifted (expired, or the urgent unit is queued)."""

    assignments: tuple[Assignment, ...]
    floor_lifted: bool = False


@dataclass(frozen=True)
class Requeue:
    """Hand a unit's attempt back to the queue, and why."""

    key: AttemptKey
    reason: str


@dataclass(frozen=True)
class LeaseActions:
    """Units to requeue (one requeue command), workers newly found down, and the
    requeue memory to keep for the next check."""

    requeue: tuple[Requeue, ...]
    down: tuple[str, ...]
    recent: Mapping[AttemptKey, float]
    missing: Mapping[AttemptKey, float] = field(default_factory=dict)
