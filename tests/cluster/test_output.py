"""Task output through the surfaces a user touches: the stderr tail kept on success,
the truncation marker and byte count when stdout passes the node's output cap, on
the CLI (``taskandgo submit --wait``, ``get``), HTTP and gRPC.

The cluster is real node processes on loopback (one voter and one worker, so units
run on both); every wait polls with a deadline and the fixture ends the processes
by pid.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import _cluster
from harness import Cluster

pytestmark = pytest.mark.cluster

LIMIT = 4096  # the nodes' --output-limit: small, so a test writes little


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _cluster(request, tmp_path_factory, n=2, voters=1, slots=2,
                        extra=["--output-limit", str(LIMIT)])


def cli(cluster: Cluster, *args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    """``taskandgo CMD --node NODE-0 ARGS...`` (the flags before a ``--`` payload)."""
    return subprocess.run([sys.executable, "-m", "taskandgo", args[0], "--node",
                           cluster.addr(0), *args[1:]],
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def submit_wait(cluster: Cluster, code: str, *extra: str) -> dict[str, Any]:
    """Submit with the CLI and wait; a whole task (batch) unless ``extra`` says split."""
    extra = extra or ("--strategy", "batch")
    res = cli(cluster, "submit", "--wait", "--json", *extra, "--", code)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def http_task(cluster: Cluster, i: int, tid: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{cluster.http(i)}/api/v1/tasks/{tid}", timeout=30) as r:
        return json.loads(r.read())


def test_stderr_of_a_passing_task_is_kept(cluster: Cluster) -> None:
    task = submit_wait(cluster, "sh: echo done; echo 'warning: disk nearly full' >&2")
    assert task["status"] == "succeeded"
    assert task["result"] == "done"
    assert task["stderr"].strip() == "warning: disk nearly full"
    assert task["truncated"] is False and task["output_bytes"] == len("done\n")
    # The same on every surface: gRPC (the client), HTTP on the other node, `get`.
    with cluster.client() as c:
        assert c.get(task["id"])["stderr"] == task["stderr"]
    assert http_task(cluster, 1, task["id"])["stderr"] == task["stderr"]
    shown = cli(cluster, "get", task["id"])
    assert shown.returncode == 0 and "warning: disk nearly full" in shown.stdout
    brief = cli(cluster, "submit", "--wait", "--strategy", "batch", "--",
                "sh: echo ok; echo careful >&2")
    assert brief.returncode == 0 and "careful" in brief.stderr


def test_stderr_keeps_its_tail(cluster: Cluster) -> None:
    task = submit_wait(cluster, "python: import sys\n"
                       "for i in range(2000): print(f'line {i}', file=sys.stderr)")
    assert task["status"] == "succeeded"
    assert task["stderr"].rstrip().endswith("line 1999")
    assert "line 0\n" not in task["stderr"] and len(task["stderr"].encode()) <= 4096


def test_output_beyond_the_cap_is_marked(cluster: Cluster) -> None:
    n = 3 * LIMIT + 5
    task = submit_wait(cluster, f"python: import sys; sys.stdout.write('x' * {n})")
    assert task["status"] == "succeeded"
    assert task["truncated"] is True and task["output_bytes"] == n
    assert task["result"] == "x" * LIMIT
    with cluster.client() as c:
        got = c.get(task["id"])
    assert got["truncated"] is True and got["output_bytes"] == n
    over_http = http_task(cluster, 0, task["id"])
    assert over_http["truncated"] is True and over_http["output_bytes"] == n
    shown = cli(cluster, "get", task["id"])
    assert f"output truncated: {n} bytes" in shown.stdout
    # Under the cap: not marked.
    small = submit_wait(cluster, f"python: import sys; sys.stdout.write('y' * {LIMIT})")
    assert small["truncated"] is False and small["output_bytes"] == LIMIT


def test_split_chunks_carry_their_own(cluster: Cluster) -> None:
    n = LIMIT + 1
    task = submit_wait(cluster, "python: import os, sys\n"
                       "i = int(os.environ['TASKANDGO_CHUNK_INDEX'])\n"
                       "print(f'chunk {i} says hi', file=sys.stderr)\n"
                       f"sys.stdout.write('z' * ({n} if i == 1 else 3))",
                       "--strategy", "split", "--shards", "2")
    assert task["status"] == "succeeded"
    chunks = {c["index"]: c for c in task["chunks"]}
    assert chunks[0]["stderr"].strip() == "chunk 0 says hi"
    assert chunks[1]["stderr"].strip() == "chunk 1 says hi"
    assert not chunks[0]["truncated"] and chunks[0]["output_bytes"] == 3
    assert chunks[1]["truncated"] and chunks[1]["output_bytes"] == n
    assert task["truncated"] is True and task["output_bytes"] == n + 3
