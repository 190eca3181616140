"""Task dependencies end to end (issue 17, item 3): real nodes, real Raft, real tasks.

A chain and a fan-in run in order with their parents' results, survive a leader kill
mid-chain, a failed parent ends its dependents upstream_failed (naming it), and an
unknown parent id is refused at submit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import TaskAndGoError, task_spec

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from serve(request, Cluster(tmp_path_factory.mktemp("deps"), n=3))


def _cli(c: Cluster, node: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", args[0], "--node", c.addr(node),
                           *args[1:]], capture_output=True, text=True, timeout=60, check=False)


def test_map_then_reduce_is_two_submits_and_survives_a_leader_kill(cluster: Cluster) -> None:
    # Given four map tasks that take a moment and a reduce after all of them, and a
    # chain after the reduce...
    maps = [task_spec(f"sh: sleep 1; echo {i * i}", id=f"map-{i}") for i in range(4)]
    reduce = task_spec("python: import json, os; p = json.loads(os.environ['TASKANDGO_PARENTS'])"
                       "; print(sum(int(v) for v in p.values()))",
                       id="reduce", after=[m["id"] for m in maps])
    chain = [task_spec("sh: echo \"$TASKANDGO_PARENTS\"", id="step-1", after=["reduce"]),
             task_spec("sh: echo done", id="step-2", after=["step-1"])]
    with cluster.client() as c:
        c.submit_many(maps)
        c.submit_many([reduce, *chain])
        assert c.get("reduce")["status"] == "waiting" and c.get("step-2")["status"] == "waiting"
        assert c.get("reduce")["parents"] == [m["id"] for m in maps]
        assert c.get("map-0")["children"] == ["reduce"]
    # ...when the leader is killed mid-chain...
    leader = cluster.leader_index()
    assert leader is not None
    cluster.kill(leader, signal.SIGKILL)
    cluster.start(leader)
    # ...then everything still runs in order, each child with its parents' results.
    with cluster.client() as c:
        done = {t["id"]: t for t in c.wait(["reduce", "step-1", "step-2"], timeout_s=90)}
        parents = {m["id"]: c.get(m["id"]) for m in maps}
    assert {t["status"] for t in done.values()} == {"succeeded"}, done
    assert done["reduce"]["result"] == str(sum(i * i for i in range(4)))
    assert done["reduce"]["started_at"] >= max(p["finished_at"] for p in parents.values())
    assert json.loads(done["step-1"]["result"]) == {"reduce": "14"}
    assert done["step-2"]["started_at"] >= done["step-1"]["finished_at"]
    cluster.wait_ready(60)
    cluster.check_invariants([*parents, "reduce", "step-1", "step-2"])


def test_a_failed_parent_ends_its_dependents_upstream_failed(cluster: Cluster) -> None:
    res = _cli(cluster, 0, "submit", "--id", "fails", "--", "sh: exit 3")
    assert res.returncode == 0, res.stderr
    assert _cli(cluster, 1, "submit", "--id", "child", "--after", "fails", "--",
                "sh: echo no").returncode == 0
    assert _cli(cluster, 2, "submit", "--id", "grandchild", "--after", "child", "--",
                "sh: echo no").returncode == 0
    assert _cli(cluster, 2, "submit", "--id", "cleanup", "--after", "fails", "--after-any",
                "--", "sh: echo cleaned").returncode == 0
    with cluster.client() as c:
        got = {t["id"]: t for t in c.wait(["child", "grandchild", "cleanup"], timeout_s=60)}
    assert got["child"]["status"] == "upstream_failed"
    assert got["child"]["error"].startswith("upstream task fails ended failed")
    assert got["grandchild"]["status"] == "upstream_failed"
    assert "upstream task child" in got["grandchild"]["error"]
    assert got["cleanup"]["status"] == "succeeded" and got["cleanup"]["result"] == "cleaned"
    shown = _cli(cluster, 0, "get", "child").stdout
    assert "upstream_failed" in shown and "after" in shown and "fails" in shown, shown


def test_an_unknown_parent_is_refused_naming_the_field(cluster: Cluster) -> None:
    with cluster.client() as c, pytest.raises(TaskAndGoError) as err:
        c.submit("sh: echo x", after=["no-such-task"])
    assert err.value.code == "INVALID_ARGUMENT" and "after" in str(err.value)
    res = _cli(cluster, 1, "submit", "--after", "no-such-task", "--", "sh: echo x")
    assert res.returncode == 2 and "unknown task 'no-such-task'" in res.stderr
    # A parent earlier in the same call is known.
    with cluster.client() as c:
        out = c.submit_many([task_spec("sh: echo p", id="same-call-p"),
                             task_spec("sh: echo c", id="same-call-c", after=["same-call-p"])])
        assert [r["status"] for r in out] == ["queued", "waiting"]
        wait_for(lambda: c.get("same-call-c")["status"] == "succeeded", 60, "the child")
