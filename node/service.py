"""gRPC layer: the public ``taskandgo.v1.Scheduler`` and the peer ``Peer`` services,
standard health checking and reflection. The only node module (with the client and
the vocabulary's codecs) that imports generated protobuf code.

Errors map through the one table both servers use
(:func:`taskandgo.node.vocabulary.api_error`): InvalidTask -> INVALID_ARGUMENT
(message names the field), NotFound -> NOT_FOUND, Unavailable -> UNAVAILABLE, ...;
anything unexpected is logged and answered INTERNAL, never allowed to take the node
down.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from taskandgo.node.app import NodeApp
from taskandgo.node.security import (
    PeerIdentity,
    RateLimited,
    RateLimiter,
    TokenAuth,
    Unauthenticated,
    client_ip,
)
from taskandgo.node.streams import (
    DEFAULT_PER_CLIENT,
    DEFAULT_TOTAL,
    STREAM_ACCEPTED,
    StreamLimiter,
    TooManyStreams,
    upstream_refused,
    wait_limiter,
)
from taskandgo.node.submitting import FORWARDED, FORWARDED_HEADER
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.vocabulary import (
    TaskSpec,
    api_error,
    check_bearer,
    check_many,
    message_from_dict,
    request_from_proto,
    token_required,
)
from taskandgo.protos import peer_pb2, peer_pb2_grpc, taskandgo_pb2, taskandgo_pb2_grpc

log = logging.getLogger("taskandgo.grpc")

MAX_MESSAGE = 16 * 1024 * 1024
#: Health service name that is SERVING only while the node is part of a cluster
#: with a leader (readiness); "" is SERVING while the process is up (liveness).
READINESS_SERVICE = "taskandgo.v1.Scheduler"

def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A unary method whose exceptions are answered through the one error table
    (:func:`api_error`; retry hint as trailing ``retry-after-ms``)."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:
            if type(exc).__name__ == "_AbortError":  # context.abort() inside fn
                raise
            if api_error(exc) is None:
                log.exception("%s failed", fn.__name__)
            _abort(context, exc)
    return wrapper


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """End the call with the answer for ``exc`` (:func:`api_error`; INTERNAL for an
    unexpected one). Raises, as ``context.abort`` does."""
    err = api_error(exc)
    if err is None:
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return
    trailers = err.grpc_trailers()
    if trailers:
        context.set_trailing_metadata(trailers)
    context.abort(err.grpc_code, err.message)


class SchedulerService(taskandgo_pb2_grpc.SchedulerServicer):
    def __init__(self, app: NodeApp) -> None:
        self.app = app

    @_errors
    def SubmitTask(self, request: Any, context: Any) -> Any:
        spec = TaskSpec.from_proto(request.task, self.app.default_strategy())
        out = self.app.submit([spec], timeout_s=_left(context))
        return message_from_dict(taskandgo_pb2.SubmitTaskResponse, out[0])

    @_errors
    def SubmitTasks(self, request: Any, context: Any) -> Any:
        if not request.tasks:
            raise InvalidTask("tasks", "at least one task")
        specs = check_many([request_from_proto(t) for t in request.tasks],
                           self.app.default_strategy())
        # A submit another voter forwarded to this one is proposed here, never
        # forwarded again (see Submitter._forwardable).
        forwarded = any(k == FORWARDED_HEADER for k, _v in context.invocation_metadata())
        mark = FORWARDED.set(True) if forwarded else None
        try:
            out = self.app.submit(specs, timeout_s=_left(context))
        finally:
            if mark is not None:
                FORWARDED.reset(mark)
        return taskandgo_pb2.SubmitTasksResponse(
            results=[message_from_dict(taskandgo_pb2.SubmitTaskResponse, r) for r in out])

    @_errors
    def GetTask(self, request: Any, context: Any) -> Any:
        if not request.task_id:
            raise InvalidTask("task_id", "required")
        return taskandgo_pb2.GetTaskResponse(
            task=message_from_dict(taskandgo_pb2.Task, self.app.get(request.task_id)))

    @_errors
    def ListTasks(self, request: Any, context: Any) -> Any:
        out = self.app.list_tasks(request.status, list(request.labels), request.limit,
                                  request.page_token)
        return message_from_dict(taskandgo_pb2.ListTasksResponse, out)

    @_errors
    def CancelTask(self, request: Any, context: Any) -> Any:
        if not request.task_id:
            raise InvalidTask("task_id", "required")
        return message_from_dict(taskandgo_pb2.CancelTaskResponse,
                                 self.app.cancel(request.task_id))

    @_errors
    def WaitTasks(self, request: Any, context: Any) -> Any:
        if not request.task_ids:
            raise InvalidTask("task_ids", "at least one id")
        timeout = request.timeout_s or 30.0
        if not 0 < timeout <= 600:
            raise InvalidTask("timeout_s", "expected 0..600 seconds")
        timeout = min(timeout, _left(context) - 0.2)
        # A wait holds a unary thread for up to 600 s: bounded per client address and
        # in total (--max-waits-per-client, --max-waits), so waits alone can never
        # take the threads other calls and the peers need. RESOURCE_EXHAUSTED beyond.
        # (TooManyStreams: _errors answers RESOURCE_EXHAUSTED with retry-after-ms.)
        with wait_limiter(self.app, "grpc").hold(client_ip(context.peer())):
            return message_from_dict(taskandgo_pb2.WaitTasksResponse,
                                     self.app.wait(list(request.task_ids), timeout))

    def WatchTasks(self, request: Any, context: Any) -> Iterator[Any]:
        """Stream task events. Sends :data:`STREAM_ACCEPTED` as initial metadata once
        open; create_server bounds how many are open (RESOURCE_EXHAUSTED beyond)."""
        if self.app.replicated is None:
            try:
                with self.app.forward_client() as c:
                    upstream = c.watch_raw(list(request.task_ids), request.after_seq)
                    # A client that goes away ends the voter's stream at once, not
                    # at the next event: it holds a place there.
                    context.add_callback(upstream.cancel)
                    try:
                        refused = upstream_refused(upstream)
                        if refused is not None:
                            # The voter's own answer (RESOURCE_EXHAUSTED, UNAUTHENTICATED...).
                            context.abort(refused[0], refused[1])
                        context.send_initial_metadata((STREAM_ACCEPTED,))
                        for ev in upstream:
                            if not context.is_active():
                                return
                            yield ev
                    finally:
                        upstream.cancel()
            except grpc.RpcError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc.details()))
            return
        context.send_initial_metadata((STREAM_ACCEPTED,))
        ids = set(request.task_ids)
        seq = request.after_seq if request.after_seq > 0 else self.app.bus.seq
        while context.is_active():
            for e in self.app.events(seq, 1.0):
                seq = e["seq"]
                if ids and e["task_id"] not in ids:
                    continue
                yield message_from_dict(taskandgo_pb2.TaskEvent, e)

    @_errors
    def GetNodeStatus(self, request: Any, context: Any) -> Any:
        return message_from_dict(taskandgo_pb2.NodeStatus,
                                 self.app.node_status(request.include_digest))

    @_errors
    def GetSettings(self, request: Any, context: Any) -> Any:
        return taskandgo_pb2.Settings(**self.app.settings())

    @_errors
    def SetSettings(self, request: Any, context: Any) -> Any:
        values = {"default_strategy": request.default_strategy} if request.default_strategy \
            else {}
        return taskandgo_pb2.Settings(**self.app.set_settings(values))

    @_errors
    def GetPolicy(self, request: Any, context: Any) -> Any:
        return message_from_dict(taskandgo_pb2.Policy, self.app.policies.get())

    @_errors
    def SetPolicy(self, request: Any, context: Any) -> Any:
        change: dict[str, Any] = {
            "limits": dict(request.limits), "remove_limits": list(request.remove_limits),
            "weights": dict(request.weights), "remove_weights": list(request.remove_weights)}
        if request.set_tenant_label:
            change["tenant_label"] = request.tenant_label
        return message_from_dict(taskandgo_pb2.Policy, self.app.policies.change(change))

    @_errors
    def CreateSchedule(self, request: Any, context: Any) -> Any:
        from taskandgo.node.schedules import check_schedule, schedule_from_proto

        op = check_schedule(schedule_from_proto(request.schedule), self.app.default_strategy(),
                            task_from="mapping")
        return message_from_dict(taskandgo_pb2.Schedule, self.app.schedules.create(op))

    @_errors
    def ListSchedules(self, request: Any, context: Any) -> Any:
        return message_from_dict(taskandgo_pb2.ListSchedulesResponse,
                                 {"schedules": self.app.schedules.list_all()})

    @_errors
    def GetSchedule(self, request: Any, context: Any) -> Any:
        return message_from_dict(taskandgo_pb2.Schedule,
                                 self.app.schedules.get(_schedule_id(request)))

    @_errors
    def PauseSchedule(self, request: Any, context: Any) -> Any:
        return message_from_dict(taskandgo_pb2.Schedule,
                                 self.app.schedules.change(_schedule_id(request), "pause"))

    @_errors
    def ResumeSchedule(self, request: Any, context: Any) -> Any:
        return message_from_dict(taskandgo_pb2.Schedule,
                                 self.app.schedules.change(_schedule_id(request), "resume"))

    @_errors
    def DeleteSchedule(self, request: Any, context: Any) -> Any:
        return message_from_dict(taskandgo_pb2.Schedule,
                                 self.app.schedules.change(_schedule_id(request), "delete"))

    @_errors
    def GetTaskOutput(self, request: Any, context: Any) -> Any:
        from taskandgo.node.outputs import fetch_output

        page = fetch_output(self.app, request.task_id,
                            request.chunk if request.HasField("chunk") else None,
                            request.stream or "stdout", request.offset, request.limit,
                            local=request.local)
        return taskandgo_pb2.GetTaskOutputResponse(**page)

    @_errors
    def GetClusterStatus(self, request: Any, context: Any) -> Any:
        if self.app.replicated is None:
            with self.app.forward_client() as c:
                return message_from_dict(taskandgo_pb2.ClusterStatusResponse,
                                         c.cluster_status())
        return message_from_dict(taskandgo_pb2.ClusterStatusResponse, self.app.cluster_status())


#: Rate-limit cost of a peer call: a Hold makes the leader wait for dispatches and
#: call every worker, so it costs as much as many ordinary calls.
PEER_CALL_COST = {"Hold": 20.0}


def _peer_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A Peer method: admitted only with the peer credential (see PeerService.admit);
    the method gets the caller's identity as a third argument."""
    cost = PEER_CALL_COST.get(fn.__name__, 1.0)

    @functools.wraps(fn)
    def wrapper(self: PeerService, request: Any, context: grpc.ServicerContext) -> Any:
        return fn(self, request, context, self.admit(context, cost))
    return _errors(wrapper)


class PeerService(peer_pb2_grpc.PeerServicer):
    """The peer API. Every method is a :func:`_peer_call`: API tokens do not
    authorise it (the GuardInterceptor lets peer calls through to this check)."""

    def __init__(self, app: NodeApp) -> None:
        self.app = app
        rate = app.cfg.peer_rate_limit
        self.limiter = RateLimiter(rate, 2 * rate)

    def admit(self, context: grpc.ServicerContext, cost: float = 1.0) -> PeerIdentity:
        """The caller's identity if it may use the peer API: the peer credential
        (and, with --peer-cert-names, a node's client certificate), within its rate.
        Raises Unauthenticated, PermissionDenied (a client's API token or
        certificate) or RateLimited."""
        # Values are str but for binary ("-bin") keys, none of which is read here.
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        auth = self.app.peer_auth
        token = TokenAuth.parse_header(md.get("authorization"))
        api_token = False
        if token and self.app.cfg.auth.enabled:
            try:
                self.app.cfg.auth.check(token)
                api_token = True
            except Unauthenticated:
                pass
        peer = auth.check(md, has_api_token=api_token)
        if auth.cert_names:
            # The stubs say Mapping[str, bytes]; gRPC gives a list of bytes per property.
            ac: Mapping[str, list[bytes]] = context.auth_context() or {}  # type: ignore[assignment]
            names = [v.decode(errors="replace") for k in ("x509_subject_alternative_name",
                                                          "x509_common_name")
                     for v in ac.get(k, [])]
            auth.check_certificate(names)
        # Per peer once the credential vouches for the name; per address in open mode.
        self.limiter.take(peer.node_id if auth.enabled else client_ip(context.peer()), cost)
        return peer

    @_peer_call
    def Dispatch(self, request: Any, context: Any, peer: PeerIdentity) -> Any:
        accepted, refused = self.app.handle_dispatch(request, peer)
        return peer_pb2.DispatchResponse(accepted=accepted, refused=refused)

    @_peer_call
    def ReportResults(self, request: Any, context: Any, peer: PeerIdentity) -> Any:
        # Field by field: json_format per message costs more than the rest of the call.
        results = [{"task_id": r.task_id, "chunk": r.chunk, "attempt": r.attempt,
                    "token": r.token, "ok": r.ok, "exit_code": r.exit_code, "result": r.result,
                    "error": r.error, "node": r.node, "started_at": r.started_at,
                    "finished_at": r.finished_at, "requeue": r.requeue, "held": r.held,
                    "stderr": r.stderr, "truncated": r.truncated,
                    "output_bytes": r.output_bytes}
                   for r in request.results]
        ok, refused = self.app.accept_peer_results(results, peer)
        return peer_pb2.ReportResultsResponse(accepted=ok, refused=refused,
                                              leader_grpc=self.app.leader_grpc() or "")

    @_peer_call
    def Heartbeat(self, request: Any, context: Any, peer: PeerIdentity) -> Any:
        return self.app.handle_heartbeat(request, peer)

    @_peer_call
    def Hold(self, request: Any, context: Any, peer: PeerIdentity) -> Any:
        return self.app.handle_hold(request, peer)

    @_peer_call
    def Kill(self, request: Any, context: Any, peer: PeerIdentity) -> Any:
        keys = [(u.task_id, u.chunk, u.attempt, u.token) for u in request.units]
        return peer_pb2.KillResponse(killed=self.app.handle_kill(keys, peer))


READ_ONLY_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                      "/grpc.reflection.v1.ServerReflection/")
PUBLIC_PREFIX = "/taskandgo.v1.Scheduler/"
PEER_PREFIX = "/taskandgo.peer.v1.Peer/"


class GuardInterceptor(grpc.ServerInterceptor):
    """Bearer-token check on every method (health and reflection exempt while
    read-only endpoints are open) and a per-client rate limit on the public API.
    Peer methods are not checked here: API tokens do not authorise them; each
    checks the peer credential itself (PeerService.admit)."""

    def __init__(self, auth: TokenAuth, limiter: RateLimiter) -> None:
        self.auth = auth
        self.limiter = limiter

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = details.method or ""
        if method.startswith(PEER_PREFIX):
            return continuation(details)
        read_only = method.startswith(READ_ONLY_PREFIXES)
        if token_required(self.auth, read_only):
            md = dict(details.invocation_metadata or ())
            try:
                check_bearer(self.auth, TokenAuth.parse_header(md.get("authorization")),
                             read_only)
            except Unauthenticated as exc:
                return _deny(continuation(details), grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if self.limiter.rate > 0 and method.startswith(PUBLIC_PREFIX):
            handler = continuation(details)
            return _rate_limited(handler, self.limiter)
        return continuation(details)


def _deny(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler is None:
        return None
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        abort, handler.request_deserializer, handler.response_serializer)


def _rate_limited(handler: Any, limiter: RateLimiter) -> Any:
    if handler is None:
        return None

    def check(context: grpc.ServicerContext) -> None:
        try:
            limiter.take(client_ip(context.peer()))
        except RateLimited as exc:
            _abort(context, exc)

    if handler.unary_stream:
        inner = handler.unary_stream

        def stream(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            yield from inner(request, context)

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer)
    inner_unary = handler.unary_unary

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        check(context)
        return inner_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary, handler.request_deserializer, handler.response_serializer)


def server_credentials(cfg: Any) -> grpc.ServerCredentials | None:
    if not cfg.tls:
        return None

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    # cfg.tls: both the key and the certificate are set.
    return grpc.ssl_server_credentials(
        [(read(cfg.tls_key), read(cfg.tls_cert))],
        root_certificates=read(cfg.tls_ca) if cfg.tls_ca else None,
        require_client_auth=bool(cfg.tls_client_auth))


def _left(context: grpc.ServicerContext, default: float = 30.0) -> float:
    left = context.time_remaining()
    return default if left is None else max(0.1, min(left, 600.0))


class StreamInterceptor(grpc.ServerInterceptor):
    """Runs every blocking streaming method (WatchTasks, reflection; not the
    non-blocking health Watch) on its own thread pool, under a per-client and
    total bound: open streams can never hold the threads unary and peer calls run
    on, and a stream beyond a bound is refused at once with RESOURCE_EXHAUSTED
    (trailing ``retry-after-ms``).

    Placed first among the interceptors, so it wraps whatever handler the others
    return (a token check that denies still answers from the stream pool)."""

    def __init__(self, limiter: StreamLimiter, pool: futures.ThreadPoolExecutor) -> None:
        self.limiter = limiter
        self.pool = pool

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not handler.response_streaming:
            return handler
        if handler.request_streaming:
            inner, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        else:
            inner, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        if getattr(inner, "experimental_non_blocking", False):
            return handler  # answers through callbacks: holds no thread while open
        limiter = self.limiter

        def bounded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with contextlib.ExitStack() as slot:
                try:
                    slot.enter_context(limiter.hold(client_ip(context.peer())))
                except TooManyStreams as exc:
                    _abort(context, exc)
                yield from inner(request, context)

        bounded.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
        return make(bounded, handler.request_deserializer, handler.response_serializer)


def create_server(app: NodeApp, address: str, max_workers: int | None = None,
                  max_streams: int | None = None,
                  max_streams_per_client: int | None = None) -> tuple[grpc.Server, int]:
    """Build the node's gRPC server bound to address; returns it and the bound port.

    Two thread pools: ``max_workers`` threads (default ``cfg.grpc_threads``) for
    unary and peer calls, and one for streams, which serves at most ``max_streams``
    open streams (``max_streams_per_client`` per client address; defaults from the
    config) plus a few threads that refuse the ones beyond. Measured with
    bench/streams.py: with one shared pool, 40 open streams made every unary call
    time out."""
    cfg = app.cfg
    workers: int = max_workers or int(getattr(cfg, "grpc_threads", 32))
    total: int = max_streams or int(getattr(cfg, "max_streams", DEFAULT_TOTAL))
    per_client: int = max_streams_per_client or int(getattr(cfg, "max_streams_per_client",
                                                            DEFAULT_PER_CLIENT))
    # Spare threads beyond the bound answer refusals at once, however many streams
    # are open; refused attempts hold one only for the refusal.
    stream_pool = futures.ThreadPoolExecutor(max_workers=total + max(4, total // 4),
                                             thread_name_prefix="grpc-stream")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.max_send_message_length", MAX_MESSAGE),
                 ("grpc.so_reuseport", 0)],
        # Calls queued or running at once, both pools: beyond it gRPC itself answers
        # RESOURCE_EXHAUSTED. Room for a burst of refused stream attempts on top of
        # a full unary queue.
        maximum_concurrent_rpcs=(workers + total) * 8 + 1024,
        interceptors=[StreamInterceptor(StreamLimiter(per_client, total, "streams"),
                                        stream_pool),
                      GuardInterceptor(app.cfg.auth, RateLimiter(app.cfg.rate_limit))],
    )
    taskandgo_pb2_grpc.add_SchedulerServicer_to_server(SchedulerService(app), server)
    peer_pb2_grpc.add_PeerServicer_to_server(PeerService(app), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        taskandgo_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
        peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    creds = server_credentials(app.cfg)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    def track_readiness() -> None:
        last = None
        while not app._stop.wait(0.5):
            try:
                ready = bool(app.node_status()["ready"])
            except Exception:  # noqa: BLE001
                ready = False
            if ready != last:
                health_servicer.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.SERVING
                                    if ready else health_pb2.HealthCheckResponse.NOT_SERVING)
                last = ready

    threading.Thread(target=track_readiness, name="readiness", daemon=True).start()
    return server, port


def _schedule_id(request: Any) -> str:
    if not request.id:
        raise InvalidTask("id", "required")
    return str(request.id)
