"""One simulated node process: a real replica, its worker side and its leader side.

The replica is the real :class:`~taskandgo.consensus.state.SchedulerState`, fed the
committed log in order. ``worker.py`` and ``leader.py`` hold the two sides (mixins,
mirroring ``node/worker.py`` and ``node/scheduling.py``); this module holds what a
node process is: its state (``reset`` is a fresh process), proposals and their
callbacks (``node/replica.py``), the submit path (``node/submitting.py``) and one
:meth:`SimNode.tick`, which runs one pass of each of the node's threads. RPCs are
:class:`~.world.Network` messages; a blocking call is a :class:`~.worker.Pending`
record with a deadline that ``tick`` settles.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskandgo.consensus.commands import (
    Cancel,
    Command,
    Submit,
    Verify,
    WriteSchedules,
    from_args,
)
from taskandgo.consensus.state import SchedulerState
from taskandgo.node import decisions as d
from taskandgo.node.placement import spec_prefer, spec_request, spec_require
from taskandgo.strategies import QueuedUnit

from .leader import MAX_INFLIGHT_ASSIGNS, HoldOp, LeaderSide, WorkerInfo
from .timing import TimingSide
from .worker import Pending, Run, UnitKey, Work, WorkerSide


def apply(state: SchedulerState, name: str, args: Any) -> Any:
    """A log entry applied to a replica as ReplicatedState does: the typed command
    rebuilt from its log form, applied to the state (result, events)."""
    command = from_args(name, args)
    assert not isinstance(command, Verify)  # the simulated log carries no audits
    return command.apply(state)

if TYPE_CHECKING:
    from .world import ClientCall, Msg, World

SUBMIT_RETRY_S = 3.0
MAX_INFLIGHT_SUBMITS = 4
LEADER_FALLBACK_S = 2.0
LEADER_CHANGED = 5  # PySyncObj's FAIL_REASON: the command may or may not commit
HOLD_TIMEOUT_S = 1.0

__all__ = ["Run", "SimNode", "Work"]


class SimNode(WorkerSide, LeaderSide, TimingSide):
    """One node process. ``reset()`` is a fresh process: nothing in memory survives."""

    def __init__(self, world: World, nid: str, voter: bool) -> None:
        self.world = world
        self.id = nid
        self.voter = voter
        self.up = True
        self.paused = False
        self.paused_at = 0.0
        self.resumed_at = 0.0
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
        self.hb_ok_at = self.world.now  # when a leader last accepted its heartbeat
        self.lease_from = self.world.now  # when it sent the last accepted heartbeat
        self.lease_lost: set = set()  # units stopped by check_lease
        self.report_next = 0.0
        self.report_wait: Pending | None = None
        self.report_try = 0
        self.backoff = 0.0
        self.dispatch_checks: list[tuple[float, str, int, int | None, list[Work]]] = []
        self.rpcs: dict[int, Pending] = {}
        # leader side
        self.workers: dict[str, WorkerInfo] = {}
        self.leader_since: float | None = None
        self.leader_ready = False
        self.assigning: dict[int, list[tuple[str, int, str, int]]] = {}
        self.completing: dict[tuple[str, int], str] = {}
        self.completing_attempt: dict[tuple[str, int], tuple[int, int]] = {}
        self.completions: list[tuple[dict[str, Any], Pending | None]] = []
        self.complete_inflight = 0
        self.result_waits: list[Pending] = []
        self.requeue_recent: dict[d.AttemptKey, float] = {}
        self.floors: tuple[d.Floor, ...] = ()
        self.run_s_by_kind: dict[str, float] = {}  # Scheduler._run_s_by_kind
        self.kind_of: dict[tuple[str, int], str] = {}
        self.self_hb_at = -1.0
        self.last_lease_check = 0.0
        self.last_compact = -10.0
        self.holds: list[HoldOp] = []
        self.dispatch_put_n = 0
        self.dispatch_done_n = 0
        self.dispatching: dict[int, set[str]] = {}
        self.dispatch_prio: dict[int, int] = {}  # Dispatcher._undelivered
        # submits
        self.submit_q: list[tuple[list, tuple[ClientCall, int], float]] = []
        self.submit_inflight = 0
        self.lowest_seen: int | None = None  # Submitter._lowest_seen

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

    def pause(self) -> None:
        """SIGSTOP of the whole pod: the node and the units it runs freeze."""
        self.paused, self.paused_at = True, self.world.now

    def resume(self) -> None:
        self.paused, self.resumed_at = False, self.world.now
        for run in self.active.values():
            if run.started:
                run.finish_at += self.world.now - self.paused_at

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

    def propose(self, command: Command, *, callback: Callable[[Any, int], None],
                timeout_s: float = 2.0) -> None:
        """Replica.propose: callback(result, err) exactly once: when the command applies
        here, at once when no leader can be reached, or LEADER_CHANGED at timeout_s
        or when this node stops leading (it may still commit)."""
        pid = self.world.pid()
        self.proposals[pid] = (self.world.now + timeout_s, callback)
        outcome = self.world.log.propose(self, pid, command.NAME, command.args())
        if outcome == "refused":
            self.refused.append(pid)

    def apply_to(self, index: int) -> None:
        assert self.replica is not None
        while self.applied < index:
            e = self.world.log.entries[self.applied]
            result, _ = apply(self.replica, e.name, pickle.loads(e.blob))
            self.applied += 1
            self.world.checker.on_apply(self)
            if e.proposer == self.id and e.pid in self.proposals:
                self.proposals.pop(e.pid)[1](result, 0)

    def release_proposals(self, everything: bool, fire: bool = True) -> None:
        if not self.proposals:
            self.refused = []
            return
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
        if self.is_leader():
            if self.world.log.reaches_majority(self.id):
                self.lease_from = now
            self.check_lease()
        elif now >= self.hb_next and self.hb_wait is None:
            self.check_lease()
            self.hb_next = now + self.world.cfg.heartbeat_s
            self.heartbeat()
        if self.unreported and self.report_wait is None and now >= self.report_next:
            self.report()
        self.submit_loop()
        if self.is_leader():
            self.leader_tick()
            self.timing_tick()

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

    # ------------------------------------------------------------------ client API

    def client_submit(self, call: ClientCall, try_no: int) -> None:
        """submit: hold lower units waiting in prefetch windows first, then queue the
        specs for the submit loop (which batches and retries them)."""
        assert self.replica is not None
        specs = copy.deepcopy(call.specs)
        top = max(s["priority"] for s in specs)

        def go(complete: bool) -> None:
            call.hold = "ok" if complete else "failed"
            self.submit_q.append((specs, (call, try_no), self.world.now + SUBMIT_RETRY_S))

        s = self.replica
        prios = set(s.queued_by_priority)
        for tid, _chunk in (*s.running, *s.delayed):
            t = s.tasks.get(tid)
            if t is not None:
                prios.add(t.priority)
        seen = [p for p in (self.lowest_seen, min(prios, default=None)) if p is not None]
        seen_low = min(seen) if seen else None
        low = min(sp["priority"] for sp in specs)
        self.lowest_seen = low if seen_low is None else min(seen_low, low)
        if d.needs_hold(top, seen_low):
            self.hold_for(top, tuple(sp["id"] for sp in specs), go)
        else:
            call.hold = "none"
            self.submit_q.append((specs, (call, try_no), self.world.now + SUBMIT_RETRY_S))

    def hold_for(self, priority: int, task_ids: tuple[str, ...],
                 then: Callable[[bool], None]) -> None:
        if self.is_leader():
            self.hold_workers(priority, then, task_ids)
            return
        target = self.leader_grpc()
        if not target:
            then(False)
            return
        self.rpc(target, "hold_fan", {"min_priority": priority, "task_ids": task_ids},
                 HOLD_TIMEOUT_S + 0.5, lambda v: then(bool(v)))

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
        fast = self.fast_path(specs)

        def done(result: Any, err: int) -> None:
            if fast is not None:
                both = err == 0 and isinstance(result, tuple) and len(result) == 2
                fast[2](result[1] if both else None, err if both or err else -1)
                if both:
                    result = result[0]
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

        if fast is None:
            self.propose(Submit(tuple(specs), self.wall()), callback=done)
        else:
            self.propose(Submit(tuple(specs), self.wall(), fast[0], fast[1]), callback=done)

    def fast_path(self, specs: list[dict[str, Any]]) -> Any:
        """Scheduler.fast_path: on the ready leader, a submit of tasks the state queues
        at once (no parents, no start time, no concurrency keys) and does not hold yet
        is planned by decisions.fast_path (LeaderSide.plan_and_assign with its units)."""
        s = self.replica
        if s is None or not self.is_leader() or not self.leader_ready or not specs \
                or len(self.assigning) >= MAX_INFLIGHT_ASSIGNS or not self.world.cfg.fast_path:
            return None
        if any(sp.get("after") or sp.get("run_at") is not None or sp.get("concurrency_keys")
               for sp in specs):
            return None
        ids = [str(sp["id"]) for sp in specs]
        if len(set(ids)) != len(ids) or any(t in s.tasks for t in ids):
            return None
        return self.plan_and_assign(fast=[QueuedUnit(
            str(sp["id"]), -1, int(sp["priority"]), str(sp.get("strategy") or "batch"),
            int(sp.get("shards", 0) or 0), len(sp.get("items") or ()), 0, d.unit_kind(sp),
            spec_request(sp), spec_require(sp), spec_prefer(sp)) for sp in specs])

    def client_schedule(self, op: dict[str, Any]) -> None:
        """ScheduleBook.create at this node (retried like a cancel)."""
        deadline = self.world.now + SUBMIT_RETRY_S

        def done(result: Any, err: int) -> None:
            if err and self.world.now < deadline and self.up:
                self.propose(WriteSchedules((op,), self.wall()), callback=done)

        self.propose(WriteSchedules((op,), self.wall()), callback=done)

    def client_cancel(self, tid: str) -> None:
        deadline = self.world.now + SUBMIT_RETRY_S

        def done(result: Any, err: int) -> None:
            if err and self.world.now < deadline and self.up:
                self.propose(Cancel((tid,), self.wall()), callback=done)

        self.propose(Cancel((tid,), self.wall()), callback=done)

