"""The leader side of a simulated node: node/scheduling.py without threads.

A mixin of :class:`~.node.SimNode` (its state is set in ``SimNode.reset``). Every
decision is the node's own, from ``node/decisions.py`` (plan_round, expired_leases,
units_to_kill, hold_targets, hold_floor, completion batching); what is modelled
here is only how the node carries them out: which view it builds from its replica
and worker table, which command it proposes, which message it sends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from taskandgo.consensus.commands import Assign, AssignEntry, Compact, Complete, Requeue
from taskandgo.node import decisions as d
from taskandgo.node.placement import queued_unit, spec_request
from taskandgo.node.policies import key_room_of
from taskandgo.strategies import QueuedUnit
from taskandgo.strategies.placement import amounts

from .worker import Pending, UnitKey, Work

if TYPE_CHECKING:
    from .world import Msg

DISPATCH_TIMEOUT_S = 2.0
MAX_INFLIGHT_ASSIGNS = 3
HOLD_TIMEOUT_S = 1.0


@dataclass
class WorkerInfo:
    """The leader's view of a worker, from its heartbeats (app.WorkerInfo)."""

    node_id: str
    slots: int = 0
    capacity: int = 0
    running: set = field(default_factory=set)
    accepting: bool = True
    last_seen: float = 0.0
    last_seen_wall: float = 0.0
    down: bool = False
    resources: tuple = ()  # what it offers (placement), sorted pairs

    def view(self) -> d.WorkerView:
        return d.WorkerView(self.node_id, self.slots, self.capacity, self.last_seen,
                            self.last_seen_wall, self.accepting, self.down,
                            frozenset(self.running), self.resources)


@dataclass
class HoldOp:
    """The leader's hold_workers in progress (see there)."""

    priority: int
    deadline: float
    proposed: set
    on_done: Callable[[bool], None]
    phase: str = "assigns"
    put: int = 0
    waiting: set = field(default_factory=set)


class LeaderSide:
    """Scheduling, dispatching, leases, results and holds of :class:`~.node.SimNode`."""

    world: Any
    id: str

    def become_leader(self, term: int) -> None:
        """_become_leader: forget in-flight work, give every worker a full lease, and
        wait for an entry of this term to apply before planning."""
        now = self.world.now
        self.leading_term = term
        self.leader_since = now
        self.lease_missing: dict = {}
        self.retry_seen: dict = {}
        self.minority_since = None
        self.assigning.clear()
        self.completing.clear()
        self.completing_attempt.clear()
        self.run_s_by_kind = {}
        self.kind_of.clear()
        for w in self.workers.values():
            w.last_seen = now
        self.leader_ready = False

        def ready(_: Any, err: int) -> None:
            if err == 0 and self.leader_since == now:
                self.leader_ready = True

        self.propose(Requeue((), self.wall()), callback=ready)

    def step_down(self) -> None:
        self.leading_term = None
        self.leader_since = None
        self.leader_ready = False
        self.release_proposals(everything=True)
        if self.world.log.leader == self.id:
            self.world.log.leader_lost()

    def leader_tick(self) -> None:
        """_leader_loop, one pass."""
        now = self.world.now
        if not self.leader_ready:
            return
        if now - self.self_hb_at >= self.world.cfg.heartbeat_s / 2:
            self.self_hb_at = now
            kill = self.record_heartbeat(self.heartbeat_request())
            if kill:
                self.kill(kill)
                for k in kill:
                    self.unreported.pop(k, None)
        self.flush_completions()
        if len(self.assigning) < MAX_INFLIGHT_ASSIGNS:
            self.plan_and_assign()
        if now - self.last_lease_check > 0.2:
            self.last_lease_check = now
            self.check_leases(now)
        if now - self.last_compact > 10.0:
            # Also what releases due retries (apply_* advance the state's clock) when
            # nothing else is proposed.
            self.last_compact = now
            self.propose(Compact(self.wall(), 24 * 3600.0, 100_000), callback=lambda *_: None)

    def plan_and_assign(self, fast: list[QueuedUnit] | None = None) -> Any:
        """Scheduler._plan_and_assign: the view from the replica and the worker table,
        decisions.plan_round, one assign command with random fencing tokens. With
        ``fast`` (a submit's new units, Scheduler.fast_path): decisions.fast_path on
        the same view, and the entries, lease and callback returned for the submit
        command to carry instead of an assign command (None: no fast path)."""
        s = self.replica
        assert s is not None
        if not s.queued_by_priority and fast is None:
            return None  # nothing to plan (a shortcut: plan_round would return nothing)
        now = self.world.now
        live = d.live_workers([w.view() for w in self.workers.values()], now,
                              self.world.cfg.lease_s)
        if not live:
            return None
        in_flight = tuple(d.InFlight(t, c, w, p, r) for units in self.assigning.values()
                          for t, c, w, p, r in units)
        floors = self.floors
        live_floors = d.live_floors(floors, now, s.tasks.__contains__, s.queued_by_priority)
        self.floors = live_floors
        floor = d.top_floor(live_floors)
        prios = set(s.queued_by_priority) | self.arriving  # type: ignore[attr-defined]
        for tid, _chunk in s.delayed:
            t = s.tasks.get(tid)
            if t is not None:
                prios.add(t.priority)
        for tid in s.waiting:
            t = s.tasks.get(tid)
            if t is not None:
                prios.add(t.priority)
        held = {w.node_id: n for w in live if w.running
                if (n := d.stale_held(w.node_id, w.running, s.running, self.replica_unit))}
        tasks = s.tasks
        view = d.PlanView(
            now, live, in_flight=in_flight, held=held,
            floor=floor, run_s_by_kind=self.run_s_by_kind,
            undelivered=frozenset(self.dispatch_prio[b] for b in self.dispatching
                                  if b in self.dispatch_prio),
            # Summed up with the running units' requests, as Scheduler._plan_and_assign does.
            running_summary=d.summarize_running(
                s.running, lambda tid: t.priority if (t := tasks.get(tid)) else None,
                list(self.completing.items()),
                lambda tid: spec_request(t.spec) if (t := tasks.get(tid)) is not None else ()),
            queued_priorities=frozenset(prios),
            # Concurrency keys' room, as Scheduler._plan_and_assign reads it.
            key_room=key_room_of(s, in_flight, [(w.node_id, w.running) for w in live
                                                if w.running], self.replica_unit)
            if s.limits else None)
        if held and view.running_summary is not None:
            # Attempts a worker still holds though no longer its own keep their
            # resources too (Scheduler._plan_and_assign, decisions.with_held_requests).
            view = replace(view, running_summary=d.with_held_requests(view.running_summary, {
                w.node_id: r for w in live if w.node_id in held
                and (r := d.stale_held_requests(
                    w.node_id, w.running, s.running, self.replica_unit,
                    lambda tid: spec_request(t.spec) if (t := tasks.get(tid)) else ()))}))
        depth = d.queue_depth_needed(view) if fast is None else 0
        if depth:
            head = s.peek_queued(depth)
            view = replace(view, queued=tuple(
                queued_unit(t, chunk) for t, chunk in head))
        if fast is not None:
            actions = d.fast_path(view, fast)
            view = replace(view, queued=tuple(fast))
        else:
            actions = d.plan_round(view)
        if not actions.assignments:
            return None
        assignments = actions.assignments
        cid = self.world.pid()
        prio = {u.task_id: u.priority for u in view.queued}
        top = max(prio[a.task_id] for a in assignments)
        req = {u.task_id: u.request for u in view.queued}
        self.assigning[cid] = [(a.task_id, a.chunk, a.worker, prio[a.task_id], req[a.task_id])
                               for a in assignments]
        tokens = [self.world.rng.getrandbits(63) or 1 for _ in assignments]
        # (for the checker's diagnosis) split tasks left out because their cut is in flight
        flying = {p.task_id for p in in_flight}
        cuts = {u.task_id for u in view.queued
                if u.chunk == -1 and u.strategy == "split" and u.task_id in flying}
        # ... and slots counted free for a result of an older attempt being committed
        stale: dict[str, list[str]] = {}
        for (t, c), (a, tok) in self.completing_attempt.items():
            task = s.tasks.get(t)
            u = task.unit_at(c) if task is not None else None
            if u is not None and (u.attempt, u.token) != (a, tok):
                stale.setdefault(self.completing[(t, c)], []).append(f"{t}/{c}")
        for a, tok in zip(assignments, tokens):
            self.world.checker.on_plan(tok, self.applied, cuts, stale.get(a.worker, []),
                                       self.floor_gone_early(floors, live_floors, now))
        self.world.trace(f"{self.id} assigns " + ", ".join(
            f"{a.task_id}/{a.chunk}->{a.worker}" for a in assignments))

        def done(result: Any, err: int) -> None:
            if err == 0 and result:
                self.dispatch_put_n += 1
                self.dispatch_prio[self.dispatch_put_n] = top
                self.dispatch(result)
            self.assigning.pop(cid, None)

        entries = tuple(AssignEntry(a.task_id, a.chunk, a.chunk_count, a.worker, tok)
                        for a, tok in zip(assignments, tokens))
        if fast is not None:
            return entries, self.world.cfg.lease_s, done
        self.propose(Assign(entries, self.wall(), self.world.cfg.lease_s), callback=done)
        return None

    def dispatch(self, batch: list) -> None:
        """_dispatch_loop for one committed assign: one Dispatch per worker."""
        s = self.replica
        assert s is not None
        by_worker: dict[str, list[Work]] = {}
        for tid, chunk, count, attempt, token, worker in batch:
            t = s.tasks.get(tid)
            if t is not None:
                by_worker.setdefault(worker, []).append(
                    Work(tid, chunk, count, attempt, token, t.priority))
        # As node/dispatching.py _priorities: waiting dependents and what arrives
        # soon count too.
        prios = list(s.queued_by_priority) + list(self.arriving)  # type: ignore[attr-defined]
        for tid, _chunk in (*s.running, *s.delayed):
            t = s.tasks.get(tid)
            if t is not None:
                prios.append(t.priority)
        for tid in s.waiting:
            t = s.tasks.get(tid)
            if t is not None:
                prios.append(t.priority)
        floor = d.dispatch_floor(prios)
        bid = self.dispatch_put_n
        left = self.dispatching[bid] = set()
        for worker, works in by_worker.items():
            if worker == self.id:
                self.dispatch_works(works, floor)
            elif worker in self.workers:
                left.add(worker)
                self.rpc(worker, "dispatch", {"works": works, "floor": floor},
                         DISPATCH_TIMEOUT_S,
                         lambda _v, worker=worker: self.dispatched(bid, worker))
        self.dispatched(bid, "")

    def dispatched(self, bid: int, worker: str) -> None:
        left = self.dispatching.get(bid)
        if left is None:
            return
        left.discard(worker)
        if not left:
            del self.dispatching[bid]
            self.dispatch_prio.pop(bid, None)
            self.dispatch_done_n += 1

    def check_leases(self, now: float) -> None:
        """Scheduler._check_leases: decisions.expired_leases, one requeue command."""
        s = self.replica
        assert s is not None and self.leader_since is not None
        cfg = self.world.cfg
        tick, self.retry_seen = d.due_retry_tick(s.delayed, s.now, self.retry_seen, now)
        if tick is not None and tick > s.now:
            self.world.trace(f"{self.id} moves the replicated clock to {tick:.2f} (a retry is due)")
            self.propose(Requeue((), max(tick, self.wall())), callback=lambda *_: None)
        actions = d.expired_leases(d.LeaseView(
            now, cfg.lease_s, max(2.5, 4 * cfg.heartbeat_s), self.leader_since,
            tuple(w.view() for w in self.workers.values()),
            tuple(d.RunningView(tid, chunk, worker, None, attempt, token, started)
                  for tid, chunk, attempt, token, worker, started in s.running_units()),
            self.requeue_recent, self.lease_missing))
        self.requeue_recent = dict(actions.recent)
        self.lease_missing = dict(actions.missing)
        for node_id in actions.down:
            self.workers[node_id].down = True
        if not actions.requeue:
            return
        reason = actions.requeue[0].reason
        self.world.trace(f"{self.id} requeues "
                         f"{[f'{r.key[0]}/{r.key[1]}' for r in actions.requeue]}: {reason}")
        self.propose(Requeue(tuple((*r.key, self.started_wall) for r in actions.requeue),
                             self.wall(), reason), callback=lambda *_: None)

    def record_heartbeat(self, req: dict[str, Any]) -> list[UnitKey]:
        """_record_heartbeat: update the worker table; return units to kill."""
        s = self.replica
        assert s is not None
        running = req["running"]
        w = self.workers.get(req["node_id"])
        if w is None:
            w = self.workers[req["node_id"]] = WorkerInfo(req["node_id"])
        w.slots, w.capacity, w.running = req["slots"], req["capacity"], set(running)
        w.accepting = req["accepting"]
        w.resources = amounts(req.get("resources"))
        w.last_seen, w.last_seen_wall = self.world.now, self.wall()
        w.down = False
        if not running or not self.leader_ready:
            return []
        units = {(tid, chunk): self.replica_unit((tid, chunk)) for tid, chunk, _a, _t in running}
        return list(d.units_to_kill(req["node_id"], running, units))

    def replica_unit(self, key: d.UnitKey) -> d.ReplicaUnit | None:
        """scheduling._unit_of: a unit of the replica as decisions.ReplicaUnit."""
        s = self.replica
        assert s is not None
        t = s.tasks.get(key[0])
        u = t.unit_at(key[1]) if t is not None else None
        return None if u is None else d.ReplicaUnit(u.status, u.token, s.running.get(key))

    def handle_heartbeat(self, m: Msg) -> None:
        if not self.is_leader():
            self.reply(m, {"accepted": False, "leader": self.leader_grpc(), "kill": []})
            return
        kill = self.record_heartbeat(m.body)
        self.reply(m, {"accepted": True, "leader": self.id, "kill": kill})

    def handle_results(self, m: Msg) -> None:
        """accept_peer_results."""
        self.accept_from(m.src, m.body["results"], lambda v: self.reply(m, v))

    def accept_from(self, node_id: str, results: list[dict[str, Any]],
                    reply: Callable[[Any], None]) -> None:
        """Scheduler.accept_from: commit only results of the attempt the unit runs
        now on the sender (running there with that token)."""
        if not self.is_leader() or not self.leader_ready:
            reply(False)
            return
        ok = []
        for r in results:
            u = self.replica_unit((r["task_id"], r["chunk"]))
            if u is not None and u.worker == node_id and u.token == r["token"]:
                ok.append(dict(r, node=node_id))
                assert self.replica is not None
                self.kind_of[(r["task_id"], int(r["chunk"]))] = d.unit_kind(
                    self.replica.tasks[r["task_id"]].spec)
        if not ok:
            reply(True)
            return
        self.accept_results(ok, reply)

    def accept_results(self, results: list[dict[str, Any]], reply: Callable[[Any], None]) -> None:
        """accept_results: True once committed, False if not leading or after 3 s."""
        if not self.is_leader() or not self.leader_ready:
            reply(False)
            return
        wait = Pending(self.world.now + 3.0, reply)
        for r in results:
            fut = Pending(0.0, lambda _v: None)
            wait.parts.append(fut)
            self.completions.append((r, fut))
            self.completing[(r["task_id"], int(r["chunk"]))] = str(r.get("node", ""))
            # (for the checker's diagnosis only) which attempt the result is of
            self.completing_attempt[(r["task_id"], int(r["chunk"]))] = (r["attempt"], r["token"])
        self.result_waits.append(wait)
        self.flush_completions()

    def settle_result_waits(self) -> None:
        keep = []
        for wait in self.result_waits:
            values = [f.value for f in wait.parts]
            if False in values:
                wait.on_done(False)
            elif None not in values:
                wait.on_done(True)
            elif self.world.now >= wait.deadline:
                wait.on_done(False)
            else:
                keep.append(wait)
        self.result_waits = keep

    def flush_completions(self) -> None:
        """Scheduler._flush_completions: one complete command for what has arrived."""
        if not d.should_flush(len(self.completions), self.complete_inflight):
            return
        group, self.completions = self.completions, []
        self.complete_inflight += 1
        results = d.completion_results([r for r, _ in group],
                                       [self.world.rng.random() for _ in group])

        def done(result: Any, err: int) -> None:
            self.complete_inflight -= 1
            if err == 0:
                for r, _ in group:
                    self.completing.pop((r["task_id"], int(r["chunk"])), None)
                    self.completing_attempt.pop((r["task_id"], int(r["chunk"])), None)
                kinds = [(self.kind_of.pop((r["task_id"], int(r["chunk"])), None), r)
                         for r, _ in group]
                self.run_s_by_kind = d.update_run_times(
                    self.run_s_by_kind, [(k, r) for k, r in kinds if k is not None])
            else:
                self.completions.extend(g for g in group if g[1] is None or g[1].value is None)
            for _, fut in group:
                if fut is not None and fut.value is None:
                    if err == 0:
                        fut.value = True
                    elif not self.is_leader():
                        fut.value = False

        self.propose(Complete(tuple(results), self.wall()), callback=done, timeout_s=3.0)

    # ------------------------------------------------------------------ holds

    def floor_gone_early(self, before: tuple[d.Floor, ...], after: tuple[d.Floor, ...],
                         now: float) -> d.Floor | None:
        """(for the checker's diagnosis) a floor lifted before it expired while the
        tasks it was set for were not all in this replica."""
        s = self.replica
        assert s is not None
        for f in before:
            if f not in after and now <= f.until and f.task_ids \
                    and not all(t in s.tasks for t in f.task_ids):
                return f
        return None

    def handle_hold_fan(self, m: Msg) -> None:
        if not self.is_leader():
            self.reply(m, False)
            return
        self.hold_workers(m.body["min_priority"], lambda ok: self.reply(m, ok),
                          tuple(m.body.get("task_ids", ())))

    def hold_workers(self, priority: int, on_done: Callable[[bool], None],
                     task_ids: tuple[str, ...] = ()) -> None:
        """hold_workers: stop planning below priority (the floor), let assignments
        already proposed reach their workers, then have every worker with a prefetch
        window hand back its waiting units below priority. on_done(True) when every
        worker answered within HOLD_TIMEOUT_S."""
        deadline = self.world.now + HOLD_TIMEOUT_S
        self.floors = (*self.floors, d.hold_floor(priority, deadline, task_ids))
        self.world.trace(f"{self.id} holds below {priority}")
        self.holds.append(HoldOp(priority, deadline, set(self.assigning), on_done))
        self.progress_holds()

    def progress_holds(self) -> None:
        now = self.world.now
        keep = []
        for op in self.holds:
            late = now >= op.deadline
            if op.phase == "assigns" and (late or not op.proposed & set(self.assigning)):
                op.phase, op.put = "dispatch", self.dispatch_put_n
            if op.phase == "dispatch" and (late or self.dispatch_done_n >= op.put):
                op.phase = "workers"
                for nid in d.hold_targets(w.view() for w in self.workers.values()):
                    if nid == self.id:
                        self.hold_here(op.priority)
                        continue
                    op.waiting.add(nid)
                    self.rpc(nid, "hold", {"min_priority": op.priority},
                             max(0.05, op.deadline - now),
                             lambda v, op=op, n=nid: self.held(op, n, v))
            if op.phase == "workers" and (late or not op.waiting):
                op.phase = "done"
                op.on_done(not op.waiting and not late)
            if op.phase != "done":
                keep.append(op)
        self.holds = keep

    def held(self, op: HoldOp, node: str, value: Any) -> None:
        if value is not None and value is not False:
            op.waiting.discard(node)
