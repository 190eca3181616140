"""Delayed tasks end to end (issue 17, item 1): real nodes, real Raft, real tasks.

A task submitted with a start time (``--at``/``--in``, ``run_at``/``delay_s``) is
accepted at once, shown as scheduled with its time by get, tasks and the API, starts
no earlier than that time, can be cancelled before, and survives a restart of the
whole cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from harness import Cluster, serve, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from serve(request, Cluster(tmp_path_factory.mktemp("delayed"), n=3))


def _cli(c: Cluster, node: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", args[0], "--node", c.addr(node),
                           *args[1:]], capture_output=True, text=True, timeout=60, check=False)


def _post(c: Cluster, node: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(c.http(node) + "/submit-task", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_task_submitted_to_run_later_is_scheduled_then_runs_no_earlier(
        cluster: Cluster) -> None:
    follower = next(i for i in range(3) if i != cluster.leader_index())
    # Given a submit at a follower to run 3 s from now (the CLI's --in)...
    res = _cli(cluster, follower, "submit", "--in", "3s", "--id", "later-cli", "--json",
               "--", "sh: date +%s.%N")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "scheduled"
    # ...then get and tasks show it scheduled, with its time.
    got = _cli(cluster, 0, "get", "later-cli")
    assert "scheduled" in got.stdout and "run at" in got.stdout, got.stdout
    listed = _cli(cluster, 2, "tasks", "--status", "scheduled")
    assert "later-cli" in listed.stdout and "runs at" in listed.stdout, listed.stdout
    with cluster.client() as c:
        task = c.get("later-cli")
        assert task["status"] == "scheduled" and task["run_at"] > time.time() + 1
        assert task["spec"]["run_at"].endswith("Z")
        # When its time comes it runs, and not before.
        done = c.wait(["later-cli"], timeout_s=60)[0]
    assert done["status"] == "succeeded", done
    assert done["started_at"] >= done["run_at"]
    assert float(done["result"]) >= done["run_at"]  # the task's own clock agrees


def test_the_client_and_http_take_a_start_time_and_name_a_bad_one(cluster: Cluster) -> None:
    at = time.time() + 2
    with cluster.client() as c:
        tid = c.submit("sh: echo on-time", run_at=at, id="later-client")
        assert c.get(tid)["status"] in ("scheduled", "queued", "running", "succeeded")
    status, body = _post(cluster, 1, {"task_id": "later-http", "data": "sh: echo http",
                                      "delay_s": 2})
    assert status == 201 and body["status"] == "scheduled", body
    status, body = _post(cluster, 1, {"data": "x", "run_at": "2026-13-01T00:00:00Z"})
    assert status == 400 and body["field"] == "run_at", body
    status, body = _post(cluster, 1, {"data": "x", "run_at": "2026-12-01T00:00:00"})
    assert status == 400 and body["field"] == "run_at" and "offset" in body["error"], body
    with cluster.client() as c:
        for t in c.wait(["later-client", "later-http"], timeout_s=60):
            assert t["status"] == "succeeded" and t["started_at"] >= t["run_at"], t


def test_a_delayed_task_cancelled_before_its_time_never_runs(cluster: Cluster) -> None:
    res = _cli(cluster, 0, "submit", "--in", "4s", "--id", "later-cancelled", "--",
               "sh: echo should-not-run")
    assert res.returncode == 0, res.stderr
    assert _cli(cluster, 1, "cancel", "later-cancelled").stdout.split() == [
        "later-cancelled", "cancelled"]
    with cluster.client() as c:
        # Past its time (and a release by the leader), it is still cancelled, unrun.
        wait_for(lambda: time.time() > c.get("later-cancelled")["run_at"] + 1.5, 30,
                 "its start time to pass")
        t = c.get("later-cancelled")
    assert t["status"] == "cancelled" and t["attempts"] == 0 and not t["result"], t


def test_a_restart_of_every_node_keeps_a_delayed_task(cluster: Cluster) -> None:
    with cluster.client() as c:
        c.submit("sh: echo after-restart", delay_s=6, id="later-restart")
        accepted = [c.submit("sh: echo plain")]
    for i in range(3):
        cluster.kill(i)
    cluster.start()
    cluster.wait_ready(60)
    with cluster.client() as c:
        t = c.get("later-restart")
        assert t["run_at"] > 0 and t["status"] in ("scheduled", "queued", "running",
                                                   "succeeded"), t
        done = c.wait(["later-restart"], timeout_s=60)[0]
    assert done["status"] == "succeeded" and done["result"] == "after-restart"
    assert done["started_at"] >= done["run_at"]
    cluster.check_invariants(accepted + ["later-restart"])
