"""Priority with one free slot: higher levels start first, FIFO within a level."""

from __future__ import annotations

from typing import Iterator

import pytest
from cluster import Cluster, wait_for
from conftest import _cluster

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
