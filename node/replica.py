"""The replica: this node's facade over Raft and the replicated state machine.

Owns the :class:`ReplicatedState` and the :class:`Raft` instance (voters only; a
non-voter has neither), the proposals waiting for their outcome, the cluster
identity and the fail-stop state, and what the voters' releases can read
(``voters_at``). Everything else proposes through :meth:`Replica.propose` and
reads through :meth:`Replica.read`. The constructor starts nothing; :meth:`start`
checks the data dir and starts Raft.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from taskandgo.consensus.commands import Command, Verify, WritePolicy, WriteSettings
from taskandgo.consensus.identity import (
    ClusterIdentity,
    check_data_dir,
    record_cluster_id,
    record_divergence,
)
from taskandgo.consensus.policy import POLICY_PROTOCOL
from taskandgo.consensus.raft import FAIL_REASON, Raft, RaftTimers, ReplicatedState
from taskandgo.consensus.state import FINAL, SchedulerState, priority_name
from taskandgo.node.config import NodeConfig, Voter
from taskandgo.node.events import EventBus
from taskandgo.node.tasks import InvalidTask, check_status
from taskandgo.node.vocabulary import spec_to_api

log = logging.getLogger("taskandgo.node")

#: How often the leader proposes an audit point (ReplicatedState.verify).
VERIFY_EVERY_S = 2.0


class Unavailable(Exception):
    """No leader can be reached now (gRPC UNAVAILABLE / HTTP 503); safe to retry."""


class NotFound(Exception):
    """No such task (gRPC NOT_FOUND / HTTP 404)."""


class Replica:
    """The Raft facade. Thread-safe; callbacks given to the constructor run on the
    Raft tick thread and must not block: ``on_applied`` after every applied
    command's events are published, ``on_role_change`` when this voter's Raft role
    changes, ``on_fatal(reason)`` when this replica has diverged and stopped."""

    def __init__(self, cfg: NodeConfig, timers: RaftTimers, bus: EventBus, *,
                 on_applied: Callable[[], None], on_role_change: Callable[[], None],
                 on_fatal: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.voter: Voter | None = cfg.self_voter
        self.timers = timers
        self.bus = bus
        self._on_applied = on_applied
        self._on_role_change = on_role_change
        self._on_fatal_hook = on_fatal
        self.replicated: ReplicatedState | None = None
        self.raft: Raft | None = None
        self.identity: ClusterIdentity | None = None
        #: Why this replica stopped itself (it diverged from the cluster), or None.
        self.fatal: str | None = None
        self.fatal_event = threading.Event()
        self.elections = 0
        self._raft_to_voter = {v.raft: v for v in cfg.voters}
        self._lock = threading.Lock()
        self._proposals: dict[int, tuple[float, Callable[[Any, int], None]]] = {}
        self._proposal_seq = 0
        # Raft address -> RAFT_PROTOCOL reported by that voter (see voters_at).
        self._voter_levels: dict[str, int] = {}
        self._last_verify = 0.0
        self._warned_strategy = ""
        self._started_wall = time.time()  # see requeue_tail

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Voters: check the data dir's identity (IdentityError when it belongs to
        another cluster or voter set) and start Raft. Non-voters: nothing."""
        if self.voter is None:
            return
        cfg = self.cfg
        self.identity = check_data_dir(cfg.data_dir, [v.raft for v in cfg.voters],
                                       self.voter.raft)
        if self.identity.adopted:
            log.warning("node %s: data dir %s has a journal but no cluster identity "
                        "(written by an earlier release): recorded voters %s for it",
                        self.node_id, cfg.data_dir, ",".join(self.identity.voters))
        self.replicated = ReplicatedState(listener=self._on_state_events)
        partners = [v.raft for v in cfg.voters if v.raft != self.voter.raft]
        self.raft = Raft(self.voter.raft, partners, cfg.data_dir, cfg.bind, cfg.raft_password,
                         self.replicated, self.timers, on_state_changed=self._on_raft_state,
                         fsync=cfg.fsync, cluster_id=self.identity.cluster_id,
                         on_fatal=self._on_fatal, on_cluster_id=self._on_cluster_id)

    def stop(self) -> None:
        if self.raft is not None:
            self.raft.destroy()

    # ------------------------------------------------------------------ raft info

    def is_leader(self) -> bool:
        return self.raft is not None and self.fatal is None and self.raft.is_leader()

    def quorum_age_s(self) -> float:
        """See RaftNode.quorum_age_s (``inf`` when this node does not lead)."""
        if not self.is_leader():
            return float("inf")
        assert self.raft is not None
        return self.raft.quorum_age_s()

    def leader_address(self) -> str | None:
        """The Raft address of the leader this voter knows (None on non-voters)."""
        return self.raft.leader() if self.raft is not None else None

    def leader_voter(self) -> Voter | None:
        """The leader this voter follows, while it is in contact with it (None on
        non-voters, and when no leader is known or the Raft connection to it is down).

        PySyncObj forgets a leader only when an election timeout passes while this
        node is connected to some peer; a node cut off from every peer (the leader
        and the other voters dead) would name a dead leader forever. A leader whose
        connection is down cannot be sending this node entries, so it is not named."""
        if self.raft is None:
            return None
        addr = self.raft.leader()
        if not addr:
            return None
        own = self.cfg.self_voter
        # 2: connected (PySyncObj's CONNECTION_STATE); absent on the leader itself.
        if (own is None or addr != own.raft) and \
                self.raft.status().get(f"partner_node_status_server_{addr}", 2) != 2:
            return None
        return self._raft_to_voter.get(addr)

    def voter_at(self, raft_address: str | None) -> Voter | None:
        return self._raft_to_voter.get(raft_address) if raft_address else None

    def hand_over_leadership(self, timeout_s: float, stop: threading.Event) -> bool:
        """If this node leads, ask a caught-up follower to take over and wait (up to
        timeout_s) until it has; scheduling then stalls for one round, not for an
        election timeout. Returns True when this node no longer leads."""
        if self.raft is None or len(self.cfg.voters) < 2 or not self.raft.is_leader():
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.raft.transfer_leadership()
            step = time.monotonic() + 0.25
            while time.monotonic() < min(step, deadline):
                if not self.raft.is_leader():
                    log.info("node %s: handed leadership over", self.node_id)
                    return True
                stop.wait(0.01)
        log.warning("node %s: leadership handover did not complete", self.node_id)
        return False

    def _on_fatal(self, reason: str) -> None:
        """This replica diverged (on the Raft tick thread, which has already stopped
        applying and acknowledging): stop serving at once, record why in the data dir
        so a restart refuses to rejoin, and let the main loop exit non-zero."""
        self.fatal = reason
        self._on_fatal_hook(reason)
        log.critical("node %s: replica diverged from the cluster, stopping: %s",
                     self.node_id, reason)
        record_divergence(self.cfg.data_dir, reason)
        self.fatal_event.set()

    def _on_cluster_id(self, cluster_id: str) -> None:
        # Tick thread, once per data dir: remember the agreed id beside the journal.
        ident = self.identity
        if ident is not None and ident.cluster_id != cluster_id:
            self.identity = record_cluster_id(self.cfg.data_dir, ident, cluster_id)
            log.info("node %s: cluster id %s recorded in %s", self.node_id, cluster_id,
                     self.cfg.data_dir)

    def _on_raft_state(self, old: int, new: int) -> None:
        self._on_role_change()
        if new == 2:
            self.elections += 1
        if old == 2 and new != 2:
            # Deposed: PySyncObj will not call our own pending commands back.
            threading.Thread(target=self.release_proposals, args=(True,), daemon=True).start()

    def _on_state_events(self, events: list) -> None:
        self.bus.publish([
            {"kind": k, "task_id": tid, "status": st, "chunk": ch, "node": nd, "at": at}
            for (k, tid, st, ch, nd, at) in events])
        self._on_applied()

    # ------------------------------------------------------------------ proposals

    def propose(self, command: Command, *, callback: Callable[[Any, int], None],
                timeout_s: float = 2.0) -> None:
        """Propose a replicated command; callback(result, err) is called exactly once:
        when it applies, when PySyncObj reports failure, or with LEADER_CHANGED after
        timeout_s or when this node stops leading (PySyncObj does not call a deposed
        leader back). A command released that way may still commit later, so every
        caller retries with the same ids or relies on fencing."""
        assert self.replicated is not None
        with self._lock:
            self._proposal_seq += 1
            pid = self._proposal_seq
            self._proposals[pid] = (time.monotonic() + timeout_s, callback)

        def once(result: Any, err: int) -> None:
            with self._lock:
                entry = self._proposals.pop(pid, None)
            if entry is not None:
                entry[1](result, err)

        self._call(command, callback=once)
        if self.raft is not None:
            self.raft.wake()

    def send(self, command: Command) -> None:
        """Propose a command whose outcome nobody waits for (requeue, compact)."""
        self._call(command)

    def _call(self, command: Command, **kw: Any) -> None:
        """The replicated method that carries the command, with its log form."""
        assert self.replicated is not None
        getattr(self.replicated, command.NAME)(*command.args(), **kw)

    def release_proposals(self, everything: bool) -> None:
        """Fail pending proposals that are past their deadline (or all of them)."""
        now = time.monotonic()
        with self._lock:
            due = [pid for pid, (deadline, _) in self._proposals.items()
                   if everything or deadline <= now]
            callbacks = [self._proposals.pop(pid)[1] for pid in due]
        for cb in callbacks:
            try:
                cb(None, FAIL_REASON.LEADER_CHANGED)
            except Exception:
                log.exception("releasing a proposal failed")

    def read(self, fn: Callable[[SchedulerState], Any]) -> Any:
        """fn(state) under the replica's lock: fn must be quick and not keep it."""
        assert self.replicated is not None
        return self.replicated.read(fn)

    # ------------------------------------------------------------------ what voters read

    def note_voter_level(self, raft_address: str, level: int) -> None:
        """A voter reported (in a heartbeat) the RAFT_PROTOCOL its release runs."""
        self._voter_levels[raft_address] = level

    def voters_at(self, level: int) -> bool:
        """True once every other voter has reported a release at RAFT_PROTOCOL
        ``level`` or above. Before that an earlier release's replica would read the
        feature's commands differently (and diverge) or not at all (and wedge)."""
        own = self.voter.raft if self.voter is not None else None
        return all(self._voter_levels.get(v.raft, 0) >= level
                   for v in self.cfg.voters if v.raft != own)

    def requeue_tail(self) -> list:
        """What a requeued unit carries besides its key: this node's start time, once
        every voter knows it (RAFT_PROTOCOL 3). Only a leader already running when a
        unit started can tell that its node died rather than the whole cluster
        restarting (consensus/state.py apply_requeue, the poison rule)."""
        return [self._started_wall] if self.voters_at(3) else []

    def maybe_verify(self, now: float) -> None:
        """Leader: propose an audit point every few seconds (ReplicatedState.verify)
        when the log moved since the last one, once every voter runs a release that
        knows the command."""
        if now - self._last_verify < VERIFY_EVERY_S or self.replicated is None \
                or self.raft is None or not self.voters_at(1):
            return
        self._last_verify = now
        index, window, summary = self.replicated.last_audit()
        if index and self.raft.applied_index() <= index:
            return  # nothing applied since: an idle cluster writes nothing
        proposal = self.replicated.cluster_id or uuid.uuid4().hex
        self.send(Verify(proposal, index, window, tuple(summary)))
        if self.voters_at(4) and not self.read(lambda s: "default_strategy" in s.settings):
            # A cluster without a default strategy yet takes its first leader's (the
            # first applied wins; operators change it with `taskandgo settings`).
            self.send(WriteSettings((("default_strategy", self.cfg.strategy),), time.time(),
                                    only_if_unset=True))
        if self.raft is not None:
            self.raft.wake()

    # ------------------------------------------------------------------ settings

    def default_strategy(self) -> str:
        """The strategy of a task that names none: the cluster's (replicated, one
        value for every node), this node's --strategy until the cluster has one; ""
        on a node without a replica (the voter it forwards a submit to decides)."""
        if self.replicated is None:
            return ""
        cluster = self.read(lambda s: s.settings.get("default_strategy", ""))
        if cluster and cluster != self.cfg.strategy and self._warned_strategy != cluster:
            self._warned_strategy = cluster
            log.warning("node %s was started with strategy %s, but the cluster's default "
                        "strategy is %s: tasks naming none use %s (`taskandgo settings` "
                        "shows and changes it)", self.cfg.node_id, self.cfg.strategy,
                        cluster, cluster)
        return cluster or self.cfg.strategy

    def settings(self) -> dict[str, str]:
        """The cluster-wide settings this replica has applied."""
        return self.read(lambda s: dict(s.settings))

    def write_settings(self, values: dict[str, str], timeout_s: float = 10.0) -> dict[str, str]:
        """Propose settings and wait until applied here (voters; the caller checked
        the values). Unavailable when not committed in time, or while a voter runs a
        release that does not know the command."""
        if not self.voters_at(4):
            raise Unavailable("a voter runs an earlier release that cannot store settings; "
                              "upgrade every voter first")
        fut: Future = Future()

        def done(result: Any, err: int) -> None:
            if err == 0 and isinstance(result, dict):
                fut.set_result(result)
            elif not fut.done():
                fut.set_exception(Unavailable("settings were not committed (no leader?)"))

        self.propose(WriteSettings(tuple(sorted(values.items())), time.time()),
                     callback=done, timeout_s=timeout_s)
        try:
            return dict(fut.result(timeout=timeout_s + 1.0))
        except FutureTimeout:
            raise Unavailable("settings were not committed in time") from None

    # ------------------------------------------------------------------ usage policy

    def policy(self) -> dict[str, Any]:
        """The usage policy this replica has applied (consensus/policy.py)."""
        return self.read(lambda s: s.policy())

    def write_policy(self, ops: list[list[Any]], timeout_s: float = 10.0) -> dict[str, Any]:
        """Propose usage-policy ops (the caller checked them) and wait until applied
        here. Unavailable when not committed in time, or while a voter runs a release
        that does not know the command (RAFT_PROTOCOL 9)."""
        if not self.voters_at(POLICY_PROTOCOL):
            raise Unavailable("a voter runs an earlier release that cannot store concurrency "
                              "limits or fair-share weights; upgrade every voter first")
        fut: Future = Future()

        def done(result: Any, err: int) -> None:
            if err == 0 and isinstance(result, dict):
                fut.set_result(result)
            elif not fut.done():
                fut.set_exception(Unavailable("the policy change was not committed (no leader?)"))

        self.propose(WritePolicy(tuple(tuple(o) for o in ops), time.time()),
                     callback=done, timeout_s=timeout_s)
        try:
            return dict(fut.result(timeout=timeout_s + 1.0))
        except FutureTimeout:
            raise Unavailable("the policy change was not committed in time") from None

    # ------------------------------------------------------------------ client reads

    def get_task(self, task_id: str) -> dict[str, Any]:
        t = self.read(lambda s: dict(s.tasks[task_id].as_dict(),
                                     children=list(s.children.get(task_id, ())))
                      if task_id in s.tasks else None)
        if t is None:
            if self.leader_voter() is None:
                # A voter that has not heard from a leader (just restarted, cut off) may
                # simply not have caught up: let the client ask another node.
                raise Unavailable("this replica has no leader yet and may be behind; retry")
            raise NotFound(f"task {task_id} not found")
        return task_to_api(t)

    def list_page(self, status: str, pairs: list[tuple[str, str]], limit: int,
                  offset: int) -> dict[str, Any]:
        def page(s: SchedulerState) -> tuple[list, int]:
            tasks = s.list_tasks(status, pairs)
            return [dict(t.as_dict(), children=list(s.children.get(t.id, ())))
                    for t in tasks[offset:offset + limit]], len(tasks)

        tasks, total = self.read(page)
        nxt = str(offset + limit) if offset + limit < total else ""
        return {"tasks": [task_to_api(t) for t in tasks], "next_page_token": nxt, "total": total}

    def wait_tasks(self, task_ids: list[str], timeout_s: float) -> dict[str, Any]:
        """Block until every task is final or timeout; returns the tasks known."""
        deadline = time.monotonic() + max(0.0, min(timeout_s or 30.0, 600.0))
        ids = list(dict.fromkeys(task_ids))

        def unfinished(among: set[str]) -> Callable[[SchedulerState], set[str]]:
            return lambda s: {t for t in among
                              if t not in s.tasks or s.tasks[t].status not in FINAL}

        # Check every id once, then only the ids that events name (a full check
        # again whenever events may have been missed), not every id on every event.
        seq = self.bus.seq
        pending = self.read(unfinished(set(ids)))
        last_full = time.monotonic()
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = self.bus.since(seq, min(left, 0.5))
            gap = bool(events) and events[0]["seq"] > seq + 1
            if events:
                seq = events[-1]["seq"]
            if gap or time.monotonic() - last_full > 1.0:
                pending = self.read(unfinished(pending))
                last_full = time.monotonic()
            else:
                touched = {e["task_id"] for e in events} & pending
                if touched:
                    pending -= touched - self.read(unfinished(touched))
        tasks = self.read(lambda s: [s.tasks[t].as_dict() for t in ids if t in s.tasks])
        return {"tasks": [task_to_api(t) for t in tasks], "complete": not pending}

    def status(self, include_digest: bool) -> dict[str, Any]:
        """The replica's part of NodeStatus (voters only)."""
        assert self.raft is not None
        raft = self.raft
        st: dict[str, Any] = {
            "cluster_id": raft.cluster_id, "fsync": self.cfg.fsync,
            "raft_syncs": raft.durability()["syncs"],
            "foreign_peers": [f"{p} (cluster {c})"
                              for p, c in sorted(raft.foreign_peers().items())]}
        rs = raft.status()
        st["role"] = {0: "follower", 1: "candidate", 2: "leader"}.get(rs.get("state", -1),
                                                                      "follower")
        st["raft_term"] = rs.get("raft_term", 0)
        st["commit_index"] = rs.get("commit_idx", 0)
        st["applied_index"] = rs.get("last_applied", 0)
        st["has_quorum"] = bool(rs.get("has_quorum", True))
        byp = self.read(lambda s: dict(s.queued_by_priority))
        st["queue_by_priority"] = {priority_name(p): n for p, n in sorted(byp.items())}
        st["queued"] = sum(byp.values())
        if include_digest:
            def digest(s: SchedulerState) -> tuple[str, int]:
                return hashlib.sha256(repr(s.fingerprint()).encode()).hexdigest(), \
                    raft.status().get("last_applied", 0)

            st["state_digest"], st["applied_index"] = self.read(digest)
        return st


# ---------------------------------------------------------------------- shapes

def list_args(status: str, labels: list[str] | None, limit: int,
              page_token: str) -> tuple[list[tuple[str, str]], int, int]:
    """Check ListTasks arguments (InvalidTask naming the field): the label pairs,
    the page size (0 means 100) and the offset the page token stands for."""
    check_status(status)
    pairs = []
    for item in labels or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise InvalidTask("labels", f"{item!r}: expected key=value")
        pairs.append((k, v))
    if not 0 <= limit <= 10_000:
        raise InvalidTask("limit", "expected 0..10000")
    limit = limit or 100
    try:
        offset = int(page_token or 0)
    except ValueError:
        raise InvalidTask("page_token", "not a token from a previous response") from None
    if offset < 0:
        raise InvalidTask("page_token", "not a token from a previous response")
    return pairs, limit, offset


def dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def task_to_api(t: dict[str, Any]) -> dict[str, Any]:
    """State's task dict -> the API's Task shape (same for gRPC and HTTP)."""
    out = {k: t[k] for k in ("id", "priority", "strategy", "status", "attempts", "node",
                             "exit_code", "result", "error", "created_at", "started_at",
                             "finished_at", "chunk_count", "chunks_done", "chunks",
                             "stderr", "truncated", "output_bytes")}
    for k, default in (("run_at", 0.0), ("schedule_id", ""), ("slot", 0.0)):
        out[k] = t.get(k, default)
    out["parents"] = list(t.get("parents", ()))
    out["children"] = list(t.get("children", ()))
    out["spec"] = spec_to_api(t["spec"])
    out["priority_name"] = t.get("priority_name", "")
    return out


__all__ = ["NotFound", "Replica", "Unavailable", "list_args", "spec_to_api", "task_to_api"]
