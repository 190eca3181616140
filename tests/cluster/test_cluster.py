"""A real 3-node cluster on loopback: submits through every node, split and batch,
cancel, idempotent ids, status, and the seed's HTTP submit — each checked through
the same doors a user has (client library, CLI, HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from harness import Cluster, wait_for

pytestmark = pytest.mark.cluster

ACCEPTED: dict[str, tuple[str, ...]] = {}  # task id -> allowed final states


def cli(cluster: Cluster, *args: str, node: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", *args[:1], "--node",
                           cluster.addr(node), *args[1:]], capture_output=True, text=True,
                          timeout=120, check=False)


def test_submits_through_every_node_run_on_more_than_one_node(cluster3: Cluster) -> None:
    ids = []
    for i in range(3):
        with cluster3.client(i) as c:
            ids += [c.submit("python: import time; time.sleep(0.4); print('ok')",
                             strategy="batch", labels={"test": "spread"}) for _ in range(4)]
    with cluster3.client() as c:
        tasks = c.wait(ids, timeout_s=60)
    assert [t["status"] for t in tasks] == ["succeeded"] * 12
    assert all(t["result"] == "ok" for t in tasks)
    nodes = {t["node"] for t in tasks}
    assert len(nodes) > 1, f"all tasks ran on {nodes}"
    ACCEPTED.update(dict.fromkeys(ids, ("succeeded",)))


def test_split_task_with_six_shards_runs_on_all_nodes_and_gathers_in_order(
        cluster3: Cluster) -> None:
    with cluster3.client(1) as c:
        tid = c.submit("sh: sleep 0.3; echo $TASKANDGO_CHUNK_INDEX", strategy="split", shards=6)
        task = c.wait(tid, timeout_s=60)[0]
    ACCEPTED[tid] = ("succeeded",)
    assert task["status"] == "succeeded", task["error"]
    assert task["chunk_count"] == 6 and task["chunks_done"] == 6
    assert json.loads(task["result"]) == [0, 1, 2, 3, 4, 5]
    assert {ch["node"] for ch in task["chunks"]} == {"node-0", "node-1", "node-2"}


def test_split_items_are_partitioned_and_passed_to_callables(cluster3: Cluster) -> None:
    with cluster3.client(2) as c:
        tid = c.submit(call="taskandgo.node.builtins:square_items", strategy="split",
                       items=[1, 2, 3, 4, 5, 6, 7], shards=3)
        task = c.wait(tid, timeout_s=60)[0]
    ACCEPTED[tid] = ("succeeded",)
    assert task["status"] == "succeeded", task["error"]
    assert json.loads(task["result"]) == [[1, 4], [9, 16], [25, 36, 49]]


def test_a_task_with_nothing_to_cut_runs_once_and_on_every_node_when_asked(
        cluster3: Cluster) -> None:
    """Given a 3-node cluster whose default strategy is split, when a task with nothing
    to cut is submitted (CLI, client with strategy split, the seed's HTTP body), then
    it runs once, as one unit, with a plain result; with --on-every-node it runs once
    on each live node and shows as such. (Each used to run once per live node.)"""
    res = cli(cluster3, "submit", "--wait", "--json", "--",
              "sh: echo ran ${TASKANDGO_CHUNK_INDEX:-whole}")
    assert res.returncode == 0, res.stderr
    task = json.loads(res.stdout)
    ACCEPTED[task["id"]] = ("succeeded",)
    assert task["result"] == "ran whole" and task["strategy"] == "batch", task
    assert not task["chunks"] and task["attempts"] == 1
    with cluster3.client(1) as c:
        tid = c.submit("python: print('once')", strategy="split")
        assert c.wait(tid, timeout_s=60)[0]["result"] == "once"
    ACCEPTED[tid] = ("succeeded",)
    code, body = _post(cluster3.http(2) + "/submit-task",
                       b'{"task_id": "plain-seed", "data": "task details"}')
    assert code == 201, body
    ACCEPTED["plain-seed"] = ("succeeded",)
    with cluster3.client() as c:
        assert c.wait("plain-seed", timeout_s=60)[0]["result"] == "task details"

    res = cli(cluster3, "submit", "--wait", "--json", "--on-every-node", "--",
              "sh: echo $TASKANDGO_CHUNK_INDEX/$TASKANDGO_CHUNK_COUNT")
    assert res.returncode == 0, res.stderr
    task = json.loads(res.stdout)
    ACCEPTED[task["id"]] = ("succeeded",)
    assert json.loads(task["result"]) == ["0/3", "1/3", "2/3"], task
    assert task["strategy"] == "split" and task["spec"]["on_every_node"] is True
    assert len({ch["node"] for ch in task["chunks"]}) >= 2
    shown = cli(cluster3, "get", task["id"])
    assert "split (on every node)" in shown.stdout, shown.stdout
    code, body = _post(cluster3.http(0) + "/api/v1/tasks",
                       b'{"data": "x", "on_every_node": true, "shards": 2}')
    assert code == 400 and body["field"] == "on_every_node", body


def test_callable_failure_is_reported_with_retries(cluster3: Cluster) -> None:
    with cluster3.client(0) as c:
        tid = c.submit(call="tasklib:boom", args=["no luck"], strategy="batch", retries=1)
        task = c.wait(tid, timeout_s=60)[0]
    ACCEPTED[tid] = ("failed",)
    assert task["status"] == "failed"
    assert "RuntimeError: no luck" in task["error"]
    assert task["attempts"] == 2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pid_of(argv: list[str]) -> int | None:
    """The pid of the process running exactly argv, seen from this (host) side: a
    sandboxed task has its own pid namespace and /tmp, so it cannot report its pid."""
    want = ("\0".join(argv) + "\0").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == want:
                    return int(entry.name)
            except OSError:
                continue
    return None


def test_cancel_kills_a_running_task_and_its_children(cluster3: Cluster) -> None:
    grandchild = ["sleep", f"120.{uuid.uuid4().int % 10**6:06d}"]  # unique, to find it
    with cluster3.client(1) as c:
        tid = c.submit(f"sh: {' '.join(grandchild)} & wait", strategy="batch")
        pid = wait_for(lambda: c.get(tid)["status"] == "running" and _pid_of(grandchild), 30,
                       "the task to start")
        assert _alive(pid)
        res = cli(cluster3, "cancel", tid, node=2)
        assert res.returncode == 0, res.stderr
        assert "cancelled" in res.stdout
        wait_for(lambda: not _alive(pid), 10, "the grandchild to be killed")
        assert c.get(tid)["status"] == "cancelled"
    ACCEPTED[tid] = ("cancelled",)


def test_duplicate_id_creates_one_task(cluster3: Cluster) -> None:
    first = cli(cluster3, "submit", "--id", "dup-1", "--strategy", "batch", "--",
                "python: print('once')", node=0)
    second = cli(cluster3, "submit", "--id", "dup-1", "--strategy", "batch", "--",
                 "python: print('twice')", node=2)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() == "dup-1"
    assert "already known" in second.stdout
    with cluster3.client() as c:
        task = c.wait("dup-1", timeout_s=60)[0]
        assert task["result"] == "once"
        assert [t["id"] for t in c.list_tasks(limit=100000)].count("dup-1") == 1
    ACCEPTED["dup-1"] = ("succeeded",)


def test_cli_submit_wait_get_tasks(cluster3: Cluster) -> None:
    res = cli(cluster3, "submit", "--priority", "high", "--wait", "--strategy", "batch",
              "--label", "team=a", "--", "python: print(6*7)", node=1)
    assert res.returncode == 0, res.stderr
    tid, status = res.stdout.split()[:2]
    assert status == "succeeded" and res.stdout.splitlines()[1] == "42"
    ACCEPTED[tid] = ("succeeded",)
    got = json.loads(cli(cluster3, "get", tid, "--json").stdout)
    assert got["priority_name"] == "high" and got["spec"]["labels"] == {"team": "a"}
    listed = json.loads(cli(cluster3, "tasks", "--json", "--status", "succeeded").stdout)
    assert tid in [t["id"] for t in listed]
    argv = cli(cluster3, "submit", "--wait", "--strategy", "batch", "--", "echo", "hi there")
    assert argv.returncode == 0 and argv.stdout.splitlines()[1] == "hi there", argv.stderr
    ACCEPTED[argv.stdout.split()[0]] = ("succeeded",)


def test_bad_input_is_rejected_with_the_field_named(cluster3: Cluster) -> None:
    res = cli(cluster3, "submit", "--priority", "urgent", "--", "python: 1")
    assert res.returncode == 2 and "INVALID_ARGUMENT" in res.stderr and "priority" in res.stderr
    res = cli(cluster3, "submit", "--id", "bad id!", "--", "python: 1")
    assert res.returncode == 2 and "task_id" in res.stderr
    res = cli(cluster3, "get", "no-such-task")
    assert res.returncode == 2 and "NOT_FOUND" in res.stderr


def test_status_all_shows_exactly_one_leader(cluster3: Cluster) -> None:
    res = cli(cluster3, "status", "--all", "--json", node=2)
    assert res.returncode == 0, res.stderr
    nodes = json.loads(res.stdout)
    assert sorted(n["id"] for n in nodes) == ["node-0", "node-1", "node-2"]
    assert [n["role"] for n in nodes].count("leader") == 1
    leader = next(n["id"] for n in nodes if n["role"] == "leader")
    for n in nodes:
        assert n["leader_id"] == leader
        assert n["slots"] == 4 and 0 <= n["cpu_percent"] <= 100 and n["memory_rss"] > 0
        assert n["raft_term"] >= 1 and n["commit_index"] >= 1
    text = cli(cluster3, "status", "--all", node=0).stdout
    assert text.count("role=leader") == 1


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_seed_http_submit_on_a_follower(cluster3: Cluster) -> None:
    leader = cluster3.leader_index()
    follower = next(i for i in range(3) if i != leader)
    url = cluster3.http(follower) + "/submit-task"
    code, body = _post(url, b'{"task_id": "123", "priority": "high", "data": "task details"}')
    assert code == 201 and body == {"task_id": "123", "created": True, "status": "queued"}
    ACCEPTED["123"] = ("succeeded",)
    with cluster3.client() as c:
        task = c.wait("123", timeout_s=60)[0]
    assert task["status"] == "succeeded" and task["priority"] == 20
    for bad, field in ((b"{not json", "body"), (b'{"priority": "high"}', "data"),
                       (b'{"task_id": 5.5, "data": "x"}', "task_id"),
                       (b'{"data": "x", "priority": "urgent"}', "priority"),
                       (b'{"data": "x", "retries": "3"}', "retries"),
                       (b'{"data": "x", "colour": "red"}', "colour")):
        code, body = _post(url, bad)
        assert code == 400 and body["field"] == field, (bad, body)
    code, body = _post(url, b'{"data": "' + b"x" * (3 * 1024 * 1024) + b'"}')
    assert code == 413
    code, _ = _post(url, b'{"task_id": "124", "data": "still serving"}')
    assert code == 201
    ACCEPTED["124"] = ("succeeded",)


def test_zz_invariants_hold_after_the_module(cluster3: Cluster) -> None:
    for allowed in set(ACCEPTED.values()):
        ids = [k for k, v in ACCEPTED.items() if v == allowed]
        cluster3.check_invariants(ids, allow=allowed)


def test_grpc_health_and_reflection_on_every_node(cluster3: Cluster) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for i in range(3):
        with grpc.insecure_channel(cluster3.addr(i)) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "taskandgo.v1.Scheduler"):
                # The lambda is polled within this iteration: the loop variables are current.
                wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(  # noqa: B023
                    service=service), timeout=5).status  # noqa: B023
                         == health_pb2.HealthCheckResponse.SERVING, 10, f"{service!r} serving")
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            resp = next(refl.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            names = {s.name for s in resp.list_services_response.service}
            assert {"taskandgo.v1.Scheduler", "grpc.health.v1.Health"} <= names


def test_endless_output_is_capped_and_times_out(cluster3: Cluster) -> None:
    with cluster3.client() as c:
        tid = c.submit("python: import sys\nwhile True: sys.stdout.write('x' * 65536)",
                       strategy="batch", timeout_s=2)
        task = c.wait(tid, timeout_s=60)[0]
    assert task["status"] == "failed" and "timed out" in task["error"]
    assert 0 < len(task["result"]) <= 64 * 1024
