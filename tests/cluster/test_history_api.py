"""GET /api/v1/history on a real cluster: two voters and a non-voter on loopback.
Each voter records the same history from its own replica; the non-voter answers
with the leader's; bad parameters are a 400 naming the parameter."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Cluster, serve, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from serve(request, Cluster(tmp_path_factory.mktemp("cluster"), n=3, voters=2))


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def totals(body: dict[str, Any]) -> tuple[int, int, int]:
    s = body["samples"]
    return (sum(x["started"] for x in s), sum(x["finished"] for x in s),
            sum(x["completed"] for x in s))


def test_every_node_serves_the_same_history_of_a_split_task(cluster: Cluster) -> None:
    with cluster.client() as c:
        tid = c.submit("sh: sleep 0.3; echo $TASKANDGO_CHUNK_INDEX", strategy="split", shards=5,
                       priority="high")
        others = [c.submit("python: print(1)", strategy="batch") for _ in range(4)]
        for t in [tid, *others]:
            wait_for(lambda t=t: c.get(t)["status"] == "succeeded" or None, 60, f"{t} done")

    def settled(i: int) -> dict[str, Any] | None:
        status, body = get(cluster.http(i) + "/api/v1/history?window_s=120")
        assert status == 200, body
        # Settled: every run counted, and the node figures in (asked of the leader
        # every few seconds, so a node started before the leader has none at first).
        nodes = set(body["samples"][-1]["nodes"]) if body.get("samples") else set()
        return body if totals(body) == (9, 9, 5) and len(nodes) == 3 else None

    views = [wait_for(lambda i=i: settled(i), 30, f"node-{i}'s history") for i in range(3)]
    leader = cluster.leader_index()
    assert views[2]["forwarded_from"] == f"node-{leader}", "the non-voter asks the leader"
    for v in views[:2]:
        assert "forwarded_from" not in v
    spans = [s for s in views[0]["spans"] if s["task_id"] == tid]
    assert sorted(s["chunk"] for s in spans) == [0, 1, 2, 3, 4]
    assert {s["priority_name"] for s in spans} == {"high"}
    assert all(s["status"] == "succeeded" and s["end"] >= s["start"] for s in spans)
    assert len({s["node"] for s in spans}) >= 2, "a split's chunks ran on several nodes"
    # Both voters recorded the same runs from their own replicas.
    runs = [sorted((s["task_id"], s["chunk"], s["node"], s["start"], s["end"])
                   for s in v["spans"]) for v in views[:2]]
    assert runs[0] == runs[1]
    done = [x for x in views[0]["samples"] if x["completed"]]
    assert all(0 < x["p50_s"] <= x["p99_s"] < 60 for x in done)
    last = views[0]["samples"][-1]
    assert last["queue"] == {}
    assert set(last["nodes"]) == {"node-0", "node-1", "node-2"}
    ts = [x["t"] for x in views[0]["samples"]]
    assert ts == sorted(ts) and len(ts) <= 120


@pytest.mark.parametrize("query, field", [("window_s=0", "window_s"),
                                          ("window_s=601", "window_s"),
                                          ("window_s=x", "window_s"),
                                          ("spans=-1", "spans"), ("spans=5001", "spans")])
def test_bad_parameters_are_400_naming_them(cluster: Cluster, query: str, field: str) -> None:
    for i in range(3):
        status, body = get(cluster.http(i) + "/api/v1/history?" + query)
        assert (status, body["field"]) == (400, field), body


# ---------------------------------------------------------------------- service tier
# The HTTP server on port 0 in this process, in front of stand-in nodes with a real
# History: tokens, and a non-voter passing the caller's token on to the leader.

class _StubNode:
    """Just what GET /api/v1/history calls on a NodeApp."""

    def __init__(self, node_id: str, voter: bool, auth: Any,
                 leader_http: str = "") -> None:
        from types import SimpleNamespace

        from taskandgo.node.events import EventBus
        from taskandgo.node.history import History

        self.cfg = SimpleNamespace(auth=auth, rate_limit=0.0, tls=False, tls_cert=None,
                                   tls_key=None, tls_ca=None, tls_client_auth=False)
        self.node_id = node_id
        self.voter = object() if voter else None
        self.leader_http = leader_http
        self.history = History(node_id, EventBus(), None, None)

    def cluster_status(self) -> dict[str, Any]:
        return {"leader_id": "leader-0",
                "nodes": [{"id": "leader-0", "http_address": self.leader_http}]}


def _get(url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_history_needs_the_token_and_a_non_voter_passes_it_on() -> None:
    from taskandgo.node.http import create_http_server, serve_in_thread
    from taskandgo.node.security import TokenAuth

    auth = TokenAuth.from_text("s3cret")
    servers = []
    try:
        leader = _StubNode("leader-0", True, auth)
        server, port = create_http_server(leader, "127.0.0.1", 0)  # type: ignore[arg-type]
        serve_in_thread(server)
        servers.append(server)
        worker = _StubNode("worker-0", False, auth, leader_http=f"127.0.0.1:{port}")
        server, wport = create_http_server(worker, "127.0.0.1", 0)  # type: ignore[arg-type]
        serve_in_thread(server)
        servers.append(server)
        for p in (port, wport):
            status, body = _get(f"http://127.0.0.1:{p}/api/v1/history")
            assert (status, body["field"]) == (401, "Authorization")
        status, body = _get(f"http://127.0.0.1:{port}/api/v1/history", "s3cret")
        assert status == 200 and body["node"] == "leader-0" and "forwarded_from" not in body
        status, body = _get(f"http://127.0.0.1:{wport}/api/v1/history?window_s=60", "s3cret")
        assert status == 200 and body["node"] == "leader-0"
        assert body["forwarded_from"] == "leader-0" and body["window_s"] == 60
        # The leader gone: the non-voter says so (503), it does not fail.
        servers[0].shutdown()
        servers[0].server_close()
        status, body = _get(f"http://127.0.0.1:{wport}/api/v1/history", "s3cret")
        assert status == 503 and "leader-0" in body["error"]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
