"""The worker side of a simulated node: its executor and what it tells the leader.

A mixin of :class:`~.node.SimNode` (its state is set in ``SimNode.reset``), mirroring
``node/executor.py`` (units wait in a priority queue, ``slots`` of them run) and
``node/worker.py`` (heartbeats, Dispatch with the voter's replica check, Hold,
reporting results until the leader has committed them).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskandgo.node import decisions as d

if TYPE_CHECKING:
    from .world import Msg

DISPATCH_CHECK_S = 1.5

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
    cut_off: float = 0.0  # longest time without an accepted heartbeat while it ran


@dataclass
class Pending:
    """A call waiting for something, settled by tick(): value None until done."""

    deadline: float
    on_done: Callable[[Any], None]
    value: Any = None
    parts: list = field(default_factory=list)


class WorkerSide:
    """Executor and worker side of :class:`~.node.SimNode`."""

    world: Any
    id: str

    def dispatch_works(self, works: list[Work], floor: int | None = None) -> int:
        """WorkerSide._run + Executor.dispatch: kill older attempts of the units
        dispatched, hand back at once those below the leader's floor that find no
        free slot (decisions.gate_arrivals), queue the others (a duplicate is
        ignored); start what fits."""
        newer = {(w.task_id, w.chunk): w.attempt for w in works}
        older = [k for k in self.active if k[2] < newer.get((k[0], k[1]), -1)]
        if older:
            self.kill(older)
            for k in older:
                self.unreported.pop(k, None)
        take, back = d.gate_arrivals([w.priority for w in works], self.free_slots(), floor)
        if back:
            self.hand_back([works[i] for i in back])
        works = [works[i] for i in take]
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
        if key in self.lease_lost:  # stopped by check_lease: handed back, not failed
            self.lease_lost.discard(key)
            if not ok:
                self.unreported[key].update(requeue=True, error="handed back: lease")

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
                "running": sorted(set(self.active) | set(self.unreported)),
                "resources": self.world.offer_of(self.id)}

    def heartbeat(self) -> None:
        """_heartbeat_loop: to the leader this node believes in, else the next voter."""
        targets = [t for t in self.leader_targets()[:3] if t != self.id]
        if not targets:
            return
        target = targets[self.hb_try % len(targets)]
        sent = self.world.now

        def done(resp: Any) -> None:
            self.hb_wait = None
            if not resp:
                self.hb_try += 1
                return
            if resp["accepted"]:
                self.hb_try = 0
                self.hint = target
                for run in self.active.values():  # (for the checker's diagnosis)
                    if run.started:
                        run.cut_off = max(run.cut_off, self.world.now - self.hb_ok_at)
                self.hb_ok_at = self.world.now
                self.lease_from = sent
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

    def check_lease(self) -> None:
        """WorkerSide._check_lease: once a lease has passed since this node sent the
        last heartbeat a leader accepted, stop its units (results in hand are kept)."""
        if self.world.now - self.lease_from <= self.world.cfg.lease_s:
            return
        keys = list(self.active)
        if keys:
            self.world.trace(f"{self.id} stops {len(keys)} unit(s): no heartbeat accepted "
                             "for a lease")
            self.lease_lost.update(keys)
            self.kill(keys)

    def require_leader(self, peer: str) -> bool:
        return self.leader_grpc() == peer

    def handle_dispatch(self, m: Msg) -> None:
        """handle_dispatch: only from the leader this node follows; a voter runs only
        units its replica holds as running here (waiting up to DISPATCH_CHECK_S)."""
        self.dispatch_checks.append((self.world.now + DISPATCH_CHECK_S, m.src,
                                     m.body["rid"], m.body.get("floor"), m.body["works"]))
        self.check_dispatches()

    def check_dispatches(self) -> None:
        keep = []
        for deadline, src, rid, floor, works in self.dispatch_checks:
            late = self.world.now >= deadline
            if not self.require_leader(src):
                if late:
                    self.send(src, "reply", {"rid": rid, "value": False})
                else:
                    keep.append((deadline, src, rid, floor, works))
                continue
            found = [w for w in works if self.replica_holds(w)]
            if len(found) == len(works) or late:
                if len(found) < len(works):
                    self.world.trace(f"{self.id} refuses {len(works) - len(found)} "
                                     f"dispatched unit(s) from {src}")
                self.dispatch_works(found, floor)
                self.send(src, "reply", {"rid": rid, "value": True})
            else:
                keep.append((deadline, src, rid, floor, works))
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
        self.hand_back(works)
        return len(works)

    def hand_back(self, works: list[Work]) -> None:
        for w in works:
            self.world.trace(f"{self.id} hands back {w.task_id}/{w.chunk} (prio {w.priority})")
            self.unreported[w.key] = {
                "task_id": w.task_id, "chunk": w.chunk, "attempt": w.attempt,
                "token": w.token, "ok": False, "exit_code": 0, "result": "", "error": "",
                "node": self.id, "started_at": 0.0, "finished_at": self.wall(),
                "requeue": True, "held": True}

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
            self.accept_from(self.id, list(batch.values()), done)
            return
        targets = [t for t in self.leader_targets()[:3] if t != self.id]
        if not targets:
            done(False)
            return
        self.rpc(targets[self.report_try % len(targets)], "results",
                 {"results": list(batch.values())}, 5.0, done)

