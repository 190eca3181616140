"""One default strategy for the whole cluster (issue: the same submit got a different
strategy depending on which node a client reached). Real nodes, real Raft; node 2 is
started with a different --strategy than the others."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import TaskAndGoError

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def mixed(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("settings"), n=3, extra=["--strategy", "split"])
    c.argvs[2] += ["--strategy", "batch"]  # the last --strategy wins
    yield from serve(request, c)


def _cli(c: Cluster, node: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", args[0], "--node", c.addr(node),
                           *args[1:]], capture_output=True, text=True, timeout=60, check=False)


def test_every_node_uses_the_clusters_default_and_an_operator_changes_it(
        mixed: Cluster) -> None:
    # The cluster agrees on one value (its first leader's): a node started with the
    # other says so in status, and submits through it follow the cluster's.
    wait_for(lambda: json.loads(_cli(mixed, 0, "settings", "--json").stdout or "{}")
             .get("default_strategy") in ("split", "batch"), 30, "the cluster's default")
    cluster = json.loads(_cli(mixed, 2, "settings", "--json").stdout)["default_strategy"]
    statuses = [json.loads(_cli(mixed, i, "status", "--json").stdout) for i in range(3)]
    assert [st["strategy"] for st in statuses] == [cluster] * 3, statuses
    assert [st["strategy_configured"] for st in statuses] == ["split", "split", "batch"]
    text = _cli(mixed, 2 if cluster == "split" else 0, "status").stdout
    assert "the cluster's; this node was started with" in text, text

    for strategy in ("batch", "split"):
        res = _cli(mixed, 1, "settings", "--default-strategy", strategy, "--json")
        assert res.returncode == 0 and json.loads(res.stdout) == {
            "default_strategy": strategy}, res
        for node in range(3):
            with mixed.client(node) as c:
                if strategy == "split":
                    tid = c.submit("sh: echo $TASKANDGO_CHUNK_INDEX", shards=2)
                    task = c.wait(tid, timeout_s=60)[0]
                    assert task["strategy"] == "split" and json.loads(task["result"]) == [0, 1]
                else:
                    with pytest.raises(TaskAndGoError) as err:
                        c.submit("sh: echo x", shards=2)
                    assert err.value.code == "INVALID_ARGUMENT" and "split" in str(err.value)
    bad = _cli(mixed, 0, "settings", "--default-strategy", "fast")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_a_setting_survives_a_restart_of_every_node(mixed: Cluster, tmp_path: Path) -> None:
    assert _cli(mixed, 0, "settings", "--default-strategy", "batch").returncode == 0
    for i in range(3):
        mixed.kill(i)
    mixed.start()
    mixed.wait_ready()
    wait_for(lambda: json.loads(_cli(mixed, 2, "settings", "--json").stdout or "{}")
             == {"default_strategy": "batch"}, 60, "the setting after the restart")
    assert _cli(mixed, 0, "settings", "--default-strategy", "split").returncode == 0
