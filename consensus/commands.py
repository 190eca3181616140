"""The replicated commands, as typed values.

Every change to the replicated state is one of these commands, proposed by a node
through :meth:`taskandgo.node.replica.Replica.propose` (or ``send``) and applied, in
log order, by every replica's :class:`taskandgo.consensus.raft.ReplicatedState`
through :meth:`apply` on its :class:`~taskandgo.consensus.state.SchedulerState`.

A command is frozen; ``NAME`` is the replicated method that carries it (pinned in
``COMMAND_IDS``: the log refers to methods by their sorted position) and
:meth:`args` is exactly what goes into the log entry. That form is the replicated
format: entries written by earlier releases carry it, and a replica of an earlier
release in a rolling upgrade reads it, so :meth:`args` yields plain lists, tuples,
dicts and numbers (no class of this module ever reaches the log) and each command
rebuilds from it (:func:`from_args`).

``now`` is the proposing node's wall clock; the state's clock takes the largest
``now`` applied (it never goes back), which releases retries and stamps times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    from taskandgo.consensus.state import Event, SchedulerState

#: The replicated methods, in the order PySyncObj numbers them: sorted by name with its
#: version suffix (``_v0``), so ``write_timetable_change`` must come before
#: ``write_timetable_fire`` and a name that is a prefix of another sorts after it.
COMMAND_IDS = ("assign", "cancel", "compact", "complete", "requeue", "submit", "verify",
               "write_settings", "write_start_due", "write_timetable_change",
               "write_timetable_fire", "write_usage_policy")


class AssignEntry(NamedTuple):
    """One unit given to a worker: chunk -1 is a whole task, or the first chunk of a
    split task not yet cut into ``chunk_count`` chunks. ``token``: the fencing token
    the leader drew (None: the replicas count tokens, RAFT_PROTOCOL below 2)."""

    task_id: str
    chunk: int
    chunk_count: int
    worker: str
    token: int | None = None

    def wire(self) -> tuple[Any, ...]:
        head = (self.task_id, self.chunk, self.chunk_count, self.worker)
        return head if self.token is None else (*head, self.token)


#: The RAFT_PROTOCOL at which a submit may carry assignments (the single-task fast
#: path): an earlier release's ``submit`` takes two arguments and would wedge on four.
FAST_PATH_PROTOCOL = 10


@dataclass(frozen=True, slots=True)
class Submit:
    """Accept tasks (specs in stored form, checked by taskandgo.node.tasks).

    ``assign`` (the fast path, RAFT_PROTOCOL 10): units of these tasks that the
    leader gave to workers when it proposed the submit, with their fencing tokens,
    for ``lease_s``. They apply in the same command, right after the tasks are
    queued, and only to tasks this command created (a repeated submit of a known id
    assigns nothing): accept and assign are one atomic step on every replica. The
    result is then ``(submit result, assign result)``, each as the plain commands
    return it; without ``assign`` it is the submit result alone, as before."""

    NAME: ClassVar[str] = "submit"
    specs: tuple[Mapping[str, Any], ...]
    now: float
    assign: tuple[AssignEntry, ...] = ()
    lease_s: float = 0.0

    def args(self) -> tuple[Any, ...]:
        if not self.assign:
            return list(self.specs), self.now
        return list(self.specs), self.now, [e.wire() for e in self.assign], self.lease_s

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        out, events = state.apply_submit(list(self.specs), self.now)
        if not self.assign:
            return out, events
        created = {r[0] for r in out if r[1] and r[2] == "queued"}
        entries = [e.wire() for e in self.assign if str(e.task_id) in created]
        lease_s = self.lease_s
        assigned: list = []
        if entries and type(lease_s) in (int, float) and lease_s > 0:
            assigned, more = state.apply_assign(entries, self.now, float(lease_s))
            events.extend(more)
        return (out, assigned), events


@dataclass(frozen=True, slots=True)
class Assign:
    """Give units to workers for ``lease_s`` (each gets an attempt and a token)."""

    NAME: ClassVar[str] = "assign"
    entries: tuple[AssignEntry, ...]
    now: float
    lease_s: float

    def args(self) -> tuple[Any, ...]:
        return [e.wire() for e in self.entries], self.now, self.lease_s

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_assign([e.wire() for e in self.entries], self.now, self.lease_s)


@dataclass(frozen=True, slots=True)
class Complete:
    """Record units' results (dicts as workers report them; a failed one carries
    its retry backoff)."""

    NAME: ClassVar[str] = "complete"
    results: tuple[Mapping[str, Any], ...]
    now: float

    def args(self) -> tuple[Any, ...]:
        return list(self.results), self.now

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_complete(list(self.results), self.now)


@dataclass(frozen=True, slots=True)
class Cancel:
    """End tasks as cancelled (and their running units)."""

    NAME: ClassVar[str] = "cancel"
    task_ids: tuple[str, ...]
    now: float

    def args(self) -> tuple[Any, ...]:
        return list(self.task_ids), self.now

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_cancel(list(self.task_ids), self.now)


@dataclass(frozen=True, slots=True)
class Requeue:
    """Hand attempts back to the queue, with why. Each unit is
    ``[task_id, chunk, attempt, token, *tail]`` (see consensus/state.py
    apply_requeue: the requeuing leader's start time; confirm-death entries carry
    the worker's and the attempt's start times). No units: a clock tick (it moves
    the replicated clock, releasing due retries; a new leader's first entry)."""

    NAME: ClassVar[str] = "requeue"
    units: tuple[tuple[Any, ...], ...]
    now: float
    reason: str = ""

    def args(self) -> tuple[Any, ...]:
        return [list(u) for u in self.units], self.now, self.reason

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_requeue([list(u) for u in self.units], self.now, self.reason)


@dataclass(frozen=True, slots=True)
class Compact:
    """Forget finished tasks older than ``retention_s`` beyond ``max_finished``."""

    NAME: ClassVar[str] = "compact"
    now: float
    retention_s: float
    max_finished: int

    def args(self) -> tuple[Any, ...]:
        return self.now, self.retention_s, self.max_finished

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_compact(self.now, self.retention_s, self.max_finished)


@dataclass(frozen=True, slots=True)
class Verify:
    """Audit point (see ReplicatedState.verify): applied by the replication layer
    itself, not by the scheduler state."""

    NAME: ClassVar[str] = "verify"
    cluster_id: str
    prev_index: int
    prev_window: str
    prev_summary: tuple[Any, ...]

    def args(self) -> tuple[Any, ...]:
        return self.cluster_id, self.prev_index, self.prev_window, list(self.prev_summary)


@dataclass(frozen=True, slots=True)
class WriteSettings:
    """Set cluster-wide settings (see consensus/state.py SETTINGS: the default
    strategy). ``only_if_unset``: keep a value already set (a new cluster's first
    leader proposes its own configuration this way; the first applied wins)."""

    NAME: ClassVar[str] = "write_settings"
    values: tuple[tuple[str, str], ...]
    now: float
    only_if_unset: bool = False

    def args(self) -> tuple[Any, ...]:
        return dict(self.values), self.now, self.only_if_unset

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_settings(self.values, self.now, self.only_if_unset)


@dataclass(frozen=True, slots=True)
class StartDue:
    """Queue delayed tasks whose start time has come (the leader's decision,
    node/timing.py ``due_starts``; RAFT_PROTOCOL 5). Applying it releases only tasks
    still scheduled and due by the replicated clock, so a repeat is a no-op. Its
    method is ``write_start_due``: every new command's name must sort after the
    earlier ones (see COMMAND_IDS)."""

    NAME: ClassVar[str] = "write_start_due"
    task_ids: tuple[str, ...]
    now: float

    def args(self) -> tuple[Any, ...]:
        return list(self.task_ids), self.now

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_start_due(list(self.task_ids), self.now)


@dataclass(frozen=True, slots=True)
class WriteSchedules:
    """Create, pause, resume or delete periodic schedules (RAFT_PROTOCOL 6): each op
    a dict with ``op`` and ``id`` (see SchedulerState.apply_schedules). Method
    ``write_timetable_change`` (sorts after every earlier command)."""

    NAME: ClassVar[str] = "write_timetable_change"
    ops: tuple[Mapping[str, Any], ...]
    now: float

    def args(self) -> tuple[Any, ...]:
        return [dict(o) if isinstance(o, Mapping) else o for o in self.ops], self.now

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_schedules(list(self.ops), self.now)


@dataclass(frozen=True, slots=True)
class FireSchedules:
    """Fire schedule slots (RAFT_PROTOCOL 6): each ``(schedule_id, slot, run)``,
    keyed by (schedule, slot) and applied at most once per slot (see
    SchedulerState.apply_fire), the leader's decision (node/timing.py due_fires).
    Method ``write_timetable_fire``."""

    NAME: ClassVar[str] = "write_timetable_fire"
    fires: tuple[tuple[str, float, bool], ...]
    now: float

    def args(self) -> tuple[Any, ...]:
        return [list(f) for f in self.fires], self.now

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_fire([list(f) for f in self.fires], self.now)


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """Change the usage policy (RAFT_PROTOCOL 9): concurrency limits, fair-share
    weights, the tenant label; each op a list (see consensus/policy.py apply_ops).
    Method ``write_usage_policy`` (sorts after every earlier command)."""

    NAME: ClassVar[str] = "write_usage_policy"
    ops: tuple[tuple[Any, ...], ...]
    now: float

    def args(self) -> tuple[Any, ...]:
        return [list(o) for o in self.ops], self.now

    def apply(self, state: SchedulerState) -> tuple[Any, list[Event]]:
        return state.apply_policy([list(o) for o in self.ops], self.now)


#: A command the scheduler state applies.
StateCommand = (Submit | Assign | Complete | Cancel | Requeue | Compact | WriteSettings
                | StartDue | WriteSchedules | FireSchedules | WritePolicy)
Command = StateCommand | Verify


def from_args(name: str, args: Sequence[Any]) -> Command:
    """The command a log entry of replicated method ``name`` carries (its
    :meth:`args`, as an earlier release may also have written them)."""
    if name == "submit":
        if len(args) > 2:
            return Submit(tuple(args[0]), args[1], assign_entries(args[2]), args[3])
        return Submit(tuple(args[0]), args[1])
    if name == "assign":
        return Assign(tuple(AssignEntry(*e) for e in args[0]), args[1], args[2])
    if name == "complete":
        return Complete(tuple(args[0]), args[1])
    if name == "cancel":
        return Cancel(tuple(args[0]), args[1])
    if name == "requeue":
        return Requeue(tuple(tuple(u) for u in args[0]), args[1], args[2])
    if name == "compact":
        return Compact(args[0], args[1], args[2])
    if name == "verify":
        return Verify(args[0], args[1], args[2], tuple(args[3]))
    if name == "write_settings":
        return WriteSettings(settings_items(args[0]), args[1], bool(args[2]))
    if name == "write_timetable_change":
        return WriteSchedules(tuple(args[0]) if isinstance(args[0], list) else (), args[1])
    if name == "write_timetable_fire":
        return FireSchedules(tuple(tuple(f) for f in args[0] if isinstance(f, (list, tuple)))
                             if isinstance(args[0], list) else (), args[1])
    if name == "write_start_due":
        return StartDue(tuple(str(t) for t in args[0]) if isinstance(args[0], list) else (),
                        args[1])
    if name == "write_usage_policy":
        return WritePolicy(tuple(tuple(o) for o in args[0] if isinstance(o, (list, tuple)))
                           if isinstance(args[0], list) else (), args[1])
    raise ValueError(f"unknown replicated command {name!r}")


def assign_entries(wire: Any) -> tuple[AssignEntry, ...]:
    """Assignments from a log entry (each ``(task_id, chunk, chunk_count, worker[,
    token])``); an entry of another shape is left out (applying never raises)."""
    if not isinstance(wire, (list, tuple)):
        return ()
    return tuple(AssignEntry(*e) for e in wire
                 if isinstance(e, (list, tuple)) and 4 <= len(e) <= 5)


def settings_items(values: Any) -> tuple[tuple[str, str], ...]:
    """A settings mapping from a log entry as sorted (key, value) string pairs; anything
    else in it is left out (applying a command never raises)."""
    if not isinstance(values, dict):
        return ()
    return tuple(sorted((k, v) for k, v in values.items()
                        if isinstance(k, str) and isinstance(v, str)))


__all__ = [
    "COMMAND_IDS",
    "FAST_PATH_PROTOCOL",
    "Assign",
    "AssignEntry",
    "Cancel",
    "Command",
    "Compact",
    "Complete",
    "FireSchedules",
    "Requeue",
    "StartDue",
    "StateCommand",
    "Submit",
    "Verify",
    "WritePolicy",
    "WriteSchedules",
    "WriteSettings",
    "assign_entries",
    "from_args",
    "settings_items",
]
