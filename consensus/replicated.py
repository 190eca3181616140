"""The replicated wrapper around :class:`SchedulerState` (a PySyncObj consumer).

:class:`ReplicatedState`'s replicated methods rebuild each log entry as its typed
command (consensus/commands.py) and apply it to the pure state under one lock, so
readers on other threads (:meth:`ReplicatedState.read`) never see a half-applied
command; it also writes and reads the versioned snapshot and runs the divergence
audit (``verify``). consensus/raft.py owns the SyncObj that drives it. This module
and consensus/raft.py are the only ones that import pysyncobj.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pysyncobj import SyncObjConsumer, replicated
from taskandgo.consensus.commands import (
    Assign,
    AssignEntry,
    Cancel,
    Compact,
    Complete,
    FireSchedules,
    Requeue,
    StartDue,
    StateCommand,
    Submit,
    WritePolicy,
    WriteSchedules,
    WriteSettings,
    assign_entries,
    settings_items,
)
from taskandgo.consensus.snapshot import needs_version
from taskandgo.consensus.state import SchedulerState

log = logging.getLogger("taskandgo.raft")
T = TypeVar("T")
Listener = Callable[[list], None]
Fatal = Callable[[str], None]

#: The snapshot format (docs/architecture.md, "Snapshot format"): a snapshot holds
#: {"format": SNAPSHOT_FORMAT, "version": N, ...} of plain data, never pickled classes.
SNAPSHOT_FORMAT = "taskandgo.snapshot"
SNAPSHOT_VERSION = 3


class _SnapshotData:
    """What :meth:`ReplicatedState._serialize` hands PySyncObj: pickled (in its forked
    snapshot writer) as a plain dict built at that moment, so the snapshot file holds
    only builtins, and the tick thread never walks the whole state."""

    __slots__ = ("_rs",)

    def __init__(self, rs: ReplicatedState) -> None:
        self._rs = rs

    def __reduce__(self) -> tuple:
        # In the forked writer: one thread, a frozen copy of memory. Taking the state
        # lock here could wait forever for a thread that does not exist in the child
        # (a reader holding it at fork time); nothing applies in the child anyway.
        return (dict, (self._rs.snapshot(locked=False),))


def _summary(s: SchedulerState, cluster_id: str) -> list:
    """A cheap digest of a state: equal on replicas that applied the same log."""
    return [cluster_id, len(s.tasks), s.seq, s.next_token, s.committed_results,
            s.dropped_results, s.rejected_commands, len(s.running), len(s.finished),
            sum(s.queued_by_priority.values()), s.now]


class ReplicatedState(SyncObjConsumer):
    """Replicated wrapper around :class:`SchedulerState`.

    Every replicated method is total: the pure state never raises, and a defect
    that would still raise is caught here and recorded, because a raising
    replicated method wedges the cluster (PySyncObj retries it forever)."""

    def __init__(self, listener: Listener | None = None) -> None:
        # Attributes set before SyncObjConsumer.__init__ are not replicated.
        self._lock = threading.RLock()
        self._listener = listener
        #: Called (on the tick thread) when this replica finds it diverged.
        self.on_fatal: Fatal | None = None
        #: Called (on the tick thread) when the cluster id is first applied here.
        self.on_cluster_id: Callable[[str], None] | None = None
        # Divergence audit (see verify): hash of the entries applied since the last
        # audit, and this replica's records of recent audits.
        self._window = hashlib.blake2b(digest_size=16)
        self._window_whole = False  # False until an audit boundary after a restore
        self._audits: dict[int, tuple[str, list]] = {}
        self._last_audit: tuple[int, str, list] = (0, "", [])
        self.diverged = ""
        super().__init__()
        self.state = SchedulerState()
        self.cluster_id = ""

    def set_listener(self, listener: Listener | None) -> None:
        self._listener = listener

    def read(self, fn: Callable[[SchedulerState], T]) -> T:
        """Run fn on the state under the apply lock (fn must be quick)."""
        with self._lock:
            return fn(self.state)

    # ---- snapshots (versioned plain data; see SNAPSHOT_FORMAT)

    def snapshot(self, locked: bool = True) -> dict[str, Any]:
        """The versioned snapshot of this replica (see SNAPSHOT_FORMAT)."""
        if locked:
            with self._lock:
                return self.snapshot(locked=False)
        state = self.state.to_snapshot()
        # The oldest version that holds it: an earlier release still reads a snapshot
        # without the newer records (delayed tasks), and refuses one with them.
        return {"format": SNAPSHOT_FORMAT, "version": needs_version(state),
                "cluster_id": self.cluster_id, "state": state}

    def _serialize(self) -> Any:
        return _SnapshotData(self)

    def _deserialize(self, data: Any) -> None:
        with self._lock:
            if isinstance(data, dict) and data.get("format") == SNAPSHOT_FORMAT:
                version = data.get("version")
                if not isinstance(version, int) or version > SNAPSHOT_VERSION:
                    self._fatal(f"snapshot format version {version!r} is newer than this "
                                f"release reads ({SNAPSHOT_VERSION}): run the newer release")
                    return
                self.state = SchedulerState.from_snapshot(data["state"])
                self.cluster_id = str(data.get("cluster_id") or "")
            elif isinstance(data, dict) and isinstance(data.get("state"), SchedulerState):
                # Release 0.1.0 pickled the SchedulerState object itself (without the
                # attributes added since, which start empty).
                self.state = data["state"]
                # Every attribute added since, as a new state has it (settings,
                # delayed tasks, schedules, dependencies, the usage policy, ...).
                for name, value in vars(SchedulerState()).items():
                    if not hasattr(self.state, name):
                        setattr(self.state, name, value)
                self.cluster_id = str(data.get("cluster_id") or "")
            else:
                self._fatal(f"unrecognised snapshot contents ({type(data).__name__})")
                return
            self._window = hashlib.blake2b(digest_size=16)
            self._window_whole = False
        if self.cluster_id and self.on_cluster_id is not None:
            self.on_cluster_id(self.cluster_id)

    def _fatal(self, reason: str) -> None:
        if not self.diverged:
            self.diverged = reason
            if self.on_fatal is not None:
                self.on_fatal(reason)

    # ---- divergence audit

    def note_entry(self, command: bytes) -> None:
        """Every applied log entry, in order (called by SafeSyncObj before applying)."""
        self._window.update(command)

    def last_audit(self) -> tuple[int, str, list]:
        """(log index, entry hash, state summary) of the last audit applied here: what
        the leader's next verify command carries for every replica to compare."""
        with self._lock:
            return self._last_audit

    def _run(self, command: StateCommand) -> Any:
        with self._lock:
            try:
                result, events = command.apply(self.state)
            except Exception:
                log.exception("replicated %s raised; recorded as rejected", command.NAME)
                self.state.rejected_commands += 1
                return None
        if events and self._listener is not None:
            try:
                self._listener(events)
            except Exception:
                log.exception("event listener failed")
        return result

    @replicated
    def submit(self, specs: list, now: float, assign: Any = None, lease_s: Any = 0.0) -> Any:
        """Accept tasks; with ``assign`` (RAFT_PROTOCOL 10, the fast path) also give
        some of them to workers in the same step (see commands.Submit)."""
        if assign is None:
            return self._run(Submit(tuple(specs), now))
        return self._run(Submit(tuple(specs), now, assign_entries(assign), lease_s))

    @replicated
    def assign(self, assignments: list, now: float, lease_s: float) -> Any:
        return self._run(Assign(tuple(AssignEntry(*a) for a in assignments), now, lease_s))

    @replicated
    def complete(self, results: list, now: float) -> Any:
        return self._run(Complete(tuple(results), now))

    @replicated
    def cancel(self, task_ids: list, now: float) -> Any:
        return self._run(Cancel(tuple(task_ids), now))

    @replicated
    def requeue(self, units: list, now: float, reason: str) -> Any:
        return self._run(Requeue(tuple(units), now, reason))

    @replicated
    def compact(self, now: float, retention_s: float, max_finished: int) -> Any:
        return self._run(Compact(now, retention_s, max_finished))

    @replicated
    def write_settings(self, values: dict, now: float, only_if_unset: bool) -> Any:
        """Cluster-wide settings (RAFT_PROTOCOL 4; sorts after every earlier command,
        so journals written before it keep their method numbers)."""
        return self._run(WriteSettings(settings_items(values), now, bool(only_if_unset)))

    @replicated
    def write_start_due(self, task_ids: list, now: float) -> Any:
        """Release due delayed tasks (RAFT_PROTOCOL 5; spelled to sort after every
        earlier command)."""
        return self._run(StartDue(tuple(str(t) for t in task_ids)
                                  if isinstance(task_ids, list) else (), now))

    @replicated
    def write_timetable_change(self, ops: list, now: float) -> Any:
        """Create, pause, resume, delete schedules (RAFT_PROTOCOL 6)."""
        return self._run(WriteSchedules(tuple(ops) if isinstance(ops, list) else (), now))

    @replicated
    def write_timetable_fire(self, fires: list, now: float) -> Any:
        """Fire schedule slots, each at most once (RAFT_PROTOCOL 6)."""
        return self._run(FireSchedules(tuple(tuple(f) for f in fires)
                                       if isinstance(fires, list) else (), now))

    @replicated
    def write_usage_policy(self, ops: list, now: float) -> Any:
        """Concurrency limits, fair-share weights, the tenant label (RAFT_PROTOCOL 9;
        sorts after every earlier command)."""
        return self._run(WritePolicy(tuple(tuple(o) for o in ops
                                           if isinstance(o, (list, tuple)))
                                     if isinstance(ops, list) else (), now))

    @replicated
    def verify(self, cluster_id: str, prev_index: int, prev_window: str,
               prev_summary: list) -> Any:
        """Audit point, proposed by the leader every few seconds. Applying it, every
        replica (1) adopts ``cluster_id`` if the cluster has none yet (the first one
        applied wins); (2) compares the leader's record of the previous audit (hash of
        the entries between the two audits before it, and a state summary) with its
        own record at the same log index: a difference means the replicas diverged,
        and this replica stops (fail-stop, never serve diverged); (3) records its own
        hash and summary at this index and starts a new window. Total: never raises."""
        try:
            return self._verify(cluster_id, prev_index, prev_window, prev_summary)
        except Exception:
            log.exception("verify raised; ignored")
            return None

    def _verify(self, cluster_id: str, prev_index: int, prev_window: str,
                prev_summary: list) -> Any:
        so = self._syncObj
        index = so.raftLastApplied + 1 if so is not None else 0
        learned = ""
        with self._lock:
            if not self.cluster_id and cluster_id:
                self.cluster_id = learned = str(cluster_id)
            mine = self._audits.get(prev_index)
            if mine is not None and prev_summary:
                window, summary = mine
                if list(prev_summary) != summary:
                    self._fatal(f"state summary at log index {prev_index} differs from the "
                                f"leader's: ours {summary}, leader's {list(prev_summary)}")
                elif window and prev_window and window != prev_window:
                    self._fatal(f"log entries before index {prev_index} differ from the "
                                "leader's (entry hash mismatch)")
            window = self._window.hexdigest() if self._window_whole else ""
            summary = _summary(self.state, self.cluster_id)
            self._audits[index] = (window, summary)
            while len(self._audits) > 64:
                del self._audits[min(self._audits)]
            self._last_audit = (index, window, summary)
            self._window = hashlib.blake2b(digest_size=16)
            self._window_whole = True
        if learned and self.on_cluster_id is not None:
            self.on_cluster_id(learned)
        return index


__all__ = ["SNAPSHOT_FORMAT", "SNAPSHOT_VERSION", "Fatal", "Listener", "ReplicatedState"]
