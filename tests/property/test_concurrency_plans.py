"""Concurrency-key properties (issue 18, item 3): a key never has more units
assigned than its limit, counting the units the replica holds as assigned, those in
flight and attempts workers still run that are no longer their own; units held back
by a key do not hold up the rest of the queue; the why-pending reason agrees with
the next plan; and the replicated state enforces the limit whatever a leader
proposes, over any sequence of commands. Pure: strategies.plan, decisions and the
real SchedulerState."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from taskandgo.consensus import policy
from taskandgo.consensus.commands import (
    Assign,
    AssignEntry,
    Cancel,
    Complete,
    Requeue,
    Submit,
    WritePolicy,
)
from taskandgo.consensus.state import SchedulerState
from taskandgo.node import decisions as d
from taskandgo.node.placement import PendingView, pending_reason
from taskandgo.strategies import QueuedUnit, Worker, plan

KEYS = ("api", "db", "gpu-lock")
key_sets = st.lists(st.sampled_from(KEYS), max_size=2, unique=True).map(tuple)
limits = st.dictionaries(st.sampled_from(KEYS), st.integers(0, 3), max_size=3)


@st.composite
def units(draw: st.DrawFn) -> list[QueuedUnit]:
    out = []
    for i in range(draw(st.integers(0, 12))):
        split = draw(st.integers(0, 3)) == 0
        out.append(QueuedUnit(f"t{i}", -1, draw(st.integers(0, 2)) * 10,
                              "split" if split else "batch",
                              shards=draw(st.integers(1, 4)) if split else 0,
                              keys=draw(key_sets)))
    return out


workers = st.lists(st.integers(0, 4), min_size=1, max_size=4).map(
    lambda slots: [Worker(f"w{i}", n) for i, n in enumerate(slots)])


def _per_key(out: list, queued: list[QueuedUnit]) -> Counter:
    keys = {u.task_id: u.keys for u in queued}
    n: Counter = Counter()
    for a in out:
        n.update(keys[a.task_id])
    return n


@settings(max_examples=400, deadline=None)
@given(workers, units(), limits)
def test_plan_gives_no_key_more_than_its_room(ws: list[Worker], queued: list[QueuedUnit],
                                              room: dict[str, int]) -> None:
    out = plan(queued, ws, room)
    got = _per_key(out, queued)
    for k, n in room.items():
        assert got[k] <= n, (k, got, room)
    # Every slot it could fill with a unit whose keys have room is filled: a unit
    # held back by its key holds nothing else up (no unit without keys is left
    # queued while a slot is free).
    free = sum(w.free_slots for w in ws)
    if len(out) < free:
        placed = {a.task_id for a in out}
        for u in queued:
            if not u.keys:
                assert u.task_id in placed, (u, out)


@settings(max_examples=300, deadline=None)
@given(workers, units(), limits)
def test_plan_keeps_order_among_units_with_room(ws: list[Worker], queued: list[QueuedUnit],
                                                room: dict[str, int]) -> None:
    out = plan(queued, ws, room)
    placed = {a.task_id for a in out}
    # Walking the queue with the room left: the units placed are exactly those
    # reached before the first that found no slot, skipping those without room.
    left = dict(room)
    slots = sum(w.free_slots for w in ws)
    expect = set()
    for u in queued:
        if any(left.get(k, 1) <= 0 for k in u.keys):
            continue
        n = max(1, u.shards) if u.strategy == "split" else 1
        can = min([n, *(left[k] for k in u.keys if k in left)])
        take = min(can, slots)
        if take == 0:
            break
        expect.add(u.task_id)
        slots -= take
        for k in u.keys:
            if k in left:
                left[k] -= take
        if take < can:
            break
    assert placed == expect, (out, expect)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), units(), limits, st.data())
def test_plan_round_counts_held_in_flight_and_stale_units(slots: list[int],
                                                          queued: list[QueuedUnit],
                                                          lim: dict[str, int],
                                                          data: st.DataObject) -> None:
    views = tuple(d.WorkerView(f"w{i}", n) for i, n in enumerate(slots))
    # The replica counts some units holding keys; some more are in flight; a worker
    # still runs an attempt that is no longer its own.
    held = {k: data.draw(st.integers(0, 2)) for k in KEYS}
    flying = data.draw(st.lists(key_sets, max_size=3))
    stale = data.draw(st.lists(key_sets, max_size=2))
    room = d.key_room(lim, held, [*flying, *stale])
    view = d.PlanView(0.0, views, queued=tuple(queued),
                      queued_priorities=frozenset(u.priority for u in queued), key_room=room)
    got = _per_key(list(d.plan_round(view).assignments), queued)
    for k, limit in lim.items():
        already = held[k] + sum(k in f for f in flying) + sum(k in s for s in stale)
        assert got[k] == 0 or already + got[k] <= limit, (k, got, already, limit)


@settings(max_examples=300, deadline=None)
@given(workers, units(), limits, st.data())
def test_the_pending_reason_agrees_with_the_next_plan(ws: list[Worker], queued: list[QueuedUnit],
                                                      room: dict[str, int],
                                                      data: st.DataObject) -> None:
    if not queued:
        return
    i = data.draw(st.integers(0, len(queued) - 1))
    head, unit = tuple(queued[:i]), queued[i]
    full = next((k for k in unit.keys if room.get(k, 1) <= 0), None)
    view = PendingView("queued", unit=unit, ahead=len(head), head=head, workers=tuple(ws),
                       key_room=room,
                       key_full=None if full is None else (full, 0, 0, ()))
    reason = pending_reason(view)
    started = any(a.task_id == unit.task_id for a in plan([*head, unit], ws, room))
    if reason.startswith("concurrency key"):
        assert not started
    assert started == reason.startswith("about to start"), (reason, started)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["assign", "complete", "requeue", "cancel", "limit"]),
                          st.integers(0, 7), st.integers(0, 3)), max_size=60))
def test_the_state_never_assigns_a_key_beyond_its_limit(ops: list) -> None:
    # Whatever a leader proposes, in whatever order: eight tasks holding "api" (and
    # some "db"), limits changing on the way.
    s = SchedulerState()
    specs = tuple({"id": f"t{i}", "priority": 10, "strategy": "batch", "data": "x",
                   "concurrency_keys": ["api", "db"] if i % 3 == 0 else ["api"]}
                  for i in range(8))
    Submit(specs, 1.0).apply(s)
    WritePolicy((("limit", "api", 2), ("limit", "db", 1)), 1.0).apply(s)
    lim = {"api": 2, "db": 1}
    now = 2.0
    token = 1
    for kind, i, n in ops:
        now += 1.0
        tid = f"t{i}"
        u = s.tasks[tid].unit
        if kind == "assign":
            token += 1
            before = dict(s.key_held)
            Assign((AssignEntry(tid, -1, 0, f"w{n}", token),), now, 30.0).apply(s)
            if s.tasks[tid].unit.token == token:  # it was assigned
                for k in policy.spec_keys(s.tasks[tid].spec):
                    assert before.get(k, 0) < lim[k], (k, before, lim)
        elif kind == "complete":
            Complete(({"task_id": tid, "chunk": -1, "attempt": u.attempt, "token": u.token,
                       "ok": n > 0},), now).apply(s)
        elif kind == "requeue":
            Requeue(((tid, -1, u.attempt, u.token),), now, "lease").apply(s)
        elif kind == "cancel":
            Cancel((tid,), now).apply(s)
        else:
            key = "api" if n % 2 else "db"
            lim[key] = n
            WritePolicy((("limit", key, n),), now).apply(s)
        # The count is always the assigned units holding each key.
        expect: Counter = Counter()
        for t, _c in s.running:
            expect.update(policy.spec_keys(s.tasks[t].spec))
        assert s.key_held == {k: v for k, v in expect.items() if v}, (s.key_held, expect)
