"""Hostile input against a live 3-node cluster: hypothesis generates TaskSpec
messages (gRPC) and raw JSON bodies (HTTP POST /submit-task); every answer must be
success or a typed refusal, never an internal error, and afterwards every node
serves, no accepted task is lost and the replicas agree.

TASKANDGO_FUZZ_EXAMPLES sets the number of inputs per door (default 5,000 each,
10,000 in all). The cluster allows only the bundled callables, so nothing a fuzzed
payload says can run code.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from conftest import _cluster
from harness import Cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from taskandgo.protos import taskandgo_pb2 as pb
from taskandgo.protos import taskandgo_pb2_grpc as pb_grpc

pytestmark = pytest.mark.cluster

N = int(os.environ.get("TASKANDGO_FUZZ_EXAMPLES", "5000"))
TYPED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
COUNTS = {"grpc": 0, "grpc_ok": 0, "http": 0, "http_ok": 0}
ACCEPTED: list[str] = []


@pytest.fixture(scope="module")
def fuzz_cluster(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _cluster(request, tmp_path_factory, n=3,
                        extra=["--allow", "call", "--allow-calls", "taskandgo.node.builtins"])


text = st.text(max_size=40)
ids = st.one_of(st.just(""), st.text(max_size=140),
                st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True))
json_text = st.one_of(text, st.just("[1,2,3]"), st.just('{"a": 1}'), st.just("[]"),
                      st.just("null"), st.just("[" * 50))
specs = st.builds(
    pb.TaskSpec, id=ids,
    priority=st.one_of(st.sampled_from(["", "low", "medium", "high", "critical", "urgent",
                                        "-1001", "1000", "7", "1e3"]), text),
    data=st.one_of(st.just(""), text, st.just("sh: echo hi"), st.just("python: 1")),
    argv=st.lists(text, max_size=3),
    call=st.one_of(st.just(""), st.just("taskandgo.node.builtins:noop"), text,
                   st.just("os:system")),
    args_json=json_text, strategy=st.sampled_from(["", "split", "batch", "fastest"]),
    shards=st.integers(-5, 2000), items_json=json_text,
    timeout_s=st.one_of(st.floats(allow_nan=True), st.just(0.0)),
    retries=st.integers(-3, 200),
    labels=st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=3))


mostly_valid = st.builds(
    pb.TaskSpec, id=ids, priority=st.sampled_from(["", "low", "high", "critical", "12"]),
    call=st.just("taskandgo.node.builtins:echo"),
    args_json=st.sampled_from(["", "[1]", '{"x": 2}', "[[1, 2], null]"]),
    strategy=st.sampled_from(["", "split", "batch"]), shards=st.integers(0, 4),
    items_json=st.sampled_from(["", "[1, 2, 3]"]), timeout_s=st.sampled_from([0.0, 5.0]),
    retries=st.integers(0, 2), labels=st.dictionaries(
        st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.text(max_size=10), max_size=2))


def test_fuzz_grpc_submit(fuzz_cluster: Cluster) -> None:
    chans = [grpc.insecure_channel(fuzz_cluster.addr(i)) for i in range(3)]
    stubs = [pb_grpc.SchedulerStub(ch) for ch in chans]

    @settings(max_examples=N, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(specs, mostly_valid), st.integers(0, 2))
    def one(spec: pb.TaskSpec, node: int) -> None:
        COUNTS["grpc"] += 1
        try:
            resp = stubs[node].SubmitTask(pb.SubmitTaskRequest(task=spec), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in TYPED, (exc.code(), exc.details(), spec)
            return
        COUNTS["grpc_ok"] += 1
        ACCEPTED.append(resp.task_id)

    try:
        one()
    finally:
        for ch in chans:
            ch.close()


bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
        st.sampled_from(["task_id", "id", "priority", "data", "argv", "call", "args", "strategy",
                         "shards", "items", "timeout_s", "retries", "labels", "extra"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text,
                  st.lists(st.integers(), max_size=3), st.dictionaries(text, text, max_size=2)),
        max_size=6)),
    st.builds(lambda tid, prio: json.dumps({"task_id": tid, "priority": prio,
                                            "data": "task details"}).encode(),
              ids, st.sampled_from(["high", "low", "x", 5, None])),
)


def test_fuzz_http_submit(fuzz_cluster: Cluster) -> None:
    @settings(max_examples=N, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies, st.integers(0, 2))
    def one(body: bytes, node: int) -> None:
        COUNTS["http"] += 1
        req = urllib.request.Request(fuzz_cluster.http(node) + "/submit-task", data=body,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out = json.loads(r.read())
                assert r.status in (200, 201)
                COUNTS["http_ok"] += 1
                ACCEPTED.append(out["task_id"])
        except urllib.error.HTTPError as e:
            assert e.code in (400, 413, 429), (e.code, e.read()[:300], body[:200])

    one()


def test_zz_after_the_fuzz_every_node_serves_and_nothing_was_lost(fuzz_cluster: Cluster) -> None:
    print(f"\nfuzz: {COUNTS['grpc']} gRPC inputs ({COUNTS['grpc_ok']} accepted), "
          f"{COUNTS['http']} HTTP inputs ({COUNTS['http_ok']} accepted), "
          f"{COUNTS['grpc'] + COUNTS['http']} in all")
    assert COUNTS["grpc"] + COUNTS["http"] >= 2 * min(N, 5000) or N < 5000
    assert len(fuzz_cluster.statuses()) == 3
    fuzz_cluster.check_invariants(sorted(set(ACCEPTED)), timeout_s=120,
                                  allow=("succeeded",))
