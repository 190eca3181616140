"""The API's vocabulary (node/vocabulary.py): one TaskSpec, its codecs, one error
mapping, one token check.

Given any valid spec, when it goes through the protobuf codec (serialised to bytes
and back), the HTTP JSON codec (to text and back) or the stored form, then the same
spec comes out. Given a valid spec with one field made wrong, then every entry
(request mapping, HTTP body, the client's ``task_spec``) refuses it naming that
field. Given the real gRPC and HTTP servers on port 0 in front of a stand-in node
that raises each of the node's exceptions, then both answer each the same way
(the gRPC code and HTTP status of one table, the same message, a retry hint on both
or neither).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from taskandgo.node.client import Client, TaskAndGoError, make_channel, task_spec
from taskandgo.node.replica import NotFound, Unavailable
from taskandgo.node.security import (
    Overloaded,
    PermissionDenied,
    RateLimited,
    TokenAuth,
    Unauthenticated,
)
from taskandgo.node.streams import TooManyStreams
from taskandgo.node.tasks import MAX_PAYLOAD, MAX_TIMEOUT_S, InvalidTask, normalize
from taskandgo.node.vocabulary import TaskSpec, check_bearer, check_many, spec_to_api
from taskandgo.protos import taskandgo_pb2 as pb
from taskandgo.protos import taskandgo_pb2_grpc as pb_grpc

# ---------------------------------------------------------------------- specs

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,30}", fullmatch=True)
priorities = st.one_of(st.sampled_from(["low", "medium", "high", "critical", "", None]),
                       st.integers(-1000, 1000), st.integers(-1000, 1000).map(str))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=4),
    max_leaves=12)
json_args = st.one_of(st.lists(json_values, max_size=4),
                      st.dictionaries(st.text(max_size=4), json_values, max_size=4))
label_keys = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,20}", fullmatch=True)
labels = st.dictionaries(label_keys, st.text(max_size=20), max_size=5)
payloads = st.one_of(
    st.builds(lambda d: {"data": d}, st.text(min_size=1, max_size=40)),
    st.builds(lambda a: {"argv": a}, st.lists(st.text(max_size=10), min_size=1, max_size=4)),
    st.builds(lambda c, a: {"call": c, **({} if a is None else {"args": a})},
              st.sampled_from(["json:dumps", "taskandgo.node.builtins:noop", "pkg.mod:fn_2"]),
              st.none() | json_args))


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """(a valid request mapping, the node default strategy to check it with; "" is
    the client's: no default)."""
    default = draw(st.sampled_from(["split", "batch", ""]))
    raw: dict[str, Any] = {"id": draw(ids | st.just("")), "priority": draw(priorities),
                           **draw(payloads)}
    strategy = draw(st.sampled_from(["", "split", "batch"]))
    if strategy:
        raw["strategy"] = strategy
    if (strategy or default) != "batch":
        raw["shards"] = draw(st.integers(0, 1000))
        items = draw(st.none() | st.lists(json_values, max_size=6))
        if items is not None:
            raw["items"] = items
    raw["timeout_s"] = draw(st.sampled_from([0, 1, 2.5]) | st.floats(0, MAX_TIMEOUT_S))
    raw["retries"] = draw(st.integers(0, 100))
    raw["labels"] = draw(labels)
    return raw, default


SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(requests())
def test_every_valid_spec_round_trips_through_protobuf_bytes(case: tuple[dict, str]) -> None:
    raw, default = case
    spec = TaskSpec.check(raw, default)
    wire = pb.TaskSpec.FromString(spec.to_proto().SerializeToString())
    assert TaskSpec.from_proto(wire, default) == spec
    assert spec.to_api() == spec_to_api(spec.to_stored())


@SETTINGS
@given(requests())
def test_every_valid_spec_round_trips_through_http_json_text(case: tuple[dict, str]) -> None:
    raw, default = case
    spec = TaskSpec.check(raw, default)
    body = json.loads(json.dumps(spec.to_json()))
    assert set(body) >= {"task_id", "priority"}, "the seed's field names"
    assert TaskSpec.from_json(body, default) == spec


@SETTINGS
@given(requests())
def test_stored_form_round_trips_and_normalize_is_stable(case: tuple[dict, str]) -> None:
    raw, default = case
    spec = TaskSpec.check(raw, default or "split")
    stored = spec.to_stored()
    assert TaskSpec.from_stored(stored) == spec
    assert normalize(stored, "batch") == stored, "a stored spec checks to itself"
    assert normalize(spec, "batch") == stored, "a checked spec passes as it is"


def test_stored_form_is_exactly_the_replicated_format() -> None:
    # The dict the state machine stores, journals and snapshots: keys, order, types.
    spec = TaskSpec.check({"id": "t-1", "priority": "high", "call": "json:dumps",
                           "args_json": '[1, {"a": 2}]', "items_json": "[1,2,3]",
                           "timeout_s": 5, "retries": 2, "labels": {"team": "x"}}, "split")
    stored = spec.to_stored()
    assert stored == {"id": "t-1", "priority": 20, "call": "json:dumps", "args": [1, {"a": 2}],
                      "strategy": "split", "items": [1, 2, 3], "shards": 3, "timeout_s": 5.0,
                      "retries": 2, "labels": {"team": "x"}}
    assert list(stored) == ["id", "priority", "call", "args", "strategy", "items", "shards",
                            "timeout_s", "retries", "labels"]
    assert type(stored["timeout_s"]) is float
    seed = TaskSpec.from_json({"task_id": 123, "priority": "high", "data": "task details"},
                              "batch").to_stored()
    assert seed == {"id": "123", "priority": 20, "data": "task details", "strategy": "batch"}


def test_a_spec_without_a_strategy_takes_the_nodes() -> None:
    spec = task_spec(items=[1, 2], data="python: print(1)")
    assert spec["strategy"] == "" and spec["shards"] == 2 and spec["items_json"] == "[1,2]"
    assert normalize(spec, "split")["strategy"] == "split"
    with pytest.raises(InvalidTask) as err:
        normalize(spec, "batch")
    assert err.value.field == "strategy"


# ---------------------------------------------------------------------- bad fields

#: field -> wrong values, each refused naming that field (as the HTTP body names it).
BAD: dict[str, list[Any]] = {
    "task_id": ["bad id", "-starts-with-dash", "x" * 129, "a\n"],
    "priority": ["urgent", 5000, -1001, True, 1.5],
    "strategy": ["fastest"],
    "shards": [-1, 1001, True, "3"],
    "timeout_s": [-1, MAX_TIMEOUT_S + 1, float("inf"), "5"],
    "retries": [-1, 101, 2.5, True],
    "labels": [{"bad key!": "v"}, {"k": "x" * 256}, {f"k{i}": "v" for i in range(33)},
               {"k": 5}],
    "data": [5, "x" * (MAX_PAYLOAD + 1)],
}


@SETTINGS
@given(requests(), st.sampled_from(sorted(BAD)), st.data())
def test_one_wrong_field_is_refused_naming_it(case: tuple[dict, str], name: str,
                                              data: st.DataObject) -> None:
    raw, default = case
    value = data.draw(st.sampled_from(BAD[name]))
    raw = {k: v for k, v in raw.items() if k not in ("data", "argv", "call", "args")} \
        if name == "data" else dict(raw)
    mapping_key = "id" if name == "task_id" else name
    # A request mapping (gRPC's and the node's entry).
    with pytest.raises(InvalidTask) as err:
        TaskSpec.check({**raw, mapping_key: value}, default)
    assert err.value.field == name, err.value
    # An HTTP body, alone and as tasks[2] of a batch.
    body = {("task_id" if k == "id" else k): v for k, v in raw.items()}
    body[name] = value
    with pytest.raises(InvalidTask) as err:
        TaskSpec.from_json(body, default)
    assert err.value.field == name, err.value
    with pytest.raises(InvalidTask) as err:
        TaskSpec.from_json(body, default, "tasks[2].")
    assert err.value.field == f"tasks[2].{name}", err.value


def test_the_client_refuses_a_bad_field_as_the_node_would() -> None:
    with pytest.raises(TaskAndGoError) as err:
        task_spec("python: print(1)", priority="urgent")
    assert err.value.code == "INVALID_ARGUMENT" and err.value.message.startswith("priority: ")
    with pytest.raises(TaskAndGoError) as err:
        task_spec(call="json:dumps", args="not a list")
    assert err.value.message.startswith("args: ")


def test_a_batch_names_the_task_only_when_there_are_several() -> None:
    good, bad = {"data": "python: 1"}, {"data": "python: 1", "retries": -1}
    with pytest.raises(InvalidTask) as err:
        check_many([bad], "split")
    assert err.value.field == "retries"
    with pytest.raises(InvalidTask) as err:
        check_many([good, bad], "split")
    assert err.value.field == "tasks[1].retries"


def test_the_http_body_keeps_its_own_checks() -> None:
    for body, field in (({"task_id": "a", "data": "x", "colour": "red"}, "colour"),
                        ({"task_id": "a", "id": "b", "data": "x"}, "id"),
                        ({"data": "x", "retries": ""}, "retries"),
                        ({"call": "json:dumps", "args_json": "[" * 100 + "]" * 100},
                         "args_json"),
                        ([], "body")):
        with pytest.raises(InvalidTask) as err:
            TaskSpec.from_json(body, "split")
        assert err.value.field == field, (body, err.value)


# ---------------------------------------------------------------------- errors

#: task id -> (what the stand-in node raises for it, gRPC code, HTTP status). The one
#: table both protocols must follow; a forwarded call's failure keeps its code.
FAULTS: dict[str, tuple[BaseException, str, int]] = {
    "invalid": (InvalidTask("task_id", "not like that"), "INVALID_ARGUMENT", 400),
    "missing": (NotFound("task missing not found"), "NOT_FOUND", 404),
    "leaderless": (Unavailable("no leader"), "UNAVAILABLE", 503),
    "anonymous": (Unauthenticated("invalid bearer token"), "UNAUTHENTICATED", 401),
    "denied": (PermissionDenied("peer credential refused"), "PERMISSION_DENIED", 403),
    "full": (Overloaded("queue is full"), "RESOURCE_EXHAUSTED", 429),
    "rate": (RateLimited(0.4), "RESOURCE_EXHAUSTED", 429),
    "waits": (TooManyStreams("too many open waits"), "RESOURCE_EXHAUSTED", 429),
    "fwd-invalid": (TaskAndGoError("INVALID_ARGUMENT", "priority: nope"),
                    "INVALID_ARGUMENT", 400),
    "fwd-full": (TaskAndGoError("RESOURCE_EXHAUSTED", "queue is full"),
                 "RESOURCE_EXHAUSTED", 429),
    "fwd-anonymous": (TaskAndGoError("UNAUTHENTICATED", "invalid bearer token"),
                      "UNAUTHENTICATED", 401),
    "fwd-late": (TaskAndGoError("DEADLINE_EXCEEDED", "no answer"), "DEADLINE_EXCEEDED", 503),
    "bug": (KeyError("oops"), "INTERNAL", 500),
}


class _FaultyNode:
    """A stand-in NodeApp for the servers: ``get(task_id)`` raises FAULTS[task_id]."""

    def __init__(self, auth: TokenAuth | None = None) -> None:
        self.cfg = SimpleNamespace(auth=auth or TokenAuth(), rate_limit=0.0,
                                   peer_rate_limit=100.0, strategy="split", tls=False,
                                   tls_cert=None, tls_key=None, tls_ca=None,
                                   tls_client_auth=False, grpc_threads=4, max_streams=4,
                                   max_streams_per_client=2)
        self.node_id = "stub-0"
        self.replicated = object()
        self._stop = threading.Event()

    def node_status(self, include_digest: bool = False) -> dict[str, Any]:
        return {"id": self.node_id, "role": "leader", "ready": True, "leader_id": self.node_id}

    def get(self, task_id: str) -> dict[str, Any]:
        raise FAULTS[task_id][0]


@pytest.fixture
def servers() -> Iterator[tuple[str, str]]:
    """(gRPC target, HTTP base URL) of both real servers on port 0."""
    from taskandgo.node.http import create_http_server, serve_in_thread
    from taskandgo.node.service import create_server

    node = _FaultyNode(TokenAuth.from_text("s3cret"))
    grpc_server, grpc_port = create_server(node, "127.0.0.1:0")  # type: ignore[arg-type]
    grpc_server.start()
    http_server, http_port = create_http_server(node, "127.0.0.1", 0)  # type: ignore[arg-type]
    serve_in_thread(http_server)
    try:
        yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    finally:
        node._stop.set()
        http_server.shutdown()
        http_server.server_close()
        grpc_server.stop(0)


def _grpc_get(target: str, task_id: str, token: str | None = "s3cret") -> tuple[str, str, bool]:
    """(code name, details, has a retry hint) of GetTask."""
    channel = make_channel(target)
    try:
        md = (("authorization", f"Bearer {token}"),) if token else ()
        pb_grpc.SchedulerStub(channel).GetTask(pb.GetTaskRequest(task_id=task_id),
                                               metadata=md, timeout=10)
    except grpc.RpcError as exc:
        trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        return exc.code().name, exc.details() or "", "retry-after-ms" in trailers  # type: ignore[attr-defined]
    finally:
        channel.close()
    return "OK", "", False


def _http_get(base: str, task_id: str,
              token: str | None = "s3cret") -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(f"{base}/api/v1/tasks/{task_id}",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_grpc_and_http_answer_each_exception_the_same_way(servers: tuple[str, str]) -> None:
    target, base = servers
    for task_id, (_exc, code, status) in FAULTS.items():
        got_code, details, grpc_retry = _grpc_get(target, task_id)
        got_status, body, headers = _http_get(base, task_id)
        assert (got_code, got_status) == (code, status), task_id
        assert body["code"] == status, task_id
        if code != "INTERNAL":
            assert details == body["error"], task_id
        assert grpc_retry == ("Retry-After" in headers) == (status == 429), task_id
        if status == 401:
            assert headers.get("WWW-Authenticate") == "Bearer", task_id
        if status == 400:
            assert body["field"] == details.split(":", 1)[0], task_id


def test_both_servers_run_the_same_token_check(servers: tuple[str, str]) -> None:
    target, base = servers
    for token, message in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
        code, details, _ = _grpc_get(target, "missing", token)
        status, body, _ = _http_get(base, "missing", token)
        assert (code, status) == ("UNAUTHENTICATED", 401)
        assert details == body["error"] == message
    auth = TokenAuth.from_text("s3cret")
    assert check_bearer(auth, "s3cret", read_only=False) == "s3cret"
    assert check_bearer(auth, None, read_only=True) is None, "probes stay open"
    assert check_bearer(TokenAuth(), None, read_only=False) is None, "no tokens: open API"
    with pytest.raises(Unauthenticated):
        check_bearer(TokenAuth.from_text("s3cret", open_read_only=False), None, read_only=True)


# ---------------------------------------------------------------------- names


def test_no_method_of_the_node_shadows_a_builtin() -> None:
    import builtins
    import importlib
    import inspect
    import pkgutil

    import taskandgo.node

    shadowing = set(dir(builtins))
    found = []
    for info in pkgutil.iter_modules(taskandgo.node.__path__):
        module = importlib.import_module(f"taskandgo.node.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                found += [f"{module.__name__}.{name}.{attr}" for attr, value in vars(cls).items()
                          if attr in shadowing and callable(value)]
    # Client.list: the deprecated name of Client.list_tasks, kept for one release.
    assert found == ["taskandgo.node.client.Client.list"], found
    with pytest.warns(DeprecationWarning), Client("127.0.0.1:1", timeout_s=0.3) as c, \
            pytest.raises(TaskAndGoError):
        c.list()  # type: ignore[attr-defined]
