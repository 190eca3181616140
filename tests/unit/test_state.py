"""Properties of the replicated state machine: determinism, snapshot round trip,
fencing, priority order, totality."""

from __future__ import annotations

import json
import pickle

from hypothesis import given, settings
from hypothesis import strategies as st
from taskandgo.consensus.state import POISON_AFTER_NODE_LOSSES, SchedulerState, Unit

ids = st.sampled_from([f"t{i}" for i in range(8)])
workers = st.sampled_from(["a", "b", "c"])

command = st.one_of(
    st.tuples(st.just("submit"), st.lists(st.fixed_dictionaries({
        "id": ids, "priority": st.integers(-3, 30),
        "strategy": st.sampled_from(["split", "batch"]), "data": st.just("sh: true")}),
        max_size=4)),
    # Assignments with and without a proposer-chosen fencing token (a few valid
    # values that complete/requeue below also carry, a large one, and invalid ones).
    st.tuples(st.just("assign"), st.lists(st.one_of(
        st.tuples(ids, st.integers(-1, 3), st.integers(1, 4), workers),
        st.tuples(ids, st.integers(-1, 3), st.integers(1, 4), workers,
                  st.one_of(st.integers(1, 12), st.just(2 ** 63 - 1), st.just(0),
                            st.just(-5), st.just(2 ** 63), st.just(True), st.just("7")))),
        max_size=4)),
    st.tuples(st.just("complete"), st.lists(st.fixed_dictionaries({
        "task_id": ids, "chunk": st.integers(-1, 3), "attempt": st.integers(0, 3),
        "token": st.integers(0, 12), "ok": st.booleans(), "backoff_s": st.sampled_from([0, 1.0]),
        "result": st.sampled_from(["1", "x", ""])}), max_size=4)),
    st.tuples(st.just("cancel"), st.lists(ids, max_size=2)),
    st.tuples(st.just("requeue"), st.lists(st.tuples(ids, st.integers(-1, 3), st.integers(0, 3),
                                                     st.integers(0, 12)), max_size=3)),
    st.tuples(st.just("compact"), st.integers(0, 5)),
    st.tuples(st.just("garbage"), st.one_of(st.none(), st.integers(), st.text(max_size=3),
                                            st.lists(st.none(), max_size=2))),
)


def apply(s: SchedulerState, cmd: tuple, now: float) -> object:
    kind, arg = cmd
    if kind == "submit":
        return s.apply_submit(arg, now)
    if kind == "assign":
        return s.apply_assign(arg, now, 3.0)
    if kind == "complete":
        return s.apply_complete(arg, now)
    if kind == "cancel":
        return s.apply_cancel(arg, now)
    if kind == "requeue":
        return s.apply_requeue(arg, now, "lost")
    if kind == "compact":
        return s.apply_compact(now, 100.0, arg)
    # Malformed arguments, as a defective proposer might send: must not raise.
    s.apply_submit(arg, now)
    s.apply_assign(arg, now, 1.0)
    s.apply_complete(arg, now)
    s.apply_cancel(arg, now)
    return s.apply_requeue(arg, now, "x")


@given(st.lists(command, max_size=40))
@settings(max_examples=200, deadline=None)
def test_same_commands_give_equal_states_and_results(cmds) -> None:
    a, b = SchedulerState(), SchedulerState()
    for i, cmd in enumerate(cmds):
        assert apply(a, cmd, float(i)) == apply(b, cmd, float(i))
    assert a.fingerprint() == b.fingerprint()


@given(st.lists(command, max_size=40))
@settings(max_examples=200, deadline=None)
def test_reads_that_touch_units_change_nothing_replicated(cmds) -> None:
    """A queued task's unit is kept compact until touched; a replica whose reads
    touched units (materialising them) still has an equal state and snapshot."""
    a, b = SchedulerState(), SchedulerState()
    for i, cmd in enumerate(cmds):
        assert apply(a, cmd, float(i)) == apply(b, cmd, float(i))
        for t in list(b.tasks.values()):
            t.unit.status  # noqa: B018 - materialise, as a read may
            b.peek_queued(3)
    assert a.fingerprint() == b.fingerprint()
    assert pickle.loads(pickle.dumps(b)).fingerprint() == a.fingerprint()


@given(st.lists(command, max_size=40), st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_snapshot_restore_round_trip(cmds, cut) -> None:
    a = SchedulerState()
    for i, cmd in enumerate(cmds[:cut]):
        apply(a, cmd, float(i))
    b = pickle.loads(pickle.dumps(a))
    assert b.fingerprint() == a.fingerprint()
    for i, cmd in enumerate(cmds[cut:], start=cut):
        assert apply(a, cmd, float(i)) == apply(b, cmd, float(i))
    assert a.fingerprint() == b.fingerprint()


@given(st.lists(command, max_size=40), st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_versioned_snapshot_is_plain_data_and_round_trips(cmds, cut) -> None:
    """The snapshot format holds plain data only (it survives JSON), and a replica
    restored from it behaves exactly like the one that wrote it."""
    a = SchedulerState()
    for i, cmd in enumerate(cmds[:cut]):
        apply(a, cmd, float(i))
    b = SchedulerState.from_snapshot(json.loads(json.dumps(a.to_snapshot())))
    c = SchedulerState.from_snapshot(pickle.loads(pickle.dumps(a.to_snapshot())))
    assert b.fingerprint() == a.fingerprint() == c.fingerprint()
    for i, cmd in enumerate(cmds[cut:], start=cut):
        assert apply(a, cmd, float(i)) == apply(b, cmd, float(i))
    assert a.fingerprint() == b.fingerprint()


@given(st.lists(command, max_size=60))
@settings(max_examples=200, deadline=None)
def test_at_most_one_result_committed_per_unit_and_books_balance(cmds) -> None:
    s = SchedulerState()
    for i, cmd in enumerate(cmds):
        apply(s, cmd, float(i))
        for t in s.tasks.values():
            units = [t.unit] if t.chunks is None else t.chunks
            assert t.chunks_done <= len(units)
        assert s.queued_count() == sum(
            1 for t in s.tasks.values()
            for u in ([t.unit] if t.chunks is None else t.chunks)
            if u.status == "queued" and u.qseq)
        for tid, chunk in s.running:
            assert s.tasks[tid].unit_at(chunk).status == "running"


def test_late_result_from_an_old_attempt_is_dropped() -> None:
    s = SchedulerState()
    s.apply_submit([{"id": "t", "priority": 0, "strategy": "batch"}], 0.0)
    (_, _, _, attempt, token, _), = s.apply_assign([("t", -1, 0, "a")], 1.0, 3.0)[0]
    assert s.apply_requeue([("t", -1, attempt, token)], 5.0, "lease")[0] == 1
    (_, _, _, attempt2, token2, _), = s.apply_assign([("t", -1, 0, "b")], 6.0, 3.0)[0]
    assert attempt2 == attempt + 1 and token2 > token
    late = {"task_id": "t", "chunk": -1, "attempt": attempt, "token": token, "ok": True,
            "result": "late"}
    assert s.apply_complete([late], 7.0)[0] == {"committed": 0, "dropped": 1}
    good = dict(late, attempt=attempt2, token=token2, result="fresh")
    assert s.apply_complete([good, good], 8.0)[0] == {"committed": 1, "dropped": 1}
    assert s.tasks["t"].status == "succeeded" and s.tasks["t"].result == "fresh"
    assert s.dropped_results == 2


def test_assign_records_the_proposers_token_on_every_replica() -> None:
    """The leader's random token is the unit's token on every replica; a result must
    carry it (a guess from the old counter is fenced off); a bad token rejects only
    its own assignment; an assignment without one (an earlier release's command)
    still gets the counter's next value."""
    token = 6_917_529_027_641_081_857  # a 63-bit value, as the leader draws them
    replicas = [SchedulerState(), SchedulerState()]
    outs = []
    for s in replicas:
        s.apply_submit([{"id": t, "priority": 0, "strategy": "batch"} for t in "abcd"], 0.0)
        outs.append(s.apply_assign([("a", -1, 0, "w1", token), ("b", -1, 0, "w1", 0),
                                    ("c", -1, 0, "w1", "12"), ("d", -1, 0, "w2")], 1.0, 3.0)[0])
    assert outs[0] == outs[1] == [("a", -1, 0, 1, token, "w1"), ("d", -1, 0, 1, 2, "w2")]
    assert replicas[0].fingerprint() == replicas[1].fingerprint()
    s = replicas[0]
    assert s.rejected_commands == 2 and s.tasks["b"].status == "queued"
    guess = {"task_id": "a", "chunk": -1, "attempt": 1, "token": 1, "ok": True, "result": "x"}
    assert s.apply_complete([guess], 2.0)[0] == {"committed": 0, "dropped": 1}
    assert s.apply_complete([dict(guess, token=token)], 3.0)[0] == {"committed": 1,
                                                                    "dropped": 0}


def test_priority_then_fifo_order() -> None:
    s = SchedulerState()
    specs = [("l1", 0), ("h1", 20), ("m1", 10), ("h2", 20), ("c1", 30), ("l2", 0)]
    for i, (tid, prio) in enumerate(specs):
        s.apply_submit([{"id": tid, "priority": prio, "strategy": "batch"}], float(i))
    order = [t.id for t, _ in s.peek_queued(10)]
    assert order == ["c1", "h1", "h2", "m1", "l1", "l2"]


def test_aging_lets_an_old_low_task_pass_a_new_high_one() -> None:
    s = SchedulerState(aging_per_s=1.0 / 60)
    s.apply_submit([{"id": "old-low", "priority": 0, "strategy": "batch"}], 0.0)
    s.apply_submit([{"id": "new-high", "priority": 20, "strategy": "batch"}], 3600.0)
    assert [t.id for t, _ in s.peek_queued(2)] == ["old-low", "new-high"]


def test_compaction_forgets_old_finished_tasks_only() -> None:
    s = SchedulerState()
    s.apply_submit([{"id": f"t{i}", "priority": 0, "strategy": "batch"} for i in range(3)], 0.0)
    s.apply_cancel(["t0", "t1"], 1.0)
    assert s.apply_compact(2.0, 3600.0, 1)[0] == 1
    assert set(s.tasks) == {"t1", "t2"}
    assert s.apply_compact(10_000.0, 3600.0, 100)[0] == 1
    assert set(s.tasks) == {"t2"}


def _run_on(s: SchedulerState, tid: str, worker: str, now: float) -> tuple[int, int]:
    (assigned,) = s.apply_assign([(tid, -1, 0, worker)], now, 3.0)[0]
    return assigned[3], assigned[4]


def test_a_unit_whose_node_dies_twice_ends_failed_with_the_reason() -> None:
    """Poison rule: the second confirmed death of a node running the unit (its process
    restarted after the attempt started, seen by a leader that outlived it) ends the
    unit failed, retries or not, with the reason; a requeue alone, or a clean hand-back,
    does not count."""
    s = SchedulerState()
    s.apply_submit([{"id": "p", "priority": 0, "strategy": "batch", "retries": 5}], 0.0)
    attempt, token = _run_on(s, "p", "a", 1.0)
    # A node shutting down hands it back: not a node loss.
    s.apply_complete([{"task_id": "p", "chunk": -1, "attempt": attempt, "token": token,
                       "ok": False, "requeue": True, "error": "handed back"}], 2.0)
    attempt, token = _run_on(s, "p", "b", 3.0)
    assert s.apply_requeue([("p", -1, attempt, token, 0.5)], 4.0,
                           "worker b missed its lease")[0] == 1
    assert s.tasks["p"].unit.status == "queued" and s.tasks["p"].unit.deaths == 0
    # Node b comes back as a new process (started at 4.5 > 3.0): confirmed.
    s.apply_requeue([("p", -1, attempt, token, 0.5, 4.5, 3.0)], 5.0, "worker b restarted")
    assert s.tasks["p"].unit.status == "queued" and s.tasks["p"].unit.deaths == 1
    # The count survives snapshots (plain data and pickle) on every replica.
    restored = SchedulerState.from_snapshot(json.loads(json.dumps(s.to_snapshot())))
    assert restored.fingerprint() == s.fingerprint()
    assert pickle.loads(pickle.dumps(s)).tasks["p"].unit.deaths == 1
    attempt, token = _run_on(s, "p", "c", 6.0)
    _, events = s.apply_requeue([("p", -1, attempt, token, 0.5),
                                 ("p", -1, attempt, token, 0.5, 7.5, 6.0)], 8.0,
                                "worker c restarted")
    task = s.tasks["p"]
    assert task.status == "failed" and ("task", "p", "failed", -1, "c", 8.0) in events
    assert "died 2 times" in task.error and "worker c restarted" in task.error
    assert not s.running and s.queued_count() == 0


def test_only_a_restart_after_the_attempt_seen_by_a_leader_that_outlived_it_counts() -> None:
    """A paused or partitioned node that comes back as the same process, a whole-
    cluster restart (the leader started after the unit), and plain requeues (also
    those of old journals) are no node deaths."""
    s = SchedulerState()
    s.apply_submit([{"id": "p", "priority": 0, "strategy": "batch"}], 0.0)
    for i in range(POISON_AFTER_NODE_LOSSES + 3):
        start = 10.0 * (i + 1)
        attempt, token = _run_on(s, "p", "a", start)
        entries = [("p", -1, attempt, token, 0.5)] if i % 2 else [("p", -1, attempt, token)]
        if i == 1:  # the same process came back (started before the attempt)
            entries.append(("p", -1, attempt, token, 0.5, start - 1.0, start))
        if i == 2:  # whole-cluster restart: the requeuing leader started after it
            entries.append(("p", -1, attempt, token, start + 2.0, start + 1.0, start))
        assert s.apply_requeue(entries, start + 3.0, "worker a missed its lease")[0] == 1
    unit = s.tasks["p"].unit
    assert unit.status == "queued" and unit.deaths == 0 and unit.lost == 5


def test_a_snapshot_from_before_the_poison_rule_loads_with_no_losses_counted() -> None:
    s = SchedulerState()
    s.apply_submit([{"id": "p", "priority": 0, "strategy": "batch"}], 0.0)
    _run_on(s, "p", "a", 1.0)
    snap = json.loads(json.dumps(s.to_snapshot()))
    for t in snap["tasks"]:
        t["unit"].pop("deaths")
    old = SchedulerState.from_snapshot(snap)
    assert old.tasks["p"].unit.deaths == 0 and old.fingerprint() == s.fingerprint()
    unit = Unit()
    unit.__setstate__(unit.__getstate__()[:-1])  # a unit pickled before it existed
    assert unit.deaths == 0
