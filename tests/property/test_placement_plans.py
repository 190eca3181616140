"""Placement properties (issue 18): the planner never over-commits any resource,
required labels always hold, order is kept, and the why-pending reason agrees with
what the planner does next. Pure: strategies.plan, decisions.plan_round and
node/placement.py on generated workers and queues."""

from __future__ import annotations

from collections import Counter, defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st
from taskandgo.node import decisions as d
from taskandgo.node.placement import (
    Offer,
    PendingView,
    check_resources,
    offers_of,
    parse_quantity,
    pending_reason,
    unfit_reason,
)
from taskandgo.node.tasks import InvalidTask
from taskandgo.strategies import Assignment, QueuedUnit, Worker, plan
from taskandgo.strategies.placement import EPSILON, amounts, labels_ok, request_fits

RESOURCES = ("cpu", "memory", "gpu")
LABELS = {"zone": ("a", "b", "c"), "disk": ("ssd", "hdd")}

amount = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0])
resources = st.dictionaries(st.sampled_from(RESOURCES), amount, max_size=3).map(amounts)
node_labels = st.fixed_dictionaries({}, optional={
    k: st.sampled_from(v) for k, v in LABELS.items()}).map(lambda m: tuple(sorted(m.items())))
term = st.sampled_from(["zone=a", "zone=b", "zone=c", "disk", "disk=ssd", "gpu"])


@st.composite
def workers(draw: st.DrawFn) -> list[Worker]:
    n = draw(st.integers(1, 5))
    out = []
    for i in range(n):
        cap = draw(resources)
        # Free: between nothing and everything of each resource.
        free = tuple((k, v * draw(st.sampled_from([0.0, 0.5, 1.0]))) for k, v in cap)
        out.append(Worker(f"w{i}", draw(st.integers(0, 4)), free, cap, draw(node_labels)))
    return out


@st.composite
def units(draw: st.DrawFn) -> list[QueuedUnit]:
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        split = draw(st.booleans())
        out.append(QueuedUnit(
            f"t{i}", -1, draw(st.integers(0, 3)) * 10, "split" if split else "batch",
            shards=draw(st.integers(1, 3)) if split else 0,
            request=draw(resources), require=tuple(draw(st.lists(term, max_size=2))),
            prefer=tuple(draw(st.lists(term, max_size=2)))))
    return out


def _used(out: list[Assignment], queued: list[QueuedUnit]) -> dict[str, Counter]:
    req = {u.task_id: u.request for u in queued}
    used: dict[str, Counter] = defaultdict(Counter)
    for a in out:
        for k, v in req[a.task_id]:
            used[a.worker][k] += v
    return used


@settings(max_examples=300, deadline=None)
@given(workers(), units())
def test_plan_never_over_commits_and_constraints_hold(ws: list[Worker],
                                                      queued: list[QueuedUnit]) -> None:
    out = plan(queued, ws)
    by_id = {w.node_id: w for w in ws}
    unit = {u.task_id: u for u in queued}
    # Slots: never more than free.
    per_worker = Counter(a.worker for a in out)
    assert all(n <= by_id[w].free_slots for w, n in per_worker.items())
    # Resources: never more than free of any.
    for w, used in _used(out, queued).items():
        free = dict(by_id[w].free)
        for k, v in used.items():
            assert v <= free.get(k, 0.0) + 1e-6, (w, k, v, free)
    # Constraints: every required label holds where it runs.
    for a in out:
        assert labels_ok(unit[a.task_id].require, dict(by_id[a.worker].labels))
    # At most once per unit.
    assert len({(a.task_id, a.chunk) for a in out}) == len(out)


def _ever(u: QueuedUnit, ws: list[Worker]) -> bool:
    return any(labels_ok(u.require, dict(w.labels)) and request_fits(u.request, dict(w.capacity))
               for w in ws)


@settings(max_examples=300, deadline=None)
@given(workers(), units())
def test_plan_keeps_order_among_units_some_node_could_hold(ws: list[Worker],
                                                           queued: list[QueuedUnit]) -> None:
    out = plan(queued, ws)
    placed = {a.task_id for a in out}
    reachable = [u for u in queued if _ever(u, ws)]
    # The placed ones are a prefix of the reachable ones (a split task may be cut
    # short only as the last one), and nothing unreachable is placed.
    seen_gap = False
    for u in reachable:
        if u.task_id in placed:
            assert not seen_gap, (u, out)
        else:
            seen_gap = True
    assert placed <= {u.task_id for u in reachable}


@settings(max_examples=300, deadline=None)
@given(workers(), units(), st.data())
def test_pending_reason_agrees_with_the_next_plan(ws: list[Worker], queued: list[QueuedUnit],
                                                  data: st.DataObject) -> None:
    if not queued:
        return
    i = data.draw(st.integers(0, len(queued) - 1))
    head, unit = tuple(queued[:i]), queued[i]
    room = sum(w.free_slots for w in ws)
    # As read_pending gives it: the head only when planning could reach the unit.
    view = PendingView("queued", unit=unit, ahead=len(head),
                       ahead_higher=sum(u.priority > unit.priority for u in head),
                       head=head if len(head) < room else (), workers=tuple(ws))
    reason = pending_reason(view)
    # The leader reads as many units of the queue's head as there are free slots.
    seen = [*head, unit][:room]
    started = any(a.task_id == unit.task_id for a in plan(seen, ws))
    assert started == reason.startswith("about to start"), (reason, started)
    if reason.startswith("needs "):
        name = reason.split()[1].split("=")[0]
        assert name in dict(unit.request)
    if not _ever(unit, ws):
        assert unfit_reason(unit.request, unit.require, offers_of(ws)) == reason


@settings(max_examples=200, deadline=None)
@given(workers(), units())
def test_a_refused_request_is_never_placed_even_on_idle_nodes(ws: list[Worker],
                                                              queued: list[QueuedUnit]) -> None:
    idle = [Worker(w.node_id, 4, w.capacity, w.capacity, w.labels) for w in ws]
    offers = [Offer(w.node_id, 4, w.capacity, w.labels) for w in ws]
    out = {a.task_id for a in plan(queued, idle)}
    for u in queued:
        if u.placed and unfit_reason(u.request, u.require, offers) is not None:
            assert u.task_id not in out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(resources, node_labels, st.integers(1, 4)), min_size=1, max_size=4),
       units(), st.data())
def test_plan_round_counts_running_and_in_flight_requests(
        nodes: list, queued: list[QueuedUnit], data: st.DataObject) -> None:
    views = tuple(d.WorkerView(f"w{i}", slots, resources=cap, labels=labels)
                  for i, (cap, labels, slots) in enumerate(nodes))
    # Some units already run or are in flight with requests of their own.
    used: dict[str, dict[str, float]] = {}
    busy: dict[str, int] = {}
    in_flight = []
    for w in views:
        if data.draw(st.booleans()):
            req = tuple((k, v / 2) for k, v in w.resources)
            used[w.node_id] = dict(req)
            busy[w.node_id] = 1
        if data.draw(st.booleans()):
            req = tuple((k, v / 4) for k, v in w.resources)
            in_flight.append(d.InFlight(f"f-{w.node_id}", -1, w.node_id, None, req))
    view = d.PlanView(0.0, views, queued=tuple(queued),
                      queued_priorities=frozenset(u.priority for u in queued),
                      in_flight=tuple(in_flight),
                      running_summary=d.RunningSummary(busy, frozenset(), used))
    out = d.plan_round(view).assignments
    new = _used(list(out), queued)
    for w in views:
        total = Counter(used.get(w.node_id, {}))
        for p in in_flight:
            if p.worker == w.node_id:
                total.update(dict(p.request))
        total.update(new.get(w.node_id, Counter()))
        cap = dict(w.resources)
        for k, v in total.items():
            assert v <= cap.get(k, 0.0) + EPSILON * 10, (w, k, v)


def test_quantities_and_bad_requests() -> None:
    assert parse_quantity("500m", "cpu") == 0.5
    assert parse_quantity("2Gi", "memory") == 2 * 1024 ** 3
    assert check_resources({"cpu": 2, "gpu": "1", "memory": 0}) == {"cpu": 2.0, "gpu": 1.0}
    for bad in ({"cpu": "lots"}, {"cpu": -1}, {"cpu": float("inf")}, {"": 1}, {"cpu": True},
                "cpu", ["cpu"]):
        try:
            check_resources(bad)
        except InvalidTask as exc:
            assert exc.field.startswith("resources")
        else:
            raise AssertionError(bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.integers(-1, 2),
                          st.integers(1, 3), st.integers(1, 3)), max_size=8, unique=True),
       st.dictionaries(st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.integers(-1, 2)),
                       st.sampled_from(["a", "b"]), max_size=6),
       st.dictionaries(st.sampled_from(["t1", "t2", "t3"]), amount, max_size=3))
def test_attempts_a_worker_still_holds_keep_their_resources(
        reported: list, running: dict, cpu: dict) -> None:
    """Given attempts worker "a" still runs though they are no longer its own (stale),
    their requests count as used: summed over exactly the attempts stale_held counts,
    and planning gives "a" only what is left of its cpu."""
    def unit(key: d.UnitKey) -> d.ReplicaUnit | None:
        return d.ReplicaUnit("running", 0, running.get(key))

    def request(tid: str) -> tuple[tuple[str, float], ...]:
        return amounts({"cpu": cpu.get(tid, 0.0)})

    stale = d.stale_held("a", reported, running, unit)
    held = d.stale_held_requests("a", reported, running, unit, request)
    everything = sum(cpu.get(k[0], 0.0) for k in reported)
    assert held.get("cpu", 0.0) <= everything + 1e-9
    if all(cpu.get(k[0], 0.0) == 1.0 for k in reported):
        assert held.get("cpu", 0.0) == stale
    summary = d.with_held_requests(d.RunningSummary({}, frozenset()), {"a": held})
    w = d.WorkerView("a", 8, resources=amounts({"cpu": 4.0}))
    queued = tuple(QueuedUnit(f"q{i}", -1, 0, "batch", request=amounts({"cpu": 1.0}))
                   for i in range(8))
    view = d.PlanView(0.0, (w,), queued, frozenset({0}), held={"a": stale},
                      running_summary=summary)
    placed = len(d.plan_round(view).assignments)
    assert placed <= max(0.0, 4.0 - held.get("cpu", 0.0)) + 1e-9


def _reference_plan(queued: list[QueuedUnit], ws: list[Worker]) -> list[tuple[str, int, str]]:
    """The placement policy written as plainly as possible (every unit scans every
    worker): what strategies.plan, which keeps per-request heaps, must decide."""
    from taskandgo.strategies.placement import leftover, preferred, take

    free = {w.node_id: max(0, w.free_slots) for w in ws}
    order = [w.node_id for w in ws]
    res = {w.node_id: dict(w.free) for w in ws}
    caps = {w.node_id: dict(w.capacity) for w in ws}
    labels = {w.node_id: dict(w.labels) for w in ws}
    out: list[tuple[str, int, str]] = []
    rr = 0

    def pick(u: QueuedUnit, spread: bool) -> str | None:
        nonlocal rr
        node = None
        if u.placed:
            best_key = None
            for i, n in enumerate(order):
                if free[n] > 0 and labels_ok(u.require, labels[n]) \
                        and request_fits(u.request, res[n]):
                    key = (-preferred(u.prefer, labels[n]), leftover(u.request, res[n], caps[n]), i)
                    if best_key is None or key < best_key:
                        node, best_key = n, key
        elif spread:
            for _ in range(len(order)):
                n = order[rr % len(order)]
                rr += 1
                if free[n] > 0:
                    node = n
                    break
        else:
            top = 0
            for n in order:
                if free[n] > top:
                    node, top = n, free[n]
        if node is not None:
            free[node] -= 1
            take(res[node], u.request)
        return node

    for u in queued:
        if u.placed and not _ever(u, ws):
            continue
        if u.chunk == -1 and u.strategy == "split":
            count = max(1, u.shards) if u.shards else len(ws)
            for i in range(count):
                node = pick(u, True)
                if node is None:
                    return out
                out.append((u.task_id, i, node))
            continue
        node = pick(u, u.chunk != -1)
        if node is None:
            return out
        out.append((u.task_id, u.chunk, node))
    return out


@settings(max_examples=500, deadline=None)
@given(workers(), units())
def test_plan_decides_as_the_plain_policy(ws: list[Worker], queued: list[QueuedUnit]) -> None:
    # The planner keeps a heap of candidate nodes per distinct request (a round of
    # hundreds of units on a hundred workers must stay within milliseconds); every
    # choice must be the one a plain scan of every worker makes.
    got = [(a.task_id, a.chunk, a.worker) for a in plan(queued, ws)]
    assert got == _reference_plan(queued, ws)
