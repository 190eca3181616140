"""Placement end to end (issue 18: resources, constraints, why pending): real nodes
with different offers and labels, real Raft, real tasks, through the CLI and HTTP.

node-0 offers cpu=4 memory=8Gi in zone a, node-1 cpu=2 memory=2Gi and a gpu in zone
b, node-2 cpu=1 memory=1Gi in zone a."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import TaskAndGoError, task_spec

pytestmark = pytest.mark.cluster

OFFERS = (["--cpu", "4", "--memory", "8Gi", "--node-label", "zone=a"],
          ["--cpu", "2", "--memory", "2Gi", "--resource", "gpu=1", "--node-label", "zone=b"],
          ["--cpu", "1", "--memory", "1Gi", "--node-label", "zone=a"])


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("placement"), n=3, slots=2)
    for argv, offer in zip(c.argvs, OFFERS):
        argv.extend(offer)
    gen = serve(request, c)
    started = next(gen)
    _wait_offers(started)
    yield started
    yield from gen


def _wait_offers(c: Cluster) -> None:
    """Until every node knows the three workers' offers (from heartbeat answers): a
    delayed probe that needs what only all three together describe is refused."""
    for i in range(c.n):
        def refused(i: int = i) -> bool:
            probe = task_spec("sh: true", id=f"probe-{i}", resources={"gpu": 2}, delay_s=3600)
            with c.client(i) as cl:
                try:
                    cl.submit_many([probe])
                except TaskAndGoError as exc:
                    return "node-1 with cpu=2 gpu=1" in str(exc)
                cl.cancel(probe["id"])
                return False
        wait_for(refused, 30, f"node-{i} knows the workers' offers")


def _cli(c: Cluster, node: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", args[0], "--node", c.addr(node),
                           *args[1:]], capture_output=True, text=True, timeout=60, check=False)


def _http(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_request_no_node_can_hold_is_refused_naming_the_largest(cluster: Cluster) -> None:
    # When a task asks for more CPU than any node has, or a label nobody has...
    # (A node refuses by the workers the leader last described as live: one whose
    # heartbeat is late on a busy machine is left out for that moment, so the
    # largest named can briefly be another. The refusal itself never waits.)
    got: dict[str, subprocess.CompletedProcess] = {}

    def names_node0() -> bool:
        got["big"] = _cli(cluster, 2, "submit", "--cpu", "8", "--", "sh: true")
        return "largest is node-0" in got["big"].stderr or got["big"].returncode != 2
    wait_for(names_node0, 30, "a refusal naming node-0, the largest")
    big = got["big"]
    zone = _cli(cluster, 1, "submit", "--require", "zone=c", "--", "sh: true")
    status, body = _http(cluster.http(0) + "/api/v1/tasks",
                         {"data": "sh: true", "resources": {"memory": "64Gi"}})
    bad_status, bad = _http(cluster.http(0) + "/api/v1/tasks",
                            {"data": "sh: true", "resources": {"cpu": "lots"}})
    # ...then it is refused at submit, with the field and the largest node named.
    assert big.returncode == 2, big
    assert "resources" in big.stderr and "largest is node-0 with cpu=4" in big.stderr
    assert zone.returncode == 2 and "require" in zone.stderr and "zone=c" in zone.stderr
    assert status == 400 and "resources" in json.dumps(body) and "node-0" in json.dumps(body)
    assert bad_status == 400 and "resources.cpu" in json.dumps(bad)


def test_units_go_where_their_request_and_labels_fit(cluster: Cluster) -> None:
    # Given tasks that each fit one node only...
    specs = [task_spec("sh: echo gpu", id="on-gpu", resources={"gpu": 1}),
             task_spec("sh: echo big", id="big-a", resources={"cpu": 3}, require=["zone=a"]),
             task_spec("sh: echo b", id="in-b", require=["zone=b"]),
             task_spec("sh: echo mem", id="mem", resources={"memory": "6Gi"})]
    with cluster.client() as c:
        c.submit_many(specs)
        done = {t["id"]: t for t in c.wait([s["id"] for s in specs], timeout_s=60)}
    # ...then each ran there.
    assert {i: t["status"] for i, t in done.items()} == dict.fromkeys(done, "succeeded")
    assert done["on-gpu"]["node"] == "node-1"
    assert done["big-a"]["node"] == "node-0"
    assert done["in-b"]["node"] == "node-1"
    assert done["mem"]["node"] == "node-0"


def test_get_says_why_a_task_waits_and_it_then_runs(cluster: Cluster) -> None:
    # Given a task holding all of node-0's CPU for a while...
    with cluster.client() as c:
        c.submit_many([task_spec("sh: sleep 30", id="hog", resources={"cpu": 4})])
        wait_for(lambda: c.get("hog")["status"] == "running", 30, "hog running")
    # ...when a task needing 3 CPU in zone a is submitted (CLI), and one for later...
    sub = _cli(cluster, 1, "submit", "--id", "waits", "--cpu", "3", "--require", "zone=a",
               "--", "sh: echo ran")
    later = _cli(cluster, 2, "submit", "--id", "later", "--in", "1h", "--", "sh: true")
    child = _cli(cluster, 0, "submit", "--id", "child", "--after", "hog", "--", "sh: true")
    assert sub.returncode == 0 and later.returncode == 0 and child.returncode == 0, (
        sub, later, child)

    # ...then get says what it waits for, through the CLI, gRPC and HTTP...
    def reason() -> str | None:
        out = _cli(cluster, 2, "get", "waits")
        return out.stdout if "needs cpu=3" in out.stdout else None
    shown = wait_for(reason, 30, "the pending reason")
    assert "the most free on any node is cpu=0 (node-0)" in shown, shown
    with cluster.client(1) as c:
        assert c.get("waits")["pending_reason"].startswith("needs cpu=3")
        assert c.get("later")["pending_reason"].startswith("scheduled for ")
        assert c.get("child")["pending_reason"] == "waiting for hog"
    status, task = _http(cluster.http(0) + "/api/v1/tasks/waits")
    assert status == 200 and task["pending_reason"].startswith("needs cpu=3"), task
    assert task["spec"]["resources"] == {"cpu": 3.0} and task["spec"]["require"] == ["zone=a"]
    # ...and once the hog is cancelled it runs on node-0, and says nothing more.
    with cluster.client() as c:
        c.cancel("hog")
        c.cancel("later")
        (t, child_done) = c.wait(["waits", "child"], timeout_s=60)
    assert t["status"] == "succeeded" and t["node"] == "node-0", t
    assert not t.get("pending_reason")
    assert child_done["status"] == "upstream_failed" and not child_done.get("pending_reason")


def test_status_shows_each_nodes_offer_and_labels(cluster: Cluster) -> None:
    # When an operator looks at a node and at the cluster...
    out = _cli(cluster, 0, "status")
    status, body = _http(cluster.http(1) + "/api/v1/cluster")
    # ...then each node's offer and labels are there (what --require can name).
    assert out.returncode == 0 and "offers cpu=4 memory=8Gi  labels zone=a" in out.stdout, out
    assert status == 200, body
    nodes = {n["id"]: n for n in body["nodes"]}
    assert nodes["node-1"]["offer"] == {"cpu": 2.0, "gpu": 1.0, "memory": 2.0 * (1 << 30)}
    assert nodes["node-2"]["node_labels"] == {"zone": "a"}
