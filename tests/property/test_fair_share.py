"""Fair share properties (issue 18, item 4; consensus/fairshare.py), on the real
SchedulerState driven as the leader drives it (peek the queue, assign a prefix of
what it returns) and the real why-pending read and planner:

* backlogged tenants of one priority get units within 10% of weight/sum(weights);
* never a lower priority before a higher one (aging aside), and with aging the
  order is the plain queue's whenever a level holds one tenant;
* within a tenant and level, units go in the plain queue's order;
* a tenant idle while others were served gets no burst when it comes back;
* the why-pending reason agrees with what the next planning round does, and the
  units it counts ahead of a task are those ahead of it in the fair order.

Each fails with its mechanism taken out (checked by hand when written: the tag
not advanced in FairQueue.served; levels merged by tag instead of their earliest
unit; a sub-queue kept newest first; a returning tenant's tag not raised to the
level's virtual time; read_pending counting by the heap instead of the fair order;
fairshare.standing placing a level by the unit itself instead of its earliest unit
left, or ignoring weights).
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from taskandgo.consensus.fairshare import standing
from taskandgo.consensus.state import SchedulerState
from taskandgo.node.placement import Offer, pending_reason, queued_unit, read_pending
from taskandgo.strategies import plan

WEIGHTS = st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0])


def fair_state(weights: dict[str, float], aging_per_s: float = 1.0 / 60.0) -> SchedulerState:
    s = SchedulerState(aging_per_s=aging_per_s)
    s.apply_policy([["tenant_label", "team"], *(["weight", t, w] for t, w in weights.items())],
                   0.0)
    return s


def spec(tid: str, team: str, priority: int = 0) -> dict:
    return {"id": tid, "priority": priority, "strategy": "batch", "labels": {"team": team}}


def team(s: SchedulerState, tid: str) -> str:
    return str(s.tasks[tid].spec["labels"]["team"])


def plain_order(s: SchedulerState) -> list[tuple[str, int]]:
    """The queue as it would be served without fair share: live entries by key."""
    return [(e[2], e[3]) for e in sorted(e for e in s.heap if s._is_live_entry(e))]


def serve(s: SchedulerState, data: st.DataObject, now: float) -> list[str]:
    """One planning round as the leader does it: peek some units, assign a prefix."""
    head = s.peek_queued(data.draw(st.integers(1, 8), label="depth"))
    if not head:
        return []
    k = data.draw(st.integers(1, len(head)), label="assigned")
    out, _ = s.apply_assign([(t.id, c, 0, "w1") for t, c in head[:k]], now, 30.0)
    assert [a[0] for a in out] == [t.id for t, _ in head[:k]]
    return [a[0] for a in out]


@settings(max_examples=40, deadline=None)
@given(st.lists(WEIGHTS, min_size=2, max_size=4), st.data())
def test_backlogged_tenants_get_their_weighted_share(weights: list[float],
                                                     data: st.DataObject) -> None:
    tenants = {f"t{i}": w for i, w in enumerate(weights)}
    s = fair_state(tenants)
    total = 400
    # Backlogs submitted in random batches, each tenant far more than it can get.
    batches = [(t, i) for t in tenants for i in range(total // 50 + 1)]
    for t, i in data.draw(st.permutations(batches), label="submit order"):
        s.apply_submit([spec(f"{t}-{i}-{j}", t) for j in range(50)], 1.0 + i)
    got = dict.fromkeys(tenants, 0)
    n, now = 0, 10.0
    while n < total:
        for tid in serve(s, data, now):
            got[team(s, tid)] += 1
            n += 1
        now += 1.0
    wsum = sum(tenants.values())
    for t, w in tenants.items():
        want = n * w / wsum
        assert abs(got[t] - want) <= 0.1 * want, (got, tenants)


@st.composite
def ops(draw: st.DrawFn) -> list[tuple]:
    out: list[tuple] = []
    for i in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["submit", "submit", "serve", "cancel"]))
        if kind == "submit":
            out.append(("submit", i, draw(st.sampled_from(["a", "b", "c"])),
                        draw(st.integers(0, 3)), draw(st.integers(1, 6))))
        else:
            out.append((kind, i))
    return out


def run_ops(s: SchedulerState, script: list[tuple], data: st.DataObject,
            check: Callable[[SchedulerState], None]) -> None:
    now = 1.0
    for op in script:
        now += data.draw(st.sampled_from([0.0, 1.0, 90.0]), label="elapsed")
        if op[0] == "submit":
            _, i, t, prio, count = op
            s.apply_submit([spec(f"{t}{i}.{j}", t, prio) for j in range(count)], now)
        elif op[0] == "serve":
            serve(s, data, now)
        else:
            queued = sorted(t for t, _ in plain_order(s))
            if queued:
                s.apply_cancel([data.draw(st.sampled_from(queued), label="cancel")], now)
        check(s)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), WEIGHTS), ops(), st.data())
def test_never_a_lower_priority_before_a_higher_one(weights: dict[str, float],
                                                    script: list[tuple],
                                                    data: st.DataObject) -> None:
    s = fair_state(weights, aging_per_s=0.0)  # aging aside

    def check(s: SchedulerState) -> None:
        prios = [t.priority for t, _ in s.peek_queued(10_000)]
        assert prios == sorted(prios, reverse=True)
        assert len(prios) == s.queued_count()

    run_ops(s, script, data, check)


@settings(max_examples=150, deadline=None)
@given(ops(), st.data())
def test_with_one_tenant_per_level_the_order_is_the_plain_queues(script: list[tuple],
                                                                 data: st.DataObject) -> None:
    # Aging on, submits minutes apart: levels overtake each other as before.
    s = fair_state({"a": 3.0})
    script = [(*op[:2], f"p{op[3]}", *op[3:]) if op[0] == "submit" else op for op in script]

    def check(s: SchedulerState) -> None:
        assert [(t.id, c) for t, c in s.peek_queued(10_000)] == plain_order(s)

    run_ops(s, script, data, check)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), WEIGHTS), ops(), st.data())
def test_order_within_a_tenant_and_level_is_unchanged(weights: dict[str, float],
                                                      script: list[tuple],
                                                      data: st.DataObject) -> None:
    s = fair_state(weights)

    def check(s: SchedulerState) -> None:
        fair = [(t.id, c) for t, c in s.peek_queued(10_000)]
        plain = plain_order(s)
        assert sorted(fair) == sorted(plain)
        fq = s.fair
        assert fq is not None  # and its counts are the queue's
        assert {p: sum(lv.live.values()) for p, lv in fq.levels.items()} == s.queued_by_priority
        for group in {(team(s, tid), s.tasks[tid].priority) for tid, _ in plain}:
            def mine(units: list[tuple[str, int]], g: tuple = group) -> list:
                return [u for u in units if (team(s, u[0]), s.tasks[u[0]].priority) == g]
            assert mine(fair) == mine(plain), group

    run_ops(s, script, data, check)


@settings(max_examples=60, deadline=None)
@given(WEIGHTS, WEIGHTS, st.integers(10, 120), st.data())
def test_an_idle_tenant_banks_no_credit(wa: float, wb: float, alone: int,
                                        data: st.DataObject) -> None:
    s = fair_state({"a": wa, "b": wb})
    s.apply_submit([spec(f"a{i}", "a") for i in range(alone + 200)], 1.0)
    served = 0
    while served < alone:  # a alone: b is idle
        served += len(serve(s, data, 2.0))
    s.apply_submit([spec(f"b{i}", "b") for i in range(200)], 3.0)
    # From b's return on, every prefix of what is served gives b about its share:
    # never the burst a tag left behind at a's start would give it.
    got_b = n = 0
    while n < 60:
        for tid in serve(s, data, 4.0):
            n += 1
            got_b += tid.startswith("b")
            share = n * wb / (wa + wb)
            assert share - 1.5 <= got_b <= share + 1.5, (n, got_b, wa, wb)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), WEIGHTS, min_size=1),
       st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 1),
                          st.integers(1, 5)), min_size=1, max_size=6),
       st.lists(st.integers(0, 3), min_size=1, max_size=4), st.integers(0, 6), st.data())
def test_pending_reason_agrees_with_the_next_plan(weights: dict[str, float],
                                                  batches: list[tuple[str, int, int]],
                                                  slots: list[int], served: int,
                                                  data: st.DataObject) -> None:
    s = fair_state(weights)
    for i, (t, prio, count) in enumerate(batches):
        s.apply_submit([spec(f"{t}{i}.{j}", t, prio) for j in range(count)], 1.0 + i)
    head = s.peek_queued(served)  # some served already: virtual times moved on
    s.apply_assign([(t.id, c, 0, "done") for t, c in head], 20.0, 30.0)
    queued = [tid for tid, _ in plain_order(s)]
    if not queued:
        return
    tid = data.draw(st.sampled_from(queued), label="task")
    offers = [Offer(f"w{i}", n) for i, n in enumerate(slots)]
    view = read_pending(s, tid, offers)
    assert view is not None
    reason = pending_reason(view)
    # What the planner does next, as tests/property/test_placement_plans.py checks
    # it: strategies.plan on the queue's head as deep as the free slots, the head
    # read from peek_queued (the order the leader plans in).
    room = sum(w.free_slots for w in view.workers)
    seen = [queued_unit(t, c) for t, c in s.peek_queued(room)]
    started = any(a.task_id == tid for a in plan(seen, list(view.workers)))
    assert started == reason.startswith("about to start"), (reason, started, weights, batches,
                                                            slots, served, view)
    if "over its share" in reason:
        # True as said: units of another tenant of its priority, queued after it,
        # go first.
        fair = [t.id for t, _ in s.peek_queued(10_000)]
        plain = [t for t, _ in plain_order(s)]
        prio = s.tasks[tid].priority
        overtaking = [x for x in fair[:fair.index(tid)]
                      if s.tasks[x].priority == prio and team(s, x) != team(s, tid)
                      and plain.index(x) > plain.index(tid)]
        assert f": {len(overtaking)} unit" in reason, (reason, overtaking)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), WEIGHTS), ops(), st.data())
def test_units_ahead_are_counted_in_the_fair_order(weights: dict[str, float],
                                                   script: list[tuple],
                                                   data: st.DataObject) -> None:
    # What read_pending counts (fairshare.standing, computed without walking the
    # order) is each task's place in the order peek_queued returns, aging included.
    s = fair_state(weights)

    def check(s: SchedulerState) -> None:
        fq = s.fair
        assert fq is not None
        fair = [t for t, _ in s.peek_queued(10_000)]
        for i, t in enumerate(fair):
            if t in fair[:i]:
                continue
            mine = min(e for e in s.heap if e[2] == t.id and s._is_live_entry(e))
            ahead, higher, _ = standing(fq, mine, s.tasks, s._is_live_entry, s.weights)
            assert (ahead, higher) == (i, sum(x.priority > t.priority for x in fair[:i]))

    run_ops(s, script, data, check)
