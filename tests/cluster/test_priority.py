"""Priority with one free slot: higher levels start first, FIFO within a level."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import _cluster
from harness import Cluster, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def one_slot(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _cluster(request, tmp_path_factory, n=1, slots=1)


def test_higher_priority_starts_first_and_fifo_within_a_level(one_slot: Cluster) -> None:
    with one_slot.client() as c:
        blocker = c.submit(call="tasklib:stamp", args=["blocker", 1.0], strategy="batch")
        wait_for(lambda: c.get(blocker)["status"] == "running", 20, "the blocker to run")
        order = [("low", "l1"), ("medium", "m1"), ("critical", "c1"), ("low", "l2"),
                 ("high", "h1"), ("7", "i7"), ("high", "h2"), ("critical", "c2")]
        ids = {}
        for prio, tag in order:
            ids[tag] = c.submit(call="tasklib:stamp", args=[tag], priority=prio, strategy="batch")
        tasks = c.wait(list(ids.values()) + [blocker], timeout_s=60)
    assert all(t["status"] == "succeeded" for t in tasks)
    by_start = sorted(tasks[:-1], key=lambda t: t["started_at"])
    tags = [next(k for k, v in ids.items() if v == t["id"]) for t in by_start]
    assert tags == ["c1", "c2", "h1", "h2", "m1", "i7", "l1", "l2"]
    one_slot.check_invariants(list(ids.values()) + [blocker])


@pytest.fixture(scope="module")
def prefetching(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _cluster(request, tmp_path_factory, n=3, slots=1, extra=["--prefetch", "16"])


def test_prefetched_low_units_never_start_after_a_high_one_is_accepted(
        prefetching: Cluster) -> None:
    """Short same-priority units fill the workers' prefetch windows; a high-priority
    submit through a follower has the waiting low units handed back before it is
    accepted, so none starts (on its worker) after that while a high one waits."""
    sleep = "taskandgo.node.builtins:sleep"
    leader = prefetching.leader_index()
    assert leader is not None
    follower = (leader + 1) % 3
    with prefetching.client(follower, timeout_s=60) as c:
        warm = c.submit_many([{"call": "taskandgo.node.builtins:noop", "strategy": "batch"}
                              for _ in range(30)])
        c.wait([w["task_id"] for w in warm], timeout_s=60)  # run times now known: short
        lows = c.submit_many([{"call": sleep, "args": [0.01], "priority": "low",
                               "strategy": "batch"} for _ in range(400)])
        low_ids = [x["task_id"] for x in lows]
        wait_for(lambda: len(c.list_tasks(status="running", limit=1000)) > 3,
                 20, "low units to fill the prefetch windows")
        highs = c.submit_many([{"call": sleep, "args": [0.01], "priority": "high",
                                "strategy": "batch"} for _ in range(20)])
        accepted = time.time()
        high_ids = [x["task_id"] for x in highs]
        done = {t["id"]: t for t in c.wait(low_ids + high_ids, timeout_s=120)}
        held = sum(int(c.node_status(prefetching.addr(i))["held_back"]) for i in range(3))
    assert all(t["status"] == "succeeded" for t in done.values())
    last_high = max(done[h]["started_at"] for h in high_ids)
    late = [t for t in low_ids if accepted < done[t]["started_at"] < last_high]
    assert late == []
    assert held > 0, "no low unit was waiting in a prefetch window: the test proves nothing"
    prefetching.check_invariants(low_ids + high_ids)


def test_urgent_tasks_one_call_at_a_time_never_wait_behind_a_lower_start(
        prefetching: Cluster) -> None:
    """Urgent tasks arriving one call each, about 10 ms apart, through a follower into
    a deep queue of 10 ms low tasks that fill the workers' prefetch windows: no low
    unit starts on its worker (its real start time) after an urgent task was
    accepted (its created_at, stamped before the commit) and before that urgent
    task started. Units already running do not count: they started before."""
    sleep = "taskandgo.node.builtins:sleep"
    leader = prefetching.leader_index()
    assert leader is not None
    follower = (leader + 2) % 3
    with prefetching.client(follower, timeout_s=60) as c:
        held_before = sum(int(c.node_status(prefetching.addr(i))["held_back"])
                          for i in range(3))
        lows = c.submit_many([{"call": sleep, "args": [0.01], "priority": "low",
                               "strategy": "batch"} for _ in range(600)])
        low_ids = [x["task_id"] for x in lows]
        wait_for(lambda: len(c.list_tasks(status="running", limit=1000)) > 3,
                 20, "low units to fill the prefetch windows")
        high_ids = []
        for _ in range(15):
            high_ids.append(c.submit(call=sleep, args=[0.01], priority="high",
                                     strategy="batch"))
            time.sleep(0.01)  # pacing the arrivals (not waiting for an outcome)
        done = {t["id"]: t for t in c.wait(low_ids + high_ids, timeout_s=120)}
        held = sum(int(c.node_status(prefetching.addr(i))["held_back"])
                   for i in range(3)) - held_before
    assert all(t["status"] == "succeeded" for t in done.values())
    late = sorted({(lo, h) for h in high_ids for lo in low_ids
                   if done[h]["created_at"] < done[lo]["started_at"] < done[h]["started_at"]})
    after_ms = {(lo, h): 1000 * (done[lo]["started_at"] - done[h]["created_at"])
                for lo, h in late}
    assert late == [], f"{len(late)} low units started while an urgent one waited: " + ", ".join(
        f"{lo} on {done[lo].get('node')} {after_ms[lo, h]:.1f} ms after {h} was accepted"
        for lo, h in late[:5])
    assert held > 0, "no low unit was waiting in a prefetch window: the test proves nothing"
    prefetching.check_invariants(low_ids + high_ids)
