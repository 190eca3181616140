"""Raft replication of :class:`SchedulerState` through PySyncObj.

:class:`Raft` owns the SyncObj (journal, dump file, timers, password, bind
address); :class:`SafeSyncObj` is PySyncObj with this project's safety fixes
(durable acknowledgements, conflict-only truncation, cluster identity, fail-stop).
The replicated state it drives, :class:`ReplicatedState`, is in
consensus/replicated.py (re-exported here).

Threading: PySyncObj applies commands and fires callbacks on its one tick thread.
Readers on other threads go through :meth:`ReplicatedState.read`, which holds the
same lock the apply path holds, so they never see a half-applied command.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer
from pysyncobj.journal import FIRST_RECORD_OFFSET
from pysyncobj.pipe_notifier import PipeNotifier
from taskandgo.consensus.durability import DurableJournal, install_durable_replace
from taskandgo.consensus.replicated import (
    Fatal,
    ReplicatedState,
)
from taskandgo.consensus.transport import BoundedTCPTransport

log = logging.getLogger("taskandgo.raft")

#: Fail reasons after which the command may still commit: retry with the same ids.
MAYBE_COMMITTED = {FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME}

# COMMAND_IDS (consensus/commands.py): replicated methods in the order PySyncObj
# numbers them (sorted by name within a code version). Journals store these numbers,
# so a new command must sort after the last one there or every journal on disk would
# replay the wrong methods; tests/cluster/test_upgrade.py pins the list.

#: What this release's state machine understands, reported in heartbeats. The leader
#: uses a feature only once every voter has reported at least its level, so during a
#: rolling upgrade a replica of the earlier release never applies a command it would
#: read differently (diverging) or not at all (wedging). 1: the verify command;
#: 2: fencing tokens chosen by the leader in assign; 3: requeue carries the requeuing
#: node's start time (a loss counts towards the poison rule only if that node
#: outlived it); 4: write_settings (the cluster-wide default strategy); 5: delayed
#: tasks (a submit's ``run_at`` keeps a task out of the queue; write_start_due);
#: 6: periodic schedules (write_timetable_change, write_timetable_fire); 7: task
#: dependencies (a submit's ``after`` keeps a task waiting; complete and cancel
#: release or end its dependents); 8: placement (a submit's ``resources``, ``require``
#: and ``prefer``: a leader of an earlier release would place such a task anywhere);
#: 9: the usage policy (write_usage_policy: concurrency limits and fair-share
#: weights; a submit's ``concurrency_keys`` and tenant label, which a state of an
#: earlier release would neither count nor order by); 10: a submit that carries
#: assignments (the single-task fast path, commands.Submit ``assign``: an earlier
#: release's ``submit`` takes two arguments and would wedge on four).
RAFT_PROTOCOL = 10


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

    # SyncObj's private log (its ``__raftLog``), replaced below by the durable journal;
    # declared because PySyncObj has no types for mypy to find it by.
    _SyncObj__raftLog: Any

    def __init__(self, *args: Any, journal_mode: str = "always", dump_path: str = "",
                 journal_path: str = "", replicated_state: ReplicatedState | None = None,
                 cluster_id: str = "", **kwargs: Any) -> None:
        # Set before SyncObj.__init__ so PySyncObj does not put them in snapshots (it
        # pickles every attribute added after its constructor), and because its tick
        # thread starts inside that constructor.
        self._tg_confirmed_term = -1
        self._tg_confirmed = 0
        self._tg_journal: DurableJournal | None = None
        self._tg_fatal: str | None = None
        self._tg_on_fatal: Fatal | None = None
        self._tg_state = replicated_state
        self._tg_cluster_id = cluster_id
        self._tg_foreign: dict[str, tuple[str, float]] = {}  # peer -> (its cluster id, when)
        self._tg_foreign_logged: dict[str, float] = {}
        super().__init__(*args, **kwargs)
        if journal_path:
            journal = DurableJournal(self._SyncObj__raftLog, journal_path, dump_path,
                                     journal_mode)
            self._SyncObj__raftLog = journal
            self._tg_journal = journal
        transport = self._SyncObj__transport
        send = transport.send

        def tagged_send(node: Any, message: Any) -> Any:
            # Every Raft message names the sender's cluster: a node of another
            # cluster (a copied data dir, a reused address) is refused, not merged.
            if self._tg_cluster_id and isinstance(message, dict):
                message["cid"] = self._tg_cluster_id
            return send(node, message)

        transport.send = tagged_send
        self.addOnTickCallback(self._tg_sync)

    # ---- durability

    def _tg_sync(self) -> None:
        # End of every tick, after append-entries went out: the leader's own fsync
        # overlaps the followers' (they sync before acknowledging). Also at the start
        # of a tick, for entries appended while polling (a new leader's no-op).
        j = self._tg_journal
        if j is not None:
            j.sync()

    def _onTick(self, timeToWait: float = 0.0) -> None:
        if self._tg_fatal is not None:
            time.sleep(min(timeToWait, 0.1) if timeToWait else 0.05)
            return  # stopped: apply, acknowledge and vote no more
        self._tg_sync()  # before the leader counts its own log towards a commit
        SyncObj._onTick(self, timeToWait)

    def _SyncObj__sendNextNodeIdx(self, node: Any, reset: bool = False,
                                  nextNodeIdx: int | None = None, success: bool = False) -> Any:
        if success:
            self._tg_sync()  # acknowledge only what is on stable storage
        if success and nextNodeIdx is not None:
            term = self._SyncObj__raftCurrentTerm
            if term != self._tg_confirmed_term:
                self._tg_confirmed_term, self._tg_confirmed = term, 0
            self._tg_confirmed = max(self._tg_confirmed, nextNodeIdx - 1)
        return SyncObj._SyncObj__sendNextNodeIdx(self, node, reset, nextNodeIdx, success)

    # ---- fail-stop

    def tg_fail_stop(self, reason: str) -> None:
        """Stop this replica at once: no more applying, acknowledging or voting. Safe
        from the tick thread (the only caller besides tests)."""
        if self._tg_fatal is not None:
            return
        self._tg_fatal = reason
        log.critical("REPLICA DIVERGED, stopping: %s", reason)
        if self._tg_on_fatal is not None:
            try:
                self._tg_on_fatal(reason)
            except Exception:
                log.exception("fail-stop handler failed")

    def _SyncObj__doApplyCommand(self, command: Any) -> Any:
        if self._tg_fatal is not None:
            raise RuntimeError("replica stopped: " + self._tg_fatal)
        if self._tg_state is not None:
            self._tg_state.note_entry(command)
        return SyncObj._SyncObj__doApplyCommand(self, command)

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> Any:
        try:
            data = self._SyncObj__serializer.deserialize()
        except Exception as exc:  # noqa: BLE001
            # PySyncObj would log and carry on with an empty state and a cut journal.
            self.tg_fail_stop(f"snapshot {self._tg_dump_name()} is unreadable ({exc!r})")
            return None
        if not clearJournal:
            self._tg_align_journal(data[2], data[1])
        return SyncObj._SyncObj__loadDumpFile(self, clearJournal)

    def _tg_align_journal(self, prev: tuple, last: tuple) -> None:
        """At start, make the journal begin at the snapshot's last two entries when it
        holds them, instead of letting PySyncObj drop it whole.

        PySyncObj cuts the journal only after a snapshot is written. If the node dies
        in between (or its forked snapshot writer outlives it and finishes the file),
        the snapshot is newer than the journal's start; PySyncObj then throws the whole
        journal away and keeps the snapshot's two entries, losing every entry after the
        snapshot, acknowledged ones included (a majority doing this at once loses
        committed tasks: seen in tests/cluster/test_powercut.py). Entries are matched by index
        and term, which identify a Raft entry."""
        log_ = self._SyncObj__raftLog
        n = len(log_)
        if n < 2 or (log_[0][1:] == prev[1:] and log_[1][1:] == last[1:]):
            return
        first, end = log_[0][1], log_[n - 1][1]
        off = prev[1] - first
        if not first <= prev[1] < end or log_[off][1:] != prev[1:] \
                or log_[off + 1][1:] != last[1:]:
            return  # the journal does not hold the snapshot's entries: PySyncObj decides
        log.warning("journal starts at entry %d, before the snapshot's %d (a snapshot "
                    "finished but the journal was not cut): keeping entries %d..%d",
                    first, prev[1], last[1] + 1, end)
        log_.deleteEntriesTo(off)

    def _tg_dump_name(self) -> str:
        return str(getattr(self._SyncObj__conf, "fullDumpFile", "") or "")

    # ---- messages

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> Any:
        if self._tg_fatal is not None:
            return None
        if isinstance(message, dict):
            cid = message.get("cid")
            if cid and self._tg_cluster_id and cid != self._tg_cluster_id:
                self._tg_refuse(node, str(cid))
                return None
            if message.get("type") == "append_entries" and "prevLogIdx" in message \
                    and message.get("transmission") is None:
                message = self._tg_trim_append(message)
                if message is None:
                    return None
        return SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _tg_refuse(self, node: Any, cid: str) -> None:
        peer = str(getattr(node, "address", node))
        now = time.monotonic()
        self._tg_foreign[peer] = (cid, now)
        if now - self._tg_foreign_logged.get(peer, -1e9) > 10.0:
            self._tg_foreign_logged[peer] = now
            log.error("refusing Raft messages from %s: it belongs to cluster %s, this node to "
                      "cluster %s (a data dir from another cluster, or a reused address)",
                      peer, cid, self._tg_cluster_id)

    def tg_foreign_peers(self) -> dict[str, str]:
        """Peers whose messages were refused in the last 30 s, with their cluster ids."""
        now = time.monotonic()
        return {p: c for p, (c, t) in list(self._tg_foreign.items()) if now - t < 30.0}

    def _tg_trim_append(self, message: dict) -> dict | None:
        """The append-entries message PySyncObj should see: trimmed so it truncates
        only on a real conflict, its commit index capped to what the message proves
        matches the leader's log (Raft: min(leaderCommit, index of last new entry);
        PySyncObj would commit entries it never checked), or None after a fail-stop:
        the leader's log disagrees with entries this replica has already applied."""
        term = message["term"]
        if term < self._SyncObj__raftCurrentTerm:
            return message  # PySyncObj ignores it
        prev = message["prevLogIdx"]
        last = self._SyncObj__getCurrentLogIndex()
        if prev >= last:
            return self._tg_cap_commit(message)  # nothing of ours after prev
        applied = self._SyncObj__raftLastApplied
        ours = self._SyncObj__getEntries(prev)  # ours[i] holds index prev + i
        if not ours:
            return message  # before our snapshot: PySyncObj asks for a reset
        if ours[0][2] != message["prevLogTerm"]:
            if prev <= applied:
                self.tg_fail_stop(
                    f"the leader's entry {prev} has term {message['prevLogTerm']}, the one "
                    f"this replica applied has term {ours[0][2]}")
                return None
            return message  # PySyncObj answers the mismatch itself
        entries = message.get("entries") or []
        k = 0
        while k < len(entries) and k + 1 < len(ours) and ours[k + 1][2] == entries[k][2]:
            k += 1
        if k < len(entries):
            # entries[k] conflicts (PySyncObj truncates from it) or lies past our end.
            if k + 1 < len(ours) and prev + k + 1 <= applied:
                self.tg_fail_stop(
                    f"the leader would replace entry {prev + k + 1} (term {entries[k][2]}), "
                    f"which this replica has applied (term {ours[k + 1][2]}; applied up to "
                    f"{applied})")
                return None
            if k == 0:
                return self._tg_cap_commit(message)
            return self._tg_cap_commit(dict(message, prevLogIdx=prev + k,
                                            prevLogTerm=entries[k - 1][2], entries=entries[k:]))
        # Everything sent is already here and our log goes further.
        if ours[-1][2] == term:
            safe = last  # an entry of the leader's term: our whole log is the leader's
        elif self._tg_confirmed_term == term:
            safe = self._tg_confirmed
        else:
            safe = 0
        # Applied entries were committed: every later leader holds them.
        safe = min(last, max(prev + len(entries), safe, applied))
        return self._tg_cap_commit(dict(message, prevLogIdx=safe,
                                        prevLogTerm=ours[safe - prev][2], entries=[]))

    @staticmethod
    def _tg_cap_commit(message: dict) -> dict:
        proven = message["prevLogIdx"] + len(message.get("entries") or [])
        if message.get("commit_index", 0) > proven:
            return dict(message, commit_index=proven)
        return message


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
        fsync: str = "always",
        cluster_id: str = "",
        on_fatal: Fatal | None = None,
        on_cluster_id: Callable[[str], None] | None = None,
    ) -> None:
        """``fsync``: "always" (acknowledge only what is on stable storage) or "never"
        (PySyncObj's own behaviour; see consensus/durability.py). ``cluster_id``: this
        data dir's cluster (empty until agreed). ``on_fatal(reason)`` runs once, on the
        tick thread, when this replica stops because it diverged (must not block)."""
        conf = make_conf(f"{bind_host}:{self_addr.rsplit(':', 1)[1]}", data_dir, password,
                         timers, on_state_changed)
        _drop_empty_journal(conf.journalFile)
        install_durable_replace(fsync == "always")
        self.state = state
        self._transfer = threading.Event()
        self._notifier: PipeNotifier | None = None
        self._seen = (0, 0)
        replicated_state = state if isinstance(state, ReplicatedState) else None
        self.on_fatal = on_fatal
        self._on_cluster_id = on_cluster_id
        if replicated_state is not None:
            replicated_state.on_fatal = self._fail_stop
            replicated_state.on_cluster_id = self._learned_cluster_id
        self.syncobj = SafeSyncObj(self_addr, partners, conf=conf, consumers=[state],
                                   transportClass=BoundedTCPTransport,
                                   journal_mode=fsync, journal_path=conf.journalFile,
                                   dump_path=conf.fullDumpFile,
                                   replicated_state=replicated_state, cluster_id=cluster_id)
        self.syncobj._tg_on_fatal = on_fatal
        self.syncobj.addOnTickCallback(self._on_tick)

    def _fail_stop(self, reason: str) -> None:
        self.syncobj.tg_fail_stop(reason)

    def _learned_cluster_id(self, cluster_id: str) -> None:
        so = getattr(self, "syncobj", None)
        if so is not None and not so._tg_cluster_id:
            so._tg_cluster_id = cluster_id
        elif so is not None and so._tg_cluster_id != cluster_id:
            so.tg_fail_stop(f"this data dir belongs to cluster {so._tg_cluster_id}, but the "
                            f"log it replicated names cluster {cluster_id}")
            return
        if self._on_cluster_id is not None:
            self._on_cluster_id(cluster_id)

    def applied_index(self) -> int:
        return int(self.syncobj.raftLastApplied)

    @property
    def fatal(self) -> str | None:
        return self.syncobj._tg_fatal

    @property
    def cluster_id(self) -> str:
        return self.syncobj._tg_cluster_id

    def durability(self) -> dict[str, Any]:
        j = self.syncobj._tg_journal
        if j is None:
            return {"fsync": "never", "syncs": 0, "sync_seconds": 0.0}
        return {"fsync": j.mode, "syncs": j.syncs, "sync_seconds": j.sync_seconds}

    def foreign_peers(self) -> dict[str, str]:
        return self.syncobj.tg_foreign_peers()

    def status(self) -> dict[str, Any]:
        return self.syncobj.getStatus()

    def is_leader(self) -> bool:
        return bool(self.syncobj._isLeader())

    def quorum_age_s(self) -> float:
        """On the leader: how long ago a majority of the voters (itself included)
        last answered it (0 in a one-voter cluster); ``inf`` on other nodes. A
        leader cut off from a majority keeps believing it leads for up to
        leader_fallback_s; this is how long it has been leading on its own."""
        o = self.syncobj
        if not o._isLeader():
            return float("inf")
        from pysyncobj.monotonic import monotonic

        now = monotonic()
        others = list(o._SyncObj__otherNodes)
        seen = o._SyncObj__lastResponseTime
        times = sorted([now] + [seen.get(n, 0.0) for n in others], reverse=True)
        return max(0.0, now - times[(len(others) + 1) // 2])

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


def _drop_empty_journal(path: str) -> None:
    """A journal file shorter than its header was created and never synced (a power
    cut right after a node's first start, or any cut with --fsync never): it holds no
    entry, and PySyncObj cannot open it (an empty file cannot be mapped)."""
    try:
        if os.path.getsize(path) < FIRST_RECORD_OFFSET:
            log.warning("journal %s is shorter than its header (never synced): starting "
                        "it afresh", path)
            os.remove(path)
    except FileNotFoundError:
        pass


def fail_reason_name(code: int) -> str:
    for name in dir(FAIL_REASON):
        if not name.startswith("_") and getattr(FAIL_REASON, name) == code:
            return name
    return str(code)
