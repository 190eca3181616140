"""Properties of the leader's pure decisions (node/decisions.py), with hypothesis.

Given a view (queue head in priority order, workers' last reports, assignments in
flight, ``now``), when a decision runs, then its actions respect capacity, priority
order, lease timing, in-flight exclusion and requeue de-duplication."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from taskandgo.node import decisions as d
from taskandgo.strategies import QueuedUnit

NODES = ["a", "b", "c", "d"]
KINDS = ["call:m:noop", "call:m:sleep", "argv:/bin/true", "data"]


@st.composite
def plan_views(draw: st.DrawFn) -> d.PlanView:
    now = draw(st.floats(0, 100))
    workers = tuple(
        d.WorkerView(n, slots, slots + draw(st.integers(0, 6)), last_seen=now)
        for n, slots in zip(draw(st.lists(st.sampled_from(NODES), unique=True, max_size=4)),
                            draw(st.lists(st.integers(0, 4), min_size=4, max_size=4))))
    n_tasks = draw(st.integers(0, 20))
    queued = []
    for i in range(n_tasks):
        strategy = draw(st.sampled_from(["batch", "split"]))
        cut = strategy == "split" and draw(st.booleans())
        chunk = draw(st.integers(0, 3)) if cut else -1
        queued.append(QueuedUnit(f"t{i}", chunk, draw(st.sampled_from([0, 10, 20, 30])),
                                 strategy, draw(st.integers(0, 3)), 0, 4 if cut else 0,
                                 draw(st.sampled_from(KINDS))))
    # The queue's order: priority first, FIFO within a level.
    queued.sort(key=lambda u: -u.priority)
    running = tuple(
        d.RunningView(f"r{i}", -1, w, p, 1, i + 1, 0.0)
        for i, (w, p) in enumerate(draw(st.lists(
            st.tuples(st.sampled_from(NODES), st.sampled_from([0, 10, 20, 30])), max_size=8))))
    in_flight = tuple(
        d.InFlight(u.task_id, u.chunk, draw(st.sampled_from(NODES)))
        for u in queued if draw(st.integers(0, 4)) == 0)
    completing = frozenset((r.task_id, r.chunk, r.worker) for r in running
                           if draw(st.integers(0, 3)) == 0)
    floor = draw(st.none() | st.builds(d.Floor, st.sampled_from([10, 20, 30, 40]),
                                       st.floats(0, 200)))
    by_kind = draw(st.none() | st.dictionaries(st.sampled_from(KINDS), st.floats(0, 3)))
    return d.PlanView(now, workers, tuple(queued),
                      frozenset(u.priority for u in queued), running, in_flight, completing,
                      floor, draw(st.none() | st.floats(0, 3)), run_s_by_kind=by_kind)


@given(plan_views())
@settings(max_examples=400, deadline=None)
def test_never_more_units_on_a_worker_than_its_capacity(view: d.PlanView) -> None:
    out = d.plan_round(view).assignments
    got = Counter(a.worker for a in out)
    busy = Counter(r.worker for r in view.running
                   if (r.task_id, r.chunk, r.worker) not in view.completing)
    busy.update(p.worker for p in view.in_flight)
    run_s = view.run_ewma if view.run_s_by_kind is None \
        else d.window_run_s(view.queued, view.run_s_by_kind)
    per_slot = d.prefetch_per_slot(run_s)
    for w in view.workers:
        room = w.slots + d.window(w, per_slot)
        assert room <= max(w.capacity, w.slots)  # slots + --prefetch
        assert got[w.node_id] <= max(0, room - busy[w.node_id])
    assert set(got) <= {w.node_id for w in view.workers}


@given(plan_views())
@settings(max_examples=400, deadline=None)
def test_prefetch_only_while_every_unit_has_one_priority(view: d.PlanView) -> None:
    """Queued (and waiting to retry: the caller counts them in queued_priorities),
    running and completing units alike: a completing unit may fail and come back."""
    prios = set(view.queued_priorities) | {r.priority for r in view.running}
    if len(prios) > 1:
        busy = Counter(r.worker for r in view.running
                       if (r.task_id, r.chunk, r.worker) not in view.completing)
        busy.update(p.worker for p in view.in_flight)
        got = Counter(a.worker for a in d.plan_round(view).assignments)
        for w in view.workers:
            assert got[w.node_id] <= max(0, w.slots - busy[w.node_id])


@given(plan_views())
@settings(max_examples=400, deadline=None)
def test_no_lower_unit_planned_while_a_higher_one_waits(view: d.PlanView) -> None:
    out = d.plan_round(view).assignments
    planned = {a.task_id for a in out}
    in_flight = {(p.task_id, p.chunk) for p in view.in_flight}
    in_flight_tasks = {p.task_id for p in view.in_flight}
    waiting = [u for u in view.queued if (u.task_id, u.chunk) not in in_flight
               and not (u.chunk == -1 and u.task_id in in_flight_tasks)]
    for a in out:
        prio = next(u.priority for u in view.queued if u.task_id == a.task_id)
        # Every eligible unit above it was planned too (at least one of its chunks).
        assert all(u.task_id in planned for u in waiting if u.priority > prio)
    floor = d.current_floor(view.floor, view.now)
    if floor is not None:
        # Whatever else is queued: the floor is cut at until the caller lifts it.
        assert all(next(u.priority for u in view.queued if u.task_id == a.task_id)
                   >= floor.priority for a in out)


@given(plan_views())
@settings(max_examples=400, deadline=None)
def test_no_unit_planned_twice_or_while_in_flight(view: d.PlanView) -> None:
    out = d.plan_round(view).assignments
    keys = [(a.task_id, a.chunk) for a in out]
    assert len(keys) == len(set(keys))
    in_flight = {(p.task_id, p.chunk) for p in view.in_flight}
    assert not set(keys) & in_flight
    whole_in_flight = {p.task_id for p in view.in_flight}
    queued_whole = {u.task_id for u in view.queued if u.chunk == -1}
    assert not {a.task_id for a in out} & whole_in_flight & queued_whole


@given(plan_views())
@settings(max_examples=200, deadline=None)
def test_a_plan_needs_no_more_of_the_queue_than_queue_depth_needed(view: d.PlanView) -> None:
    depth = d.queue_depth_needed(view)
    cut = d.PlanView(view.now, view.workers, view.queued[:depth], view.queued_priorities,
                     view.running, view.in_flight, view.completing, view.floor, view.run_ewma)
    assert d.plan_round(cut) == d.plan_round(view)


@given(st.floats(0, 1e6), st.floats(0.5, 60), st.floats(0, 200), st.floats(0, 1e6))
@settings(max_examples=400)
def test_a_lease_expires_exactly_after_lease_s(seen: float, lease_s: float, after: float,
                                               leader_since: float) -> None:
    now = seen + after
    w = d.WorkerView("a", 1, last_seen=seen, last_seen_wall=0.0,
                     running=frozenset({("t", -1, 1, 7)}))
    view = d.LeaseView(now, lease_s, 2.5, min(leader_since, now), (w,),
                       (d.RunningView("t", -1, "a", 0, 1, 7, 0.0),))
    out = d.expired_leases(view)
    expired = now - seen > lease_s
    assert bool(out.requeue) == expired
    assert (out.down == ("a",)) == expired
    # Live and expired never overlap; at exactly lease_s it is neither.
    assert not (d.live_workers([w], now, lease_s) and expired)


def test_a_lease_check_requeues_at_the_first_check_past_lease_s() -> None:
    w = d.WorkerView("a", 1, last_seen=10.0, running=frozenset({("t", -1, 1, 7)}))
    run = (d.RunningView("t", -1, "a", 0, 1, 7, 0.0),)
    checks = [10.0 + 0.2 * i for i in range(40)]  # the leader checks every 0.2 s
    first = next(now for now in checks
                 if d.expired_leases(d.LeaseView(now, 5.0, 2.5, 0.0, (w,), run)).requeue)
    assert 15.0 < first <= 15.0 + 0.2 + 1e-9


@given(st.lists(st.tuples(st.sampled_from(["x", "y", "z"]), st.floats(0, 0.5)), max_size=30))
@settings(max_examples=300)
def test_requeue_dedup_proposes_an_attempt_once_per_memory(steps: list) -> None:
    recent: dict = {}
    now = 0.0
    last: dict[str, float] = {}
    for tid, dt in steps:
        now += dt
        lost = [d.Requeue((tid, -1, 1, 1), "why"), d.Requeue((tid, -1, 1, 1), "again")]
        out, recent = d.dedupe_requeues(recent, lost, now)
        assert len(out) <= 1  # never twice in one command
        if tid in last and now - last[tid] < d.REQUEUE_MEMORY_S:
            assert not out
        else:
            assert len(out) == 1
            last[tid] = now
        assert all(now - t < d.REQUEUE_MEMORY_S for t in recent.values())


def test_a_worker_that_does_not_run_its_unit_loses_it_after_the_grace() -> None:
    """Judged on the leader's clock alone: the unit's started_at (another leader's
    wall clock, here far in the future) plays no part."""
    run = (d.RunningView("t", -1, "a", 0, 1, 7, started_at=1e9),)
    seen_at = d.WorkerView("a", 1, last_seen=97.0, running=frozenset())
    first = d.expired_leases(d.LeaseView(97.0, 5.0, 2.5, 50.0, (seen_at,), run))
    assert not first.requeue and dict(first.missing) == {("t", -1, 1, 7): 97.0}
    # Still missing in a heartbeat within the grace: kept; after it: requeued.
    within = d.WorkerView("a", 1, last_seen=99.5, running=frozenset())
    out = d.expired_leases(d.LeaseView(99.5, 5.0, 2.5, 50.0, (within,), run, {}, first.missing))
    assert not out.requeue and out.missing == first.missing
    w = d.WorkerView("a", 1, last_seen=100.0, running=frozenset())
    early = d.expired_leases(d.LeaseView(100.0, 5.0, 2.5, 50.0, (w,), run, {}, first.missing))
    assert [r.reason for r in early.requeue] == ["worker a is not running it"]
    # Reported again: forgotten.
    back = d.WorkerView("a", 1, last_seen=100.0, running=frozenset({("t", -1, 1, 7)}))
    assert not d.expired_leases(d.LeaseView(100.0, 5.0, 2.5, 50.0, (back,), run, {},
                                            first.missing)).missing
    # A new leader gives workers the grace before judging them.
    assert not d.expired_leases(d.LeaseView(100.0, 5.0, 2.5, 98.0, (w,), run, {},
                                            first.missing)).requeue
    # A worker unknown to the leader loses its units once the leader has led a lease.
    assert not d.expired_leases(d.LeaseView(100.0, 5.0, 2.5, 96.0, (), run)).requeue
    unknown = d.expired_leases(d.LeaseView(100.0, 5.0, 2.5, 94.0, (), run))
    assert [r.reason for r in unknown.requeue] == ["worker a unknown to the new leader"]


def test_the_floor_holds_lower_units_until_the_urgent_one_is_queued() -> None:
    """Given a hold's floor for task "hi" (priority 20), when another task of
    priority 20 ("other") is queued first, then lower units still wait: only "hi"
    itself being in the replica lifts the floor (the simulator's floor-lifted-early
    defect, seed 2585: the old rule lifted it for any unit at or above 20)."""
    w = d.WorkerView("a", 4, 4, last_seen=0.0)
    low = QueuedUnit("low", -1, 0, "batch")
    floor = d.hold_floor(20, 1.0, ["hi"])
    held = d.plan_round(d.PlanView(1.0, (w,), (low,), frozenset({0}), floor=floor))
    assert held == d.PlanActions((), False)
    other = QueuedUnit("other", -1, 20, "batch")
    known = {"low", "other"}.__contains__
    live = d.live_floors([floor], 1.0, known, {0, 20})
    assert live == (floor,)
    out = d.plan_round(d.PlanView(1.0, (w,), (other, low), frozenset({0, 20}),
                                  floor=d.top_floor(live)))
    assert [a.task_id for a in out.assignments] == ["other"]
    # "hi" applied: the floor goes, and priority order takes it from here.
    assert d.live_floors([floor], 1.0, {"low", "other", "hi"}.__contains__, {0, 20}) == ()
    # Expired (the submit never committed): it goes too.
    assert d.live_floors([floor], floor.until + 0.1, known, {0}) == ()
    expired = d.plan_round(d.PlanView(floor.until + 0.1, (w,), (low,), frozenset({0}),
                                      floor=floor))
    assert expired.floor_lifted and [a.task_id for a in expired.assignments] == ["low"]


@given(st.lists(st.tuples(st.sampled_from([0, 10, 20, 30]), st.floats(0, 10),
                          st.frozensets(st.sampled_from(["t1", "t2", "t3"]), max_size=2)),
                max_size=5),
       st.frozensets(st.sampled_from(["t1", "t2", "t3"])), st.floats(0, 12),
       st.frozensets(st.sampled_from([0, 10, 20, 30])))
@settings(max_examples=300)
def test_a_floor_stays_until_its_tasks_are_known_or_it_expires(
        raw: list, known: frozenset, now: float, queued: frozenset) -> None:
    """Given floors set by holds, when planning checks them, then exactly those not
    expired whose tasks are not all in the replica stay (a floor without tasks, from
    an earlier release's hold, until anything at or above it is queued), and
    planning obeys the highest of them."""
    floors = [d.Floor(p, until, ids) for p, until, ids in raw]
    live = d.live_floors(floors, now, known.__contains__, queued)
    for f in floors:
        met = (f.task_ids <= known) if f.task_ids else any(q >= f.priority for q in queued)
        assert (f in live) == (now <= f.until and not met)
    top = d.top_floor(live)
    assert (top is None) == (not live)
    assert top is None or all(top.priority >= f.priority for f in live)


def test_holds_go_to_every_worker_not_down() -> None:
    """A unit planned onto a slot the leader counted free can wait on a worker
    without a window (simulator seed 344: an ended attempt still held the slot)."""
    ws = [d.WorkerView("a", 2, 4), d.WorkerView("b", 2, 2), d.WorkerView("c", 2, 0),
          d.WorkerView("e", 2, 8, down=True)]
    assert d.hold_targets(ws) == ("a", "b", "c")
    assert d.hold_floor(20, 3.0, ["x"]) == d.Floor(20, 3.0 + d.FLOOR_EXTRA_S, frozenset({"x"}))


@given(st.integers(-50, 50), st.none() | st.integers(-50, 50))
def test_a_submit_skips_the_hold_only_at_or_below_the_lowest_priority_seen(
        priority: int, lowest: int | None) -> None:
    """Whether lower units wait in windows cannot be read from a replica (simulator
    seed 61: assignments and lower submits in flight): a submit holds unless nothing
    lower was ever seen there; with nothing seen at all it holds."""
    assert d.needs_hold(priority, lowest) == (lowest is None or priority > lowest)


def test_no_window_while_a_completing_unit_has_another_priority() -> None:
    """Simulator seed 1652: a unit of priority 10 whose (failed) result is being
    committed comes back as a retry; lower units put in a window meanwhile would
    start while it is queued."""
    w = d.WorkerView("a", 1, 5)
    low = tuple(QueuedUnit(f"low{i}", -1, 0, "batch", kind="data") for i in range(4))
    run = (d.RunningView("hi", -1, "a", 10),)
    view = d.PlanView(0.0, (w,), low, frozenset({0}), run,
                      completing=frozenset({("hi", -1, "a")}), run_s_by_kind={"data": 0.01})
    assert [a.task_id for a in d.plan_round(view).assignments] == ["low0"]
    same = d.PlanView(0.0, (w,), low, frozenset({0}), (d.RunningView("lo", -1, "a", 0),),
                      completing=frozenset({("lo", -1, "a")}), run_s_by_kind={"data": 0.01})
    assert len(d.plan_round(same).assignments) == 4


@given(st.dictionaries(st.sampled_from(KINDS), st.floats(0, 5)),
       st.lists(st.sampled_from([*KINDS, "call:m:new"]), min_size=1, max_size=8),
       st.integers(1, 4), st.integers(0, 64))
@settings(max_examples=300)
def test_windows_follow_the_kinds_being_prefetched(by_kind: dict, kinds: list, slots: int,
                                                   prefetch: int) -> None:
    """Given run times per kind, when units are planned, then a worker's window holds
    about PREFETCH_WORK_S of work per slot at the slowest queued kind's run time, and
    none when a queued kind has not been seen yet or runs for a second or more (a 2 s
    task is never prefetched because earlier units of another kind were no-ops)."""
    w = d.WorkerView("a", slots, slots + prefetch)
    queued = tuple(QueuedUnit(f"t{i}", -1, 0, "batch", kind=k) for i, k in enumerate(kinds))
    got = len(d.plan_round(d.PlanView(0.0, (w,), queued, frozenset({0}),
                                      run_s_by_kind=by_kind)).assignments)
    run_s = [by_kind.get(k) for k in kinds]
    if None in run_s or max(r for r in run_s if r is not None) >= 1.0:
        assert got == min(slots, len(kinds))
    else:
        longest = max(r for r in run_s if r is not None)
        room = slots + min(prefetch, int(slots * d.PREFETCH_WORK_S / max(longest, 1e-4)))
        assert got == min(room, len(kinds))


def test_a_long_task_after_no_ops_is_not_prefetched() -> None:
    """The issue's case: no-ops ran (deep windows for them), then a 2 s task of
    another kind: it gets a slot, not a window; later no-ops get the window again."""
    w = d.WorkerView("a", 2, 130)
    by_kind = d.update_run_times({}, [("call:m:noop", {"started_at": 1.0,
                                                       "finished_at": 1.0005})])
    noops = tuple(QueuedUnit(f"n{i}", -1, 0, "batch", kind="call:m:noop") for i in range(200))
    assert len(d.plan_round(d.PlanView(0.0, (w,), noops, frozenset({0}),
                                       run_s_by_kind=by_kind)).assignments) == 130
    longs = tuple(QueuedUnit(f"l{i}", -1, 0, "batch", kind="call:m:sleep") for i in range(5))
    assert len(d.plan_round(d.PlanView(0.0, (w,), longs, frozenset({0}),
                                       run_s_by_kind=by_kind)).assignments) == 2
    by_kind = d.update_run_times(by_kind, [("call:m:sleep", {"started_at": 1.0,
                                                             "finished_at": 3.0})])
    assert len(d.plan_round(d.PlanView(0.0, (w,), longs, frozenset({0}),
                                       run_s_by_kind=by_kind)).assignments) == 2


@given(st.lists(st.tuples(st.sampled_from(KINDS), st.floats(0, 10), st.booleans()),
                max_size=30))
@settings(max_examples=200)
def test_run_times_are_kept_per_kind(results: list) -> None:
    """Each kind's average moves only with its own results (hand-backs do not count),
    stays within the run times seen, and at most MAX_KINDS kinds are kept."""
    by_kind: dict[str, float] = {}
    seen: dict[str, list[float]] = {}
    for kind, run_s, handed_back in results:
        before = dict(by_kind)
        r = {"started_at": 100.0, "finished_at": 100.0 + run_s, "requeue": handed_back}
        by_kind = d.update_run_times(by_kind, [(kind, r)])
        if not handed_back:
            seen.setdefault(kind, []).append(d.run_time_s(r))
        assert {k: v for k, v in by_kind.items() if k != kind} == \
            {k: v for k, v in before.items() if k != kind}
    for kind, v in by_kind.items():
        assert min(seen[kind]) - 1e-9 <= v <= max(seen[kind]) + 1e-9
    many = d.update_run_times({}, [(f"k{i}", {"finished_at": 1.0})
                                   for i in range(d.MAX_KINDS + 5)])
    assert len(many) == d.MAX_KINDS and "k0" not in many


def test_unit_kind_names_what_runs() -> None:
    assert d.unit_kind({"call": "m:f", "args": [1]}) == "call:m:f"
    assert d.unit_kind({"argv": ["/bin/sleep", "2"]}) == "argv:/bin/sleep"
    assert d.unit_kind({"data": "python: print(1)"}) == "data:python"
    assert d.unit_kind({"data": "task details"}) == d.unit_kind({"data": "a b: c"}) == "data"
    assert d.unit_kind({"data": "http://x"}) == "data:http"
    assert d.unit_kind({}) == "data"


def test_units_to_kill_spares_committed_results() -> None:
    replica = {("t", -1): d.ReplicaUnit("running", 7, "a"),
               ("u", -1): d.ReplicaUnit("succeeded", 8, None),
               ("v", -1): d.ReplicaUnit("queued", 9, None),
               ("w", -1): d.ReplicaUnit("running", 10, "b")}
    reported = [("t", -1, 1, 7), ("t", -1, 0, 6), ("u", -1, 1, 8), ("v", -1, 1, 9),
                ("w", -1, 1, 10), ("gone", -1, 1, 1)]
    assert d.units_to_kill("a", reported, replica) == (
        ("t", -1, 0, 6), ("v", -1, 1, 9), ("w", -1, 1, 10), ("gone", -1, 1, 1))


@given(st.integers(-10, 10**6), st.floats(0, 0.999))
@settings(max_examples=300)
def test_retry_backoff_is_bounded_for_any_attempt(attempt: int, jitter: float) -> None:
    b = d.retry_backoff_s(attempt, jitter)
    assert 0.5 * d.RETRY_BASE_S <= b < 1.5 * d.RETRY_CAP_S
    if 1 <= attempt < 8:
        assert b == d.RETRY_BASE_S * 2 ** (attempt - 1) * (0.5 + jitter)


def test_completion_batching_and_run_time_average() -> None:
    assert d.should_flush(1, 0) and not d.should_flush(0, 0)
    assert not d.should_flush(5, d.MAX_INFLIGHT_COMPLETES)
    out = d.completion_results([{"ok": True}, {"ok": False, "attempt": 3}], [0.5, 0.5])
    assert "backoff_s" not in out[0] and out[1]["backoff_s"] == 2.0
    ewma = d.update_run_ewma(None, [{"started_at": 1.0, "finished_at": 2.0},
                                    {"requeue": True, "started_at": 0, "finished_at": 9.0},
                                    {"started_at": 1.0, "finished_at": 3.0}])
    assert ewma is not None and abs(ewma - 1.1) < 1e-9


def test_a_unit_whose_result_is_being_committed_frees_its_slot() -> None:
    w = d.WorkerView("a", 1, 1)
    run = (d.RunningView("done", -1, "a", 0),)
    nxt = (QueuedUnit("next", -1, 0, "batch"),)
    busy = d.PlanView(0.0, (w,), nxt, frozenset({0}), run)
    assert d.plan_round(busy).assignments == ()
    freed = d.PlanView(0.0, (w,), nxt, frozenset({0}), run,
                       completing=frozenset({("done", -1, "a")}))
    assert [a.task_id for a in d.plan_round(freed).assignments] == ["next"]
    # A result from another node than the one the replica has it on frees nothing.
    other = d.PlanView(0.0, (w,), nxt, frozenset({0}), run,
                       completing=frozenset({("done", -1, "b")}))
    assert d.plan_round(other).assignments == ()


ATTEMPTS = st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.integers(-1, 2),
                     st.integers(1, 3), st.integers(1, 3))


@given(st.lists(ATTEMPTS, max_size=8, unique=True),
       st.dictionaries(st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.integers(-1, 2)),
                       st.sampled_from(["a", "b"]), max_size=6),
       st.dictionaries(st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.integers(-1, 2)),
                       st.tuples(st.sampled_from(["queued", "running", "succeeded", "failed"]),
                                 st.integers(1, 3)), max_size=6))
@settings(max_examples=300, deadline=None)
def test_stale_held_counts_every_attempt_that_is_not_the_workers_to_run(
        reported: list, running: dict, units: dict) -> None:
    """Given what worker "a" reports holding and the replica, when the leader counts
    the slots it still takes, then every reported attempt counts once except one per
    unit the replica runs on "a" and those whose result is committed."""
    def unit(key: d.UnitKey) -> d.ReplicaUnit | None:
        u = units.get(key)
        return None if u is None else d.ReplicaUnit(u[0], u[1], running.get(key))

    n = d.stale_held("a", reported, running, unit)
    mine = {(k[0], k[1]) for k in reported if running.get((k[0], k[1])) == "a"}
    done = [k for k in reported if running.get((k[0], k[1])) != "a"
            and (u := units.get((k[0], k[1]))) is not None and u[1] == k[3]
            and u[0] in ("succeeded", "failed")]
    assert n == len(reported) - len(mine) - len(done)
    # ... and the planner gives the worker that many fewer units.
    w = d.WorkerView("a", 3, 3)
    queued = tuple(QueuedUnit(f"q{i}", -1, 0, "batch") for i in range(5))
    view = d.PlanView(0.0, (w,), queued, frozenset({0}), held={"a": n})
    assert len(d.plan_round(view).assignments) == max(0, 3 - n)


@given(st.floats(0, 1e6), st.floats(-50, 50), st.floats(0, 100), st.floats(0, 1e5))
@settings(max_examples=300, deadline=None)
def test_a_retry_is_released_after_its_backoff_on_the_leaders_clock(
        replicated_now: float, wait: float, after: float, now: float) -> None:
    """Given a retry due ``wait`` seconds past the replicated clock, first seen by the
    leader at ``now``, when ``after`` seconds pass on the leader's own clock, then it
    is released exactly once that many seconds have passed (whatever wall clocks say),
    by a command carrying its due time."""
    due = replicated_now + wait
    tick, seen = d.due_retry_tick({("t", 0): due}, replicated_now, {}, now)
    assert (tick is not None) == (due - replicated_now <= 0)
    assert seen[("t", 0)] == (now, max(0.0, due - replicated_now))
    later = now + after
    tick, _ = d.due_retry_tick({("t", 0): due}, replicated_now + 1e-3, seen, later)
    assert (tick is not None) == (later - now >= max(0.0, due - replicated_now))
    if tick is not None:
        assert tick == due


def test_plan_round_stops_at_a_split_task_being_cut_but_not_at_a_batch_task() -> None:
    """Given a split task whose cut is in flight at the head of the queue, when the
    leader plans, then nothing after it is planned; a batch task in flight is skipped."""
    w = (d.WorkerView("a", 2),)
    low = QueuedUnit("low", -1, 10, "batch")
    split = d.PlanView(0.0, w, (QueuedUnit("hi", -1, 20, "split", shards=3), low),
                       frozenset({20, 10}), in_flight=(d.InFlight("hi", 0, "a"),))
    assert d.plan_round(split).assignments == ()
    batch = d.PlanView(0.0, w, (QueuedUnit("hi", -1, 20, "batch"), low),
                       frozenset({20, 10}), in_flight=(d.InFlight("hi", -1, "a"),))
    assert [a.task_id for a in d.plan_round(batch).assignments] == ["low"]


@given(st.lists(st.sampled_from([0, 10, 20, 30]), max_size=10), st.integers(0, 6),
       st.none() | st.sampled_from([0, 10, 20, 30, 40]))
@settings(max_examples=400)
def test_a_worker_never_keeps_a_unit_below_the_floor_that_would_wait(
        prios: list, free: int, floor: int | None) -> None:
    """Given dispatched units, the worker's free slots and the leader's floor, when the
    worker takes them in, then every unit is taken or handed back (once); units at or
    above the floor are taken; below it, only into free slots left after them, most
    urgent first (simulator seeds 1666, 3086, 6166: a unit sent to a slot the leader
    counted free waited behind an ended attempt, then started while a more urgent
    retry was queued). No floor (an earlier release): everything is taken."""
    take, back = d.gate_arrivals(prios, free, floor)
    assert sorted(take + back) == list(range(len(prios)))
    if floor is None:
        assert back == ()
        return
    above = [i for i, p in enumerate(prios) if p >= floor]
    assert set(above) <= set(take)
    below_taken = [i for i in take if prios[i] < floor]
    assert len(below_taken) <= max(0, free - len(above))
    if back:
        assert len(below_taken) == max(0, free - len(above))
        assert min((prios[i] for i in below_taken), default=99) >= max(prios[i] for i in back)


def test_the_dispatch_floor_is_the_highest_priority_in_the_system() -> None:
    assert d.dispatch_floor([0, 30, 10]) == 30 and d.dispatch_floor([]) is None


@given(plan_views(), st.frozensets(st.sampled_from([0, 10, 20, 30])))
@settings(max_examples=300, deadline=None)
def test_a_lower_unit_never_goes_out_before_a_more_urgent_one_is_delivered(
        view: d.PlanView, undelivered: frozenset) -> None:
    """Given assignments in flight (with their priorities) and committed ones not yet
    delivered to their workers, when the leader plans, then it plans one priority
    level, at or above every one of those: a lower unit sent with or ahead of a
    more urgent one accepted earlier could start before it (the one-call-at-a-time
    case of tests/cluster/test_priority.py)."""
    prio = {u.task_id: u.priority for u in view.queued}
    in_flight = tuple(d.InFlight(p.task_id, p.chunk, p.worker, prio.get(p.task_id))
                      for p in view.in_flight)
    view = d.PlanView(view.now, view.workers, view.queued, view.queued_priorities,
                      view.running, in_flight, view.completing, view.floor, view.run_ewma,
                      undelivered=undelivered)
    out = d.plan_round(view).assignments
    levels = {prio[a.task_id] for a in out}
    assert len(levels) <= 1
    above = [p.priority for p in in_flight if p.priority is not None] + list(undelivered)
    if out and above:
        assert min(levels) >= max(above)


@given(plan_views(), st.lists(st.tuples(st.sampled_from(["gone0", "gone1", "r0"]),
                                        st.sampled_from(NODES)), max_size=3))
@settings(max_examples=400, deadline=None)
def test_the_leaders_running_summary_plans_exactly_as_the_running_units(
        view: d.PlanView, gone: list[tuple[str, str]]) -> None:
    # The leader passes the running units summed up (PlanView.running_summary), read
    # straight from the replica's unit -> worker map; the simulator passes them one
    # by one. Completing units whose result has applied meanwhile (no longer
    # running, or running again elsewhere) count in neither.
    view = replace(view, completing=view.completing | {(t, -1, w) for t, w in gone})
    prio = {r.task_id: r.priority for r in view.running}
    summary = d.summarize_running({(r.task_id, r.chunk): r.worker for r in view.running},
                                  prio.get, [((t, c), w) for t, c, w in view.completing])
    summed = replace(view, running=(), running_summary=summary)
    assert d.free_slots(summed) == d.free_slots(view)
    assert d.queue_depth_needed(summed) == d.queue_depth_needed(view)
    assert d.plan_round(summed) == d.plan_round(view)
