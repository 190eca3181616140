"""The records the replicated state is made of: a task, its units, their statuses
and priorities, and the constants the state machine's rules use.

Plain data with no behaviour beyond reading themselves; :mod:`taskandgo.consensus.state`
changes them (and re-exports every name here, under which earlier releases pickled
them).
"""

from __future__ import annotations

from typing import Any

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
#: Accepted with a start time still ahead (spec ``run_at``): kept out of the queue
#: until a leader's ``start_due`` command releases it (RAFT_PROTOCOL 5).
SCHEDULED = "scheduled"
#: Waiting for the tasks its spec names in ``after`` (RAFT_PROTOCOL 7): out of the
#: queue until they have all succeeded (or, with ``after_any``, ended).
WAITING = "waiting"
#: Final: a task it waited for failed or was cancelled (its error names it).
UPSTREAM_FAILED = "upstream_failed"
FINAL = (SUCCEEDED, FAILED, CANCELLED, UPSTREAM_FAILED)
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, SCHEDULED, WAITING,
            UPSTREAM_FAILED)

PRIORITY_LEVELS = {"low": 0, "medium": 10, "high": 20, "critical": 30}
WHOLE = -1  # chunk index of a unit that is a whole task

#: Fencing tokens are below this (they travel as protobuf int64).
MAX_TOKEN = 2 ** 63

#: Stop requeueing a unit whose worker keeps vanishing after this many attempts.
MAX_LOST_ATTEMPTS = 10

#: A unit whose node died while running it (its process restarted after the attempt
#: started, seen by a leader that outlived it: apply_requeue's confirm entries) this
#: many times ends failed instead of being run again: a task that kills or exhausts
#: the node running it would otherwise walk through the cluster taking down one node
#: after another, until Raft loses its majority. Two, not one: a single unrelated
#: crash (an OOM kill caused by another task, a node upgrade past its grace) must not
#: fail a task. A node that only missed its lease (paused, overloaded, partitioned)
#: did not die: that requeue counts towards MAX_LOST_ATTEMPTS only. Units handed
#: back by a node shutting down cleanly do not count.
POISON_AFTER_NODE_LOSSES = 2

Event = tuple  # (kind, task_id, status, chunk, node, at)


def priority_name(value: int) -> str:
    for name, level in PRIORITY_LEVELS.items():
        if level == value:
            return name
    return str(value)


class Unit:
    """One schedulable piece: a whole task or one chunk of a split task."""

    # The order is the snapshot and fingerprint format (__getstate__): never sort it.
    __slots__ = (  # noqa: RUF023
        "status", "attempt", "token", "node", "exit_code", "result", "error",
        "started_at", "finished_at", "qseq", "deadline", "lost", "deaths",
        "stderr", "truncated", "output_bytes",
    )

    def __init__(self) -> None:
        self.status = QUEUED
        self.attempt = 0
        self.token = 0
        self.node = ""
        self.exit_code = 0
        self.result = ""
        self.error = ""
        self.started_at = 0.0
        self.finished_at = 0.0
        self.qseq = 0  # sequence number of this unit's live queue entry (0: none)
        self.deadline = 0.0  # lease deadline of the current assignment
        self.lost = 0  # attempts lost with their worker (not the task's fault)
        self.deaths = 0  # of those, lost with a worker presumed dead (apply_requeue)
        self.stderr = ""  # the tail of the last committed attempt's stderr
        self.truncated = False  # its result holds only the head of its output
        self.output_bytes = 0  # bytes it wrote to stdout in all

    def __getstate__(self) -> tuple:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, st: tuple) -> None:
        # Absent from states pickled before they existed.
        self.deaths = 0
        self.stderr, self.truncated, self.output_bytes = "", False, 0
        for s, v in zip(self.__slots__, st):
            setattr(self, s, v)

    def as_dict(self) -> dict[str, Any]:
        return {s: getattr(self, s) for s in self.__slots__}

    def pristine_qseq(self) -> int | None:
        """The queue entry of a unit never assigned and otherwise at its defaults
        (the form a queued task's unit is kept in: see Task.unit), else None."""
        if self.status == QUEUED and self.attempt == 0 and self.token == 0 \
                and self.node == "" and self.exit_code == 0 and self.result == "" \
                and self.error == "" and self.started_at == 0.0 and self.finished_at == 0.0 \
                and self.deadline == 0.0 and self.lost == 0 and self.deaths == 0 \
                and self.stderr == "" and not self.truncated and self.output_bytes == 0:
            return self.qseq
        return None


#: Read-only stand-in for a unit at its defaults (never assign to it).
_DEFAULT_UNIT = Unit()


class Task:
    """A submitted task. ``unit`` is its own run state while it is not split.

    Until a whole task's unit is first touched it is kept as just its queue
    sequence number (an int, shared with its heap entry) instead of a Unit object:
    ~120 B less per queued task. ``unit`` materialises it; pickling turns a unit
    still at its defaults back into the int, so replicas that materialised at
    different moments have equal snapshots and fingerprints."""

    # The order is the snapshot and fingerprint format (__getstate__): never sort it.
    __slots__ = (  # noqa: RUF023
        "id", "spec", "priority", "strategy", "status", "created_at", "finished_at",
        "retries", "_u", "chunks", "chunk_count", "chunks_done", "key", "result",
        "error", "exit_code", "node",
    )

    def __init__(self, tid: str, spec: dict, priority: int, strategy: str, now: float) -> None:
        self.id = tid
        self.spec = spec
        self.priority = priority
        self.strategy = strategy
        self.status = QUEUED
        self.created_at = now
        self.finished_at = 0.0
        self.retries = int(spec.get("retries", 0) or 0)
        self._u: Unit | int = 0
        self.chunks: list[Unit] | None = None
        self.chunk_count = 0
        self.chunks_done = 0
        self.key = 0.0
        self.result = ""
        self.error = ""
        self.exit_code = 0
        self.node = ""

    def __getstate__(self) -> tuple:
        st = [getattr(self, s) for s in self.__slots__]
        u = self._u
        if isinstance(u, Unit):
            q = u.pristine_qseq()
            if q is not None:
                st[8] = q
        return tuple(st)

    def unit_state(self) -> Any:
        """The whole-task unit in canonical form (the int while at its defaults)."""
        u = self._u
        if isinstance(u, Unit):
            q = u.pristine_qseq()
            return q if q is not None else u.__getstate__()
        return u

    def __setstate__(self, st: tuple) -> None:
        for s, v in zip(self.__slots__, st):
            setattr(self, s, v)

    @property
    def unit(self) -> Unit:
        u = self._u
        if isinstance(u, Unit):
            return u
        unit = Unit()
        unit.qseq = u
        self._u = unit
        return unit

    def peek_unit(self) -> Unit:
        """The unit for reading only: never materialises it."""
        u = self._u
        if isinstance(u, Unit):
            return u
        return _DEFAULT_UNIT

    def live_qseq(self) -> int:
        """The queue sequence number of the whole-task unit (0: not queued)."""
        u = self._u
        if isinstance(u, Unit):
            return u.qseq if u.status == QUEUED else 0
        return u

    def unit_at(self, chunk: int) -> Unit | None:
        if chunk == WHOLE:
            return self.unit if self.chunks is None else None
        if self.chunks is None or not 0 <= chunk < len(self.chunks):
            return None
        return self.chunks[chunk]

    def as_dict(self) -> dict[str, Any]:
        u = self.peek_unit()
        chunks = self.chunks or []
        if self.chunks is None:
            stderr, truncated, output_bytes = u.stderr, u.truncated, u.output_bytes
        else:
            # The failing chunk's stderr says why a split task failed; a succeeded
            # one shows each chunk's in its chunk.
            failed = [c.stderr for c in chunks if c.status == FAILED]
            stderr = failed[0] if failed else ""
            truncated = any(c.truncated for c in chunks)
            output_bytes = sum(c.output_bytes for c in chunks)
        return {
            "id": self.id,
            "spec": self.spec,
            "priority": self.priority,
            "priority_name": priority_name(self.priority),
            "strategy": self.strategy,
            "status": self.status,
            "attempts": u.attempt if self.chunks is None else max(
                (c.attempt for c in self.chunks), default=0),
            "node": self.node or u.node,
            "exit_code": self.exit_code,
            "result": self.result,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": u.started_at if self.chunks is None else min(
                (c.started_at for c in self.chunks if c.started_at), default=0.0),
            "finished_at": self.finished_at,
            "chunk_count": self.chunk_count,
            "chunks_done": self.chunks_done,
            "chunks": [
                {"index": i, "status": c.status, "attempts": c.attempt, "node": c.node,
                 "exit_code": c.exit_code, "result": c.result, "error": c.error,
                 "started_at": c.started_at, "finished_at": c.finished_at,
                 "stderr": c.stderr, "truncated": c.truncated, "output_bytes": c.output_bytes}
                for i, c in enumerate(chunks)
            ],
            "stderr": stderr, "truncated": truncated, "output_bytes": output_bytes,
            # When a delayed task becomes runnable (0.0: at once); in its spec.
            "run_at": float(self.spec.get("run_at", 0.0) or 0.0),
            # A schedule's task: which schedule created it, for which slot.
            "schedule_id": str(self.spec.get("schedule", "") or ""),
            "slot": float(self.spec.get("slot", 0.0) or 0.0),
            "parents": list(self.spec.get("after") or ()),
        }
