"""One simulated node: a real replica, a model executor, the worker and leader sides.

The replica is the real :class:`~taskandgo.consensus.state.SchedulerState` and the
planner the real :func:`~taskandgo.strategies.planner.plan`. The rest mirrors
``node/app.py`` decision by decision (named after the method it mirrors), with its
threads replaced by :meth:`SimNode.tick` and its RPCs by :class:`~.world.Network`
messages; each ``*_loop`` of the app is one paced action here. Blocking calls
(a submit waiting for a hold, a ReportResults waiting for its commit) become small
pending records with a deadline that ``tick`` settles.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from taskandgo.consensus.state import SchedulerState
from taskandgo.node import decisions as d
from taskandgo.strategies import QueuedUnit

if TYPE_CHECKING:
    from .world import ClientCall, Msg, World

# The node's timing constants (node/scheduling.py, worker.py, submitting.py).
DISPATCH_TIMEOUT_S = 2.0
DISPATCH_CHECK_S = 1.5
SUBMIT_RETRY_S = 3.0
MAX_INFLIGHT_SUBMITS = 4
MAX_INFLIGHT_ASSIGNS = 3
HOLD_TIMEOUT_S = 1.0
LEADER_FALLBACK_S = 2.0
LEADER_CHANGED = 5

UnitKey = tuple  # (task_id, chunk, attempt, token)


@dataclass(frozen=True)
class Work:
    """A dispatched unit, as a worker holds it."""

    task_id: str
    chunk: int
    chunk_count: int
    attempt: int
    token: int
    priority: int

    @property
    def key(self) -> UnitKey:
        return (self.task_id, self.chunk, self.attempt, self.token)


@dataclass
class Run:
    """A unit in the executor: waiting in the prefetch window, or running."""

    work: Work
    started: bool = False
    cancelled: bool = False
    started_wall: float = 0.0
    finish_at: float = 0.0
    ok: bool = True
    counted: bool = False  # seen by the checker as an execution
    behind: list = field(default_factory=list)  # units it waited behind when it arrived
    started_at_once: bool = False  # started as it arrived (a free slot)


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

    def view(self) -> d.WorkerView:
        return d.WorkerView(self.node_id, self.slots, self.capacity, self.last_seen,
                            self.last_seen_wall, self.accepting, self.down,
                            frozenset(self.running))


@dataclass
class Pending:
    """A call waiting for something, settled by tick(): value None until done."""

    deadline: float
    on_done: Callable[[Any], None]
    value: Any = None
    parts: list = field(default_factory=list)


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


class SimNode:
    """One node process. ``reset()`` is a fresh process: nothing in memory survives."""

    def __init__(self, world: World, nid: str, voter: bool) -> None:
        self.world = world
        self.id = nid
        self.voter = voter
        self.up = True
        self.paused = False
        self.reset()

    def reset(self) -> None:
        cfg = self.world.cfg
        self.slots, self.capacity = cfg.slots, cfg.slots + cfg.prefetch
        self.replica: SchedulerState | None = SchedulerState() if self.voter else None
        self.applied = 0
        self.started_wall = self.wall()
        self.proposals: dict[int, tuple[float, Callable[[Any, int], None]]] = {}
        self.refused: list[int] = []  # proposals to fail on the next tick (no leader)
        self.leading_term: int | None = None
        self.minority_since: float | None = None
        self.known_leader: str | None = None  # a voter: the Raft leader it hears from
        self.hint: str | None = None  # a non-voter: the leader that accepted its heartbeat
        # executor
        self.ready: list[tuple[int, int, UnitKey]] = []
        self.active: dict[UnitKey, Run] = {}
        self.seq = 0
        # worker side
        self.unreported: dict[UnitKey, dict[str, Any]] = {}
        self.hb_next = 0.0
        self.hb_wait: Pending | None = None
        self.hb_try = 0
        self.report_next = 0.0
        self.report_wait: Pending | None = None
        self.report_try = 0
        self.backoff = 0.0
        self.dispatch_checks: list[tuple[float, str, int, list[Work]]] = []
        self.rpcs: dict[int, Pending] = {}
        # leader side
        self.workers: dict[str, WorkerInfo] = {}
        self.leader_since: float | None = None
        self.leader_ready = False
        self.assigning: dict[int, list[tuple[str, int, str]]] = {}
        self.completing: dict[tuple[str, int], str] = {}
        self.completions: list[tuple[dict[str, Any], Pending | None]] = []
        self.complete_inflight = 0
        self.result_waits: list[Pending] = []
        self.requeue_recent: dict[d.AttemptKey, float] = {}
        self.floor: d.Floor | None = None
        self.run_ewma: float | None = None
        self.self_hb_at = -1.0
        self.last_lease_check = 0.0
        self.last_compact = -10.0
        self.holds: list[HoldOp] = []
        self.dispatch_put_n = 0
        self.dispatch_done_n = 0
        self.dispatching: dict[int, set[str]] = {}
        # submits
        self.submit_q: list[tuple[list, tuple[ClientCall, int], float]] = []
        self.submit_inflight = 0

    # ------------------------------------------------------------------ process

    def running(self) -> bool:
        return self.up and not self.paused

    def wall(self) -> float:
        return self.world.wall(self.id)

    def crash(self) -> None:
        for key, run in self.active.items():
            if run.counted:
                self.world.checker.on_stop(self.id, key)
        self.up = False
        self.release_proposals(everything=True, fire=False)
        if self.world.log.leader == self.id:
            self.world.log.leader_lost()

    def restart(self) -> None:
        self.up, self.paused = True, False
        self.reset()

    def is_leader(self) -> bool:
        return self.leading_term is not None

    def leader_grpc(self) -> str | None:
        return self.known_leader if self.voter else self.hint

    def leader_targets(self) -> list[str]:
        hint = self.leader_grpc()
        voters = sorted(n for n, node in self.world.nodes.items() if node.voter)
        return ([hint] if hint else []) + [v for v in voters if v != hint]

    def send(self, dst: str, kind: str, body: Any) -> None:
        self.world.net.send(self.id, dst, kind, body)

    def rpc(self, dst: str, kind: str, body: dict[str, Any], timeout_s: float,
            on_done: Callable[[Any], None]) -> None:
        """A request whose reply (or False at timeout_s) goes to on_done once."""
        rid = self.world.pid()
        self.rpcs[rid] = Pending(self.world.now + timeout_s, on_done)
        self.send(dst, kind, dict(body, rid=rid))

    def reply(self, m: Msg, value: Any) -> None:
        self.send(m.src, "reply", {"rid": m.body["rid"], "value": value})

    # ------------------------------------------------------------------ replica

    def propose(self, name: str, *args: Any, callback: Callable[[Any, int], None],
                timeout_s: float = 2.0) -> None:
        """app.propose: callback(result, err) exactly once: when the command applies
        here, at once when no leader can be reached, or LEADER_CHANGED at timeout_s
        or when this node stops leading (it may still commit)."""
        pid = self.world.pid()
        self.proposals[pid] = (self.world.now + timeout_s, callback)
        outcome = self.world.log.propose(self, pid, name, args)
        if outcome == "refused":
            self.refused.append(pid)

    def apply_to(self, index: int) -> None:
        import pickle

        assert self.replica is not None
        while self.applied < index:
            e = self.world.log.entries[self.applied]
            result, _ = getattr(self.replica, "apply_" + e.name)(*pickle.loads(e.blob))
            self.applied += 1
            self.world.checker.on_apply(self)
            if e.proposer == self.id and e.pid in self.proposals:
                self.proposals.pop(e.pid)[1](result, 0)

    def release_proposals(self, everything: bool, fire: bool = True) -> None:
        now = self.world.now
        due = [p for p, (deadline, _) in self.proposals.items() if everything or deadline <= now]
        due += [p for p in self.refused if p in self.proposals and p not in due]
        self.refused = []
        callbacks = [self.proposals.pop(p)[1] for p in due]
        for cb in callbacks if fire else []:
            cb(None, LEADER_CHANGED)

    # ------------------------------------------------------------------ tick

    def tick(self) -> None:
        """One pass of every loop of the node (reaper, executor, heartbeat, reporter,
        submit, leader)."""
        now = self.world.now
        self.release_proposals(everything=False)
        for rid, p in list(self.rpcs.items()):
            if now >= p.deadline:
                del self.rpcs[rid]
                p.on_done(False)
        self.settle_result_waits()
        self.progress_holds()
        self.leader_fallback()
        self.run_executor()
        self.check_dispatches()
        if not self.is_leader() and now >= self.hb_next and self.hb_wait is None:
            self.hb_next = now + self.world.cfg.heartbeat_s
            self.heartbeat()
        if self.unreported and self.report_wait is None and now >= self.report_next:
            self.report()
        self.submit_loop()
        if self.is_leader():
            self.leader_tick()

    def leader_fallback(self) -> None:
        """PySyncObj's leaderFallbackTimeout: a leader cut off from a majority steps
        down after a while (until then it still believes it leads)."""
        if not self.is_leader():
            return
        if self.world.log.reaches_majority(self.id):
            self.minority_since = None
        elif self.minority_since is None:
            self.minority_since = self.world.now
        elif self.world.now - self.minority_since > LEADER_FALLBACK_S:
            self.world.trace(f"{self.id} steps down (no majority)")
            self.step_down()

    def on_message(self, m: Msg) -> None:
        b = m.body
        if m.kind == "reply":
            p = self.rpcs.pop(b["rid"], None)
            if p is not None:
                p.on_done(b["value"])
        elif m.kind == "heartbeat":
            self.handle_heartbeat(m)
        elif m.kind == "dispatch":
            self.handle_dispatch(m)
        elif m.kind == "results":
            self.handle_results(m)
        elif m.kind == "hold":
            self.handle_hold(m)
        elif m.kind == "hold_fan":
            self.handle_hold_fan(m)

    # ------------------------------------------------------------------ executor

    def dispatch_works(self, works: list[Work]) -> int:
        """Executor.dispatch: queue units (a duplicate is ignored); start what fits."""
        n = 0
        for w in works:
            if w.key in self.active:
                continue
            self.active[w.key] = Run(w)
            self.seq += 1
            heapq.heappush(self.ready, (-w.priority, self.seq, w.key))
            n += 1
        self.start_ready(immediate=True)
        for w in works:
            run = self.active.get(w.key)
            if run is not None and not run.started:
                run.behind = [k for k in self.active if k != w.key]
        return n

    def start_ready(self, immediate: bool) -> None:
        """Runner threads: a free slot takes the most urgent waiting unit."""
        busy = sum(1 for r in self.active.values() if r.started)
        while self.ready and busy < self.slots:
            key = heapq.heappop(self.ready)[2]
            run = self.active.get(key)
            if run is None or run.started:
                continue  # handed back by a hold
            busy += 1
            run.started, run.started_wall = True, self.wall()
            r = self.world.rng
            x, p_long = r.random(), self.world.cfg.p_long
            run.finish_at = self.world.now + (r.uniform(3.0, 8.0) if x < p_long else
                                              r.uniform(0.05, 0.6) if x < 0.7 else
                                              r.uniform(0.6, 2.5))
            run.ok = r.random() < 0.85
            if run.cancelled:
                run.finish_at = self.world.now
            else:
                run.counted = True
                run.started_at_once = immediate
                self.world.trace(f"{self.id} starts {run.work.task_id}/{run.work.chunk} "
                                 f"(prio {run.work.priority}, attempt {run.work.attempt})")
                self.world.checker.on_start(self, run, immediate)

    def run_executor(self) -> None:
        now = self.world.now
        for key, run in list(self.active.items()):
            if run.started and run.finish_at <= now:
                self.finish(key, run)
        self.start_ready(immediate=False)

    def finish(self, key: UnitKey, run: Run) -> None:
        del self.active[key]
        w = run.work
        ok = run.ok and not run.cancelled
        if run.counted:
            self.world.checker.on_stop(self.id, key)
        mark = f"x|{self.id}|{w.task_id}|{w.chunk}|{w.attempt}|{w.token}"
        self.world.trace(f"{self.id} ends {w.task_id}/{w.chunk}: "
                         f"{'ok' if ok else 'cancelled' if run.cancelled else 'failed'}")
        self.world.checker.on_result(mark)
        self.unreported[key] = {
            "task_id": w.task_id, "chunk": w.chunk, "attempt": w.attempt, "token": w.token,
            "ok": ok, "exit_code": 0 if ok else (-9 if run.cancelled else 1),
            "result": mark if ok else "", "error": "" if ok else "failed " + mark,
            "node": self.id, "started_at": run.started_wall, "finished_at": self.wall()}

    def kill(self, keys: list[UnitKey]) -> None:
        for key in keys:
            run = self.active.get(tuple(key))
            if run is None:
                continue
            run.cancelled = True
            if run.started:
                run.finish_at = self.world.now
                self.finish(tuple(key), run)

    def hold_units(self, min_priority: int) -> list[Work]:
        """Executor.hold: take back waiting units below min_priority."""
        out = [r.work for r in self.active.values()
               if not r.started and r.work.priority < min_priority]
        for w in out:
            del self.active[w.key]
        return out

    def free_slots(self) -> int:
        return max(0, self.slots - len(self.active))

    # ------------------------------------------------------------------ worker side

    def heartbeat_request(self) -> dict[str, Any]:
        return {"node_id": self.id, "slots": self.slots, "capacity": self.capacity,
                "free_slots": self.free_slots(), "accepting": True,
                "running": sorted(set(self.active) | set(self.unreported))}

    def heartbeat(self) -> None:
        """_heartbeat_loop: to the leader this node believes in, else the next voter."""
        targets = [t for t in self.leader_targets()[:3] if t != self.id]
        if not targets:
            return
        target = targets[self.hb_try % len(targets)]

        def done(resp: Any) -> None:
            self.hb_wait = None
            if not resp:
                self.hb_try += 1
                return
            if resp["accepted"]:
                self.hb_try = 0
                self.hint = target
                if resp["kill"]:
                    self.kill(resp["kill"])
                    for k in resp["kill"]:
                        self.unreported.pop(tuple(k), None)
            elif resp["leader"]:
                self.hint = resp["leader"] if not self.voter else self.hint
                self.hb_try += 1

        self.hb_wait = Pending(0.0, done)
        self.rpc(target, "heartbeat", self.heartbeat_request(),
                 max(0.5, self.world.cfg.heartbeat_s * 2), done)

    def require_leader(self, peer: str) -> bool:
        return self.leader_grpc() == peer

    def handle_dispatch(self, m: Msg) -> None:
        """handle_dispatch: only from the leader this node follows; a voter runs only
        units its replica holds as running here (waiting up to DISPATCH_CHECK_S)."""
        self.dispatch_checks.append((self.world.now + DISPATCH_CHECK_S, m.src,
                                     m.body["rid"], m.body["works"]))
        self.check_dispatches()

    def check_dispatches(self) -> None:
        keep = []
        for deadline, src, rid, works in self.dispatch_checks:
            late = self.world.now >= deadline
            if not self.require_leader(src):
                if late:
                    self.send(src, "reply", {"rid": rid, "value": False})
                else:
                    keep.append((deadline, src, rid, works))
                continue
            found = [w for w in works if self.replica_holds(w)]
            if len(found) == len(works) or late:
                if len(found) < len(works):
                    self.world.trace(f"{self.id} refuses {len(works) - len(found)} "
                                     f"dispatched unit(s) from {src}")
                self.dispatch_works(found)
                self.send(src, "reply", {"rid": rid, "value": True})
            else:
                keep.append((deadline, src, rid, works))
        self.dispatch_checks = keep

    def replica_holds(self, w: Work) -> bool:
        s = self.replica
        if s is None:
            return True  # a non-voter trusts the authenticated leader
        if s.running.get((w.task_id, w.chunk)) != self.id:
            return False
        t = s.tasks.get(w.task_id)
        u = t.unit_at(w.chunk) if t is not None else None
        return u is not None and u.status == "running" and u.attempt == w.attempt \
            and u.token == w.token

    def handle_hold(self, m: Msg) -> None:
        """handle_hold (plain): hand back waiting units below min_priority."""
        if not self.require_leader(m.src):
            self.reply(m, None)
            return
        self.reply(m, self.hold_here(m.body["min_priority"]))

    def hold_here(self, min_priority: int) -> int:
        works = self.hold_units(min_priority)
        for w in works:
            self.world.trace(f"{self.id} hands back {w.task_id}/{w.chunk} (prio {w.priority})")
            self.unreported[w.key] = {
                "task_id": w.task_id, "chunk": w.chunk, "attempt": w.attempt,
                "token": w.token, "ok": False, "exit_code": 0, "result": "", "error": "",
                "node": self.id, "started_at": 0.0, "finished_at": self.wall(),
                "requeue": True, "held": True}
        return len(works)

    def report(self) -> None:
        """_reporter_loop: send unreported results until the leader commits them."""
        batch = dict(list(self.unreported.items())[:2000])

        def done(ok: Any) -> None:
            self.report_wait = None
            if ok:
                self.backoff = 0.0
                for k in batch:
                    self.unreported.pop(k, None)
            else:
                self.report_try += 1
                self.backoff = min(1.0, self.backoff * 2 or 0.05)
                self.report_next = self.world.now + self.backoff

        self.report_wait = Pending(0.0, done)
        if self.is_leader():
            self.accept_results(list(batch.values()), done)
            return
        targets = [t for t in self.leader_targets()[:3] if t != self.id]
        if not targets:
            done(False)
            return
        self.rpc(targets[self.report_try % len(targets)], "results",
                 {"results": list(batch.values())}, 5.0, done)

    # ------------------------------------------------------------------ client API

    def client_submit(self, call: ClientCall, try_no: int) -> None:
        """submit: hold lower units waiting in prefetch windows first, then queue the
        specs for the submit loop (which batches and retries them)."""
        import copy

        assert self.replica is not None
        specs = copy.deepcopy(call.specs)
        top = max(s["priority"] for s in specs)

        def go(complete: bool) -> None:
            call.hold = "ok" if complete else "failed"
            self.submit_q.append((specs, (call, try_no), self.world.now + SUBMIT_RETRY_S))

        if self.replica.running_below(top):
            self.hold_for(top, go)
        else:
            call.hold = "none"
            self.submit_q.append((specs, (call, try_no), self.world.now + SUBMIT_RETRY_S))

    def hold_for(self, priority: int, then: Callable[[bool], None]) -> None:
        if self.is_leader():
            self.hold_workers(priority, then)
            return
        target = self.leader_grpc()
        if not target:
            then(False)
            return
        self.rpc(target, "hold_fan", {"min_priority": priority}, HOLD_TIMEOUT_S + 0.5,
                 lambda v: then(bool(v)))

    def submit_loop(self) -> None:
        """_submit_loop + _propose_submit."""
        while self.submit_q and self.submit_inflight < MAX_INFLIGHT_SUBMITS:
            group, self.submit_q = self.submit_q, []
            now = self.world.now
            for item in [g for g in group if g[2] <= now]:
                self.world.on_submit_done(*item[1], False)
            group = [g for g in group if g[2] > now]
            if not group:
                return
            self.submit_inflight += 1
            self.propose_submit(group)

    def propose_submit(self, group: list) -> None:
        specs = [s for item in group for s in item[0]]

        def done(result: Any, err: int) -> None:
            self.submit_inflight -= 1
            if err == 0 and isinstance(result, list) and len(result) == len(specs):
                for _, call, _ in group:
                    self.world.on_submit_done(*call, True)
                return
            now = self.world.now
            for item in group:
                if now < item[2]:
                    self.submit_q.append(item)
                else:
                    self.world.on_submit_done(*item[1], False)

        self.propose("submit", specs, self.wall(), callback=done)

    def client_cancel(self, tid: str) -> None:
        deadline = self.world.now + SUBMIT_RETRY_S

        def done(result: Any, err: int) -> None:
            if err and self.world.now < deadline and self.up:
                self.propose("cancel", [tid], self.wall(), callback=done)

        self.propose("cancel", [tid], self.wall(), callback=done)

    # ------------------------------------------------------------------ leader side

    def become_leader(self, term: int) -> None:
        """_become_leader: forget in-flight work, give every worker a full lease, and
        wait for an entry of this term to apply before planning."""
        now = self.world.now
        self.leading_term = term
        self.leader_since = now
        self.minority_since = None
        self.assigning.clear()
        self.completing.clear()
        self.run_ewma = None
        for w in self.workers.values():
            w.last_seen = now
        self.leader_ready = False

        def ready(_: Any, err: int) -> None:
            if err == 0 and self.leader_since == now:
                self.leader_ready = True

        self.propose("requeue", [], self.wall(), "", callback=ready)

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
            self.propose("compact", self.wall(), 24 * 3600.0, 100_000,
                         callback=lambda *_: None)

    def plan_and_assign(self) -> None:
        """Scheduler._plan_and_assign: the view from the replica and the worker table,
        decisions.plan_round, one assign command with random fencing tokens."""
        s = self.replica
        assert s is not None
        now = self.world.now
        live = d.live_workers([w.view() for w in self.workers.values()], now,
                              self.world.cfg.lease_s)
        if not live:
            return
        in_flight = tuple(d.InFlight(t, c, w) for units in self.assigning.values()
                          for t, c, w in units)
        floor = self.floor
        view = d.PlanView(
            now, live, in_flight=in_flight,
            completing=frozenset((t, c, w) for (t, c), w in self.completing.items()),
            floor=floor, run_ewma=self.run_ewma,
            running=tuple(d.RunningView(tid, chunk, w, t.priority if t is not None else None)
                          for (tid, chunk), w in s.running.items()
                          for t in (s.tasks.get(tid),)),
            queued_priorities=frozenset(s.queued_by_priority))
        depth = d.queue_depth_needed(view)
        if depth:
            head = s.peek_queued(depth)
            view = replace(view, queued=tuple(
                QueuedUnit(t.id, chunk, t.priority, t.strategy, int(t.spec.get("shards", 0)),
                           len(t.spec.get("items") or ()), t.chunk_count) for t, chunk in head))
        actions = d.plan_round(view)
        if actions.floor_lifted and self.floor == floor:
            self.floor = None
        if not actions.assignments:
            return
        assignments = actions.assignments
        cid = self.world.pid()
        self.assigning[cid] = [(a.task_id, a.chunk, a.worker) for a in assignments]
        tokens = [self.world.rng.getrandbits(63) or 1 for _ in assignments]
        # (for the checker's diagnosis) split tasks left out because their cut is in flight
        flying = {p.task_id for p in in_flight}
        cuts = {u.task_id for u in view.queued
                if u.chunk == -1 and u.strategy == "split" and u.task_id in flying}
        for tok in tokens:
            self.world.checker.on_plan(tok, self.applied, cuts)
        self.world.trace(f"{self.id} assigns " + ", ".join(
            f"{a.task_id}/{a.chunk}->{a.worker}" for a in assignments))

        def done(result: Any, err: int) -> None:
            if err == 0 and result:
                self.dispatch_put_n += 1
                self.dispatch(result)
            self.assigning.pop(cid, None)

        self.propose("assign", [(a.task_id, a.chunk, a.chunk_count, a.worker, tok)
                                for a, tok in zip(assignments, tokens)],
                     self.wall(), self.world.cfg.lease_s, callback=done)

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
        bid = self.dispatch_put_n
        left = self.dispatching[bid] = set()
        for worker, works in by_worker.items():
            if worker == self.id:
                self.dispatch_works(works)
            elif worker in self.workers:
                left.add(worker)
                self.rpc(worker, "dispatch", {"works": works}, DISPATCH_TIMEOUT_S,
                         lambda _v, worker=worker: self.dispatched(bid, worker))
        self.dispatched(bid, "")

    def dispatched(self, bid: int, worker: str) -> None:
        left = self.dispatching.get(bid)
        if left is None:
            return
        left.discard(worker)
        if not left:
            del self.dispatching[bid]
            self.dispatch_done_n += 1

    def check_leases(self, now: float) -> None:
        """Scheduler._check_leases: decisions.expired_leases, one requeue command."""
        s = self.replica
        assert s is not None and self.leader_since is not None
        cfg = self.world.cfg
        actions = d.expired_leases(d.LeaseView(
            now, cfg.lease_s, max(2.5, 4 * cfg.heartbeat_s), self.leader_since,
            tuple(w.view() for w in self.workers.values()),
            tuple(d.RunningView(tid, chunk, worker, None, attempt, token, started)
                  for tid, chunk, attempt, token, worker, started in s.running_units()),
            self.requeue_recent))
        self.requeue_recent = dict(actions.recent)
        for node_id in actions.down:
            self.workers[node_id].down = True
        if not actions.requeue:
            return
        reason = actions.requeue[0].reason
        self.world.trace(f"{self.id} requeues "
                         f"{[f'{r.key[0]}/{r.key[1]}' for r in actions.requeue]}: {reason}")
        self.propose("requeue", [list(r.key) + [self.started_wall] for r in actions.requeue],
                     self.wall(), reason, callback=lambda *_: None)

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
        w.last_seen, w.last_seen_wall = self.world.now, self.wall()
        w.down = False
        if not running or not self.leader_ready:
            return []
        units: dict[d.UnitKey, d.ReplicaUnit | None] = {}
        for tid, chunk, _attempt, _token in running:
            t = s.tasks.get(tid)
            unit = t.unit_at(chunk) if t is not None else None
            units[(tid, chunk)] = None if unit is None else d.ReplicaUnit(
                unit.status, unit.token, s.running.get((tid, chunk)))
        return list(d.units_to_kill(req["node_id"], running, units))

    def handle_heartbeat(self, m: Msg) -> None:
        if not self.is_leader():
            self.reply(m, {"accepted": False, "leader": self.leader_grpc(), "kill": []})
            return
        kill = self.record_heartbeat(m.body)
        self.reply(m, {"accepted": True, "leader": self.id, "kill": kill})

    def handle_results(self, m: Msg) -> None:
        """accept_peer_results: commit only results of units assigned to the sender."""
        if not self.is_leader() or not self.leader_ready:
            self.reply(m, False)
            return
        s = self.replica
        assert s is not None
        ok = [dict(r, node=m.src) for r in m.body["results"]
              if s.running.get((r["task_id"], r["chunk"])) == m.src]
        if not ok:
            self.reply(m, True)
            return
        self.accept_results(ok, lambda v: self.reply(m, v))

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
                self.run_ewma = d.update_run_ewma(self.run_ewma, [r for r, _ in group])
            else:
                self.completions.extend(g for g in group if g[1] is None or g[1].value is None)
            for _, fut in group:
                if fut is not None and fut.value is None:
                    if err == 0:
                        fut.value = True
                    elif not self.is_leader():
                        fut.value = False

        self.propose("complete", results, self.wall(), callback=done, timeout_s=3.0)

    # ------------------------------------------------------------------ holds

    def handle_hold_fan(self, m: Msg) -> None:
        if not self.is_leader():
            self.reply(m, False)
            return
        self.hold_workers(m.body["min_priority"], lambda ok: self.reply(m, ok))

    def hold_workers(self, priority: int, on_done: Callable[[bool], None]) -> None:
        """hold_workers: stop planning below priority (the floor), let assignments
        already proposed reach their workers, then have every worker with a prefetch
        window hand back its waiting units below priority. on_done(True) when every
        worker answered within HOLD_TIMEOUT_S."""
        deadline = self.world.now + HOLD_TIMEOUT_S
        self.floor = d.hold_floor(priority, deadline)
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
