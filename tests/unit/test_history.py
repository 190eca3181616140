"""The node's recent history (node/history.py), fed with the events the real state
machine produces as commands apply, through a real EventBus, on a test clock."""

from __future__ import annotations

import threading
import time
from typing import Any

from taskandgo.consensus.state import SchedulerState
from taskandgo.node.events import EventBus
from taskandgo.node.history import History, quantile
from taskandgo.node.replica import Replica


class Rig:
    """A state machine whose events go onto a bus, as Replica publishes them, and a
    History reading it, with a clock the test moves."""

    def __init__(self, window_s: int = 600, max_spans: int = 5000) -> None:
        self.state = SchedulerState()
        self.bus = EventBus()
        self.now = 1000.0
        self.cluster_calls = 0
        self.history = History("node-0", self.bus, lambda fn: fn(self.state), self._cluster,
                               window_s=window_s, max_spans=max_spans,
                               clock=lambda: self.now)
        self.seq = 0
        self.history.sample()  # starts sampling from this second

    def _cluster(self) -> dict[str, Any]:
        self.cluster_calls += 1
        return {"leader_id": "node-0", "nodes": [
            {"id": "node-0", "role": "leader", "cpu_percent": 12.5, "memory_percent": 3.5,
             "memory_rss": 1 << 20},
            {"id": "node-1", "role": "unreachable", "cpu_percent": 0.0}]}

    def run(self, result: tuple[Any, list]) -> Any:
        out, events = result
        # The replica's own translation of state events into the bus's shape.
        Replica._on_state_events(self, events)  # type: ignore[arg-type]
        return out

    def _on_applied(self) -> None:
        pass

    def pump(self) -> None:
        events = self.bus.since(self.seq, 0.0)
        if events:
            self.seq = events[-1]["seq"]
            self.history.ingest(events)

    def tick(self, seconds: float) -> None:
        self.pump()
        self.now += seconds
        self.history.sample()


def test_counts_latency_queue_and_spans_of_a_split_and_a_whole_task() -> None:
    r = Rig()
    s = r.state
    r.run(s.apply_submit([{"id": "split", "priority": 10, "strategy": "split"},
                          {"id": "urgent", "priority": 30, "strategy": "batch"}], r.now))
    r.tick(2.0)
    sample = r.history.snapshot()["samples"][-1]
    assert sample["queue"] == {"critical": 1, "medium": 1}
    assert sample["nodes"] == {"node-0": {"cpu_percent": 12.5, "memory_percent": 3.5,
                                          "memory_rss": 1 << 20}}

    t_assign = r.now
    r.run(s.apply_assign([("split", 0, 3, "node-0", 11), ("split", 1, 3, "node-1", 12),
                          ("split", 2, 3, "node-2", 13), ("urgent", -1, 1, "node-1", 14)],
                         t_assign, 30.0))
    r.tick(2.0)
    started = sum(x["started"] for x in r.history.snapshot()["samples"])
    assert started == 4, "three chunks and one whole task started"
    opened = r.history.snapshot()["spans"]
    assert {(x["task_id"], x["chunk"], x["node"]) for x in opened} == {
        ("split", 0, "node-0"), ("split", 1, "node-1"), ("split", 2, "node-2"),
        ("urgent", -1, "node-1")}
    assert all(x["end"] is None for x in opened)
    assert {x["task_id"]: x["priority_name"] for x in opened} == {"split": "medium",
                                                                  "urgent": "critical"}

    done = r.now
    results = [{"task_id": "split", "chunk": i, "attempt": 1, "token": 11 + i, "ok": True,
                "result": str(i), "started_at": t_assign + 0.5} for i in range(3)]
    results.append({"task_id": "urgent", "chunk": -1, "attempt": 1, "token": 14, "ok": True,
                    "result": "u", "started_at": t_assign + 0.25})
    r.run(s.apply_complete(results, done))
    r.tick(2.0)
    samples = r.history.snapshot()["samples"]
    assert sum(x["finished"] for x in samples) == 4
    ended = next(x for x in samples if x["completed"])
    assert ended["completed"] == 2
    # Both were submitted at 1000.0 and ended at `done`.
    assert ended["p50_s"] == ended["p99_s"] == round(done - 1000.0, 4)
    assert samples[-1]["queue"] == {}
    spans = r.history.snapshot()["spans"]
    assert all(x["end"] == done for x in spans)
    assert {x["status"] for x in spans} == {"succeeded"}
    # The worker's reported start, not the assignment's.
    assert {x["start"] for x in spans} == {t_assign + 0.5, t_assign + 0.25}
    # One sample per second, in order.
    ts = [x["t"] for x in samples]
    assert ts == list(range(ts[0], ts[0] + len(ts)))


def test_cancel_closes_open_runs_and_requeue_ends_a_run_without_finishing_it() -> None:
    r = Rig()
    s = r.state
    r.run(s.apply_submit([{"id": "a", "priority": 0, "strategy": "batch"},
                          {"id": "b", "priority": 0, "strategy": "batch"}], r.now))
    r.run(s.apply_assign([("a", -1, 1, "node-0", 1), ("b", -1, 1, "node-0", 2)], r.now, 30.0))
    r.tick(1.0)
    r.run(s.apply_complete([{"task_id": "b", "chunk": -1, "attempt": 1, "token": 2,
                             "ok": False, "requeue": True, "error": "draining"}], r.now))
    r.run(s.apply_cancel(["a"], r.now))
    r.tick(2.0)
    snap = r.history.snapshot()
    by_task = {x["task_id"]: x for x in snap["spans"]}
    assert by_task["a"]["status"] == "cancelled" and by_task["a"]["end"] is not None
    assert by_task["b"]["status"] == "requeued"
    assert sum(x["finished"] for x in snap["samples"]) == 0
    assert sum(x["completed"] for x in snap["samples"]) == 1  # a ended (cancelled)


def test_history_is_bounded_in_samples_and_spans() -> None:
    r = Rig(window_s=30, max_spans=50)
    s = r.state
    for i in range(200):
        tid = f"t{i}"
        r.run(s.apply_submit([{"id": tid, "priority": 0, "strategy": "batch"}], r.now))
        r.run(s.apply_assign([(tid, -1, 1, "node-0", i + 1)], r.now, 30.0))
        r.run(s.apply_complete([{"task_id": tid, "chunk": -1, "attempt": 1, "token": i + 1,
                                 "ok": True}], r.now))
        r.tick(1.0)
    assert len(r.history.samples) == 30
    assert len(r.history.spans) == 50
    snap = r.history.snapshot(window_s=600, max_spans=10)
    assert len(snap["spans"]) == 10
    assert snap["spans"][-1]["task_id"] == "t199", "the most recent runs"
    r.now += 3600  # a long pause closes at most window_s seconds at once
    r.history.sample()
    assert len(r.history.samples) == 30
    assert r.history.snapshot()["spans"] == [], "runs older than the window"
    # CPU and memory are asked for at most every NODES_EVERY_S, not every second.
    assert r.cluster_calls <= 101


def test_bad_events_are_skipped_and_quantiles_are_nearest_rank() -> None:
    r = Rig()
    r.history.ingest([{"kind": "task"}, {"kind": "task", "task_id": "x", "status": "running",
                                         "chunk": "no", "node": "n", "at": 1.0},
                      {"kind": "node", "status": "up"}])
    assert r.history.snapshot()["spans"] == []
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert quantile([5.0], 0.99) == 5.0


def test_thread_reads_the_bus_and_samples_until_stopped() -> None:
    bus = EventBus()
    state = SchedulerState()
    hist = History("n", bus, lambda fn: fn(state), None)
    stop = threading.Event()
    thread = hist.start(stop)
    try:
        now = time.time()
        bus.publish([{"kind": "task", "task_id": "t", "status": "running", "chunk": -1,
                      "node": "n", "at": now}])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                x["started"] for x in hist.snapshot()["samples"]):
            stop.wait(0.05)
        assert sum(x["started"] for x in hist.snapshot()["samples"]) == 1
        assert [x["task_id"] for x in hist.snapshot()["spans"]] == ["t"]
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_open_runs_are_bounded_too() -> None:
    r = Rig(max_spans=50)
    s = r.state
    r.run(s.apply_submit([{"id": "wide", "priority": 0, "strategy": "split"}], r.now))
    r.run(s.apply_assign([("wide", i, 80, f"node-{i % 3}", i + 1) for i in range(80)],
                         r.now, 30.0))
    r.pump()
    assert len(r.history._open) == 50
    r.run(s.apply_cancel(["wide"], r.now))
    r.tick(2.0)
    snap = r.history.snapshot()
    assert r.history._open == {} and r.history._open_chunks == {}
    assert len(snap["spans"]) == 50
    assert {x["status"] for x in snap["spans"]} == {"cancelled"}
    assert {x["chunk"] for x in snap["spans"]} == set(range(30, 80)), "the newest kept"
