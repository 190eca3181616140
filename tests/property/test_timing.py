"""Properties of the leader's timing decisions (node/timing.py), with hypothesis.

Given the delayed tasks of a replica (id -> run_at), the leader's clock and the
releases it has in flight, when ``due_starts`` runs, then it names exactly the due
tasks not in flight (earliest first, at most the limit), whatever order the replica
lists them in, and releasing what it names never releases a task before its time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from taskandgo.consensus.commands import StartDue, Submit
from taskandgo.consensus.state import SchedulerState
from taskandgo.node import timing

times = st.floats(0, 1000, allow_nan=False)
scheduled_maps = st.dictionaries(st.sampled_from([f"t{i}" for i in range(30)]), times,
                                 max_size=30)


@given(scheduled_maps, times, st.frozensets(st.sampled_from([f"t{i}" for i in range(30)])),
       st.integers(0, 40), st.randoms(use_true_random=False))
def test_due_starts_names_the_due_tasks_not_in_flight(
        scheduled: dict[str, float], now: float, in_flight: frozenset[str], limit: int,
        rnd: object) -> None:
    items = list(scheduled.items())
    got = timing.due_starts(items, now, in_flight, limit)
    due = sorted((at, t) for t, at in items if at <= now and t not in in_flight)
    assert list(got) == [t for _, t in due][:limit]
    shuffled = list(items)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert timing.due_starts(shuffled, now, in_flight, limit) == got
    assert len(set(got)) == len(got)


@given(scheduled_maps, times, times)
def test_releasing_what_it_names_never_starts_a_task_early(
        scheduled: dict[str, float], submit_at: float, leader_now: float) -> None:
    s = SchedulerState()
    Submit(tuple({"id": t, "priority": 0, "strategy": "batch", "data": "x", "run_at": at}
                 for t, at in scheduled.items()), submit_at).apply(s)
    ids = timing.due_starts(list(s.scheduled.items()), leader_now)
    released, _ = StartDue(ids, leader_now).apply(s)
    assert set(released) == set(ids)
    for t, at in scheduled.items():
        status = s.tasks[t].status
        assert (status == "scheduled") == (at > max(submit_at, leader_now)), (t, at, status)
        assert (t in s.scheduled) == (status == "scheduled")


@given(times, times)
def test_lateness_is_never_negative(run_at: float, released_at: float) -> None:
    assert timing.lateness_s(run_at, released_at) == max(0.0, released_at - run_at)


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 5), st.floats(0, 100)),
                min_size=1, max_size=30))
def test_the_leaders_clock_never_goes_back_nor_behind_the_cluster(
        steps: list[tuple[float, float, float]]) -> None:
    """Given wall clock readings that jump about, monotonic time moving forward and a
    replicated clock that only moves forward, the decision clock is never behind the
    wall clock, never behind the replicated clock plus the time elapsed since it was
    first seen, and never goes back."""
    anchor = None
    mono = replicated = last = 0.0
    first_seen: dict[float, float] = {}
    for wall, dt, bump in steps:
        mono += dt
        replicated = max(replicated, bump)
        first_seen.setdefault(replicated, mono)
        now, anchor = timing.cluster_clock(wall, mono, replicated, anchor)
        assert now >= wall and now >= last
        assert now >= replicated + (mono - first_seen[replicated]) - 1e-9
        last = now
