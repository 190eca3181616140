"""What must hold in every simulated schedule, checked as it happens.

"Committed state" below is the state after every committed command, applied at
commit (``World.truth``, a real SchedulerState); an index is a position in the log.

1. **Ends exactly once.** A task reaches a final state (succeeded, failed,
   cancelled) at most once and never leaves it; after the faults end, every task
   whose submit was acknowledged to its client reaches one, and until then some
   unit ends (a result or a requeue commits) at least every ``stall_s``.
2. **No fenced result.** When a complete command changes a unit's result or error,
   the result is of an execution that really ran, on the node the unit was assigned
   to, with the unit's current attempt and token, while the unit was running.
3. **Replicas agree.** Any two replicas that applied the same number of entries have
   equal ``fingerprint()`` (compared every ``FP_EVERY`` entries, where a fingerprint is
   most of a step's cost, and at the end, when every replica has applied the log).
4. **Strict priority.** A unit H is *more urgent* than L when its priority is
   higher and its queue key is lower (aging or clock jumps may order them the
   other way; then it is not). L's slot is *offered* when the leader plans L (if L
   starts as soon as it arrives: it was given a free slot) or when L starts (if it
   waited in a prefetch window: the slot it takes freed then). When L starts, no
   more urgent H may be queued in the committed state that was already queued at
   the offer (for a planned slot: at the index the leader's replica had applied).
   Excused, and counted: H's submit could not hold lower units back (the hold is
   best effort: no leader reachable, or a worker did not answer within its
   timeout); H holds a concurrency key with a limit (it is passed over while the
   key has no room, by design).
5. **One run at a time, give or take a lease.** Two executions of one unit (on two
   nodes, or two attempts on one) overlap by at most ``lease_s``. A paused node
   (the whole pod frozen, its units too) overlaps from when it resumes.
6. **Lost units return.** After the faults end, a unit running in the committed state
   that its worker does not hold (not running, waiting, unreported, nor on its way
   there in a Dispatch) is requeued within a lease, plus the leader's grace for a
   live worker that does not run it (max(2.5 s, 4 heartbeats)), plus ``SETTLE_S``
   (an election, a heartbeat, a commit).
7. **Bounded queues.** A worker holds (running or waiting) at most slots + prefetch
   units whose assignment to it is current in the committed state, and at most as
   many again whose assignment has ended (cancelled, requeued, finished) that it has
   not been told to kill yet; the network, the leader's pending completions and a
   worker's unreported results stay bounded.
8. **Not before its time.** A delayed task (spec ``run_at``) is queued (released by a
   ``write_start_due`` command) or assigned only once the committed state's clock has
   reached its ``run_at``; until then it is ``scheduled`` and in no queue.
8b. **After its parents.** A dependent task (spec ``after``) is queued only once every
   parent has succeeded (``after_any``: ended); a parent that failed or was cancelled
   ends it ``upstream_failed`` instead (consensus/state.py ``_finish``).
9. **One task per slot.** A schedule creates at most one task per (schedule, slot),
   whichever leader fires it and however often.
10. **No slot missed.** A fire that moves a schedule past slots without firing them
   (the missed-slot policy) does so only for slots more than the schedule's
   ``catchup_s`` late by the firing leader's clock: a leader change or a slow leader
   delays slots, it never loses one.
11. **Never over-committed** (placement, the quarter of schedules whose nodes offer
   cpu: ``SimConfig.cpus``). The cpu requested by the units that run at once on a node
   is at most what that node offers.
12. **Keys within limits** (concurrency keys, the schedules with ``SimConfig.key_limit``:
   the limit is committed before any task is submitted). The units holding a key that
   run at once anywhere, each under an assignment still current in the committed
   state, are at most the key's limit, whichever leader assigned them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskandgo.consensus.state import FINAL, RUNNING
from taskandgo.node.timing import next_slot

if TYPE_CHECKING:
    from .node import Run, SimNode
    from .world import World

WHOLE = -1
BOUND = 5000
FP_EVERY = 8
SETTLE_S = 3.0


class Violation(AssertionError):
    """An invariant failed; ``world`` is the failing schedule (seed, trace)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.world: World | None = None


class Checker:
    """Observes the world through hooks and raises :class:`Violation`."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.fps: dict[int, tuple] = {}  # log index -> fingerprint of the first replica there
        self.final: dict[str, float] = {}  # task id -> finished_at of its final state
        self.queued_since: dict[tuple[str, int], int] = {}  # queued unit -> index it queued at
        self.plan_index: dict[int, int] = {}  # token -> index the planner's replica had applied
        self.plan_cuts: dict[int, set[str]] = {}  # token -> split tasks whose cut was in flight
        self.plan_stale: dict[int, list[str]] = {}  # token -> units freed by a stale result
        self.plan_lifted: dict[int, int] = {}  # token -> priority of a floor lifted early
        self.execs: dict[tuple[str, int], dict[tuple, tuple[str, float]]] = {}
        self.results: set[str] = set()  # marks of executions that ended
        self.before: dict[tuple[str, int], tuple] = {}
        self.excused: dict[str, int] = {}
        self.lost_since: dict[tuple, float] = {}
        self.progress_at = 0.0  # when a unit last ended
        self.delayed_since: dict[tuple[str, int], float] = {}
        self.held_by_clock: set[tuple[str, int]] = set()  # retries the wall clock kept
        self.slot_tasks: dict[str, int] = {}  # a schedule's task id -> fires that made it
        self.last_slots: dict[str, float] = {}  # schedule -> last slot before a fire
        #: node -> attempt running there -> the cpu its task requested (placement)
        self.cpu_in_use: dict[str, dict[tuple, float]] = {}
        self.key_runs: dict[tuple, str] = {}  # executions holding a key -> their node

    def fail(self, kind: str, detail: str) -> None:
        self.world.trace(f"VIOLATION {kind}: {detail}")
        raise Violation(kind, detail)

    # ------------------------------------------------------------------ the log

    def unit(self, tid: str, chunk: int) -> Any:
        t = self.world.truth.tasks.get(tid)
        if t is None:
            return None
        return t.peek_unit() if chunk == WHOLE and t.chunks is None else t.unit_at(chunk)

    def before_commit(self, name: str, args: tuple) -> None:
        self.before = {}
        if name == "write_timetable_fire":
            self.last_slots = {sid: sc["last_slot"]
                               for sid, sc in self.world.truth.schedules.items()}
        if name != "complete":
            return
        for r in args[0]:
            u = self.unit(r["task_id"], r["chunk"])
            if u is not None:
                self.before[(r["task_id"], r["chunk"])] = (
                    u.status, u.attempt, u.token, u.node, u.result, u.error)

    def after_commit(self, index: int, name: str, args: tuple, events: list) -> None:
        truth = self.world.truth
        if name == "write_timetable_fire":
            self.check_fires(index, args[1], events)
        for kind, tid, status, chunk, *_ in events:
            run_at = truth.tasks[tid].spec.get("run_at") if tid in truth.tasks else None
            if kind == "task" and status in ("queued", "running") and run_at \
                    and truth.now < run_at:
                self.fail("before its time", f"task {tid} {status} at index {index} by "
                          f"{name}, clock {truth.now:.3f} < run_at {run_at:.3f}")
            spec = truth.tasks[tid].spec if tid in truth.tasks else {}
            if kind == "task" and status in ("queued", "running") and spec.get("after"):
                for p in spec["after"]:
                    parent = truth.tasks.get(p)
                    done = parent is not None and (parent.status == "succeeded" or (
                        spec.get("after_any") and parent.status in FINAL))
                    if not done:
                        self.fail("before its parents", f"task {tid} {status} at index "
                                  f"{index} while its parent {p} is "
                                  f"{parent.status if parent else 'unknown'}")
            if status != "running":
                self.progress_at = self.world.now
            if kind != "task" or chunk != WHOLE:
                continue
            if status in FINAL:
                if tid in self.final:
                    self.fail("ended twice", f"task {tid} ended again ({status}) at index {index}")
                self.final[tid] = truth.tasks[tid].finished_at
            elif tid in self.final:
                self.fail("ended twice", f"task {tid} left its final state ({status})")
        for key, (status, attempt, token, node, result, error) in self.before.items():
            u = self.unit(*key)
            if (u.result, u.error) == (result, error):
                continue
            mark = (u.result or u.error).removeprefix("failed ")
            if not mark.startswith("x|"):
                continue
            _, ran_on, _, _, a, t = mark.split("|")
            if status != RUNNING or (int(a), int(t)) != (attempt, token) or ran_on != node \
                    or mark not in self.results:
                self.fail("fenced result", f"{key} took {mark!r} at index {index} while "
                          f"{status} attempt {attempt} token {token} on {node}")
        live = {(e[2], e[3]) for e in truth.heap if truth._is_live_entry(e)}
        for key in [k for k in self.queued_since if k not in live]:
            del self.queued_since[key]
        for key in sorted(live):
            self.queued_since.setdefault(key, index)

    def check_fires(self, index: int, now: float, events: list) -> None:
        """Invariants 9 and 10 for one fire command (``now``: the leader's clock)."""
        truth = self.world.truth
        for kind, _sid, outcome, _chunk, tid, _at in events:
            if kind == "schedule" and outcome == "fired":
                self.slot_tasks[tid] = self.slot_tasks.get(tid, 0) + 1
                if self.slot_tasks[tid] > 1:
                    self.fail("one task per slot", f"{tid} created again at index {index}")
        for sid, before in self.last_slots.items():
            sc = truth.schedules.get(sid)
            if sc is None or sc["last_slot"] == before:
                continue
            first = next_slot(sc["cron"], sc["tz"], before)
            if first is not None and first < sc["last_slot"] \
                    and now - first <= sc["catchup_s"]:
                self.fail("slot missed", f"schedule {sid} moved from {before} to "
                          f"{sc['last_slot']} at index {index}, skipping slot {first} only "
                          f"{now - first:.2f}s late (catch-up {sc['catchup_s']}s)")

    def on_apply(self, node: SimNode, always: bool = False) -> None:
        assert node.replica is not None
        if node.applied % FP_EVERY and not always:
            return
        fp = node.replica.fingerprint()
        first = self.fps.setdefault(node.applied, fp)
        if first != fp:
            self.fail("replicas diverged", f"{node.id} at index {node.applied}")

    # ------------------------------------------------------------------ executions

    def on_plan(self, token: int, applied: int, cuts: set[str], stale: list[str],
                lifted: Any) -> None:
        self.plan_index[token] = applied
        if lifted is not None:
            self.plan_lifted[token] = lifted.priority
        if cuts:
            self.plan_cuts[token] = cuts
        if stale:
            self.plan_stale[token] = stale

    def on_start(self, node: SimNode, run: Run, immediate: bool) -> None:
        w = self.world
        work = run.work
        self.execs.setdefault((work.task_id, work.chunk), {})[work.key] = (node.id, w.now)
        self.check_committed(node.id, work)
        low = w.truth.tasks.get(work.task_id)
        offer = self.plan_index.get(work.token) if immediate else len(w.log.entries)
        if low is None or offer is None:
            return
        for (tid, chunk), since in self.queued_since.items():
            high = w.truth.tasks[tid]
            if since > offer or high.priority <= low.priority or high.key >= low.key:
                continue
            if high.spec.get("concurrency_keys") and any(
                    k in w.truth.limits for k in high.spec["concurrency_keys"]):
                # Passed over while its key has no room, by design (strategies/planner.py).
                self.excused["priority (held by its key)"] = \
                    self.excused.get("priority (held by its key)", 0) + 1
                continue
            call = w.calls.get(tid)
            how = call.hold if call is not None else "none"
            if how == "failed":
                self.excused["priority (hold failed)"] = \
                    self.excused.get("priority (hold failed)", 0) + 1
                continue
            self.fail("priority", f"{work.task_id}/{work.chunk} (prio {low.priority}) started "
                      f"on {node.id} ({'planned slot' if immediate else 'from its window'}, "
                      f"offered at index {offer}) while {tid}/{chunk} (prio {high.priority}, "
                      f"queued since index {since}, its submit's hold: {how}) was queued"
                      + self.diagnose(node, run, tid, chunk, since))

    def diagnose(self, node: SimNode, run: Run, high: str, chunk: int, since: int) -> str:
        """What the schedule shows about why (named in KNOWN, test_sim.py)."""
        work = run.work
        hints = []
        unit = self.unit(high, chunk)
        planned = self.plan_index.get(work.token, 0)
        if unit is not None and unit.attempt > 0 and since > planned and not run.started_at_once:
            hints.append(f"{high}/{chunk} came back to the queue (a retry or requeue, attempt "
                         f"{unit.attempt}) after the unit was put in a window; no hold "
                         "followed")
        if high in self.plan_cuts.get(work.token, ()):
            hints.append(f"planned while the first assignment (the cut) of split task {high} "
                         "was in flight")
        floor = self.plan_lifted.get(work.token)
        high_task = self.world.truth.tasks[high]
        call = self.world.calls.get(high)
        if call is not None and call.hold == "none" and not run.started_at_once:
            hints.append(f"the submit of {high} skipped the hold (no lower unit was running "
                         "in the replica it checked), and lower units went into windows "
                         "before it committed")
        low_task = self.world.truth.tasks[work.task_id]
        if floor is not None and high_task.priority >= floor > low_task.priority:
            hints.append(f"planned after a hold's floor (priority {floor}) was lifted before "
                         "it expired because a unit at or above that priority was queued "
                         "(not necessarily the one the hold was for)")
        stale = sorted(f"{k[0]}/{k[1]}" for k in run.behind if not self.current(k, node.id))
        if stale:
            hints.append(f"{node.id} still held {stale}, whose assignment had ended "
                         "(cancelled or requeued), when the unit arrived")
        return "; cause: " + "; ".join(hints) if hints else ""

    def check_committed(self, node_id: str, work: Any) -> None:
        """Never over-committed: the cpu requested by the units running at once on a
        node is at most what it offers (a unit starting that would exceed it)."""
        t = self.world.truth.tasks.get(work.task_id)
        if t is not None and t.spec.get("concurrency_keys"):
            self.check_keys(node_id, work, t.spec["concurrency_keys"])
        cpu = dict(t.spec.get("resources") or {}).get("cpu", 0.0) if t is not None else 0.0
        if not cpu:
            return
        mine = self.cpu_in_use.setdefault(node_id, {})
        mine[work.key] = cpu
        offer = self.world.offer_of(node_id).get("cpu", 0.0)
        if sum(mine.values()) > offer + 1e-9:
            self.fail("over-committed", f"{node_id} offers cpu={offer:g} and runs "
                      + ", ".join(f"{k[0]}/{k[1]} (attempt {k[2]}, cpu={v:g})"
                                  for k, v in sorted(mine.items())))

    def check_keys(self, node_id: str, work: Any, keys: list[str]) -> None:
        """Keys within limits: a unit holding a key starts; with it, the executions
        holding that key under a current assignment are at most its limit."""
        self.key_runs[work.key] = node_id
        limits = self.world.truth.limits
        for k in keys:
            if k not in limits:
                continue
            current = sorted(x for x, n in self.key_runs.items() if self.current(x, n)
                             and k in (self.world.truth.tasks[x[0]].spec.get("concurrency_keys")
                                       or ()))
            if len(current) > limits[k]:
                self.fail("keys over limit", f"key {k} (limit {limits[k]}) held by "
                          + ", ".join(f"{x[0]}/{x[1]} (attempt {x[2]})" for x in current))

    def on_stop(self, node_id: str, key: tuple) -> None:
        self.key_runs.pop(key, None)
        self.cpu_in_use.get(node_id, {}).pop(key, None)
        runs = self.execs.get((key[0], key[1]))
        if runs is not None:
            runs.pop(key, None)

    def on_result(self, mark: str) -> None:
        self.results.add(mark)

    # ------------------------------------------------------------------ every step

    def after_step(self) -> None:
        w = self.world
        lease = w.cfg.lease_s
        for unit, runs in self.execs.items():
            if len(runs) > 1:
                # A paused node's units are frozen: they overlap from its resumption.
                starts = sorted(((n, max(at, w.nodes[n].resumed_at)) for n, at in runs.values()
                                 if not w.nodes[n].paused), key=lambda r: r[1])
                if len(starts) > 1 and w.now - starts[-1][1] > lease:
                    stale = [(n, k) for k, (n, _) in runs.items() if not self.current(k, n)]
                    self.fail("ran twice at once", f"{unit[0]}/{unit[1]} on {starts} for "
                              f"{w.now - starts[-1][1]:.2f}s > lease {lease}s"
                              + (self.why_twice(*stale[0]) if stale else ""))
        for n in w.nodes.values():
            current = sum(1 for k in n.active if self.current(k, n.id))
            if current > n.capacity or len(n.active) > 2 * n.capacity:
                self.fail("bounded queues", f"{n.id} holds {len(n.active)} units "
                          f"({current} current), capacity {n.capacity}" + self.why_full(n))
            if len(n.unreported) > BOUND or len(n.completions) > BOUND:
                self.fail("bounded queues", f"{n.id}: {len(n.unreported)} unreported, "
                          f"{len(n.completions)} completions")
        if len(w.net.queue) > BOUND:
            self.fail("bounded queues", f"{len(w.net.queue)} messages in flight")
        if not w.faulty:
            self.check_lost()
            self.watch_retries()

    def watch_retries(self) -> None:
        """Note retries waiting (10 s and more) while the leader's wall clock is behind
        the replicated clock, which then no command moves (for the diagnosis of a
        stall)."""
        w = self.world
        since = {k: self.delayed_since.get(k, w.now) for k in w.truth.delayed}
        self.delayed_since = since
        leader = w.log.leader
        for key, at in since.items():
            if w.now - at > 10.0 and leader is not None \
                    and w.wall(leader) < w.truth.now - 1.0:
                self.held_by_clock.add(key)

    def check_lost(self) -> None:
        w = self.world
        held: set[tuple] = set()
        for n in w.nodes.values():
            held.update(n.active)
            held.update(n.unreported)
            for *_, works in n.dispatch_checks:
                held.update(x.key for x in works)
        for _, _, m in w.net.queue:
            if m.kind == "dispatch":
                held.update(x.key for x in m.body["works"])
        lost = {}
        within = w.cfg.lease_s + max(2.5, 4 * w.cfg.heartbeat_s) + SETTLE_S
        for tid, chunk, attempt, token, node, started in w.truth.running_units():
            key = (tid, chunk, attempt, token)
            if key not in held:
                lost[key] = self.lost_since.get(key, w.now)
                if w.now - lost[key] > within:
                    self.fail("lost unit not requeued", f"{tid}/{chunk} attempt {attempt} is "
                              f"running on {node} in the committed state, but {node} has not "
                              f"held it for {w.now - lost[key]:.1f}s; "
                              f"{self.why_kept(node, started)}")
        self.lost_since = lost

    def why_full(self, node: SimNode) -> str:
        """Was a unit planned onto node into a slot freed by a result of an older
        attempt being committed (the leader's completing map is keyed by unit)?"""
        hints = []
        stale = sorted({u for k in node.active for u in self.plan_stale.get(k[3], ())})
        if stale:
            hints.append(f"planned while the leader counted the slots of {stale} free: it "
                         "was committing results of older attempts of those units from this "
                         "worker (the leader's completing map is keyed by unit, not by "
                         "attempt)")
        gone = sorted(f"{k[0]}/{k[1]}" for k in node.active if not self.current(k, node.id)
                      and "is not running it" in getattr(self.unit(k[0], k[1]), "error", ""))
        if gone:
            hints.append(f"{gone} were requeued as 'not running it' while this worker held "
                         "them (the leader compared wall-clock readings that disagree: its "
                         "clock jumped between them, or two leaders' clocks differ)")
        again = sorted(f"{k[0]}/{k[1]}" for k in node.active if not self.current(k, node.id)
                       and any(j[:2] == k[:2] and self.current(j, node.id) for j in node.active))
        if again:
            hints.append(f"{again} were requeued while this worker was up and held them "
                         "(its heartbeats lost, or the 'not running it' check) and given "
                         "back to it as new attempts: it holds both until a heartbeat answer "
                         "says kill the old ones")
        return "; cause: " + "; ".join(hints) if hints else ""

    def why_twice(self, node_id: str, key: tuple) -> str:
        n = self.world.nodes[node_id]
        run = n.active.get(key)
        if n.is_leader() or run is None:
            return ""
        cut = max(run.cut_off, self.world.now - n.hb_ok_at)
        return (f"; cause: {node_id} kept running an attempt no longer its own; while it ran, "
                f"{node_id} went {cut:.2f}s without an accepted heartbeat"
                + (" (longer than a lease: nothing stops a unit on a worker cut off from "
                   "its leader)" if cut > self.world.cfg.lease_s else ""))

    def why_stuck(self, tid: str) -> str:
        held = sorted(f"{t}/{c}" for t, c in self.held_by_clock if t == tid)
        if not held:
            return ""
        return (f"; its retry of {held} waited 10 s and more while the leader's wall clock "
                "was behind the replicated one (the largest wall-clock time a command "
                "carried): the retry waits for the leader's wall clock to pass the "
                "replicated one")

    def why_kept(self, node: str, started: float) -> str:
        leader = self.world.nodes.get(self.world.log.leader or "")
        info = leader.workers.get(node) if leader is not None else None
        if info is None:
            return "its leader has no entry for the worker"
        text = (f"its leader last heard from {node} at wall {info.last_seen_wall:.1f}, "
                f"the unit started at wall {started:.1f} "
                f"(leader's wall clock minus start: {info.last_seen_wall - started:+.1f}s)")
        grace = max(2.5, 4 * self.world.cfg.heartbeat_s)
        if info.last_seen_wall <= started + grace:
            text += (f": the 'not running it' check needs its wall clock past start + "
                     f"{grace}s")
        return text

    def current(self, key: tuple, node: str) -> bool:
        u = self.unit(key[0], key[1])
        return u is not None and u.status == RUNNING and u.node == node \
            and (u.attempt, u.token) == (key[2], key[3])

    def at_end(self) -> None:
        w = self.world
        for n in w.nodes.values():
            if n.replica is not None and n.running():
                n.apply_to(len(w.log.entries))
                self.on_apply(n, always=True)
        for tid in sorted(w.acked):
            t = w.truth.tasks[tid]
            if t.status not in FINAL:
                self.fail("never ended", f"acknowledged task {tid} is still {t.status} "
                          f"{w.now - self.progress_at:.1f}s after a unit last ended"
                          + self.why_stuck(tid))
        for tid, t in w.truth.tasks.items():
            if t.status in FINAL and tid not in self.final:
                self.fail("ended twice", f"task {tid} is {t.status} without ending")
