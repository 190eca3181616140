"""Scheduling: the leader's side of a node.

While this node is the Raft leader (and an entry of its own term has applied), the
:class:`Scheduler`'s thread plans queued units onto workers and proposes the
assignments, hands committed ones to the dispatcher, requeues units whose lease ran
out, commits reported results (with retry backoff), holds lower units back for an
urgent submit, audits the log and compacts finished tasks. Every decision is made
by a pure function of ``node/decisions.py`` on a view built here from the replica
and the worker table; this module only builds views and carries actions out.

It owns the leader's in-memory state (rebuilt by every new leader): the worker
table from heartbeats, assignments proposed and not applied, results being
committed, the priority floor, the run-time average, recent requeues. The
constructor starts nothing; :meth:`start` starts the leader thread (voters only).
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from itertools import chain
from typing import Any, NamedTuple

import grpc
from taskandgo.consensus.commands import (
    FAST_PATH_PROTOCOL,
    Assign,
    AssignEntry,
    Compact,
    Complete,
    Requeue,
)
from taskandgo.consensus.policy import spec_keys
from taskandgo.consensus.state import SchedulerState, priority_name
from taskandgo.node import decisions as d
from taskandgo.node.config import NodeConfig
from taskandgo.node.dispatching import Dispatcher, Peers
from taskandgo.node.events import EventBus, event
from taskandgo.node.placement import spec_prefer, spec_request, spec_require
from taskandgo.node.policies import key_room_of
from taskandgo.node.replica import Replica, Unavailable
from taskandgo.node.security import PeerIdentity, PermissionDenied
from taskandgo.node.timing import Timekeeper
from taskandgo.node.worker import WorkerSide
from taskandgo.node.worker_table import WorkerInfo, WorkerTable
from taskandgo.protos import peer_pb2
from taskandgo.strategies import QueuedUnit

log = logging.getLogger("taskandgo.node")

MAX_INFLIGHT_ASSIGNS = 3
#: At most this many holds' floors kept (each lasts a few seconds at most).
MAX_FLOORS = 1000
#: A hold names at most this many tasks (a bigger submit's floor lifts at expiry).
MAX_HOLD_IDS = 5000


def _unit_of(s: SchedulerState) -> Callable[[d.UnitKey], d.ReplicaUnit | None]:
    """Look a unit up in the replica, as decisions.ReplicaUnit (under its lock)."""
    def unit(key: d.UnitKey) -> d.ReplicaUnit | None:
        t = s.tasks.get(key[0])
        u = t.unit_at(key[1]) if t is not None else None
        return None if u is None else d.ReplicaUnit(u.status, u.token, s.running.get(key))
    return unit


class _Pending:
    """The results of one report being committed: :meth:`wait` answers True once
    every one of them is committed (they may go in several commands), False once
    this node stops leading (the worker reports them again to the next leader).
    One per report, not one per result: the leader accepts thousands a second.
    Counted under the scheduler's lock."""

    __slots__ = ("_event", "left", "ok", "over")

    def __init__(self, n: int) -> None:
        self.left = n
        self.ok = False
        self.over = n == 0
        self._event = threading.Event()
        if self.over:
            self.ok = True
            self._event.set()

    def committed(self, n: int) -> None:
        self.left -= n
        if self.left <= 0 and not self.over:
            self.ok = self.over = True
            self._event.set()

    def fail(self) -> None:
        if not self.over:
            self.over = True
            self._event.set()

    def wait(self, timeout_s: float) -> bool:
        return self._event.wait(timeout_s) and self.ok


class _TokenSource:
    """Random fencing tokens in [1, 2**63), from the OS's random source read 4 KiB
    at a time: each read lets go of the GIL, and the leader thread then waits for
    it behind the busy threads (a read per token cost the leader thread a sixth of
    its time in the bulk benchmark). Thread-safe."""

    def __init__(self) -> None:
        self._buf = b""
        self._lock = threading.Lock()

    def take(self, n: int) -> list[int]:
        need = 8 * n
        with self._lock:
            if len(self._buf) < need:
                self._buf += secrets.token_bytes(max(4096, need))
            raw, self._buf = self._buf[:need], self._buf[need:]
        return [(int.from_bytes(raw[i:i + 8], "big") >> 1) or 1 for i in range(0, need, 8)]


_fencing_tokens = _TokenSource().take


class FastPath(NamedTuple):
    """Assignments planned for a submit's own tasks (Scheduler.fast_path): the
    entries and lease the submit command carries, and ``done(assign result, err)``,
    to be called exactly once with the command's outcome (its assign part): it hands
    the committed units to the dispatcher and stops counting them in flight."""

    entries: tuple[AssignEntry, ...]
    lease_s: float
    done: Callable[[Any, int], None]


def _fast_path_spec(spec: Mapping[str, Any]) -> bool:
    """A spec the fast path may assign in its submit: one the state queues at once
    (no parents, no start time) and that no usage policy limits (concurrency keys:
    the state may refuse their assignment)."""
    return not (spec.get("after") or spec.get("run_at") is not None
                or spec.get("concurrency_keys"))


class Scheduler:
    """The leader. Thread-safe; ``observe(name, seconds)`` records a metric."""

    def __init__(self, cfg: NodeConfig, replica: Replica, bus: EventBus, worker: WorkerSide,
                 dispatcher: Dispatcher, peers: Peers, stop: threading.Event, *,
                 observe: Callable[[str, float], None],
                 guard: Callable[[Callable[[], None]], Callable[[], None]]) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.replica = replica
        self.bus = bus
        self.worker = worker
        self.dispatcher = dispatcher
        self.peers = peers
        self._stop = stop
        self._observe = observe
        self._guard = guard
        self._lock = threading.RLock()
        self._assign_cond = threading.Condition(self._lock)
        self._plan_lock = threading.Lock()
        self.table = WorkerTable(cfg, bus, worker, self._lock)
        self.workers = self.table.workers  # the same dict, under the same lock
        self._wake = threading.Event()
        self.leader_since: float | None = None
        self.ready = False
        self._last_leader: str | None = None
        # Assignments proposed but not yet applied, by command: planning skips their
        # units and counts their slots, so several assign commands can be in flight.
        self._assigning: dict[int, list[d.InFlight]] = {}
        self._assign_seq = 0
        # Units whose result is being committed: they no longer hold a slot.
        self._completing: dict[tuple[str, int], str] = {}
        self._completions: list[tuple[dict[str, Any], _Pending | None]] = []
        self._complete_inflight = 0
        self._requeue_recent: dict[d.AttemptKey, float] = {}
        self._missing: dict[d.AttemptKey, float] = {}  # see decisions.LeaseView
        self._retry_seen: dict[d.UnitKey, tuple[float, float]] = {}  # see due_retry_tick
        # Poison rule: attempts requeued from a worker, kept until it is heard from
        # again: as a new process (it died running them: confirm) or the same one
        # (paused or cut off: forget). worker -> [(attempt key, attempt start)]
        self._lost_on: dict[str, list[tuple[d.AttemptKey, float]]] = {}
        # While a hold's submit is in progress: plan nothing below its priority
        # (decisions.live_floors says when each is lifted).
        self._floors: tuple[d.Floor, ...] = ()
        self._offers_cache: tuple[float, list[peer_pb2.NodeOffer]] | None = None
        # Moving average of recent units' run times per kind of unit (decisions.
        # unit_kind; empty: none seen as leader yet), and the kind of each unit
        # whose result is being committed.
        self._run_s_by_kind: dict[str, float] = {}
        self._kind_of: dict[tuple[str, int], str] = {}
        #: The last planning round's queue head (see _queued_head); read only on the
        #: leader thread.
        self._head_cache: dict[tuple[str, int], tuple[Any, int, QueuedUnit]] = {}
        self._last_compact = 0.0
        self._self_hb_at = 0.0
        # Delayed tasks (and schedules): released by the leader (node/timing.py).
        self.timing = Timekeeper(replica.read, replica.propose, observe=observe)

    def start(self) -> None:
        if self.replica.raft is not None:
            threading.Thread(target=self._guard(self._loop), name="leader", daemon=True).start()

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        raft = self.replica.raft
        assert raft is not None
        last_lease_check = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            leader = raft.leader()
            if leader != self._last_leader:
                self._last_leader = leader
                v = self.replica.voter_at(leader)
                self.bus.publish([event("leader", "changed" if v else "none",
                                        self.table.voter_node_id(v) if v else "", at=time.time())])
            if not raft.is_leader():
                if self.leader_since is not None:
                    log.info("node %s: no longer leader", self.node_id)
                self.leader_since = None
                self.ready = False
                continue
            now = time.monotonic()
            if self.leader_since is None:
                self._become_leader(now)
            if not self.ready:
                continue
            self._heartbeat_self()
            self._flush_completions()
            self.timing.step()
            if len(self._assigning) < MAX_INFLIGHT_ASSIGNS:
                self._plan_and_assign()
            if now - last_lease_check > 0.2:
                last_lease_check = now
                self._check_leases(now)
            self.replica.maybe_verify(now)
            if now - self._last_compact > 10.0:
                self._last_compact = now
                self.replica.send(Compact(time.time(), self.cfg.retention_s,
                                          self.cfg.max_finished))

    def _become_leader(self, now: float) -> None:
        """A new leader: forget the old view of workers (they get a full lease to
        report in) and wait until an entry of our term has applied, so the state
        read below includes every committed command."""
        log.info("node %s: became leader", self.node_id)
        self.leader_since = now
        self._missing = {}
        self._retry_seen = {}
        self.timing.reset()
        with self._lock:
            self._assigning.clear()
            self._completing.clear()
            self._run_s_by_kind = {}
            self._kind_of.clear()
            for w in self.workers.values():
                w.last_seen = now
        self.bus.publish([event("leader", "elected", self.node_id, at=time.time())])

        def ready(_: Any, err: int) -> None:
            if err == 0 and self.leader_since == now:
                self.ready = True
            self._wake.set()

        self.ready = False
        self.replica.propose(Requeue((), time.time()), callback=ready)

    def _heartbeat_self(self) -> None:
        now = time.monotonic()
        if now - self._self_hb_at < self.cfg.heartbeat_s / 2:
            return
        self._self_hb_at = now
        self.worker.kill(self._record_heartbeat(self.worker.heartbeat_request()))
        self.worker.note_offers(self._node_offers())

    # ------------------------------------------------------------------ planning

    def _plan_and_assign(self) -> None:
        # One planner at a time (the leader thread's rounds and fast-path submits):
        # each must see the other's proposals among the units in flight.
        with self._plan_lock:
            self._plan_and_assign_locked()

    def _plan_and_assign_locked(self) -> None:
        now = time.monotonic()
        got = self._plan_view(now)
        if got is None:
            return
        view, floors = got
        depth = d.queue_depth_needed(view)
        if depth:
            # With the queue's priorities as of this read: an urgent unit queued
            # in between turns prefetch off and lifts a floor (a longer head than
            # then needed is harmless: a plan stops when the slots are full).
            head, prios = self.replica.read(lambda s: (self._queued_head(s, depth),
                                                       frozenset(s.queued_by_priority)))
            view = replace(view, queued=head, queued_priorities=prios | view.queued_priorities)
        actions = d.plan_round(view)
        if actions.assignments:
            prio = {u.task_id: u.priority for u in view.queued}
            req = {u.task_id: u.request for u in view.queued if u.request}
            self._propose_assign(actions.assignments, prio, floors, req)

    def _plan_view(self, now: float) -> tuple[d.PlanView, tuple[d.Floor, ...]] | None:
        """A planning round's view of everything but the queue's head (the live
        workers, the units running, held, in flight and undelivered, the queued and
        arriving priorities, the floor), and the floors it was made with. None: no
        live worker. Under _plan_lock."""
        with self._lock:
            live = d.live_workers([w.view() for w in self.workers.values()], now,
                                  self.cfg.lease_s)
            if not live:
                return None
            in_flight = tuple(chain.from_iterable(self._assigning.values()))
            completing = list(self._completing.items())
            reported = [(w.node_id, w.running) for w in live if w.running]
            floors = self._floors
        # ``completing`` goes into the running summary (the view's own is not read).
        base = d.PlanView(now, live, in_flight=in_flight,
                          run_s_by_kind=self._run_s_by_kind,
                          undelivered=self.dispatcher.undelivered())

        # Two short reads, not one long one: the running units (summed up),
        # then, once the free slots are known, just enough of the queue's head. The
        # replica's lock is held about as long as the tick thread can afford. What
        # applies in between only frees slots or adds in-flight units already
        # counted, so the second read never lets a worker take more than it has.
        arriving = self.timing.arriving

        def running(s: SchedulerState) -> tuple[d.RunningSummary, frozenset[int],
                                                 dict[str, int], tuple[d.Floor, ...],
                                                 dict[str, int] | None]:
            tasks = s.tasks
            # Summed up here, not one RunningView per unit (see PlanView.running_summary).
            def request(tid: str) -> tuple[tuple[str, float], ...]:
                t = tasks.get(tid)
                return spec_request(t.spec) if t is not None and "resources" in t.spec else ()

            summary = d.summarize_running(
                s.running, lambda tid: t.priority if (t := tasks.get(tid)) else None, completing,
                request)
            held = {node: n for node, units in reported
                    if (n := d.stale_held(node, units, s.running, _unit_of(s)))}
            if held:
                # Attempts a worker still runs though no longer its own hold their
                # resources too, until it drops them.
                summary = d.with_held_requests(summary, {
                    node: r for node, units in reported if node in held
                    and (r := d.stale_held_requests(node, units, s.running, _unit_of(s),
                                                    request))})
            # Retries waiting for their backoff count as queued: they come back on
            # their own, and a window must not hold anything below them then. So do
            # the tasks the state queues with no submit (and no hold) before them:
            # those waiting for their parents (a parent may end any moment), and
            # delayed tasks and schedule slots coming within the arrival horizon
            # (the Timekeeper's ``arriving``).
            prios = set(s.queued_by_priority) | arriving
            for tid, _chunk in s.delayed:
                t = tasks.get(tid)
                if t is not None:
                    prios.add(t.priority)
            for tid in s.waiting:
                t = tasks.get(tid)
                if t is not None:
                    prios.add(t.priority)
            live_floors = d.live_floors(floors, now, tasks.__contains__, s.queued_by_priority)
            return summary, frozenset(prios), held, live_floors, \
                key_room_of(s, in_flight, reported, _unit_of(s)) if s.limits else None

        summary, prios, held, live_floors, key_room = self.replica.read(running)
        if live_floors != floors:
            with self._lock:
                # Floors added meanwhile stay; those found met or expired go.
                self._floors = tuple(f for f in self._floors
                                     if f in live_floors or f not in floors)
        view = replace(base, running_summary=summary, key_room=key_room,
                       queued_priorities=prios, held=held, floor=d.top_floor(live_floors))
        return view, floors

    def fast_path(self, specs: list[dict[str, Any]]) -> FastPath | None:
        """Leader, for a submit command about to be proposed: the assignments of its
        tasks that can start at once (decisions.fast_path: a free slot or room in a
        window on a live worker, nothing at or above their priority queued, waiting
        to retry, waiting for parents or arriving, no floor above them), drawn with
        their fencing tokens and counted in flight like an assign command's. The
        submit carries them (commands.Submit ``assign``); the caller proposes it and
        calls :meth:`FastPath.done` with the command's outcome exactly once. None:
        no fast path (not the leader, a voter of an earlier release, specs that wait
        for parents or a start time or name concurrency keys, a task already
        known, or nothing fits). Any thread."""
        if not self.ready or not self.replica.is_leader() or not specs \
                or len(self._assigning) >= MAX_INFLIGHT_ASSIGNS \
                or not self.replica.voters_at(FAST_PATH_PROTOCOL) \
                or not all(_fast_path_spec(s) for s in specs):
            return None
        with self._plan_lock:
            now = time.monotonic()
            got = self._plan_view(now)
            if got is None:
                return None
            view, floors = got
            ids = [str(s["id"]) for s in specs]
            if len(set(ids)) != len(ids) or self.replica.read(
                    lambda st: any(t in st.tasks for t in ids)):
                return None  # a repeat: the queue has (or had) it
            units = [QueuedUnit(str(s["id"]), -1, int(s["priority"]),
                                str(s.get("strategy") or "batch"), int(s.get("shards", 0) or 0),
                                len(s.get("items") or ()), 0, d.unit_kind(s), spec_request(s),
                                spec_require(s), spec_prefer(s)) for s in specs]
            actions = d.fast_path(view, units)
            if not actions.assignments:
                return None
            prio = {u.task_id: u.priority for u in units}
            req = {u.task_id: u.request for u in units if u.request}
            return self._register_assign(actions.assignments, prio, floors, req)

    def _register_assign(self, assignments: tuple, prio: dict[str, int],
                         floors: tuple[d.Floor, ...],
                         req: dict[str, Any]) -> FastPath | None:
        """Count planned assignments in flight and draw their tokens: the entries to
        propose and what to do once their command applies (see FastPath). None: a
        hold set a floor above the plan since it was made (the plan is dropped)."""
        t0 = time.monotonic()
        top = max((prio.get(a.task_id, 0) for a in assignments), default=None)
        with self._lock:
            if any(f not in floors and top is not None and top < f.priority
                   for f in self._floors):
                # A hold set a floor above this plan since it was made: it does not
                # wait for a proposal it did not see, so drop the plan (the next
                # round plans again).
                return None
            self._assign_seq += 1
            cid = self._assign_seq
            self._assigning[cid] = [d.InFlight(a.task_id, a.chunk, a.worker, prio.get(a.task_id),
                                               req.get(a.task_id, ()))
                                    for a in assignments]

        def done(result: Any, err: int) -> None:
            if err == 0 and result:
                self.dispatcher.put(result, top)  # counted before the hold sees cid gone
            with self._lock:
                self._assigning.pop(cid, None)
                self._assign_cond.notify_all()
            self._observe("commit_latency", time.monotonic() - t0)
            self._wake.set()

        # A random fencing token, drawn here and carried in the command (so every
        # replica records the same one; a peer cannot guess a unit's token from the
        # ones it has seen), once every voter knows them (RAFT_PROTOCOL 2): an
        # earlier release would count tokens itself and diverge.
        tokens = _fencing_tokens(len(assignments)) if self.replica.voters_at(2) else None
        return FastPath(tuple(AssignEntry(a.task_id, a.chunk, a.chunk_count, a.worker,
                                          tokens[i] if tokens is not None else None)
                              for i, a in enumerate(assignments)), self.cfg.lease_s, done)

    def _queued_head(self, s: SchedulerState, depth: int) -> tuple[QueuedUnit, ...]:
        """The queue's first ``depth`` units as the planner's QueuedUnit (under the
        replica's lock). Each round reads about the same head again, so the units of
        the last round's head are reused: the same Task object (``is``, so a task id
        reused after retention is read afresh) with the same chunk count."""
        old = self._head_cache
        new: dict[tuple[str, int], tuple[Any, int, QueuedUnit]] = {}
        out = []
        for t, chunk in s.peek_queued(depth):
            key = (t.id, chunk)
            hit = old.get(key)
            if hit is not None and hit[0] is t and hit[1] == t.chunk_count:
                u = hit[2]
            else:
                u = QueuedUnit(t.id, chunk, t.priority, t.strategy, int(t.spec.get("shards", 0)),
                               len(t.spec.get("items") or ()), t.chunk_count,
                               d.unit_kind(t.spec), spec_request(t.spec), spec_require(t.spec),
                               spec_prefer(t.spec), spec_keys(t.spec))
            new[key] = (t, t.chunk_count, u)
            out.append(u)
        self._head_cache = new
        return tuple(out)

    def _propose_assign(self, assignments: tuple, prio: dict[str, int],
                        floors: tuple[d.Floor, ...],
                        req: dict[str, Any] | None = None) -> None:
        planned = self._register_assign(assignments, prio, floors, req or {})
        if planned is not None:
            self.replica.propose(Assign(planned.entries, time.time(), planned.lease_s),
                                 callback=planned.done)

    # ------------------------------------------------------------------ leases

    def _check_leases(self, now: float) -> None:
        """Requeue units whose worker is gone (no heartbeat within the lease) or
        that a live worker does not run (a dispatch that never arrived)."""
        assert self.leader_since is not None
        units, delayed, replicated_now = self.replica.read(
            lambda s: (s.running_units(), dict(s.delayed), s.now))
        wall = time.time()
        tick, self._retry_seen = d.due_retry_tick(delayed, replicated_now, self._retry_seen, now)
        if tick is not None and tick > replicated_now:
            # A retry is due by this leader's clock but not yet by the replicated
            # one (this node's wall clock is behind it): move the replicated clock.
            self.replica.send(Requeue((), max(tick, wall)))
        with self._lock:
            workers = tuple(w.view() for w in self.workers.values())
        actions = d.expired_leases(d.LeaseView(
            now, self.cfg.lease_s, max(2.5, 4 * self.cfg.heartbeat_s), self.leader_since,
            workers, tuple(d.RunningView(tid, chunk, worker, None, attempt, token, started)
                           for tid, chunk, attempt, token, worker, started in units),
            self._requeue_recent, self._missing))
        self._requeue_recent = dict(actions.recent)
        self._missing = dict(actions.missing)
        if actions.down:
            with self._lock:
                for node_id in actions.down:
                    w = self.workers.get(node_id)
                    if w is not None and not w.down:
                        w.down = True
                        self.bus.publish([event("node", "down", node_id, at=wall)])
        if not actions.requeue:
            return
        reason = actions.requeue[0].reason
        log.warning("node %s: requeueing %d unit(s): %s", self.node_id, len(actions.requeue),
                    reason)
        tail = self.replica.requeue_tail()
        started = {(u[0], u[1], u[2], u[3]): (u[4], u[5]) for u in units}
        lost = [(r.key, *started.get(r.key, ("", 0.0))) for r in actions.requeue]
        self.replica.send(Requeue(tuple((*r.key, *tail) for r in actions.requeue)
                                  + self._deaths(lost), wall, reason))

    def _deaths(self, lost: list[tuple[d.AttemptKey, str, float]]) -> tuple[tuple, ...]:
        """Requeued attempts ``(key, worker, attempt start)``: confirm-death entries for
        those whose worker already runs as a newer process than the attempt (it died
        running it and is back), and remember the others until their worker is heard
        from again (see _heard_again). consensus/state.py apply_requeue checks the
        times; the poison rule needs every voter at RAFT_PROTOCOL 3."""
        tail = self.replica.requeue_tail()
        if not tail:
            return ()
        out: list[tuple] = []
        with self._lock:
            for key, worker, started in lost:
                w = self.workers.get(worker)
                if w is not None and w.started_at > started:
                    out.append((*key, tail[0], w.started_at, started))
                elif worker:
                    self._lost_on.setdefault(worker, []).append((key, started))
                    del self._lost_on[worker][:-1000]  # bounded: oldest forgotten
        return tuple(out)

    def _heard_again(self, worker: str) -> None:
        """Under self._lock: a heartbeat from a worker with attempts requeued from it.
        If it is a process newer than an attempt, it died running it: propose the
        confirm-death entry; if not, it was only paused or cut off. Either way the
        attempts are forgotten here."""
        lost = self._lost_on.pop(worker, [])
        tail = self.replica.requeue_tail()
        w = self.workers[worker]
        entries = tuple((*key, tail[0], w.started_at, started) for key, started in lost
                        if tail and started < w.started_at)
        if entries:
            log.warning("node %s: %s restarted while running %d unit(s): counted for the "
                        "poison rule", self.node_id, worker, len(entries))
            self.replica.send(Requeue(entries, time.time(), f"worker {worker} died"))

    def worker_gone(self, node_id: str, reason: str) -> int:
        """A worker is known to be gone (its pod was deleted or evicted): on the
        leader, requeue its units now rather than at lease expiry. Returns how many
        units were requeued (0 on other nodes)."""
        if not self.replica.is_leader() or not self.ready or node_id == self.node_id:
            return 0
        units = self.replica.read(lambda s: s.running_on(node_id))
        with self._lock:
            w = self.workers.get(node_id)
            if w is not None:
                w.last_seen = time.monotonic() - self.cfg.lease_s - 1.0
        if units:
            log.warning("node %s: %s is gone (%s); requeueing %d unit(s)", self.node_id,
                        node_id, reason, len(units))
            tail = self.replica.requeue_tail()
            started = {(u[0], u[1], u[2], u[3]): (u[4], u[5])
                       for u in self.replica.read(lambda s: s.running_units())}
            lost = [(tuple(u), *started.get(tuple(u), (node_id, 0.0))) for u in units]
            self.replica.send(Requeue(tuple((*u, *tail) for u in units) + self._deaths(lost),
                                      time.time(), f"worker {node_id}: {reason}"))
        return len(units)

    # ------------------------------------------------------------------ results

    def _flush_completions(self) -> None:
        with self._lock:
            if not d.should_flush(len(self._completions), self._complete_inflight):
                return
            group, self._completions = self._completions, []
            self._complete_inflight += 1
        results = d.completion_results([r for r, _ in group], [random.random() for _ in group])

        def done(_: Any, err: int) -> None:
            deposed = err != 0 and not self.replica.is_leader()
            with self._lock:
                self._complete_inflight -= 1
                if err == 0:
                    for r, _f in group:
                        self._completing.pop((r["task_id"], int(r["chunk"])), None)
                    kinds = [(self._kind_of.pop((r["task_id"], int(r["chunk"])), None), r)
                             for r, _f in group]
                    self._run_s_by_kind = d.update_run_times(
                        self._run_s_by_kind, [(k, r) for k, r in kinds if k is not None])
                    for _r, p in group:
                        if p is not None:
                            p.committed(1)
                else:
                    self._completions.extend(g for g in group if g[1] is None or not g[1].over)
                    if deposed:
                        for _r, p in group:
                            if p is not None:
                                p.fail()
            if err == 0:
                for r, _f in group:
                    self._observe("run_time", d.run_time_s(r))
            self._wake.set()

        self.replica.propose(Complete(tuple(results), time.time()), callback=done, timeout_s=3.0)

    def accept_peer_results(self, results: list[dict[str, Any]],
                            peer: PeerIdentity) -> tuple[bool, int]:
        """Leader side of ReportResults from a peer: see :meth:`accept_from`."""
        return self.accept_from(peer.node_id, results)

    def accept_own_results(self, results: list[dict[str, Any]]) -> bool:
        """This node's own worker side reporting to its leader side."""
        return self.accept_from(self.node_id, results)[0]

    def accept_from(self, node_id: str, results: list[dict[str, Any]]) -> tuple[bool, int]:
        """Commit results reported by ``node_id``: only those of the attempt it runs
        now (the unit is running on it with that token), each recorded as run by
        it; the others are dropped and counted. A late result of an older attempt
        (killed, or requeued and given to the same worker again) would be refused
        when applied, and meanwhile would count the newer attempt's slot free
        (_completing is keyed by unit). Returns (committed, how many were refused);
        not committed (False) when this node does not lead, so the worker retries."""
        if not self.replica.is_leader() or not self.ready:
            return False, 0

        def mine(s: SchedulerState) -> list[str | None]:
            """Per result: its unit's kind if it is the sender's current attempt."""
            unit = _unit_of(s)
            out: list[str | None] = []
            for r in results:
                try:
                    key = (str(r["task_id"]), int(r["chunk"]))
                except (KeyError, TypeError, ValueError):
                    out.append(None)
                    continue
                u = unit(key)
                ok = u is not None and u.worker == node_id and u.token == r.get("token")
                out.append(d.unit_kind(s.tasks[key[0]].spec) if ok else None)
            return out

        kinds = self.replica.read(mine)
        flags = [k is not None for k in kinds]
        with self._lock:
            for r, k in zip(results, kinds):
                if k is not None:
                    self._kind_of[(str(r["task_id"]), int(r["chunk"]))] = k
                    if len(self._kind_of) > 100_000:  # bounded: a stray entry per unit
                        self._kind_of.pop(next(iter(self._kind_of)))
        ok = [dict(r, node=node_id) for r, f in zip(results, flags) if f]
        refused = len(results) - len(ok)
        if refused:
            log.info("node %s: dropped %d result(s) from %s for attempts not assigned to it",
                     self.node_id, refused, node_id)
        if not ok:
            return True, refused
        return self.accept_results(ok), refused

    def accept_results(self, results: list[dict[str, Any]], timeout_s: float = 3.0) -> bool:
        """Leader side of ReportResults: True once the results are committed."""
        if not self.replica.is_leader() or not self.ready:
            return False
        pending = _Pending(len(results))
        with self._lock:
            for r in results:
                self._completions.append((r, pending))
                self._completing[(r["task_id"], int(r["chunk"]))] = str(r.get("node", ""))
        # Propose from this thread (no hop through the leader loop); completions that
        # arrive while 4 commands are in flight go with the next one.
        self._flush_completions()
        self._wake.set()
        return pending.wait(timeout_s)

    # ------------------------------------------------------------------ holds

    def hold_for(self, priority: int, task_ids: tuple[str, ...] = (),
                 timeout_s: float = 1.0) -> None:
        """Before a submit of this priority (of these tasks): have the leader stop
        planning below it until they are queued and take back lower units waiting
        in prefetch windows. Best effort within timeout_s."""
        if self.replica.is_leader():
            self.hold_workers(priority, timeout_s, task_ids)
            return
        target = self.worker.leader_grpc()
        if not target:
            return
        try:
            self.peers.stub(target).Hold(peer_pb2.HoldRequest(
                min_priority=priority, fan_out=True, task_ids=list(task_ids)),
                timeout=timeout_s + 0.5, metadata=self.peers.metadata)
        except grpc.RpcError as exc:
            log.info("node %s: hold at the leader failed: %s", self.node_id, exc.code())

    def handle_hold_fan_out(self, req: peer_pb2.HoldRequest) -> peer_pb2.HoldResponse:
        """A Hold with fan_out, from any admitted peer: hold every worker (leader only)."""
        if not self.replica.is_leader():
            return peer_pb2.HoldResponse(accepted=False)
        return peer_pb2.HoldResponse(accepted=True, handed_back=self.hold_workers(
            req.min_priority, task_ids=tuple(req.task_ids)[:MAX_HOLD_IDS]))

    def hold_workers(self, priority: int, timeout_s: float = 1.0,
                     task_ids: tuple[str, ...] = ()) -> int:
        """Leader: stop planning below priority until the held-for tasks are queued
        (see decisions.live_floors), let committed assignments reach their workers,
        then have every worker with a prefetch window hand back its waiting units
        below priority. Returns how many were handed back."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._floors = (*self._floors, d.hold_floor(priority, deadline, task_ids))
            del_old = len(self._floors) - MAX_FLOORS
            if del_old > 0:  # bounded: the oldest (expiring first) go
                self._floors = self._floors[del_old:]
            # Assignments already proposed must reach their workers before the hold,
            # or a unit could arrive after it and start.
            proposed = set(self._assigning)
            while proposed & set(self._assigning) and time.monotonic() < deadline:
                self._assign_cond.wait(max(0.001, deadline - time.monotonic()))
        self.dispatcher.wait_delivered(deadline)
        with self._lock:
            targets = [self.workers[n]
                       for n in d.hold_targets(w.view() for w in self.workers.values())]
        n = 0
        futs = []
        for w in targets:
            if w.node_id == self.node_id:
                n += self.worker.hold_local(priority)
                continue
            futs.append(self.peers.stub(w.grpc_address).Hold.future(
                peer_pb2.HoldRequest(min_priority=priority),
                timeout=max(0.05, deadline - time.monotonic()), metadata=self.peers.metadata))
        for f in futs:
            try:
                n += f.result().handed_back
            except grpc.RpcError as exc:
                log.info("node %s: hold at a worker failed: %s", self.node_id, exc.code())
        return n

    # ------------------------------------------------------------------ heartbeats

    def handle_heartbeat(self, req: peer_pb2.HeartbeatRequest,
                         peer: PeerIdentity) -> peer_pb2.HeartbeatResponse:
        """Leader side of a peer's Heartbeat (see _admit_heartbeat for who is
        admitted); elsewhere, where the leader is (only the leader's worker table is
        current, so only the leader judges the rest)."""
        if req.node_id != peer.node_id or req.grpc_address != peer.grpc_address:
            raise PermissionDenied(f"heartbeat for {req.node_id!r} at {req.grpc_address!r} "
                                   f"sent by {peer.node_id!r} at {peer.grpc_address!r}")
        if not self.replica.is_leader():
            return peer_pb2.HeartbeatResponse(accepted=False,
                                              leader_grpc=self.worker.leader_grpc() or "")
        self.table.admit(req, peer)
        kill = self._record_heartbeat(req)
        return peer_pb2.HeartbeatResponse(accepted=True, leader_grpc=self.cfg.grpc_address,
                                          leader_id=self.node_id, kill=[
            peer_pb2.RunningUnit(task_id=k[0], chunk=k[1], attempt=k[2], token=k[3]) for k in kill],
                                          nodes=self._node_offers())

    def _node_offers(self) -> list[peer_pb2.NodeOffer]:
        """The live workers and what they offer, for heartbeat answers (built at most
        every half second: with many workers each heartbeat would rebuild it)."""
        now = time.monotonic()
        cached = self._offers_cache
        if cached is not None and now - cached[0] < 0.5:
            return cached[1]
        with self._lock:
            live = d.live_workers([w.view() for w in self.workers.values()], now,
                                  self.cfg.lease_s)
        out = [peer_pb2.NodeOffer(node_id=w.node_id, slots=w.slots,
                                  resources=dict(w.resources), node_labels=dict(w.labels))
               for w in live]
        self._offers_cache = (now, out)
        return out

    def _record_heartbeat(self, req: peer_pb2.HeartbeatRequest) -> list[tuple]:
        """Update the worker table; return the units the worker runs that are not
        its to run (cancelled, requeued, finished)."""
        running = frozenset((u.task_id, u.chunk, u.attempt, u.token) for u in req.running)
        with self._lock:
            self.table.update(req)
            if req.node_id in self._lost_on:
                self._heard_again(req.node_id)
            if req.voter and req.raft_address:
                self.replica.note_voter_level(req.raft_address, req.raft_protocol)
        if not running or not self.ready:
            return []

        def units(s: SchedulerState) -> dict[d.UnitKey, d.ReplicaUnit | None]:
            unit = _unit_of(s)
            return {(tid, chunk): unit((tid, chunk)) for tid, chunk, _a, _t in running}

        return list(d.units_to_kill(req.node_id, running, self.replica.read(units)))

    def cluster_status(self) -> dict[str, Any]:
        if not self.replica.is_leader():
            target = self.worker.leader_grpc()
            if target is None:
                raise Unavailable("no leader known")
            with self.peers.client([target], timeout_s=5.0) as c:
                return c.cluster_status()
        nodes = self.table.nodes_status(time.monotonic(), self.leader_since)
        counts, dropped, committed, byp = self.replica.read(
            lambda s: (s.counts_by_status(), s.dropped_results, s.committed_results,
                       dict(s.queued_by_priority)))
        return {"leader_id": self.node_id, "nodes": nodes, "tasks_by_status": counts,
                "dropped_results": dropped, "committed_results": committed,
                "queue_by_priority": {priority_name(p): n for p, n in sorted(byp.items())}}


__all__ = ["MAX_INFLIGHT_ASSIGNS", "FastPath", "Scheduler", "WorkerInfo"]
