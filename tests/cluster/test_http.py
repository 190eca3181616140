"""The HTTP API against a real 3-node cluster on loopback: the seed's curl body on a
follower, typed 400s naming the field (and the node keeps serving), the REST API's
reach, Prometheus metrics that parse and move, Server-Sent Events resumed with
Last-Event-ID, the OpenAPI document (valid, and matching the server's routes), a
property-based run of the whole API against that document, and ``taskandgo top``.

Every wait polls with a deadline; the cluster's processes are ended by pid by the
``cluster3`` fixture.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import pytest
from harness import Cluster, wait_for

pytestmark = pytest.mark.cluster

SEED_BODY = b'{"task_id": "123", "priority": "high", "data": "task details"}'


# ---------------------------------------------------------------------- helpers

def request(url: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None,
            timeout_s: float = 30.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP call: (status, headers, JSON body or text)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    ctype = hdrs.get("Content-Type", "")
    return status, hdrs, json.loads(raw) if ctype.startswith("application/json") and raw \
        else raw.decode(errors="replace")


def post_json(url: str, obj: Any) -> tuple[int, Any]:
    status, _, body = request(url, "POST", json.dumps(obj).encode(),
                              {"Content-Type": "application/json"})
    return status, body


def follower(cluster: Cluster) -> int:
    leader = cluster.leader_index()
    return next(i for i in range(cluster.n) if i != leader)


def wait_final(base: str, ids: list[str], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    def final() -> list[dict[str, Any]] | None:
        status, _, body = request(f"{base}/api/v1/wait?id={','.join(ids)}&timeout_s=5")
        assert status == 200, body
        return body["tasks"] if body["complete"] else None
    return wait_for(final, timeout_s, f"tasks {ids} to finish")


def short_wait(case: Any) -> None:
    """A wait on an unknown id blocks until its timeout (30 s by default): make every
    generated wait short, whatever else it gets right or wrong."""
    query = case.query
    if isinstance(query, dict):
        timeout = query.get("timeout_s", 30)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0.2:
            query["timeout_s"] = 0.2


class EventStream:
    """A minimal Server-Sent Events reader over http.client (blocking, with a
    socket timeout so a silent stream cannot hang the test)."""

    def __init__(self, base: str, query: str = "", last_event_id: str | None = None) -> None:
        u = urlsplit(base)
        self.conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
        headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
        self.conn.request("GET", "/api/v1/events?max_s=60" + query, headers=headers)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.getheader("Content-Type") == "text/event-stream"

    def next_event(self) -> dict[str, Any]:
        """The next event: {"id", "event", "data"} (comments and retry skipped)."""
        event: dict[str, Any] = {}
        while True:
            line = self.resp.readline()
            if not line:
                raise EOFError("stream closed")
            text = line.decode().rstrip("\n")
            if not text:
                if "data" in event:
                    return event
                event = {}
            elif not text.startswith(":"):
                key, _, value = text.partition(": ")
                event[key] = json.loads(value) if key == "data" else value

    def until(self, pred: Any, timeout_s: float, what: str) -> list[dict[str, Any]]:
        """Events read up to and including the first for which pred is true."""
        seen = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen.append(self.next_event())
            if pred(seen[-1]):
                return seen
        raise AssertionError(f"timed out waiting for {what}; saw {seen[-5:]}")

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------- tests

def test_seed_curl_body_on_a_follower(cluster3: Cluster) -> None:
    base = cluster3.http(follower(cluster3))
    # Exactly what `curl -X POST URL -d '...'` sends: a form Content-Type.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = request(base + "/submit-task", "POST", SEED_BODY, form)
    assert status == 201 and body == {"task_id": "123", "created": True, "status": "queued"}
    status, _, body = request(base + "/submit-task", "POST", SEED_BODY, form)
    assert status == 200 and body["created"] is False, "a known id creates nothing"
    (task,) = wait_final(base, ["123"])
    assert task["status"] == "succeeded" and task["priority_name"] == "high"
    assert "task details" in task["result"]


BAD_BODIES = [
    (b"{not json", "body"),
    (b"", "body"),
    (b"[1, 2]", "body"),
    (b'{"priority": "high"}', "data"),
    (b'{"task_id": 5.5, "data": "x"}', "task_id"),
    (b'{"task_id": "has space", "data": "x"}', "task_id"),
    (b'{"task_id": "ok\\n", "data": "x"}', "task_id"),
    (b'{"data": 42}', "data"),
    (b'{"data": "x", "priority": "urgent"}', "priority"),
    (b'{"data": "x", "priority": 5000}', "priority"),
    (b'{"data": "x", "retries": "3"}', "retries"),
    (b'{"data": "x", "retries": ""}', "retries"),
    (b'{"data": "x", "labels": {"team": 1}}', "labels"),
    (b'{"data": "x", "shards": 1.5}', "shards"),
    (b'{"data": "x", "timeout_s": -1}', "timeout_s"),
    (b'{"data": "x", "strategy": "random"}', "strategy"),
    (b'{"data": "x", "labels": ["a"]}', "labels"),
    (b'{"argv": "echo hi"}', "argv"),
    (b'{"call": "not a callable"}', "call"),
    (b'{"data": "x", "colour": "red"}', "colour"),
    (b'{"data": "' + b"x" * (300 * 1024) + b'"}', "data"),
    (b'{"data": "x", "args": ' + b"[" * 200 + b"]" * 200 + b"}", "body"),
    (b'{"call": "m:f", "args_json": "' + b"[" * 5000 + b"]" * 5000 + b'"}', "args_json"),
]


@pytest.mark.parametrize("path", ["/submit-task", "/api/v1/tasks"])
def test_bad_input_gets_400_naming_the_field_and_the_node_keeps_serving(
        cluster3: Cluster, path: str) -> None:
    base = cluster3.http(follower(cluster3))
    for raw, field in BAD_BODIES:
        status, _, body = request(base + path, "POST", raw, {"Content-Type": "application/json"})
        assert status == 400, (raw[:60], body)
        assert body["field"] == field and body["code"] == 400 and body["error"], (raw[:60], body)
    status, body = post_json(base + "/api/v1/tasks", {"tasks": [{"data": "x"},
                                                                {"data": "y", "priority": "?"}]})
    assert status == 400 and body["field"] == "tasks[1].priority", body
    status, body = post_json(base + "/api/v1/tasks", {"tasks": [{"data": "x", "shards": "2"}]})
    assert status == 400 and body["field"] == "tasks[0].shards", body
    status, _, body = request(base + path, "POST", b'{"data": "' + b"x" * (3 << 20) + b'"}')
    assert status == 413 and body["field"] == "body"
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(base).port, timeout=10)
    conn.putrequest("POST", path)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"4\r\n{}  \r\n0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 411 and json.loads(resp.read())["field"] == "body"
    conn.close()
    for query, field in (("limit=many", "limit"), ("limit=-1", "limit"), ("status=lost", "status"),
                         ("page_token=x", "page_token"), ("label=nokey", "label")):
        status, _, body = request(f"{base}/api/v1/tasks?{query}")
        assert status == 400 and body["field"] == field, (query, body)
    for query, field in (("", "id"), ("id=a&timeout_s=0", "timeout_s"),
                         ("id=a&timeout_s=nan", "timeout_s")):
        status, _, body = request(f"{base}/api/v1/wait?{query}")
        assert status == 400 and body["field"] == field, (query, body)
    status, _, body = request(f"{base}/api/v1/events?after=soon")
    assert status == 400 and body["field"] == "after"
    # Still serving, and still accepting good work.
    assert request(base + "/healthz")[0] == 200
    status, body = post_json(base + path, {"data": "still serving", "strategy": "batch"})
    assert status == 201, body
    assert wait_final(base, [body["task_id"]])[0]["status"] == "succeeded"


def test_rest_api_create_list_page_get_cancel_and_status(cluster3: Cluster) -> None:
    base = cluster3.http(follower(cluster3))
    status, body = post_json(base + "/api/v1/tasks", {"tasks": [
        {"task_id": f"rest-{i}", "data": f"python: print({i})", "strategy": "batch",
         "labels": {"suite": "rest"}} for i in range(3)]})
    assert status == 201 and [r["task_id"] for r in body["results"]] == ["rest-0", "rest-1",
                                                                         "rest-2"]
    tasks = wait_final(base, ["rest-0", "rest-1", "rest-2"])
    assert [t["result"] for t in tasks] == ["0", "1", "2"]

    status, _, page1 = request(f"{base}/api/v1/tasks?label=suite=rest&limit=2")
    assert status == 200 and page1["total"] == 3 and len(page1["tasks"]) == 2
    status, _, page2 = request(f"{base}/api/v1/tasks?label=suite=rest&limit=2"
                               f"&page_token={page1['next_page_token']}")
    assert [t["id"] for t in page1["tasks"] + page2["tasks"]] == ["rest-0", "rest-1", "rest-2"]
    assert page2["next_page_token"] == ""
    status, _, done = request(f"{base}/api/v1/tasks?status=succeeded&label=suite=rest")
    assert status == 200 and done["total"] == 3

    status, _, task = request(f"{base}/api/v1/tasks/rest-1")
    assert status == 200 and task["id"] == "rest-1" and task["node"] and task["attempts"] == 1
    assert task["started_at"] >= task["created_at"] > 0 and task["finished_at"] > 0
    status, _, body = request(f"{base}/api/v1/tasks/no-such-task")
    assert status == 404 and body["code"] == 404

    status, body = post_json(base + "/api/v1/tasks", {"task_id": "rest-slow",
                                                      "data": "sh: sleep 60", "strategy": "batch"})
    assert status == 201
    wait_for(lambda: request(f"{base}/api/v1/tasks/rest-slow")[2]["status"] == "running", 30,
             "the slow task to start")
    status, _, body = request(f"{base}/api/v1/tasks/rest-slow", "DELETE")
    assert status == 200 and body == {"task_id": "rest-slow", "status": "cancelled"}
    status, _, body = request(f"{base}/api/v1/tasks/rest-slow/cancel", "POST")
    assert status == 200 and body["status"] == "cancelled", "cancel is idempotent"
    status, _, body = request(f"{base}/api/v1/tasks/no-such-task/cancel", "POST")
    assert status == 404

    leaders = set()
    for i in range(cluster3.n):
        status, _, node = request(cluster3.http(i) + "/api/v1/node")
        assert status == 200 and node["id"] == f"node-{i}" and node["ready"]
        status, _, cl = request(cluster3.http(i) + "/api/v1/cluster")
        assert status == 200 and sorted(n["id"] for n in cl["nodes"]) == [
            "node-0", "node-1", "node-2"]
        assert [n["role"] for n in cl["nodes"]].count("leader") == 1
        assert all(n["slots"] == 4 and n["memory_rss"] > 0 for n in cl["nodes"])
        leaders.add(cl["leader_id"])
        assert request(cluster3.http(i) + "/readyz")[0] == 200
    assert len(leaders) == 1, "every node forwards to the same leader"

    status, hdrs, body = request(base + "/api/v1/tasks", "PUT", b"{}")
    assert status == 405 and set(hdrs["Allow"].split(", ")) >= {"GET", "POST"}
    status, _, body = request(base + "/api/v2/nothing")
    assert status == 404 and body["code"] == 404
    status, hdrs, _ = request(base + "/api/v1/tasks/rest-1", "OPTIONS")
    assert status == 204 and "DELETE" in hdrs["Allow"]


def _metric(base: str, name: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, hdrs, text = request(base + "/metrics")
    assert status == 200 and hdrs["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_parse_and_counters_move_when_tasks_run(cluster3: Cluster) -> None:
    base = cluster3.http(follower(cluster3))
    before = sum(_metric(base, "taskandgo_committed_results").values())
    roles = {dict(k)["role"]: v for k, v in _metric(base, "taskandgo_raft_role").items()}
    assert roles["follower"] == 1 and roles["leader"] == 0
    status, body = post_json(base + "/api/v1/tasks", {"tasks": [
        {"data": "python: print('m')", "strategy": "batch"} for _ in range(4)]})
    assert status == 201
    wait_final(base, [r["task_id"] for r in body["results"]])
    wait_for(lambda: sum(_metric(base, "taskandgo_committed_results").values()) >= before + 4,
             30, "taskandgo_committed_results to count the 4 results")
    leader = cluster3.leader_index()
    assert leader is not None
    leader_base = cluster3.http(leader)
    leader_roles = {dict(k)["role"]: v for k, v in
                    _metric(leader_base, "taskandgo_raft_role").items()}
    assert leader_roles["leader"] == 1


def test_events_stream_and_resume_with_last_event_id(cluster3: Cluster) -> None:
    base = cluster3.http(follower(cluster3))
    stream = EventStream(base)
    try:
        _, body = post_json(base + "/api/v1/tasks", {"data": "python: print('a')",
                                                     "strategy": "batch"})
        first = body["task_id"]
        seen = stream.until(lambda e: e["data"]["task_id"] == first
                            and e["data"]["status"] == "succeeded", 60, "the first task to end")
    finally:
        stream.close()
    mine = [e for e in seen if e["data"]["task_id"] == first]
    assert [e["data"]["status"] for e in mine][:2] == ["queued", "running"]
    assert all(e["event"] == "task" and int(e["id"]) == e["data"]["seq"] for e in mine)
    last_id = mine[-1]["id"]

    # While nobody listens, a second task runs; a resumed stream gets only newer events.
    _, body = post_json(base + "/api/v1/tasks", {"data": "python: print('b')",
                                                      "strategy": "batch"})
    second = body["task_id"]
    wait_final(base, [second])
    for resumed in (EventStream(base, last_event_id=last_id),
                    EventStream(base, query=f"&after={last_id}")):
        try:
            got = resumed.until(lambda e: e["data"]["task_id"] == second
                                and e["data"]["status"] == "succeeded", 30,
                                "the second task's events after the resume")
        finally:
            resumed.close()
        ids = [int(e["id"]) for e in got if "id" in e]
        assert ids and min(ids) > int(last_id), "only events newer than Last-Event-ID"
        assert not any(e["data"]["task_id"] == first for e in got)
        assert next(e["data"]["status"] for e in got if e["data"]["task_id"] == second) == "queued"


def test_openapi_document_is_valid_and_lists_every_route(cluster3: Cluster) -> None:
    from openapi_spec_validator import validate
    from taskandgo.node.http import ROUTES

    status, _, doc = request(cluster3.http(0) + "/openapi.json")
    assert status == 200
    validate(doc)
    served = {"/" + "/".join(pattern): {m.lower() for m in methods}
              for pattern, methods in ROUTES if pattern != ("index.html",)}  # an alias of /
    documented = {path: {m for m in ops if m != "parameters"} for path, ops in doc["paths"].items()}
    assert documented == served
    seed = doc["paths"]["/submit-task"]["post"]["requestBody"]["content"]["application/json"]
    assert seed["examples"]["seed"]["value"] == json.loads(SEED_BODY)


def _fuzz_operation(op: Any, mode: Any, base: str, examples: int) -> None:
    """Run ``examples`` generated requests for one operation; every answer must be
    documented (status, content type, schema) and none may be a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=True)
    def run(case: Any) -> None:
        if op.path == "/api/v1/wait":
            short_wait(case)
        case.call_and_validate(base_url=base, checks=checks, timeout=30)

    run()


def test_property_based_run_against_the_openapi_document_finds_no_server_error(
        cluster3: Cluster) -> None:
    """schemathesis generates requests from the document, valid and invalid ones, for
    every operation but the endless event stream."""
    import schemathesis
    from schemathesis.generation import GenerationMode

    base = cluster3.http(follower(cluster3))
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    tested = []
    # An operation the loader cannot read is an Err without .ok(): the test fails on it.
    for op in [result.ok() for result in schema.get_all_operations()]:  # type: ignore[union-attr]
        if op.path == "/api/v1/events":
            continue
        # Invalid requests need something to get wrong: a query, a header or a body.
        has_inputs = any(p.location != "path" for p in op.iter_parameters()) or len(op.body) > 0
        for mode in [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * has_inputs:
            # A wait on an unknown id blocks until its (shortened) timeout: fewer of those.
            _fuzz_operation(op, mode, base, 25 if op.path == "/api/v1/wait" else 50)
            tested.append(f"{op.method.upper()} {op.path} {mode.value}")
    assert {t.split()[1] for t in tested} >= {"/submit-task", "/api/v1/tasks", "/api/v1/wait",
                                               "/api/v1/tasks/{id}", "/api/v1/tasks/{id}/cancel",
                                               "/api/v1/cluster", "/metrics"}, tested
    # The node is still healthy after all that.
    assert request(base + "/readyz")[0] == 200


def test_top_once_shows_every_node_and_one_leader(cluster3: Cluster) -> None:
    res = subprocess.run([sys.executable, "-m", "taskandgo", "top", "--once", "--node",
                          cluster3.addr(1)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    leader = f"node-{cluster3.leader_index()}"
    assert lines[0].startswith("TaskAndGo top") and f"leader {leader}" in lines[0]
    rows = [ln for ln in lines if ln.startswith("node-")]
    assert sorted(r.split()[0] for r in rows) == ["node-0", "node-1", "node-2"]
    assert [r.split()[1] for r in rows].count("leader") == 1
    assert any(ln.startswith("QUEUE") for ln in lines) and any(
        ln.startswith("RUNNING") for ln in lines)
    assert "\x1b[" not in res.stdout, "a single frame to a pipe carries no escape codes"


# ---------------------------------------------------------------------- service tier
# The HTTP server on port 0 in this process, in front of a stand-in node: tokens,
# rate limit and TLS, without a cluster.

class _StubNode:
    """Just what the guarded routes below call on a NodeApp."""

    def __init__(self, **cfg: Any) -> None:
        from types import SimpleNamespace

        from taskandgo.node.security import TokenAuth

        defaults = {"auth": TokenAuth(), "rate_limit": 0.0, "tls": False, "tls_cert": None,
                    "tls_key": None, "tls_ca": None, "tls_client_auth": False}
        self.cfg = SimpleNamespace(**{**defaults, **cfg})
        self.node_id = "stub-0"

    def node_status(self) -> dict[str, Any]:
        return {"id": self.node_id, "role": "leader", "ready": True, "leader_id": self.node_id}


def _serve(app: Any) -> Any:
    from taskandgo.node.http import create_http_server, serve_in_thread

    server, port = create_http_server(app, "127.0.0.1", 0)  # type: ignore[arg-type]
    serve_in_thread(server)
    return server, port


def test_tokens_guard_every_route_but_pages_and_probes() -> None:
    from taskandgo.node.security import TokenAuth

    server, port = _serve(_StubNode(auth=TokenAuth.from_text("s3cret")))
    base = f"http://127.0.0.1:{port}"
    try:
        status, hdrs, body = request(base + "/api/v1/node")
        assert status == 401 and body["field"] == "Authorization"
        assert hdrs["WWW-Authenticate"] == "Bearer"
        status, _, body = request(base + "/api/v1/node", headers={"Authorization": "Bearer no"})
        assert status == 401
        status, _, body = request(base + "/api/v1/node",
                                  headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and body["id"] == "stub-0"
        assert request(base + "/api/v1/events?access_token=wrong")[0] == 401
        status, _, body = request(base + "/submit-task", "POST", SEED_BODY)
        assert status == 401, "refused before the body is even looked at"
        for open_path in ("/healthz", "/readyz", "/", "/openapi.json"):
            assert request(base + open_path)[0] == 200, open_path
    finally:
        server.shutdown()
        server.server_close()


def test_rate_limit_answers_429_with_retry_after() -> None:
    server, port = _serve(_StubNode(rate_limit=1.0))
    base = f"http://127.0.0.1:{port}"
    try:
        assert request(base + "/api/v1/node")[0] == 200
        status, hdrs, body = request(base + "/api/v1/node")
        assert status == 429 and int(hdrs["Retry-After"]) >= 1 and body["code"] == 429
        assert request(base + "/healthz")[0] == 200, "probes are not rate limited"
    finally:
        server.shutdown()
        server.server_close()


def test_https_with_the_nodes_certificate(tmp_path: Any) -> None:
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stub-0")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "node.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server, port = _serve(_StubNode(tls=True, tls_cert=str(tmp_path / "node.pem"),
                                    tls_key=str(tmp_path / "node.key")))
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "node.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/api/v1/node", context=ctx,
                                    timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["id"] == "stub-0"
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to TLS
            request(f"http://127.0.0.1:{port}/healthz", timeout_s=5)
        # The node still serves after a client that spoke the wrong protocol.
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx,
                                    timeout=10) as r:
            assert r.status == 200
    finally:
        server.shutdown()
        server.server_close()
