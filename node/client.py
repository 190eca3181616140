"""The Python client: ``from taskandgo import Client``. The CLI is built on it.

A client holds one or more node addresses. Every call goes to one node; when that
node is unreachable or has no leader (UNAVAILABLE, DEADLINE_EXCEEDED) the call is
retried on the next node with backoff, until the client's timeout. Submits carry
an id chosen here when the caller gives none, so a retried submit (say across a
leader change) can never create a second task.
"""

from __future__ import annotations

import datetime
import math
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Self

import grpc
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.vocabulary import TaskSpec, dict_from_message, message_from_dict
from taskandgo.protos import taskandgo_pb2 as pb
from taskandgo.protos import taskandgo_pb2_grpc as pb_grpc

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class TaskAndGoError(Exception):
    """A call failed for good. ``code`` is the gRPC status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def task_spec(
    data: str | None = None, *, argv: list[str] | None = None, call: str | None = None,
    args: Any = None, id: str | None = None, priority: str | int = "medium",
    strategy: str = "", shards: int = 0, items: list | None = None,
    timeout_s: float = 0.0, retries: int = 0, labels: Mapping[str, str] | None = None,
    on_every_node: bool = False, run_at: str | float | datetime.datetime | None = None,
    delay_s: float = 0.0, after: Sequence[str] = (), after_any: bool = False,
    resources: Mapping[str, Any] | None = None, require: Sequence[str] = (),
    prefer: Sequence[str] = (), concurrency_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """A TaskSpec dict (the fields of ``taskandgo.v1.TaskSpec``: what
    :meth:`Client.submit_many` takes, as in earlier releases), checked here by the
    node's own checks: a bad field raises TaskAndGoError ``INVALID_ARGUMENT`` naming
    it, as the node would answer. An id is chosen here when none is given; a
    strategy left out is the node's default (``SCHEDULER_STRATEGY``). A task with
    nothing to cut (no ``shards``, no ``items``) runs once; ``on_every_node=True``
    runs it once on every live node instead.

    A delayed task: ``run_at`` (an RFC 3339 time, seconds since the epoch, or an aware
    datetime) or ``delay_s`` (seconds from now, by this machine's clock); it is
    accepted at once, shown as ``scheduled``, and queued at that time.

    A dependent task: ``after`` (ids of tasks submitted before it) — it waits as
    ``waiting`` until they have all succeeded (``after_any``: ended), then runs with
    their results (``$TASKANDGO_PARENTS``, or the ``parents`` keyword argument of a
    call); if one fails or is cancelled it ends ``upstream_failed`` naming it.

    Placement: ``resources`` each unit needs free on its node (``{"cpu": 4,
    "memory": "2Gi", "gpu": 1}``; amounts as numbers or quantities), node labels it
    must have (``require=["zone=a", "gpu"]``) and would rather have (``prefer``).

    ``concurrency_keys``: while a unit runs it holds each key, and at most the key's
    limit (:meth:`Client.set_policy`) of units holding it run at once anywhere."""
    if isinstance(run_at, datetime.datetime):
        if run_at.tzinfo is None:
            raise TaskAndGoError("INVALID_ARGUMENT", "run_at: a datetime needs a time zone")
        run_at = run_at.timestamp()
    raw = {"id": id, "priority": priority, "data": data, "argv": argv, "call": call,
           "args": args, "strategy": strategy, "shards": shards, "items": items,
           "timeout_s": timeout_s, "retries": retries, "labels": labels,
           "on_every_node": on_every_node, "run_at": run_at, "delay_s": delay_s,
           "after": list(after), "after_any": after_any, "resources": resources,
           "require": list(require), "prefer": list(prefer),
           "concurrency_keys": list(concurrency_keys)}
    try:
        spec = TaskSpec.check(raw, default_strategy="")
    except InvalidTask as exc:
        raise TaskAndGoError("INVALID_ARGUMENT", str(exc)) from None
    return dict_from_message(spec.to_proto())


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def make_channel(target: str, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, options: list | None = None) -> grpc.Channel:
    """A channel to a node: TLS when a CA or a client certificate is given (the
    certificate and key also serve as the client certificate for mTLS)."""
    opts = list(options or CHANNEL_OPTIONS)
    if tls_ca or tls_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca),
                                             private_key=_read(tls_key),
                                             certificate_chain=_read(tls_cert))
        return grpc.secure_channel(target, creds, options=opts)
    return grpc.insecure_channel(target, options=opts)


def _spec_msg(spec: TaskSpec | Mapping[str, Any]) -> pb.TaskSpec:
    """The message of a spec to submit: a TaskSpec's, or a dict's fields as given
    (an id chosen here when it has none, so a retried call cannot add a task)."""
    if isinstance(spec, TaskSpec):
        return spec.to_proto()
    fields = dict(spec)
    if not fields.get("id"):
        fields["id"] = uuid.uuid4().hex
    return message_from_dict(pb.TaskSpec, fields)


class Client:
    """Talks to a TaskAndGo cluster through any of its nodes. Thread-safe.

    ``token`` is sent as a bearer token (``authorization`` metadata); ``tls_ca``
    verifies the nodes' certificates; ``tls_cert``/``tls_key`` present a client
    certificate where the nodes require mTLS. Each falls back to its environment
    variable: TASKANDGO_TOKEN, TASKANDGO_TLS_CA, TASKANDGO_TLS_CERT, TASKANDGO_TLS_KEY."""

    def __init__(self, nodes: str | Iterable[str] = "127.0.0.1:7000", timeout_s: float = 30.0,
                 follow_leader: bool = True, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        import os

        self.token = token if token is not None else os.environ.get("TASKANDGO_TOKEN") or None
        self.tls = (tls_ca or os.environ.get("TASKANDGO_TLS_CA"),
                    tls_cert or os.environ.get("TASKANDGO_TLS_CERT"),
                    tls_key or os.environ.get("TASKANDGO_TLS_KEY"))
        self._metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        if isinstance(nodes, str):
            nodes = [n.strip() for n in nodes.split(",") if n.strip()]
        self.nodes = list(dict.fromkeys(nodes))
        if not self.nodes:
            raise ValueError("Client needs at least one node address")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                and timeout_s > 0):
            raise ValueError(f"timeout_s: expected a finite number of seconds > 0, "
                             f"got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.follow_leader = follow_leader
        self._channels: dict[str, grpc.Channel] = {}
        self._current = 0

    # -------------------------------------------------------------- plumbing

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def _stub(self, node: str) -> pb_grpc.SchedulerStub:
        ch = self._channels.get(node)
        if ch is None:
            ch = self._channels[node] = make_channel(node, *self.tls)
        return pb_grpc.SchedulerStub(ch)

    def _call(self, method: str, request: Any, timeout_s: float | None = None,
              node: str | None = None, attempt_s: float = 5.0) -> Any:
        """Call one node; on UNAVAILABLE/DEADLINE_EXCEEDED try the next. Each try gets
        at most attempt_s, so a hung (stopped) node cannot eat the whole timeout."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        delay = 0.05
        last: grpc.RpcError | None = None
        attempt = 0
        while True:
            target = node or self.nodes[self._current % len(self.nodes)]
            left = deadline - time.monotonic()
            try:
                return getattr(self._stub(target), method)(
                    request, timeout=max(0.2, min(left, attempt_s)), metadata=self._metadata)
            except grpc.RpcError as exc:
                last = exc
                if exc.code() not in RETRYABLE or (node is not None and attempt >= 2):
                    raise TaskAndGoError(exc.code().name, exc.details() or "") from None
            attempt += 1
            if node is None:
                self._current += 1
            if time.monotonic() + delay >= deadline:
                assert last is not None
                raise TaskAndGoError(last.code().name, last.details() or "") from None
            time.sleep(delay)  # backoff between retries, not waiting for an outcome
            delay = min(0.5, delay * 2)

    # -------------------------------------------------------------- API

    def submit(self, data: str | None = None, **kw: Any) -> str:
        """Submit one task; returns its id once committed by a majority."""
        return self.submit_many([task_spec(data, **kw)])[0]["task_id"]

    def submit_many(self, specs: Sequence[TaskSpec | Mapping[str, Any]], batch: int = 1000,
                    in_flight: int = 1) -> list[dict[str, Any]]:
        """Submit many tasks. Each spec is a :class:`TaskSpec` (see :func:`task_spec`)
        or a dict of ``taskandgo.v1.TaskSpec`` fields, sent as it is for the node to
        check (ids are filled in where missing). Returns ``{"task_id", "created",
        "status"}`` per spec, in order.

        Specs go in calls of ``batch`` (one Raft command each, or fewer when the node
        merges calls). ``in_flight`` > 1 keeps that many calls going at once: faster
        for big lists, but then tasks of equal priority from different calls may
        start out of list order. Ids are client-chosen, so a call that fails can be
        retried (or the whole list resubmitted) without duplicates."""
        msgs = [_spec_msg(s) for s in specs]
        parts = [msgs[i:i + max(1, batch)] for i in range(0, len(msgs), max(1, batch))]
        if len(parts) <= 1 or in_flight <= 1:
            return [r for part in parts for r in self._submit_part(part)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(in_flight, len(parts))) as pool:
            return [r for rs in pool.map(self._submit_part, parts) for r in rs]

    def _submit_part(self, specs: list[pb.TaskSpec]) -> list[dict[str, Any]]:
        req = pb.SubmitTasksRequest(tasks=specs)
        return [dict_from_message(r) for r in self._call("SubmitTasks", req).results]

    def get(self, task_id: str) -> dict[str, Any]:
        return dict_from_message(self._call("GetTask", pb.GetTaskRequest(task_id=task_id)).task)

    def list_page(self, status: str = "", labels: list[str] | None = None, limit: int = 100,
                  page_token: str = "") -> dict[str, Any]:
        req = pb.ListTasksRequest(status=status, labels=labels or [], limit=limit,
                                  page_token=page_token)
        return dict_from_message(self._call("ListTasks", req))

    def list_tasks(self, status: str = "", labels: list[str] | None = None,
                   limit: int = 1000) -> list[dict[str, Any]]:
        """Tasks (newest last), following pages up to ``limit``."""
        out: list[dict[str, Any]] = []
        token = ""
        for _ in range(10_000):
            page = self.list_page(status, labels, min(1000, limit - len(out)), token)
            out += page["tasks"]
            token = page["next_page_token"]
            if not token or len(out) >= limit:
                break
        return out

    def task_output_page(self, task_id: str, chunk: int | None = None, stream: str = "stdout",
                         offset: int = 0, limit: int = 0, local: bool = False) -> dict[str, Any]:
        """One page of a unit's kept output (``data`` bytes from ``offset``; ``kept``,
        ``written``, ``complete``, ``node``). NOT_FOUND when it is not kept."""
        req = pb.GetTaskOutputRequest(task_id=task_id, stream=stream, offset=offset,
                                      limit=limit, local=local)
        if chunk is not None:
            req.chunk = chunk
        return dict_from_message(self._call("GetTaskOutput", req))

    def task_output(self, task_id: str, chunk: int | None = None,
                    stream: str = "stdout", max_pages: int = 100_000) -> dict[str, Any]:
        """A unit's whole kept output: the first page's fields with ``data`` all of
        the kept bytes, read page by page (at most ``max_pages``)."""
        first = page = self.task_output_page(task_id, chunk, stream)
        parts = [page["data"]]
        got = len(page["data"])
        for _ in range(max_pages):
            if not page["data"] or got >= page["kept"]:
                break
            page = self.task_output_page(task_id, first["chunk"], stream, got)
            parts.append(page["data"])
            got += len(page["data"])
        return {**first, "data": b"".join(parts), "offset": 0}

    def cancel(self, task_id: str) -> dict[str, Any]:
        return dict_from_message(self._call("CancelTask", pb.CancelTaskRequest(task_id=task_id)))

    def wait_raw(self, task_ids: list[str], timeout_s: float = 30.0) -> dict[str, Any]:
        req = pb.WaitTasksRequest(task_ids=task_ids, timeout_s=min(timeout_s, 600.0))
        return dict_from_message(self._call("WaitTasks", req, timeout_s=timeout_s + 5.0,
                                   attempt_s=timeout_s + 5.0))

    def wait(self, task_ids: str | list[str], timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until the tasks are final; returns them in the order asked.
        Raises TaskAndGoError("DEADLINE_EXCEEDED") if they are not final in time."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        deadline = time.monotonic() + timeout_s
        done: dict[str, dict[str, Any]] = {}
        while True:
            left = deadline - time.monotonic()
            pending = [t for t in ids if t not in done]
            if not pending:
                return [done[t] for t in ids]
            if left <= 0:
                raise TaskAndGoError("DEADLINE_EXCEEDED",
                                     f"{len(pending)} task(s) not final in {timeout_s:g} s")
            for chunk_start in range(0, len(pending), 5000):
                part = pending[chunk_start:chunk_start + 5000]
                try:
                    res = self.wait_raw(part, max(0.5, min(left, 30.0)))
                except TaskAndGoError as exc:
                    # The node serves only so many waits at once (per client address and
                    # in total): a refused wait is tried again within the deadline.
                    if exc.code != "RESOURCE_EXHAUSTED" or deadline - time.monotonic() < 1.0:
                        raise
                    time.sleep(1.0)  # the node's retry hint, not waiting for an outcome
                    break
                for t in res["tasks"]:
                    if t["status"] in ("succeeded", "failed", "cancelled", "upstream_failed"):
                        done[t["id"]] = t

    def watch_raw(self, task_ids: list[str] | None = None, after_seq: int = 0) -> Iterator[Any]:
        """Raw TaskEvent messages from one node (for forwarding)."""
        req = pb.WatchTasksRequest(task_ids=task_ids or [], after_seq=after_seq)
        return self._stub(self.nodes[self._current % len(self.nodes)]).WatchTasks(
            req, metadata=self._metadata)

    def watch(self, task_ids: list[str] | None = None,
              after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """Follow events (task state changes, leader changes, nodes up/down). A stream
        the node refuses (RESOURCE_EXHAUSTED: too many open streams) or that fails
        raises TaskAndGoError with the node's code and message."""
        call: Any = self.watch_raw(task_ids, after_seq)  # a grpc call: also cancel()
        try:
            for ev in call:
                yield dict_from_message(ev)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise TaskAndGoError(code.name, details or "") from None
        finally:
            call.cancel()  # a caller that stops early ends the stream at the node

    def node_status(self, node: str | None = None, include_digest: bool = False) -> dict[str, Any]:
        """Status of one node (the given address, else the first reachable)."""
        return dict_from_message(self._call("GetNodeStatus",
                                   pb.NodeStatusRequest(include_digest=include_digest),
                                   node=node, timeout_s=5.0))

    # -------------------------------------------------------------- schedules

    def create_schedule(self, schedule: Mapping[str, Any] | None = None, *, id: str = "",
                        cron: str = "", time_zone: str = "UTC",
                        task: Mapping[str, Any] | None = None, overlap: str = "allow",
                        missed: str = "latest", catchup_s: float = 0.0) -> dict[str, Any]:
        """Create a periodic schedule (or give ``schedule``, a dict of
        ``taskandgo.v1.Schedule`` fields): ``task`` (a :func:`task_spec` dict without
        an id) is created once per slot of ``cron`` in ``time_zone``. ``overlap``:
        allow, forbid (skip a slot while the previous run goes on) or replace (cancel
        it); ``missed``: latest (after downtime the latest missed slot runs once) or
        skip. Creating an id that exists returns that schedule unchanged."""
        body = dict(schedule) if schedule is not None else {
            "id": id, "cron": cron, "time_zone": time_zone, "task": dict(task or {}),
            "overlap": overlap, "missed": missed, "catchup_s": catchup_s}
        req = pb.CreateScheduleRequest(schedule=message_from_dict(pb.Schedule, body))
        return dict_from_message(self._call("CreateSchedule", req))

    def list_schedules(self) -> list[dict[str, Any]]:
        msg = self._call("ListSchedules", pb.ListSchedulesRequest())
        return [dict_from_message(s) for s in msg.schedules]

    def get_schedule(self, schedule_id: str) -> dict[str, Any]:
        return dict_from_message(self._call("GetSchedule", pb.ScheduleRequest(id=schedule_id)))

    def pause_schedule(self, schedule_id: str) -> dict[str, Any]:
        return dict_from_message(self._call("PauseSchedule",
                                            pb.ScheduleRequest(id=schedule_id)))

    def resume_schedule(self, schedule_id: str) -> dict[str, Any]:
        return dict_from_message(self._call("ResumeSchedule",
                                            pb.ScheduleRequest(id=schedule_id)))

    def delete_schedule(self, schedule_id: str) -> dict[str, Any]:
        """Delete a schedule (the tasks it created stay); returns it as it was."""
        return dict_from_message(self._call("DeleteSchedule",
                                            pb.ScheduleRequest(id=schedule_id)))

    def settings(self, default_strategy: str | None = None) -> dict[str, str]:
        """The cluster-wide settings (one value for every node); with a value given,
        change it first (``default_strategy``: "split" or "batch")."""
        if default_strategy:
            msg = self._call("SetSettings", pb.Settings(default_strategy=default_strategy))
        else:
            msg = self._call("GetSettings", pb.GetSettingsRequest())
        return {"default_strategy": msg.default_strategy}

    def policy(self) -> dict[str, Any]:
        """The usage policy: ``limits`` (concurrency key -> limit), ``held`` (key ->
        units holding it now), ``weights`` (tenant -> weight), ``tenant_label``."""
        return dict_from_message(self._call("GetPolicy", pb.GetPolicyRequest()))

    def set_policy(self, change: Mapping[str, Any] | None = None, *,
                   limits: Mapping[str, int | None] | None = None,
                   weights: Mapping[str, float | None] | None = None,
                   tenant_label: str | None = None) -> dict[str, Any]:
        """Change the usage policy; returns it after. ``limits``: concurrency key ->
        the most units holding it assigned at once (None removes the limit);
        ``weights``: tenant -> fair-share weight (None: back to 1); ``tenant_label``:
        the task label naming a task's tenant ("" turns fair share off). ``change``:
        the same as one dict (the HTTP body's form)."""
        c = dict(change or {})
        limits = dict(c.get("limits") or limits or {})
        weights = dict(c.get("weights") or weights or {})
        if "tenant_label" in c:
            tenant_label = c["tenant_label"] or ""
        try:
            req = self._policy_request(c, limits, weights, tenant_label)
        except (TypeError, ValueError) as exc:
            raise TaskAndGoError("INVALID_ARGUMENT", f"policy: {exc}") from None
        return dict_from_message(self._call("SetPolicy", req))

    @staticmethod
    def _policy_request(c: Mapping[str, Any], limits: Mapping[str, Any],
                        weights: Mapping[str, Any], tenant_label: str | None) -> Any:
        return pb.SetPolicyRequest(
            limits={k: v for k, v in limits.items() if v is not None},
            remove_limits=[k for k, v in limits.items() if v is None]
            + list(c.get("remove_limits") or ()),
            weights={k: v for k, v in weights.items() if v is not None},
            remove_weights=[k for k, v in weights.items() if v is None]
            + list(c.get("remove_weights") or ()),
            tenant_label=tenant_label or "", set_tenant_label=tenant_label is not None)

    def cluster_status(self) -> dict[str, Any]:
        return dict_from_message(self._call("GetClusterStatus", pb.ClusterStatusRequest()))

    def status_all(self) -> list[dict[str, Any]]:
        """Every node's own status: the leader's member list, then each node asked."""
        members = self.cluster_status()["nodes"]
        out = []
        for m in sorted(members, key=lambda m: m["id"]):
            try:
                out.append(self.node_status(m["grpc_address"]))
            except TaskAndGoError as exc:
                out.append({"id": m["id"], "role": "unreachable", "grpc_address": m["grpc_address"],
                            "error": exc.message})
        return out


def _list(self: Client, status: str = "", labels: list[str] | None = None,
          limit: int = 1000) -> list[dict[str, Any]]:
    """Deprecated name of :meth:`Client.list_tasks` (it shadowed the builtin in the
    class); kept for this release."""
    warnings.warn("Client.list is deprecated: use Client.list_tasks", DeprecationWarning,
                  stacklevel=2)
    return self.list_tasks(status, labels, limit)


# Set after the class so the class body (and its annotations) never sees a ``list``.
setattr(Client, "list", _list)  # noqa: B010
