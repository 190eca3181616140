"""Periodic schedules end to end (issue 17, item 2): real nodes, real Raft, real tasks.

A schedule fires one task per slot (id ``<schedule>@<slot>``), shows its recent fires
and next fire, pauses, resumes and deletes; forbid and replace hold under a slow task;
a restart of every node keeps it, and after downtime the missed-slot policy runs the
latest missed slot once (latest) or none (skip)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import TaskAndGoError

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from serve(request, Cluster(tmp_path_factory.mktemp("schedules"), n=3))


def _cli(c: Cluster, node: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", *args[:2], "--node", c.addr(node),
                           *args[2:]], capture_output=True, text=True, timeout=60, check=False)


def _http(c: Cluster, node: int, method: str, path: str,
          body: dict | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(c.http(node) + path, None if body is None else
                                 json.dumps(body).encode(), {"Content-Type": "application/json"},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _slots(c: Cluster, sid: str) -> list[int]:
    with c.client() as cl:
        tasks = cl.list_tasks(labels=[f"schedule={sid}"], limit=100_000)
    assert all(t["id"] == f"{sid}@{int(t['slot'])}" and t["schedule_id"] == sid for t in tasks)
    return sorted(int(t["slot"]) for t in tasks)


def test_a_schedule_fires_once_per_slot_and_pauses_resumes_deletes(cluster: Cluster) -> None:
    follower = next(i for i in range(3) if i != cluster.leader_index())
    res = _cli(cluster, follower, "schedule", "create", "--cron", "* * * * * *",
               "--label", "schedule=tick", "--json", "tick", "--", "sh: echo tock")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["next_fire"] > time.time() - 1
    with cluster.client() as c:
        wait_for(lambda: c.get_schedule("tick")["fires_total"] >= 3, 30, "three fires")
        sc = c.get_schedule("tick")
        first = sc["recent"][0]
        assert first["outcome"] == "fired" and first["task_id"] == f"tick@{int(first['slot'])}"
        task = c.wait([first["task_id"]], timeout_s=30)[0]
        assert task["status"] == "succeeded" and task["result"] == "tock"
        assert task["slot"] == first["slot"] and task["started_at"] >= task["slot"]
        # An id that exists: the schedule as it is (a retried create is harmless).
        again = c.create_schedule(id="tick", cron="@daily", task={"data": "x"})
        assert again["cron"] == "* * * * * *"
    listed = _cli(cluster, 2, "schedule", "list")
    assert "tick" in listed.stdout and "active" in listed.stdout, listed.stdout
    got = _cli(cluster, 0, "schedule", "get", "tick")
    assert "recent fires:" in got.stdout and "tick@" in got.stdout, got.stdout

    assert _cli(cluster, 1, "schedule", "pause", "tick").returncode == 0
    with cluster.client() as c:
        paused = c.get_schedule("tick")
        assert paused["paused"] and paused["next_fire"] == 0
        n = paused["fires_total"]
        t0 = time.time()
        wait_for(lambda: time.time() > t0 + 2.5, 5, "2.5 s of pause")
        assert c.get_schedule("tick")["fires_total"] <= n + 1  # one may have been in flight
        n = c.get_schedule("tick")["fires_total"]
        assert _cli(cluster, 0, "schedule", "resume", "tick").returncode == 0
        wait_for(lambda: c.get_schedule("tick")["fires_total"] >= n + 2, 30, "fires again")
    slots = _slots(cluster, "tick")
    assert len(slots) == len(set(slots))
    # The slots of the pause were not fired: a gap, and nothing twice.
    assert any(b - a > 1 for a, b in pairwise(slots)), slots
    assert _cli(cluster, 2, "schedule", "delete", "tick").returncode == 0
    with cluster.client() as c, pytest.raises(TaskAndGoError) as err:
        c.get_schedule("tick")
    assert err.value.code == "NOT_FOUND"
    count = len(_slots(cluster, "tick"))
    t1 = time.time()
    wait_for(lambda: time.time() > t1 + 2, 5, "2 s after the delete")
    assert len(_slots(cluster, "tick")) <= count + 1  # the tasks stay; no new ones


def test_http_creates_lists_and_names_a_bad_field(cluster: Cluster) -> None:
    body = {"id": "h1", "cron": "*/5 * * * *", "time_zone": "Europe/Berlin",
            "task": {"data": "sh: echo h"}, "overlap": "forbid"}
    status, sc = _http(cluster, 1, "POST", "/api/v1/schedules", body)
    assert status == 201 and sc["time_zone"] == "Europe/Berlin" and sc["next_fire"] > time.time()
    assert int(sc["next_fire"]) % 300 == 0
    status, out = _http(cluster, 2, "GET", "/api/v1/schedules")
    assert status == 200 and "h1" in [s["id"] for s in out["schedules"]]
    for bad, field in ((dict(body, id="b1", cron="61 * * * *"), "cron"),
                       (dict(body, id="b2", cron="* * *"), "cron"),
                       (dict(body, id="b3", time_zone="Mars/Base"), "time_zone"),
                       (dict(body, id="b4", overlap="sometimes"), "overlap"),
                       (dict(body, id="b5", task={"data": "x", "delay_s": 5}), "task.run_at"),
                       (dict(body, id="b@6"), "id"),
                       (dict(body, id="b7", task={"shards": 2}), "task.data")):
        status, err = _http(cluster, 0, "POST", "/api/v1/schedules", bad)
        assert status == 400 and err["field"] == field, (bad, err)
    assert _http(cluster, 0, "POST", "/api/v1/schedules/h1/pause")[1]["paused"] is True
    assert _http(cluster, 0, "POST", "/api/v1/schedules/h1/resume")[1]["paused"] is False
    assert _http(cluster, 0, "DELETE", "/api/v1/schedules/h1")[0] == 200
    assert _http(cluster, 0, "GET", "/api/v1/schedules/h1")[0] == 404
    metrics = urllib.request.urlopen(cluster.http(cluster.leader_index() or 0) + "/metrics",
                                     timeout=10).read().decode()
    assert "taskandgo_schedule_fires_total" in metrics
    assert "taskandgo_schedule_lateness_seconds_bucket" in metrics


def _policy_run(c: Cluster, sid: str, overlap: str) -> list[dict[str, Any]]:
    """A schedule every second whose task takes 2.5 s, for about 6 s."""
    with c.client() as cl:
        cl.create_schedule(id=sid, cron="* * * * * *", overlap=overlap,
                           task={"data": "sh: sleep 2.5; echo done",
                                 "labels": {"schedule": sid}})
        wait_for(lambda: cl.get_schedule(sid)["fires_total"]
                 + cl.get_schedule(sid)["skipped_total"] >= 6, 40, "six slots")
        cl.pause_schedule(sid)
        recent = cl.get_schedule(sid)["recent"]
        ids = [f["task_id"] for f in recent if f["task_id"]]
        tasks = cl.wait(ids, timeout_s=60)
    return [dict(f, task=next((t for t in tasks if t["id"] == f["task_id"]), None))
            for f in recent]


def test_forbid_skips_slots_while_the_previous_run_goes_on(cluster: Cluster) -> None:
    fires = _policy_run(cluster, "slow-forbid", "forbid")
    outcomes = [f["outcome"] for f in fires]
    assert "skipped_overlap" in outcomes and "fired" in outcomes, outcomes
    runs = sorted((f["task"]["started_at"], f["task"]["finished_at"]) for f in fires
                  if f["task"])
    assert all(f["task"]["status"] == "succeeded" for f in fires if f["task"])
    # Never two runs at once.
    assert all(b[0] >= a[1] - 0.05 for a, b in pairwise(runs)), runs


def test_replace_cancels_the_previous_run(cluster: Cluster) -> None:
    fires = _policy_run(cluster, "slow-replace", "replace")
    assert all(f["outcome"] == "fired" for f in fires), fires
    statuses = [f["task"]["status"] for f in fires]
    # Each run but the last was cancelled by the next slot (a run still queued when
    # the next fired is cancelled too); the last one ran to the end.
    assert statuses[-1] == "succeeded" and "cancelled" in statuses[:-1], statuses
    assert all(s == "cancelled" for s in statuses[:-1]), statuses


def _restart_all(c: Cluster, down_s: float) -> None:
    for i in range(3):
        c.kill(i)
    t0 = time.time()
    wait_for(lambda: time.time() > t0 + down_s, down_s + 5, f"{down_s} s of downtime")
    c.start()
    c.wait_ready(60)


def test_a_restart_keeps_schedules_and_the_missed_policy_decides_the_backlog(
        cluster: Cluster) -> None:
    with cluster.client() as c:
        for sid, missed in (("keep-latest", "latest"), ("keep-skip", "skip")):
            c.create_schedule(id=sid, cron="* * * * * *", missed=missed, catchup_s=2,
                              task={"data": "sh: echo k", "labels": {"schedule": sid}})
            wait_for(lambda sid=sid: c.get_schedule(sid)["fires_total"] >= 1, 30, "a fire")
    _restart_all(cluster, down_s=6)
    with cluster.client() as c:
        for sid in ("keep-latest", "keep-skip"):
            wait_for(lambda sid=sid: c.get_schedule(sid)["fires_total"] >= 4, 60,
                     f"{sid} firing after the restart")
            c.pause_schedule(sid)
            recent = c.get_schedule(sid)["recent"]
            slots = [int(f["slot"]) for f in recent]
            gap = max(b - a for a, b in pairwise(slots))
            assert gap >= 5, (sid, recent)  # the downtime's slots were not each fired
            backlog = [f for f in recent if f["outcome"] == "skipped_missed"]
            if sid == "keep-skip":
                assert len(backlog) == 1, recent  # moved past them without a task
            else:
                assert not backlog, recent  # the latest of them ran once
    for sid in ("keep-latest", "keep-skip"):
        slots = _slots(cluster, sid)
        assert len(slots) == len(set(slots))
    with cluster.client() as c:
        assert {s["id"] for s in c.list_schedules()} >= {"keep-latest", "keep-skip"}
