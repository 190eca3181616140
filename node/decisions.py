"""The leader's scheduling decisions, as pure functions.

Every function here takes a read-only view (frozen dataclasses: the queue's head in
priority order, the workers' last reports, the assignments in flight, ``now``) and
returns actions (frozen dataclasses: assignments to propose, units to requeue and
why, workers to hold). Nothing here reads a clock, draws a random number, takes a
lock, starts a thread, or talks to Raft or gRPC: ``node/scheduling.py`` builds the
views from the replica and its worker table, calls these, and carries the actions
out; ``tests/sim`` calls the same functions under a simulated clock.

Times are whatever clock the caller uses for ``now`` (the node passes
``time.monotonic()`` for leases and ``time.time()`` for wall-clock fields); the
functions only compare and subtract them. The signatures and names are stable:
the simulator imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from taskandgo.node.views import (
    PREFETCH_WORK_S,
    AttemptKey,
    Floor,
    InFlight,
    LeaseActions,
    LeaseView,
    PlanActions,
    PlanView,
    ReplicaUnit,
    Requeue,
    RunningSummary,
    RunningView,
    UnitKey,
    WorkerView,
)
from taskandgo.strategies import QueuedUnit, Worker, plan
from taskandgo.strategies.placement import Amounts
from taskandgo.strategies.planner import SPLIT

#: A requeue proposed for an attempt is not proposed again within this time (the
#: first one may not have applied yet when the next lease check runs).
REQUEUE_MEMORY_S = 2.0
#: A priority floor set by a hold lasts until the tasks it was set for are in the
#: replica (queued: the planner then takes them first), or at most this long past
#: the hold's own deadline (the submit's own retry budget, SUBMIT_RETRY_S, and a
#: commit): a submit that never commits does not stop planning for ever.
FLOOR_EXTRA_S = 4.0
#: At most this many complete commands in flight; results arriving meanwhile wait
#: for the next one.
MAX_INFLIGHT_COMPLETES = 4
#: Retry backoff: base * 2**(attempt-1), at most the cap, times a jitter in [0.5, 1.5).
RETRY_BASE_S = 0.5
RETRY_CAP_S = 60.0
#: Weight of the newest run time in the moving average that sizes prefetch windows.
RUN_EWMA_WEIGHT = 0.1
#: Run-time averages are kept for at most this many kinds of unit (the least
#: recently updated go first).
MAX_KINDS = 1000


# ---------------------------------------------------------------------- planning


def live_workers(workers: Iterable[WorkerView], now: float,
                 lease_s: float) -> tuple[WorkerView, ...]:
    """Workers heard from within the lease (strictly) that accept work."""
    return tuple(w for w in workers if now - w.last_seen < lease_s and w.accepting)


def prefetch_per_slot(run_ewma: float | None, work_s: float = PREFETCH_WORK_S) -> float:
    """Units a window may hold per slot: about ``work_s`` of work at the recent run
    time. Deep for no-ops, none for units of a second or more (a long unit waiting
    in a window could sit behind another while a different worker has a free slot).
    0 until the leader has seen results (``run_ewma`` None)."""
    return 0.0 if run_ewma is None else work_s / max(run_ewma, 1e-4)


def unit_kind(spec: Mapping[str, object]) -> str:
    """What a task runs, as far as its run time goes: its call path, its argv[0], or
    its data's language prefix (``python: ...``; plain data: the default runner).
    Arguments, items and the rest of the code are not part of it."""
    call = spec.get("call")
    if isinstance(call, str) and call:
        return f"call:{call}"
    argv = spec.get("argv")
    if isinstance(argv, (list, tuple)) and argv:
        return f"argv:{argv[0]}"
    data = spec.get("data")
    if isinstance(data, str):
        head, sep, _ = data.partition(":")
        head = head.strip()
        if sep and head.isidentifier() and len(head) <= 32:
            return f"data:{head}"
    return "data"


def window_run_s(queued: Sequence[QueuedUnit],
                 run_s_by_kind: Mapping[str, float]) -> float | None:
    """The run time a prefetch window is sized by: the longest recent run time among
    the kinds of the queued units at the head (they are what would wait in it);
    None (no window) if any of them is of a kind not seen yet, so a unit of a new
    kind is never prefetched on the strength of others that were quick. With no
    queue given (sizing how much of the queue to read), the shortest known one."""
    if not queued:
        return min(run_s_by_kind.values(), default=None)
    longest = 0.0
    for kind in {u.kind for u in queued}:
        run_s = run_s_by_kind.get(kind)
        if run_s is None:
            return None
        longest = max(longest, run_s)
    return longest


def update_run_times(run_s_by_kind: Mapping[str, float],
                     results: Iterable[tuple[str, Mapping[str, object]]]) -> dict[str, float]:
    """The per-kind moving averages of run times after these committed results
    ((kind, result) pairs; handed-back units do not count: they did not run). At
    most MAX_KINDS kinds are kept, the least recently updated dropped first."""
    out = dict(run_s_by_kind)
    for kind, r in results:
        if r.get("requeue"):
            continue
        rt = run_time_s(r)
        old = out.pop(kind, None)  # re-inserted last: the dict keeps update order
        out[kind] = rt if old is None else (1 - RUN_EWMA_WEIGHT) * old + RUN_EWMA_WEIGHT * rt
    while len(out) > MAX_KINDS:
        del out[next(iter(out))]
    return out


def window(worker: WorkerView, per_slot: float) -> int:
    """How many units beyond its slots the worker may hold waiting: at most its
    --prefetch (capacity - slots)."""
    extra = max(0, (worker.capacity or worker.slots) - worker.slots)
    return min(extra, int(worker.slots * per_slot))


def summarize_running(running: Mapping[UnitKey, str], priority: Callable[[str], int | None],
                      completing: Iterable[tuple[UnitKey, str]],
                      request: Callable[[str], Amounts] | None = None) -> RunningSummary:
    """Sum up the running units (unit -> worker; ``priority`` of a task id, None
    when unknown; ``request``: the resources a task's units request) for planning:
    see :class:`RunningSummary`. ``completing``: (unit, worker) whose result is
    being committed. One pass over the running units, then one look-up per
    completing one."""
    busy: dict[str, int] = {}
    prios: set[int] = set()
    used: dict[str, dict[str, float]] = {}
    for (tid, _chunk), worker in running.items():
        busy[worker] = busy.get(worker, 0) + 1
        p = priority(tid)
        if p is not None:
            prios.add(p)
        if request is not None and (req := request(tid)):
            for name, amount in req:
                w = used.setdefault(worker, {})
                w[name] = w.get(name, 0.0) + amount
    for key, worker in completing:
        if running.get(key) == worker:
            busy[worker] -= 1
            if request is not None and (req := request(key[0])):
                for name, amount in req:
                    used[worker][name] -= amount
    return RunningSummary(busy, frozenset(prios), used)


def _busy(view: PlanView) -> tuple[dict[str, int], frozenset[int], dict[str, dict[str, float]]]:
    """Units each worker holds (running and not completing, ``held``, in flight),
    the priorities of the running units, and the resources each worker's running
    and in-flight units requested: the part of :func:`free_slots` that reads every
    running unit, unless the view carries them summed up. (Running units are
    RunningViews without requests: a view that needs them carries the summary.)"""
    summary = view.running_summary
    if summary is None:
        prio = {r.task_id: r.priority for r in view.running}
        summary = summarize_running({(r.task_id, r.chunk): r.worker for r in view.running},
                                    prio.get, (((t, c), w) for t, c, w in view.completing))
    busy: dict[str, int] = dict(view.held)
    for worker, n in summary.busy.items():
        busy[worker] = busy.get(worker, 0) + n
    used = {w: dict(m) for w, m in summary.used.items()}
    for p in view.in_flight:
        busy[p.worker] = busy.get(p.worker, 0) + 1
        if p.request:
            w = used.setdefault(p.worker, {})
            for name, amount in p.request:
                w[name] = w.get(name, 0.0) + amount
    return busy, summary.priorities, used


def free_resources(worker: WorkerView, used: Mapping[str, float]) -> Amounts:
    """What the worker has free of each resource it advertises: its capacity minus
    what its units requested (may be negative after the capacity shrank)."""
    return tuple((name, cap - used.get(name, 0.0)) for name, cap in worker.resources)


def free_slots(view: PlanView) -> tuple[Worker, ...]:
    """Every live worker with the units it can take now: its slots, plus its
    prefetch window while every queued, waiting-to-retry, running and completing
    unit has one priority (then nothing already in the system can come back to the
    queue more urgent than what waits in a window; a more urgent submit has the
    windows handed back first, see :func:`needs_hold`), minus the units it holds
    (running and not completing, and ended attempts it has not dropped yet:
    ``held``) and the units proposed to it. The window is sized by the kinds of the
    queued units (``run_s_by_kind``, see :func:`window_run_s`) or one average."""
    busy, prios, used = _busy(view)
    prios = prios | set(view.queued_priorities)
    if len(prios) > 1:
        per_slot = 0.0
    elif view.run_s_by_kind is None:
        per_slot = prefetch_per_slot(view.run_ewma, view.prefetch_work_s)
    else:
        per_slot = prefetch_per_slot(window_run_s(view.queued, view.run_s_by_kind),
                                     view.prefetch_work_s)
    return tuple(Worker(w.node_id, max(0, w.slots + window(w, per_slot) - busy.get(w.node_id, 0)),
                        free_resources(w, used.get(w.node_id, {})), w.resources, w.labels)
                 for w in view.workers)


def queue_depth_needed(view: PlanView) -> int:
    """How many units of the queue's head a plan can use: the free slots plus the
    units in flight (they are skipped). 0 when no worker has room."""
    total = sum(w.free_slots for w in free_slots(view))
    if total == 0:
        return 0
    return total + len({(p.task_id, p.chunk) for p in view.in_flight})


def current_floor(floor: Floor | None, now: float) -> Floor | None:
    """The floor, or None once it has expired (strictly after ``until``)."""
    return None if floor is None or now > floor.until else floor


def live_floors(floors: Iterable[Floor], now: float, known: Callable[[str], bool],
                queued_priorities: Iterable[int] = ()) -> tuple[Floor, ...]:
    """The floors still in force: not expired, and not yet met. A floor is met once
    every task it was set for is ``known`` to the replica (its submit committed: it
    is queued, and priority order takes it before anything lower). A floor without
    task ids is met once any unit at or above its priority is queued. Another
    task at or above the floor being queued does not meet it: the held-for submit
    may still be on its way, and lower units planned meanwhile would start after it
    is accepted."""
    prios = tuple(queued_priorities)
    out = []
    for f in floors:
        if now > f.until:
            continue
        if f.task_ids:
            if all(known(t) for t in f.task_ids):
                continue
        elif any(p >= f.priority for p in prios):
            continue
        out.append(f)
    return tuple(out)


def top_floor(floors: Iterable[Floor]) -> Floor | None:
    """The floor planning obeys: the highest of those in force (None: no floor)."""
    return max(floors, key=lambda f: (f.priority, f.until), default=None)


def plan_round(view: PlanView) -> PlanActions:
    """One round of planning: the queued units not in flight, cut at the priority
    floor (see :func:`live_floors`: the caller passes the one in force), planned
    in priority order onto the free slots (strategies.plan). A unit in flight is
    never planned again, nor a whole task any of whose units is in flight. Lower
    units are never planned while a higher queued one could not be (the plan is a
    prefix of the eligible units). Nothing below a more urgent unit in flight or
    not yet delivered to its worker is planned, and one round plans one priority
    level, so a lower unit never reaches a worker before a more urgent one
    accepted earlier. ``floor_lifted``: the view's floor has expired."""
    floor = current_floor(view.floor, view.now)
    lifted = view.floor is not None and floor is None
    workers = free_slots(view)
    if sum(w.free_slots for w in workers) == 0:
        return PlanActions((), lifted)
    pending_keys = {(p.task_id, p.chunk) for p in view.in_flight}
    pending_tasks = {p.task_id for p in view.in_flight}
    units = []
    for u in view.queued:
        if u.chunk == -1 and u.task_id in pending_tasks:
            if u.strategy == SPLIT:
                # Its cut is in flight: once applied, the cut queues its other
                # chunks here, ahead of everything after it. Plan no further.
                break
            continue
        if (u.task_id, u.chunk) not in pending_keys:
            units.append(u)
    # A lower unit is planned only once every more urgent assignment has reached
    # its worker: dispatched together or ahead of it, it could start first.
    above = [p.priority for p in view.in_flight if p.priority is not None]
    above.extend(view.undelivered)
    if floor is not None:
        above.append(floor.priority)
    cut = max(above, default=None)
    if cut is not None:
        # Stop at the first unit below the cut (order is a prefix).
        for i, u in enumerate(units):
            if u.priority < cut:
                units = units[:i]
                break
    if not units:
        return PlanActions((), lifted)
    out = plan(units, list(workers), view.key_room)
    if out:
        # One priority per round, for the same reason: the next level goes once
        # this one is delivered.
        prio = {u.task_id: u.priority for u in units}
        top = max(prio[a.task_id] for a in out)
        out = [a for a in out if prio[a.task_id] == top]
    return PlanActions(tuple(out), lifted)


def fast_path(view: PlanView, units: Sequence[QueuedUnit]) -> PlanActions:
    """The single-task fast path (issue 14): which of a submit's new ``units`` the
    leader gives to workers in the submit command itself. ``view`` is a planning
    round's view of everything else (``queued_priorities``: what the state has
    queued, waiting to retry, waiting for parents or arriving, without these units;
    ``queued`` is ignored). Nothing is planned while anything at or above the new
    units' lowest priority is queued or about to be (the queue goes first, in order);
    otherwise the units are planned by :func:`plan_round` as if they alone were
    queued, so the floor, the units in flight and undelivered, the free slots and
    windows, and placement decide exactly as for a queued unit."""
    if not units:
        return PlanActions((), False)
    low = min(u.priority for u in units)
    if any(p >= low for p in view.queued_priorities):
        return PlanActions((), False)
    ordered = tuple(sorted(units, key=lambda u: -u.priority))  # stable: FIFO per level
    return plan_round(replace(view, queued=ordered, queued_priorities=frozenset(
        view.queued_priorities) | {u.priority for u in units}))


# ---------------------------------------------------------------------- leases


def expired_leases(view: LeaseView) -> LeaseActions:
    """Units to requeue: on a worker unknown to this leader once it has led for a
    full lease; on a worker not heard from for more than ``lease_s`` (strictly:
    at exactly ``lease_s`` it is neither live nor expired); on a live worker that
    still does not report it in a heartbeat received more than ``grace_s`` after
    this leader first found it missing (a dispatch that never arrived, a worker
    that restarted), once this leader has led for ``grace_s``. Every time compared
    is on the leader's own clock (``now``): a unit's ``started_at`` was stamped by
    whichever leader assigned it, on a wall clock that may be far off this one.
    An attempt requeued within REQUEUE_MEMORY_S is not requeued again. Workers
    not heard from within the lease and not yet marked down are reported down."""
    now = view.now
    by_id = {w.node_id: w for w in view.workers}
    led_s = now - view.leader_since
    lost: list[Requeue] = []
    missing: dict[AttemptKey, float] = {}
    for r in view.running:
        w = by_id.get(r.worker)
        if w is None:
            if led_s > view.lease_s:
                lost.append(Requeue(r.key, f"worker {r.worker} unknown to the new leader"))
        elif now - w.last_seen > view.lease_s:
            lost.append(Requeue(r.key, f"worker {r.worker} missed its lease"))
        elif r.key not in w.running:
            first = view.missing.get(r.key, now)
            if w.last_seen > first + view.grace_s and led_s > view.grace_s:
                lost.append(Requeue(r.key, f"worker {r.worker} is not running it"))
            else:
                missing[r.key] = first
    down = tuple(w.node_id for w in view.workers
                 if not w.down and now - w.last_seen > view.lease_s)
    requeue, recent = dedupe_requeues(view.recent, lost, now)
    return LeaseActions(requeue, down, recent, missing)


def dedupe_requeues(recent: Mapping[AttemptKey, float], lost: Sequence[Requeue],
                    now: float) -> tuple[tuple[Requeue, ...], dict[AttemptKey, float]]:
    """The requeues not proposed within REQUEUE_MEMORY_S before ``now`` (each
    attempt once), and the memory to keep: the entries younger than that plus the
    new ones at ``now``."""
    kept = {k: t for k, t in recent.items() if now - t < REQUEUE_MEMORY_S}
    out: list[Requeue] = []
    for r in lost:
        if r.key not in kept:
            kept[r.key] = now
            out.append(r)
    return tuple(out), kept


def units_to_kill(node_id: str, reported: Iterable[AttemptKey],
                  replica: Mapping[UnitKey, ReplicaUnit | None]) -> tuple[AttemptKey, ...]:
    """Of the attempts a worker reports running, those that are not its to run
    (cancelled, requeued, given to another worker, another attempt). An attempt
    whose result is committed is left alone: the worker just has not heard yet."""
    out = []
    for key in reported:
        tid, chunk, _attempt, token = key
        unit = replica.get((tid, chunk))
        if unit is None or unit.status != "running" or unit.token != token \
                or unit.worker != node_id:
            if unit is not None and unit.token == token and unit.status in ("succeeded", "failed"):
                continue
            out.append(key)
    return tuple(out)


def stale_held(node_id: str, reported: Iterable[AttemptKey], running: Mapping[UnitKey, str],
               unit: Callable[[UnitKey], ReplicaUnit | None]) -> int:
    """How many of the attempts a worker last reported holding are no longer its to
    run, yet hold one of its slots until it drops them (when its next heartbeat is
    answered with a kill): its units cancelled, requeued or given to another
    worker, and older attempts of a unit it now runs again. An attempt whose
    result is committed is not counted (the worker was done with it).
    ``running``: the replica's unit -> worker; ``unit`` looks a unit up (called
    only for reported units not running on this worker)."""
    return sum(1 for _ in _stale(node_id, reported, running, unit))


def stale_held_requests(node_id: str, reported: Iterable[AttemptKey],
                        running: Mapping[UnitKey, str],
                        unit: Callable[[UnitKey], ReplicaUnit | None],
                        request: Callable[[str], Amounts]) -> dict[str, float]:
    """The resources the attempts :func:`stale_held` counts requested (``request``
    of a task id): until the worker drops them they still run there, so they hold
    their resources as they hold their slots."""
    out: dict[str, float] = {}
    for tid, _chunk, _attempt, _token in _stale(node_id, reported, running, unit):
        for name, amount in request(tid):
            out[name] = out.get(name, 0.0) + amount
    return out


def stale_held_keys(node_id: str, reported: Iterable[AttemptKey],
                    running: Mapping[UnitKey, str],
                    unit: Callable[[UnitKey], ReplicaUnit | None],
                    keys: Callable[[str], tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The concurrency keys (``keys`` of a task id) of the attempts :func:`stale_held`
    counts: until the worker drops them they still run, so they hold their keys."""
    return [k for tid, _c, _a, _t in _stale(node_id, reported, running, unit)
            if (k := keys(tid))]


def key_room(limits: Mapping[str, int], held: Mapping[str, int],
             holding: Iterable[tuple[str, ...]]) -> dict[str, int] | None:
    """How many more units holding each limited concurrency key may be assigned now:
    its limit, minus the units the replica counts as holding it (``held``: assigned
    ones) and one for each key tuple in ``holding`` (units in flight to be assigned,
    attempts a worker still runs that are no longer its own). None: no limits."""
    if not limits:
        return None
    room = {k: limit - held.get(k, 0) for k, limit in limits.items()}
    for keys in holding:
        for k in keys:
            if k in room:
                room[k] -= 1
    return room


def with_held_requests(summary: RunningSummary,
                       held: Mapping[str, Mapping[str, float]]) -> RunningSummary:
    """``summary`` with each worker's stale attempts' requests (``held``, see
    :func:`stale_held_requests`) added to what it uses."""
    if not held:
        return summary
    used = {w: dict(m) for w, m in summary.used.items()}
    for worker, req in held.items():
        mine = used.setdefault(worker, {})
        for name, amount in req.items():
            mine[name] = mine.get(name, 0.0) + amount
    return summary._replace(used=used)


def _stale(node_id: str, reported: Iterable[AttemptKey], running: Mapping[UnitKey, str],
           unit: Callable[[UnitKey], ReplicaUnit | None]) -> Iterable[AttemptKey]:
    """The attempts :func:`stale_held` counts, in the order reported."""
    mine: set[UnitKey] = set()
    for attempt in reported:
        tid, chunk, _attempt, token = attempt
        key = (tid, chunk)
        if running.get(key) == node_id:
            if key in mine:
                yield attempt  # two attempts of one unit: one of them is over
            mine.add(key)
            continue
        u = unit(key)
        if u is not None and u.token == token and u.status in ("succeeded", "failed"):
            continue
        yield attempt


def due_retry_tick(delayed: Mapping[UnitKey, float], replicated_now: float,
                   seen: Mapping[UnitKey, tuple[float, float]],
                   now: float) -> tuple[float | None, dict[UnitKey, tuple[float, float]]]:
    """When to release retries waiting for their backoff, on the leader's own clock.

    The replica releases a retry once its replicated clock (the latest wall-clock
    time any command carried) passes the retry's due time; a leader whose wall
    clock is behind that would leave it waiting for the difference. So the leader
    notes, the first time it sees each waiting retry, ``now`` and how long it
    still has to wait by the replicated clock; once that long has passed on its
    own clock, it proposes a command carrying the due time (the returned value,
    the latest due time among the ripe ones; None: nothing is due). Returns that
    and the notes to keep (for the retries still waiting)."""
    kept: dict[UnitKey, tuple[float, float]] = {}
    tick: float | None = None
    for key, due in delayed.items():
        first, wait = seen.get(key) or (now, max(0.0, due - replicated_now))
        kept[key] = (first, wait)
        if now - first >= wait:
            tick = due if tick is None else max(tick, due)
    return tick, kept


# ---------------------------------------------------------------------- holds


def hold_floor(priority: int, deadline: float, task_ids: Iterable[str] = ()) -> Floor:
    """The floor a hold for ``priority`` sets, given the hold's own deadline and the
    tasks of the submit it is for (see :func:`live_floors`)."""
    return Floor(priority, deadline + FLOOR_EXTRA_S, frozenset(task_ids))


def hold_targets(workers: Iterable[WorkerView]) -> tuple[str, ...]:
    """Workers a hold asks to hand units back: every one not down. Not only those
    with a prefetch window: a unit planned onto a slot the leader counted free can
    still wait on its worker (an ended attempt the worker has not dropped yet, a
    result not yet reported), and would start after the urgent submit otherwise."""
    return tuple(w.node_id for w in workers if not w.down)


def needs_hold(priority: int, lowest_seen: int | None) -> bool:
    """Does a submit at ``priority`` need a hold first? Yes unless it is at or below
    the lowest priority the submitting node has seen in its replica (queued,
    running or waiting to retry) or submitted: whether a lower unit waits in a
    window cannot be read from a replica (assignments and lower submits may be in
    flight and commit first), so the leader decides that (see the hold). None:
    nothing seen yet."""
    return lowest_seen is None or priority > lowest_seen


def gate_arrivals(priorities: Sequence[int], free_slots: int,
                  floor: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A worker's intake of dispatched units (``priorities``, one per unit), given
    its free slots (slots minus the units it holds, running or waiting) and the
    floor the leader sent (the highest priority queued, running or waiting to retry
    then; None: an earlier release, no gate). Returns (indices to take, indices to
    hand back at once). Units at or above the floor are taken (they may wait);
    below it, only as many as free slots remain after them, most urgent first: a
    lower unit that would wait could start after a more urgent one comes back to
    the queue (a retry falling due, a requeue) with no hold to stop it. The leader
    planned it onto a slot it counted free; when the worker disagrees (an ended
    attempt not dropped yet), it goes back to the queue instead."""
    if floor is None:
        return tuple(range(len(priorities))), ()
    take = [i for i, p in enumerate(priorities) if p >= floor]
    room = free_slots - len(take)
    back = []
    for i in sorted((i for i, p in enumerate(priorities) if p < floor),
                    key=lambda i: -priorities[i]):
        if room > 0:
            take.append(i)
            room -= 1
        else:
            back.append(i)
    return tuple(sorted(take)), tuple(sorted(back))


def dispatch_floor(priorities: Iterable[int]) -> int | None:
    """The floor a Dispatch carries: the highest priority among the units queued,
    running or waiting to retry (None: none)."""
    return max(priorities, default=None)


# ---------------------------------------------------------------------- completions


def should_flush(waiting: int, in_flight: int) -> bool:
    """Propose a complete command now: results wait and fewer than
    MAX_INFLIGHT_COMPLETES commands are in flight."""
    return waiting > 0 and in_flight < MAX_INFLIGHT_COMPLETES


def retry_backoff_s(attempt: int, jitter: float) -> float:
    """When a failed attempt's retry is due, in seconds after it failed:
    RETRY_BASE_S * 2**(attempt-1) up to RETRY_CAP_S, times 0.5 + ``jitter``
    (``jitter`` in [0, 1), drawn by the caller). Any attempt number is safe."""
    attempt = min(max(1, attempt), 64)  # past 8 the cap applies; 64 keeps 2** small
    return min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (attempt - 1)) * (0.5 + jitter)


def completion_results(results: Sequence[Mapping[str, object]],
                       jitters: Sequence[float]) -> list[dict[str, object]]:
    """The results as a complete command carries them: a failed one gets its
    ``backoff_s`` (see :func:`retry_backoff_s`; ``jitters`` one per result)."""
    out = []
    for r, jitter in zip(results, jitters):
        d = dict(r)
        if not d.get("ok"):
            d["backoff_s"] = retry_backoff_s(_int(d.get("attempt", 1), 1), jitter)
        out.append(d)
    return out


def run_time_s(result: Mapping[str, object]) -> float:
    """How long a reported unit ran (0 when unknown)."""
    return max(0.0, _float(result.get("finished_at")) - _float(result.get("started_at")))


def update_run_ewma(run_ewma: float | None,
                    results: Iterable[Mapping[str, object]]) -> float | None:
    """The moving average of run times after these committed results (handed-back
    units do not count: they did not run)."""
    for r in results:
        if r.get("requeue"):
            continue
        rt = run_time_s(r)
        run_ewma = rt if run_ewma is None \
            else (1 - RUN_EWMA_WEIGHT) * run_ewma + RUN_EWMA_WEIGHT * rt
    return run_ewma


def _int(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


def _float(value: object) -> float:
    try:
        return float(value or 0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


__all__ = [
    "FLOOR_EXTRA_S",
    "MAX_INFLIGHT_COMPLETES",
    "MAX_KINDS",
    "PREFETCH_WORK_S",
    "REQUEUE_MEMORY_S",
    "AttemptKey",
    "Floor",
    "InFlight",
    "LeaseActions",
    "LeaseView",
    "PlanActions",
    "PlanView",
    "ReplicaUnit",
    "Requeue",
    "RunningSummary",
    "RunningView",
    "UnitKey",
    "WorkerView",
    "completion_results",
    "current_floor",
    "dedupe_requeues",
    "dispatch_floor",
    "due_retry_tick",
    "expired_leases",
    "fast_path",
    "free_resources",
    "free_slots",
    "gate_arrivals",
    "hold_floor",
    "hold_targets",
    "key_room",
    "live_floors",
    "live_workers",
    "needs_hold",
    "plan_round",
    "prefetch_per_slot",
    "queue_depth_needed",
    "retry_backoff_s",
    "run_time_s",
    "should_flush",
    "stale_held",
    "stale_held_keys",
    "stale_held_requests",
    "summarize_running",
    "top_floor",
    "unit_kind",
    "units_to_kill",
    "update_run_ewma",
    "update_run_times",
    "window",
    "window_run_s",
    "with_held_requests",
]
