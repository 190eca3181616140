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
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import _cluster
from harness import Cluster
from taskandgo.node.outputs import OutputStore

pytestmark = pytest.mark.cluster

LIMIT = 4096  # the nodes' --output-limit: small, so a test writes little


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _cluster(request, tmp_path_factory, n=2, voters=1, slots=2,
                        extra=["--output-limit", str(LIMIT)])


def cli(cluster: Cluster, *args: str, node: int = 0,
        timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    """``taskandgo CMD --node NODE ARGS...`` (the flags before a ``--`` payload)."""
    return subprocess.run([sys.executable, "-m", "taskandgo", args[0], "--node",
                           cluster.addr(node), *args[1:]],
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def other_than(cluster: Cluster, node_id: str) -> int:
    """The index of a node that did not run the unit (so it has to ask the one that did)."""
    assert node_id in ("node-0", "node-1"), node_id
    return 1 if node_id == "node-0" else 0


def submit_wait(cluster: Cluster, code: str, *extra: str) -> dict[str, Any]:
    """Submit with the CLI and wait; a whole task (batch) unless ``extra`` says split."""
    extra = extra or ("--strategy", "batch")
    res = cli(cluster, "submit", "--wait", "--json", *extra, "--", code)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def http_get(cluster: Cluster, i: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{cluster.http(i)}{path}", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def http_task(cluster: Cluster, i: int, tid: str) -> dict[str, Any]:
    status, body = http_get(cluster, i, f"/api/v1/tasks/{tid}")
    assert status == 200, body
    return body


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


# ---------------------------------------------------------------------- full output

def test_full_output_is_fetched_from_any_node(cluster: Cluster) -> None:
    n = 5 * LIMIT + 3
    task = submit_wait(cluster, "python: import sys\n"
                       f"sys.stdout.write(''.join(chr(97 + i % 26) for i in range({n})))\n"
                       "for i in range(3000): print(f'err {i}', file=sys.stderr)")
    assert task["truncated"] is True and task["output_bytes"] == n
    want = "".join(chr(97 + i % 26) for i in range(n))
    elsewhere = other_than(cluster, task["node"])
    # CLI, asked of the node that did not run it: it asks the one that did.
    res = cli(cluster, "output", task["id"], node=elsewhere)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want
    err = cli(cluster, "output", task["id"], "--stderr", node=elsewhere)
    assert err.returncode == 0, err.stderr
    assert err.stdout.splitlines() == [f"err {i}" for i in range(3000)]
    # HTTP, one page at a time.
    status, page = http_get(cluster, elsewhere,
                            f"/api/v1/tasks/{task['id']}/output?offset=10&limit=7")
    assert status == 200, page
    assert page["data"] == want[10:17] and page["kept"] == n and page["written"] == n
    assert page["complete"] is True and page["node"] == task["node"]
    # gRPC.
    with cluster.client(elsewhere) as c:
        got = c.task_output(task["id"])
    assert got["data"].decode() == want and got["complete"]


def test_full_output_of_a_chunk(cluster: Cluster) -> None:
    n = 2 * LIMIT
    task = submit_wait(cluster, "python: import os, sys\n"
                       "i = int(os.environ['TASKANDGO_CHUNK_INDEX'])\n"
                       f"sys.stdout.write(str(i) * {n})", "--strategy", "split", "--shards", "2")
    assert task["status"] == "succeeded" and task["truncated"]
    for i in (0, 1):
        res = cli(cluster, "output", task["id"], "--chunk", str(i))
        assert res.returncode == 0, res.stderr
        assert res.stdout == str(i) * n
    res = cli(cluster, "output", task["id"])
    assert res.returncode == 2 and "chunk" in res.stderr
    status, body = http_get(cluster, 0, f"/api/v1/tasks/{task['id']}/output?chunk=7")
    assert status == 400 and body["field"] == "chunk"


def test_output_under_the_cap_comes_from_the_result(cluster: Cluster) -> None:
    res = cli(cluster, "submit", "--wait", "--json", "--strategy", "batch",
              "--data", "just the data")
    task = json.loads(res.stdout)
    out = cli(cluster, "output", task["id"], node=other_than(cluster, task["node"]))
    assert out.returncode == 0 and out.stdout == "just the data"


def test_output_errors_are_typed(cluster: Cluster) -> None:
    status, body = http_get(cluster, 1, "/api/v1/tasks/no-such-task/output")
    assert status == 404, body
    status, body = http_get(cluster, 1, "/api/v1/tasks/x/output?stream=both")
    assert status == 400 and body["field"] == "stream"
    status, body = http_get(cluster, 1, "/api/v1/tasks/x/output?offset=-1")
    assert status == 400 and body["field"] == "offset"
    res = cli(cluster, "output", "no-such-task")
    assert res.returncode == 2 and "NOT_FOUND" in res.stderr


def test_store_bounds_per_unit_and_in_total(tmp_path: Any) -> None:
    """The store on real files: a unit beyond --keep-output-bytes keeps its head and
    says so; beyond --keep-output-total the oldest go first; a restarted node finds
    what it kept."""
    store = OutputStore(str(tmp_path), per_unit=100, total=250)
    for i in range(3):
        sink = store.start(f"t{i}", -1, 1)
        assert sink is not None
        sink.write("stdout", bytes([65 + i]) * 60)
        sink.write("stderr", b"e" * 30)
        store.finish(sink)
    assert store.read("t0", -1, "stdout", 0, 1000) is None  # evicted: 3 * 90 > 250
    page = store.read("t2", -1, "stdout", 0, 1000)
    assert page is not None and page["data"] == b"C" * 60 and page["complete"]
    big = store.start("big", 0, 2)
    assert big is not None
    big.write("stdout", b"x" * 150)
    store.finish(big)
    page = store.read("big", 0, "stdout", 0, 1000)
    assert page == {"data": b"x" * 100, "kept": 100, "written": 150, "complete": False,
                    "attempt": 2}
    assert store.used() <= 250
    again = OutputStore(str(tmp_path), per_unit=100, total=250)
    assert again.read("big", 0, "stdout", 0, 1000) == page
    assert again.used() == store.used()
    off = OutputStore(str(tmp_path / "off"), per_unit=0, total=250)
    assert off.start("t", -1, 1) is None
