"""Non-voting workers: they run work and forward client calls to the voters."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import _cluster
from harness import Cluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def with_worker(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _cluster(request, tmp_path_factory, n=4, voters=3)


def test_worker_node_takes_submits_and_runs_chunks(with_worker: Cluster) -> None:
    with with_worker.client(3) as c:  # node-3 is a worker, not a Raft member
        tid = c.submit("sh: echo $TASKANDGO_NODE_ID", shards=4)
        task = c.wait(tid, timeout_s=60)[0]
        assert c.get(tid)["status"] == "succeeded"
    assert sorted(json.loads(task["result"])) == ["node-0", "node-1", "node-2", "node-3"]
    res = subprocess.run([sys.executable, "-m", "taskandgo", "status", "--all", "--json",
                          "--node", with_worker.addr(3)], capture_output=True, text=True,
                         timeout=60, check=False)
    nodes = {n["id"]: n for n in json.loads(res.stdout)}
    assert nodes["node-3"]["role"] == "worker" and not nodes["node-3"]["voter"]
    assert [n["role"] for n in nodes.values()].count("leader") == 1
    with_worker.check_invariants([tid])
