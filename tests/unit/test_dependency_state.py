"""Task dependencies in the pure state machine and the vocabulary: a task with
``after`` waits outside the queue; its parents' Complete/Cancel release it (with their
results) or end it upstream_failed naming the parent, transitively, on every replica
alike; snapshots keep the waiting."""

from __future__ import annotations

from typing import Any

import pytest
from taskandgo.consensus.commands import Cancel, Submit
from taskandgo.consensus.state import SchedulerState
from taskandgo.node.tasks import InvalidTask, payload_for
from taskandgo.node.vocabulary import TaskSpec, spec_to_api


def _spec(tid: str, **kw: Any) -> dict[str, Any]:
    return {"id": tid, "priority": 0, "strategy": "batch", "data": tid, **kw}


def _run(s: SchedulerState, tid: str, ok: bool = True, result: str = "") -> list:
    token = 1000 + len(s.running) + s.committed_results + s.dropped_results
    s.apply_assign([(tid, -1, 0, "w", token)], s.now + 0.1, 30.0)
    _, events = s.apply_complete([{"task_id": tid, "chunk": -1, "attempt": 1, "token": token,
                                   "ok": ok, "result": result or f"r-{tid}"}], s.now + 0.1)
    return events


def test_a_chain_runs_in_order_and_passes_results_on() -> None:
    s = SchedulerState()
    out, _ = Submit((_spec("a"), _spec("b", after=["a"]), _spec("c", after=["b"])), 1.0).apply(s)
    assert [o[2] for o in out] == ["queued", "waiting", "waiting"]
    assert [t.id for t, _ in s.peek_queued(10)] == ["a"]
    assert s.apply_assign([("b", -1, 0, "w", 9)], 2.0, 5.0)[0] == []  # not before its parent
    events = _run(s, "a", result="42")
    assert ("task", "b", "queued", -1, "", s.now) in events
    assert s.tasks["b"].spec["parents"] == {"a": "42"}
    assert payload_for(s.tasks["b"].spec, -1, 0)["parents"] == {"a": "42"}
    _run(s, "b")
    assert s.tasks["c"].status == "queued" and not s.waiting


def test_a_fan_in_waits_for_every_parent() -> None:
    s = SchedulerState()
    parents = [f"m{i}" for i in range(5)]
    Submit(tuple(_spec(p) for p in parents) + (_spec("reduce", after=parents),), 1.0).apply(s)
    for p in parents[:-1]:
        _run(s, p)
        assert s.tasks["reduce"].status == "waiting"
    _run(s, parents[-1])
    assert s.tasks["reduce"].status == "queued"
    assert s.tasks["reduce"].spec["parents"] == {p: f"r-{p}" for p in parents}


def test_a_failed_parent_ends_its_dependents_upstream_failed_transitively() -> None:
    s = SchedulerState()
    Submit((_spec("a"), _spec("b", after=["a"]), _spec("c", after=["b"]),
            _spec("d", after=["a"], after_any=True)), 1.0).apply(s)
    events = _run(s, "a", ok=False)
    assert {e[1]: e[2] for e in events if e[1] != "a"} == {
        "b": "upstream_failed", "c": "upstream_failed", "d": "queued"}
    assert s.tasks["b"].error == "upstream task a ended failed"
    assert s.tasks["c"].error.startswith("upstream task b ended upstream_failed")
    assert s.tasks["c"].finished_at == s.now and "c" in s.finished


def test_cancelling_a_parent_or_a_waiting_task() -> None:
    s = SchedulerState()
    Submit((_spec("a"), _spec("b", after=["a"]), _spec("c", after=["b"])), 1.0).apply(s)
    out, _ = Cancel(("b",), 2.0).apply(s)
    assert out[0][1] == "cancelled" and s.tasks["c"].status == "upstream_failed"
    assert "b" not in s.waiting
    _run(s, "a")  # its dependent was cancelled: nothing to release
    assert s.tasks["b"].status == "cancelled"
    Cancel(("a",), 3.0).apply(s)  # already final: no change


def test_parents_already_done_or_unknown_at_submit() -> None:
    s = SchedulerState()
    Submit((_spec("ok"), _spec("bad")), 1.0).apply(s)
    _run(s, "ok")
    _run(s, "bad", ok=False)
    out, _ = Submit((_spec("x", after=["ok"]), _spec("y", after=["ok", "bad"]),
                     _spec("z", after=["gone"]), _spec("w", after=["bad"], after_any=True)),
                    5.0).apply(s)
    assert [o[2] for o in out] == ["queued", "upstream_failed", "upstream_failed", "queued"]
    assert s.tasks["z"].error == "upstream task gone is unknown"


def test_snapshots_keep_waiting_tasks_and_replicas_agree() -> None:
    s = SchedulerState()
    Submit((_spec("a"), _spec("b", after=["a"])), 1.0).apply(s)
    back = SchedulerState.from_snapshot(s.to_snapshot())
    assert back.waiting == {"b": ["a"]} and back.children == {"a": ["b"]}
    assert back.fingerprint() == s.fingerprint()
    _run(s, "a")
    _run(back, "a")
    assert back.fingerprint() == s.fingerprint() and back.tasks["b"].status == "queued"


def test_compaction_forgets_a_parent_s_children() -> None:
    s = SchedulerState()
    Submit((_spec("a"), _spec("b", after=["a"])), 1.0).apply(s)
    _run(s, "a")
    s.apply_compact(100.0, 1.0, 0)
    assert "a" not in s.tasks and "a" not in s.children


def test_the_spec_checks_after() -> None:
    spec = TaskSpec.check({"id": "c", "data": "x", "after": "a, b,a", "after_any": True}, "batch")
    assert spec.after == ("a", "b") and spec.after_any
    stored = spec.to_stored()
    assert stored["after"] == ["a", "b"] and stored["after_any"] is True
    assert spec_to_api(stored)["after"] == ["a", "b"]
    assert TaskSpec.from_stored(stored).after == ("a", "b")
    assert TaskSpec.from_json(spec.to_json(), "batch") == spec
    for raw, field in (({"after": ["c"]}, "after"), ({"after": ["no spaces"]}, "after"),
                       ({"after": [1]}, "after"), ({"after_any": True}, "after_any"),
                       ({"after": ["a"], "delay_s": 5}, "after")):
        with pytest.raises(InvalidTask) as err:
            TaskSpec.check({"id": "c", "data": "x", **raw}, "batch")
        assert err.value.field == field, raw
