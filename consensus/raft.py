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


class SafeSyncObj(SyncObj):
    """SyncObj whose followers truncate their log only on a real conflict.

    PySyncObj 0.3.17 deletes every entry after ``prevLogIdx`` whenever an
    append-entries message starts before the end of the follower's log, even when
    the entries match. A stale message (the leader rewinds nextIndex after a reset
    reply, a reconnect, a restart) then makes a follower drop entries it has already
    acknowledged to this leader, which the leader has counted towards a majority: a
    committed entry could be lost in a later election. Raft (section 5.3) deletes
    only from the first entry whose term conflicts. The message is trimmed before
    PySyncObj sees it, so its own code does the rest unchanged:

    * entries the follower already holds with the same term are dropped from the
      message (the reply still names the leader's last entry, as before);
    * if every entry is already held and the follower's log goes further, the
      message is moved to the furthest index known to match the leader's log (an
      entry of the leader's term, or one this follower has acknowledged in this
      term); only entries beyond that, never acknowledged in this term, may go.
    """

    _tg_confirmed_term = -1
    _tg_confirmed = 0

    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):
        if success and nextNodeIdx is not None:
            term = self._SyncObj__raftCurrentTerm
            if term != self._tg_confirmed_term:
                self._tg_confirmed_term, self._tg_confirmed = term, 0
            self._tg_confirmed = max(self._tg_confirmed, nextNodeIdx - 1)
        return SyncObj._SyncObj__sendNextNodeIdx(self, node, reset, nextNodeIdx, success)

    def _SyncObj__onMessageReceived(self, node, message):
        if isinstance(message, dict) and message.get("type") == "append_entries" \
                and "prevLogIdx" in message and message.get("transmission") is None:
            message = self._tg_trim_append(message)
        return SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _tg_trim_append(self, message: dict) -> dict:
        term = message["term"]
        if term < self._SyncObj__raftCurrentTerm:
            return message  # PySyncObj ignores it
        prev = message["prevLogIdx"]
        last = self._SyncObj__getCurrentLogIndex()
        if prev >= last:
            return message  # nothing of ours after prev: no truncation anyway
        ours = self._SyncObj__getEntries(prev)  # ours[i] holds index prev + i
        if not ours or ours[0][2] != message["prevLogTerm"]:
            return message  # PySyncObj answers the mismatch itself
        entries = message.get("entries") or []
        k = 0
        while k < len(entries) and k + 1 < len(ours) and ours[k + 1][2] == entries[k][2]:
            k += 1
        if k < len(entries):
            # entries[k] conflicts (PySyncObj truncates from it) or lies past our end.
            if k == 0:
                return message
            return dict(message, prevLogIdx=prev + k, prevLogTerm=entries[k - 1][2],
                        entries=entries[k:])
        # Everything sent is already here and our log goes further.
        if ours[-1][2] == term:
            safe = last  # an entry of the leader's term: our whole log is the leader's
        elif self._tg_confirmed_term == term:
            safe = self._tg_confirmed
        else:
            safe = 0
        safe = min(last, max(prev + len(entries), safe))
        return dict(message, prevLogIdx=safe, prevLogTerm=ours[safe - prev][2], entries=[])


@dataclass(frozen=True)
class RaftTimers:
    """Raft timing. Defaults: sub-second elections that stay quiet on 2 busy cores."""

    election_min_s: float = 0.3
    election_max_s: float = 0.6
    append_entries_period_s: float = 0.005
    tick_period_s: float = 0.005
    leader_fallback_s: float = 2.0
    #: Snapshot (and journal compaction) at least this often; also after 100k entries.
    snapshot_interval_s: float = 600.0


def make_conf(bind: str, data_dir: str, password: str | None, timers: RaftTimers,
              on_state_changed: Callable[[int, int], None] | None = None) -> SyncObjConf:
    """The PySyncObj settings every node uses (bench/consensus.py uses them too)."""
    os.makedirs(data_dir, exist_ok=True)
    return SyncObjConf(
        bindAddress=bind,
        password=password or None,
        # Journal and dump file together: a journal alone loses state after compaction,
        # and the dump file keeps snapshots off the tick thread (a forked writer).
        journalFile=os.path.join(data_dir, "raft.journal"),
        fullDumpFile=os.path.join(data_dir, "raft.dump"),
        logCompactionMinEntries=100_000,
        logCompactionMinTime=timers.snapshot_interval_s,
        logCompactionSplit=True,  # the nodes take turns, never all at once
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
        # Batched append-entries (the default). Raft.wake and the tick hook below make
        # it adaptive: sent at once when idle, one message per tick under load.
    )


class Raft:
    """One node's Raft member: starts replication and exposes role information."""

    def __init__(
        self,
        self_addr: str,
        partners: list[str],
        data_dir: str,
        bind_host: str,
        password: str | None,
        state: SyncObjConsumer,
        timers: RaftTimers = RaftTimers(),
        on_state_changed: Callable[[int, int], None] | None = None,
    ) -> None:
        conf = make_conf(f"{bind_host}:{self_addr.rsplit(':', 1)[1]}", data_dir, password,
                         timers, on_state_changed)
        self.state = state
        self._transfer = threading.Event()
        self._notifier: PipeNotifier | None = None
        self._seen = (0, 0)
        self.syncobj = SafeSyncObj(self_addr, partners, conf=conf, consumers=[state])
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
