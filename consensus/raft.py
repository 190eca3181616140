"""Raft replication of :class:`SchedulerState` through PySyncObj.

The only module that imports pysyncobj. :class:`ReplicatedState` is a SyncObj
consumer whose replicated methods call the pure ``apply_*`` methods; :class:`Raft`
owns the SyncObj (journal, dump file, timers, password, bind address).

Threading: PySyncObj applies commands and fires callbacks on its one tick thread.
Readers on other threads go through :meth:`ReplicatedState.read`, which holds the
same lock the apply path holds, so they never see a half-applied command.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.pipe_notifier import PipeNotifier

from taskandgo.consensus.state import SchedulerState

log = logging.getLogger("taskandgo.raft")
T = TypeVar("T")
Listener = Callable[[list], None]

#: Fail reasons after which the command may still commit: retry with the same ids.
MAYBE_COMMITTED = {FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME}


class ReplicatedState(SyncObjConsumer):
    """Replicated wrapper around :class:`SchedulerState`.

    Every replicated method is total: the pure state never raises, and a defect
    that would still raise is caught here and recorded, because a raising
    replicated method wedges the cluster (PySyncObj retries it forever)."""

    def __init__(self, listener: Listener | None = None) -> None:
        # Attributes set before SyncObjConsumer.__init__ are not replicated.
        self._lock = threading.RLock()
        self._listener = listener
        super().__init__()
        self.state = SchedulerState()

    def set_listener(self, listener: Listener | None) -> None:
        self._listener = listener

    def read(self, fn: Callable[[SchedulerState], T]) -> T:
        """Run fn on the state under the apply lock (fn must be quick)."""
        with self._lock:
            return fn(self.state)

    def _deserialize(self, data: dict) -> None:
        with self._lock:
            super()._deserialize(data)

    def _run(self, name: str, *args: Any) -> Any:
        with self._lock:
            try:
                result, events = getattr(self.state, name)(*args)
            except Exception:  # noqa: BLE001 - see class docstring
                log.exception("replicated %s raised; recorded as rejected", name)
                self.state.rejected_commands += 1
                return None
        if events and self._listener is not None:
            try:
                self._listener(events)
            except Exception:  # noqa: BLE001
                log.exception("event listener failed")
        return result

    @replicated
    def submit(self, specs: list, now: float) -> Any:
        return self._run("apply_submit", specs, now)

    @replicated
    def assign(self, assignments: list, now: float, lease_s: float) -> Any:
        return self._run("apply_assign", assignments, now, lease_s)

    @replicated
    def complete(self, results: list, now: float) -> Any:
        return self._run("apply_complete", results, now)

    @replicated
    def cancel(self, task_ids: list, now: float) -> Any:
        return self._run("apply_cancel", task_ids, now)

    @replicated
    def requeue(self, units: list, now: float, reason: str) -> Any:
        return self._run("apply_requeue", units, now, reason)

    @replicated
    def compact(self, now: float, retention_s: float, max_finished: int) -> Any:
        return self._run("apply_compact", now, retention_s, max_finished)


@dataclass(frozen=True)
class RaftTimers:
    """Raft timing. Defaults: sub-second elections that stay quiet on 2 busy cores."""

    election_min_s: float = 0.3
    election_max_s: float = 0.6
    append_entries_period_s: float = 0.005
    tick_period_s: float = 0.005
    leader_fallback_s: float = 2.0


class Raft:
    """One node's Raft member: starts replication and exposes role information."""

    def __init__(
        self,
        self_addr: str,
        partners: list[str],
        data_dir: str,
        bind_host: str,
        password: str | None,
        state: ReplicatedState,
        timers: RaftTimers = RaftTimers(),
        on_state_changed: Callable[[int, int], None] | None = None,
    ) -> None:
        os.makedirs(data_dir, exist_ok=True)
        conf = SyncObjConf(
            bindAddress=f"{bind_host}:{self_addr.rsplit(':', 1)[1]}",
            password=password or None,
            journalFile=os.path.join(data_dir, "raft.journal"),
            fullDumpFile=os.path.join(data_dir, "raft.dump"),
            logCompactionMinEntries=100_000,
            logCompactionMinTime=600,
            logCompactionSplit=True,
            raftMinTimeout=timers.election_min_s,
            raftMaxTimeout=timers.election_max_s,
            appendEntriesPeriod=timers.append_entries_period_s,
            autoTickPeriod=timers.tick_period_s,
            leaderFallbackTimeout=timers.leader_fallback_s,
            connectionRetryTime=0.5,
            connectionTimeout=1.5,
            commandsWaitLeader=False,
            onStateChanged=on_state_changed,
            dynamicMembershipChange=False,
            # Keep PySyncObj's batched append-entries. With appendEntriesUseBatch=False
            # (2x throughput, 4x lower latency here) a stale reply rewinds the
            # leader's nextIndex, and a follower truncates entries it has already
            # applied and acknowledged (PySyncObj logs "truncating already-applied
            # log entries"): a committed entry could then be lost in an election.
        )
        self.state = state
        self._transfer = threading.Event()
        self._notifier: PipeNotifier | None = None
        self._seen = (0, 0)
        self.syncobj = SyncObj(self_addr, partners, conf=conf, consumers=[state])
        self.syncobj.addOnTickCallback(self._on_tick)

    def status(self) -> dict[str, Any]:
        return self.syncobj.getStatus()

    def is_leader(self) -> bool:
        return bool(self.syncobj._isLeader())

    def leader(self) -> str | None:
        leader = self.syncobj._getLeader()
        return None if leader is None else str(leader.address if hasattr(leader, "address")
                                               else leader)

    def is_ready(self) -> bool:
        return self.syncobj.isReady()

    def transfer_leadership(self) -> None:
        """Ask the most caught-up follower to take over (Raft TimeoutNow). Done on the
        tick thread at its next tick, as PySyncObj's own transfers are; best effort:
        poll is_leader()."""
        self._transfer.set()

    def wake(self) -> None:
        """Wake the tick thread now (a command was just proposed) instead of at the
        end of its poll period. Safe from any thread."""
        n = self._notifier
        if n is not None:
            try:
                n.notify()
            except OSError:
                pass  # the pipe is full: the tick thread is already due to wake

    def _on_tick(self) -> None:
        # Runs on the tick thread, holding PySyncObj's callback lock: must not add or
        # remove tick callbacks here.
        so = self.syncobj
        if self._notifier is None:
            # Created here, on the tick thread, so the poller is never changed under it.
            self._notifier = PipeNotifier(so._poller)
        if self._transfer.is_set():
            self._transfer.clear()
            if so._isLeader():
                so.transferLeadership()
        # Adaptive batching. PySyncObj's batched mode sends append-entries once per
        # period, so an idle cluster waits up to a period (plus a poll period) per
        # commit. When this tick appended commands or advanced the commit index, make
        # the next tick send at once and skip its poll wait: commands commit in one
        # round trip when idle, while under load each tick still carries everything
        # that queued up meanwhile (one message per follower per tick).
        if so._isLeader():
            seen = (so._SyncObj__getCurrentLogIndex(), so._SyncObj__raftCommitIndex)
            if seen != self._seen:
                self._seen = seen
                so._SyncObj__newAppendEntriesTime = 0.0
                self.wake()

    def destroy(self) -> None:
        self.syncobj.destroy()


def fail_reason_name(code: int) -> str:
    for name in dir(FAIL_REASON):
        if not name.startswith("_") and getattr(FAIL_REASON, name) == code:
            return name
    return str(code)
