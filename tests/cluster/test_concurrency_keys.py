"""Concurrency keys end to end (issue 18, item 3): an operator sets a cluster-wide
limit per key through the CLI or HTTP; at most that many units holding the key run
at once anywhere, counted by the real start and end times on the workers, across a
leader kill; work without the key is not held up behind them; ``get`` says why a
held-back task waits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import TaskAndGoError, task_spec

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from serve(request, Cluster(tmp_path_factory.mktemp("keys"), n=3, slots=4))


def _cli(c: Cluster, node: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", args[0], "--node", c.addr(node),
                           *args[1:]], capture_output=True, text=True, timeout=60, check=False)


def _http(url: str, body: Any = None, method: str = "GET") -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _most_at_once(tasks: Sequence[dict[str, Any]]) -> int:
    """The most of these tasks that ran at the same moment (by their start and end on
    their workers; one ending as another starts is not overlap)."""
    edges = sorted([(t["started_at"], 1) for t in tasks] + [(t["finished_at"], -1)
                                                              for t in tasks],
                   key=lambda e: (e[0], e[1]))
    now = top = 0
    for _, step in edges:
        now += step
        top = max(top, now)
    return top


def test_a_limit_set_through_the_cli_holds_across_the_cluster(cluster: Cluster) -> None:
    # Given a limit of 2 on a key, set through the CLI of a follower...
    res = _cli(cluster, 1, "policy", "limit", "stripe-api", "2")
    assert res.returncode == 0, res.stderr
    assert "stripe-api" in res.stdout and "0/2" in res.stdout, res.stdout
    # ...when 8 tasks holding it and 6 without it are submitted, in one call, with
    # 12 slots free...
    keyed = [task_spec("sh: sleep 0.6", id=f"api-{i}", concurrency_keys=["stripe-api"])
             for i in range(8)]
    free = [task_spec("sh: sleep 0.3", id=f"free-{i}") for i in range(6)]
    with cluster.client(0) as c:
        c.submit_many([*keyed, *free])
        # ...then a held-back one says why, naming the key and who holds it...
        def says_why() -> bool:
            t = c.get("api-7")
            return t["status"] != "queued" or "at its limit 2/2 (held by" in t["pending_reason"]
        wait_for(says_why, 10, "a held-back task's pending reason")
        reason = c.get("api-7")["pending_reason"]
        done = {t["id"]: t for t in c.wait([t["id"] for t in keyed + free], timeout_s=120)}
    assert {t["status"] for t in done.values()} == {"succeeded"}, done
    assert reason == "" or "concurrency key stripe-api at its limit 2/2" in reason, reason
    # ...at most 2 of them ran at once anywhere (by the real times on the workers)...
    runs = [done[t["id"]] for t in keyed]
    assert _most_at_once(runs) == 2, [(t["started_at"], t["finished_at"]) for t in runs]
    # ...on more than one node, and the tasks without the key did not wait behind them.
    assert len({t["node"] for t in runs}) >= 2
    last_free = max(done[t["id"]]["started_at"] for t in free)
    assert last_free < sorted(t["started_at"] for t in runs)[4]
    # The policy shows the key again free.
    res = _cli(cluster, 2, "policy", "--json")
    assert json.loads(res.stdout)["limits"] == {"stripe-api": 2}


def test_the_http_api_sets_and_shows_the_policy_and_refuses_bad_values(cluster: Cluster) -> None:
    base = cluster.http(2)
    status, body = _http(base + "/api/v1/policy", {"limits": {"db": 0, "gone": None}}, "PUT")
    assert status == 200 and body["limits"].get("db") == 0, body
    # A limit of 0 holds every unit with the key back (until the limit is raised).
    with cluster.client(1) as c:
        c.submit_many([task_spec("sh: echo ran", id="db-1", concurrency_keys=["db"])])
        wait_for(lambda: "concurrency key db at its limit 0/0" in
                 c.get("db-1")["pending_reason"], 10, "db-1 held back by its key")
        status, body = _http(base + "/api/v1/policy", {"limits": {"db": 1}}, "PUT")
        assert status == 200
        assert c.wait(["db-1"], timeout_s=30)[0]["result"] == "ran"
    for bad, field in (({"limits": {"db": -1}}, "limits.db"),
                       ({"limits": {"db": "two"}}, "limits.db"),
                       ({"limits": {"no spaces": 1}}, "limits"),
                       ({"weights": {"a": 0}}, "weights.a"),
                       ({"tenant_label": "bad label"}, "tenant_label"),
                       ({"limit": {"db": 1}}, "limit")):
        status, body = _http(base + "/api/v1/policy", bad, "PUT")
        assert (status, body.get("field")) == (400, field), (bad, body)
    status, body = _http(base + "/api/v1/tasks", {"task_id": "k", "data": "sh: true",
                                                  "concurrency_keys": ["a b"]}, "POST")
    assert (status, body.get("field")) == (400, "concurrency_keys"), body
    with cluster.client(0) as c, pytest.raises(TaskAndGoError, match="INVALID_ARGUMENT"):
        c.set_policy(limits={"db": 10**7})
    status, body = _http(base + "/api/v1/policy")
    assert status == 200 and body["limits"]["db"] == 1 and "held" in body
    # Through every node, followers too (they forward to the leader): a whole number
    # written as 3.0 is the limit 3 (a follower failed with 500 forwarding it).
    for i in range(cluster.n):
        status, body = _http(cluster.http(i) + "/api/v1/policy",
                             {"limits": {f"via-{i}": 3.0}, "weights": {f"t{i}": 2}}, "PUT")
        assert status == 200 and body["limits"][f"via-{i}"] == 3, (i, status, body)
    with cluster.client(1) as c, pytest.raises(TaskAndGoError, match="INVALID_ARGUMENT"):
        c.set_policy(limits={"db": 2.5})


def test_the_limit_holds_across_a_leader_kill(cluster: Cluster) -> None:
    with cluster.client(0) as c:
        c.set_policy(limits={"one-at-a-time": 1})
        tasks = [task_spec("sh: sleep 0.5", id=f"serial-{i}", concurrency_keys=["one-at-a-time"])
                 for i in range(6)]
        c.submit_many(tasks)
        wait_for(lambda: c.get("serial-0")["status"] == "succeeded"
                 or c.get("serial-1")["status"] == "running", 30, "the first one ran")
    # When the leader is killed while they run one at a time...
    leader = cluster.leader_index()
    assert leader is not None
    cluster.kill(leader, signal.SIGKILL)
    cluster.start(leader)
    with cluster.client((leader + 1) % cluster.n) as c:
        done = c.wait([t["id"] for t in tasks], timeout_s=120)
    # ...then every one ran, and never two at once (whichever node led).
    assert {t["status"] for t in done} == {"succeeded"}, done
    assert _most_at_once(done) == 1, [(t["started_at"], t["finished_at"]) for t in done]
    cluster.wait_ready(60)
    cluster.check_invariants([t["id"] for t in tasks])
