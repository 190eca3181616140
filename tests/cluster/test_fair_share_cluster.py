"""Fair share end to end (issue 18, item 4): an operator names the tenant label and
weights through the CLI and HTTP; with team a's backlog queued first, team b's
tasks start within their share, counted by the real start times on the workers,
not after a's backlog; ``get`` of a task of a says it is over its share."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import task_spec

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # No prefetch windows: a unit starts as soon as it is assigned, so the start
    # order on the workers is the order the queue served.
    yield from serve(request, Cluster(tmp_path_factory.mktemp("fair"), n=3, slots=2,
                                      extra=["--prefetch", "0"]))


def _cli(c: Cluster, node: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", args[0], "--node", c.addr(node),
                           *args[1:]], capture_output=True, text=True, timeout=60, check=False)


def _put(url: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())


def test_a_tenant_behind_a_backlog_gets_its_share(cluster: Cluster) -> None:
    # Given fair share by the label team (CLI on a follower), a weighted 3 (HTTP)...
    res = _cli(cluster, 1, "policy", "tenant-label", "team")
    assert res.returncode == 0, res.stderr
    status, body = _put(cluster.http(2) + "/api/v1/policy", {"weights": {"a": 3}})
    assert status == 200 and body["weights"] == {"a": 3} and body["tenant_label"] == "team"
    res = _cli(cluster, 0, "policy", "--json")
    assert json.loads(res.stdout)["tenant_label"] == "team", res.stdout
    backlog = [task_spec("sh: sleep 0.3", id=f"a-{i}", labels={"team": "a"}) for i in range(72)]
    late = [task_spec("sh: sleep 0.3", id=f"b-{i}", labels={"team": "b"}) for i in range(12)]
    with cluster.client(0) as c:
        # ...when team a queues a backlog of 72 tasks on 6 slots, then team b 12...
        c.submit_many(backlog)
        wait_for(lambda: c.get("a-6")["status"] != "queued", 30, "a's backlog started")
        c.submit_many(late)
        # ...then a task of a that b's tasks overtake says so...
        def says_why() -> bool:
            t = c.get("a-71")
            return t["status"] != "queued" or "over its share" in t["pending_reason"]
        wait_for(says_why, 10, "the pending reason of a task of a")
        reason = c.get("a-71")["pending_reason"]
        done = {t["id"]: t for t in c.wait([t["id"] for t in backlog + late], timeout_s=180)}
    assert {t["status"] for t in done.values()} == {"succeeded"}
    assert reason == "" or reason.startswith("tenant a over its share: "), reason
    assert reason == "" or "(weights a=3, b=1)" in reason, reason
    # ...and b's tasks start while a's backlog runs, about one start in four from b
    # (weights 3:1) while both have tasks queued: by the real start times.
    starts = sorted((t["started_at"], t["id"][0]) for t in done.values())
    b_times = [at for at, who in starts if who == "b"]
    a_last = max(at for at, who in starts if who == "a")
    assert b_times[-1] < a_last, "b's tasks waited for a's backlog"
    during = [who for at, who in starts if b_times[0] <= at <= b_times[-1]]
    share = during.count("b") / len(during)
    assert 0.15 <= share <= 0.4, (share, during)
