"""The single-task fast path end to end (issue 14): real nodes, real Raft, real tasks.

A task submitted while a worker has a free slot and nothing is queued is accepted
and assigned by one command (its ``queued`` and ``running`` events carry the same
replicated time, as one command's events do), whether the client asks the leader
or a follower (which hands the submit to the leader); a follower answers only once
its own replica holds the task, so the client reads it back there at once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import task_spec

pytestmark = pytest.mark.cluster

NOOP = "taskandgo.node.builtins:noop"


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # No prefetch windows: a task beyond the slots stays queued (the second test).
    yield from serve(request, Cluster(tmp_path_factory.mktemp("fast-path"), n=3, slots=2,
                                      extra=["--prefetch", "0"]))


def _events(c: Cluster, node: int, tid: str) -> list[dict[str, Any]]:
    """The task's events at ``node`` from its buffer, up to its end."""
    out: list[dict[str, Any]] = []
    with c.client(node) as cl:
        for ev in cl.watch([tid], after_seq=1):
            out.append(ev)
            if ev["status"] in ("succeeded", "failed", "cancelled"):
                break
    return out


def _one_command(events: list[dict[str, Any]]) -> bool:
    at = {e["status"]: e["at"] for e in events}
    return "queued" in at and at.get("running") == at["queued"]


def test_a_lone_task_is_accepted_and_assigned_in_one_command(cluster: Cluster) -> None:
    leader = cluster.wait_ready()
    follower = (leader + 1) % cluster.n
    for node in (leader, follower):
        # The leader learns every voter's release from heartbeats: until then it
        # takes the two-command path, so the first tasks may not show it.
        def fast(node: int = node) -> bool:
            spec = task_spec(call=NOOP, strategy="batch")
            with cluster.client(node) as cl:
                cl.submit_many([spec])
                # Read back at the node asked, at once (read-your-writes).
                assert cl.get(spec["id"])["id"] == spec["id"]
                assert cl.wait(spec["id"], timeout_s=30)[0]["status"] == "succeeded"
            return _one_command(_events(cluster, node, spec["id"]))
        wait_for(fast, 30, f"a task submitted at node {node} assigned in its submit",
                 every_s=0.2)


def test_a_task_behind_queued_work_waits_its_turn(cluster: Cluster) -> None:
    """Given every slot busy and a task queued, a new task of the same priority is
    not assigned in its submit: it queues behind (two commands), and both run."""
    leader = cluster.wait_ready()
    busy = [task_spec("sh: sleep 2", strategy="batch") for _ in range(cluster.n * 2 + 1)]
    late = task_spec(call=NOOP, strategy="batch")
    with cluster.client(leader) as cl:
        cl.submit_many(busy)
        wait_for(lambda: any(t["status"] == "queued" for t in cl.wait_raw(
            [s["id"] for s in busy], 0.1)["tasks"]), 10, "a task queued behind busy slots")
        cl.submit_many([late])
        done = cl.wait([s["id"] for s in busy] + [late["id"]], timeout_s=60)
    assert {t["status"] for t in done} == {"succeeded"}
    assert not _one_command(_events(cluster, leader, late["id"]))
    cluster.check_invariants([s["id"] for s in busy] + [late["id"]])
