"""Properties of the pure planner (hypothesis)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from taskandgo.strategies import QueuedUnit, Worker, chunk_count_for, plan

units = st.lists(
    st.builds(
        lambda i, prio, strategy, shards, chunk: QueuedUnit(
            f"t{i}", chunk if strategy == "batch" or chunk >= 0 else -1, prio, strategy,
            shards, 0, 0 if chunk < 0 else 8),
        st.integers(0, 10**6), st.integers(-5, 30), st.sampled_from(["split", "batch"]),
        st.integers(0, 6), st.integers(-1, 7)),
    # One entry per task: a task is either still whole (chunk -1) or already cut.
    max_size=30, unique_by=lambda u: u.task_id)
workers = st.lists(st.builds(Worker, st.sampled_from(["a", "b", "c", "d", "e"]),
                             st.integers(0, 5)), max_size=5, unique_by=lambda w: w.node_id)


@given(units, workers)
@settings(max_examples=300)
def test_each_unit_assigned_at_most_once_and_never_beyond_free_slots(q, ws) -> None:
    out = plan(q, ws)
    keys = [(a.task_id, a.chunk) for a in out]
    assert len(keys) == len(set(keys))
    free = {w.node_id: w.free_slots for w in ws}
    for node, n in Counter(a.worker for a in out).items():
        assert n <= free[node]


@given(units, workers)
@settings(max_examples=300)
def test_assigned_units_are_a_prefix_of_the_queue(q, ws) -> None:
    """Priority order: a unit is placed only if every unit before it was."""
    out = plan(q, ws)
    placed_tasks = [a.task_id for a in out]
    order = {u.task_id: i for i, u in enumerate(q)}
    positions = sorted({order[a.task_id] for a in out})
    assert positions == list(range(len(positions)))
    if out:
        assert placed_tasks[0] == q[0].task_id


@given(st.integers(1, 6), st.integers(1, 6))
def test_split_cut_spreads_chunks_over_workers(n_workers: int, shards: int) -> None:
    ws = [Worker(f"w{i}", 10) for i in range(n_workers)]
    out = plan([QueuedUnit("t", -1, 0, "split", shards)], ws)
    assert [a.chunk for a in out] == list(range(shards))
    per = Counter(a.worker for a in out)
    assert max(per.values()) - min(per.values()) <= 1 or len(per) < n_workers
    assert len(per) == min(n_workers, shards)


def test_default_chunk_count_is_live_workers_then_items_then_shards() -> None:
    assert chunk_count_for(QueuedUnit("t", -1, 0, "split"), 3) == 3
    assert chunk_count_for(QueuedUnit("t", -1, 0, "split", n_items=5), 3) == 5
    assert chunk_count_for(QueuedUnit("t", -1, 0, "split", shards=2, n_items=5), 3) == 2


def test_no_free_slot_cuts_nothing() -> None:
    assert plan([QueuedUnit("t", -1, 0, "split", 4)], [Worker("a", 0)]) == []
