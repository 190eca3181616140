"""HTTP on every node: the seed's ``POST /submit-task``, a JSON REST API with the
reach of the gRPC one, Server-Sent Events, health endpoints, Prometheus metrics,
the OpenAPI document and the dashboard.

Served by the standard library's threading HTTP server (one thread per
connection). Contract, which ``static/openapi.json`` documents route by route:

* every error is JSON ``{"error": str, "code": int, "field"?: str}``: 400 names the
  field that was wrong, 401 (no or a wrong bearer token or stream ticket), 404 (no
  such task or endpoint), 405 (with ``Allow``), 408 (request not sent within
  ``--http-request-timeout``), 411 (chunked bodies), 413 (body over
  :data:`MAX_BODY`), 429 (rate limit, full queue, too many open event streams or
  waits; with ``Retry-After``), 502/503 (no leader reachable);
* with API tokens configured, every route but the static pages (and health and
  metrics while read-only endpoints are open) needs ``Authorization: Bearer``.
  Browsers' EventSource cannot set headers, so the event stream also takes a
  stream ticket, ``?ticket=``, which ``POST /api/v1/events/ticket`` (bearer token)
  hands out: good for 30 s and one stream, bound to that token (see
  :class:`taskandgo.node.streams.StreamTickets`). ``?access_token=`` (the token in
  the URL) still works for this release, with a warning logged once per client.
  The per-client rate limit applies to the API routes. TLS (and mTLS) come from the
  same files as gRPC's;
* a request's line, headers and body must arrive within ``--http-request-timeout``
  (10 s) of the server waiting for it: a client trickling bytes cannot hold a
  thread (408, connection closed; an idle keep-alive connection is just closed);
* open event streams and waits are bounded per client address and in total
  (``--max-streams*``, ``--max-waits*``; 429 beyond);
* a request whose ``Host`` is not one of this node's names is refused (421) before
  anything else, so a page whose name an attacker re-points at this node (DNS
  rebinding) reaches nothing; a state-changing request from another origin is
  refused (403), and a browser's JSON write must say ``application/json`` (415):
  see :class:`HostPolicy` and :meth:`Handler._check_write`;
* every response carries :data:`SECURITY_HEADERS` (a Content-Security-Policy that
  admits only this node's own script and style, no framing, no sniffing, no referrer);
* a request body is always consumed (or the connection closed) before the next
  request is read, so a keep-alive connection never misparses a leftover body;
* no request can take the node down; anything unexpected is logged and answered 500.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from taskandgo.node.app import NodeApp, NotFound
from taskandgo.node.http_guard import (
    HostPolicy,
    _float,
    _int,
    _NoRoute,
    tls_context,
)
from taskandgo.node.http_requests import (
    MAX_LARGE_BODIES,
    MAX_WARNED_CLIENTS,
    REQUEST_TIMEOUT_S,
    RequestHandler,
    _Warned,
)
from taskandgo.node.http_requests import ROUTES as ROUTES  # re-exported (test_http)
from taskandgo.node.security import RateLimiter, client_ip
from taskandgo.node.streams import (
    DEFAULT_PER_CLIENT,
    DEFAULT_TOTAL,
    StreamLimiter,
    StreamTickets,
    wait_limiter,
)
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.vocabulary import (
    TaskSpec,
    request_from_json,
)

log = logging.getLogger("taskandgo.http")

STATIC = Path(__file__).resolve().parent / "static"
#: Every node of ``GET /api/v1/cluster`` carries exactly these keys, whether the
#: answer came from this node (the leader) or was forwarded to the leader over gRPC.
CLUSTER_NODE_DEFAULTS: dict[str, Any] = {
    "id": "", "role": "unreachable", "voter": False, "grpc_address": "", "http_address": "",
    "raft_address": "", "slots": 0, "free_slots": 0, "running": [], "cpu_percent": 0.0,
    "memory_percent": 0.0, "memory_rss": 0, "ready": False, "last_seen_s": 0.0,
    "offer": {}, "node_labels": {},
}


class Handler(RequestHandler):
    """The HTTP API's routes (ROUTES names each one's ``h_<name>`` method)."""

    def h_submit_task(self, params: dict[str, str], q: dict[str, str],
                      query: dict[str, list[str]]) -> None:
        self._submit_one(self._body())

    def _submit_one(self, body: Any) -> None:
        out = self.app.submit([TaskSpec.from_json(body, self.app.default_strategy())])[0]
        self._send(201 if out["created"] else 200, out)

    def h_create_tasks(self, params: dict[str, str], q: dict[str, str],
                       query: dict[str, list[str]]) -> None:
        body = self._body()
        if not (isinstance(body, dict) and "tasks" in body):
            self._submit_one(body)
            return
        if set(body) != {"tasks"}:
            raise InvalidTask(min(set(body) - {"tasks"}), "unknown field next to tasks")
        if not isinstance(body["tasks"], list) or not body["tasks"]:
            raise InvalidTask("tasks", "expected a non-empty list")
        # Every body's JSON form first, then every spec's fields, each error naming
        # tasks[i] (the node's default strategy where a task names none).
        raws = [request_from_json(b, f"tasks[{i}].") for i, b in enumerate(body["tasks"])]
        default = self.app.default_strategy()
        specs = [TaskSpec.check(r, default, f"tasks[{i}].")
                 for i, r in enumerate(raws)]
        try:
            results = self.app.submit(specs)
        except InvalidTask as exc:
            # The node's call policy names tasks[i] only when there are several; always
            # name it here.
            if exc.field.startswith("tasks["):
                raise
            raise InvalidTask(f"tasks[0].{exc.field}", exc.message) from None
        self._send(201 if any(r["created"] for r in results) else 200, {"results": results})

    def h_list_tasks(self, params: dict[str, str], q: dict[str, str],
                     query: dict[str, list[str]]) -> None:
        limit = _int(q.get("limit", "100"), "limit")
        labels = query.get("label", [])
        for item in labels:
            if "=" not in item:
                raise InvalidTask("label", f"{item!r}: expected key=value")
        self._send(200, self.app.list_tasks(q.get("status", ""), labels, limit,
                                            q.get("page_token", "")))

    def h_get_task(self, params: dict[str, str], q: dict[str, str],
                   query: dict[str, list[str]]) -> None:
        self._send(200, self.app.get(_task_id(params)))

    def h_cancel_task(self, params: dict[str, str], q: dict[str, str],
                      query: dict[str, list[str]]) -> None:
        self._send(200, self.app.cancel(_task_id(params)))

    def h_task_output(self, params: dict[str, str], q: dict[str, str],
                      query: dict[str, list[str]]) -> None:
        """A page of a unit's full output (node/outputs.py), its bytes as text."""
        from taskandgo.node.outputs import fetch_output

        chunk = _int(q["chunk"], "chunk") if q.get("chunk", "") != "" else None
        page = fetch_output(self.app, _task_id(params), chunk, q.get("stream") or "stdout",
                            _int(q.get("offset", "0"), "offset"),
                            _int(q.get("limit", "0"), "limit"))
        page["data"] = page["data"].decode("utf-8", "replace")
        self._send(200, page)

    def h_wait(self, params: dict[str, str], q: dict[str, str],
               query: dict[str, list[str]]) -> None:
        ids = [i for v in query.get("id", []) for i in v.split(",") if i]
        if not ids:
            raise InvalidTask("id", "at least one task id")
        timeout = _float(q.get("timeout_s", "30"), "timeout_s")
        if not 0 < timeout <= 600:
            raise InvalidTask("timeout_s", "expected 0..600 seconds")
        # A wait holds this connection's thread for up to 600 s: bounded per client
        # address and in total (--max-waits-per-client, --max-waits), 429 beyond.
        with self.waits.hold(client_ip(str(self.client_address[0]))):
            result = self.app.wait(ids, timeout)
        self._send(200, result)

    # ---- schedules (node/schedules.py)

    def h_create_schedule(self, params: dict[str, str], q: dict[str, str],
                          query: dict[str, list[str]]) -> None:
        from taskandgo.node.schedules import check_schedule

        op = check_schedule(self._body(), self.app.default_strategy())
        self._send(201, self.app.schedules.create(op))

    def h_list_schedules(self, params: dict[str, str], q: dict[str, str],
                         query: dict[str, list[str]]) -> None:
        self._send(200, {"schedules": self.app.schedules.list_all()})

    def h_get_schedule(self, params: dict[str, str], q: dict[str, str],
                       query: dict[str, list[str]]) -> None:
        self._send(200, self.app.schedules.get(_schedule_id(params)))

    def h_pause_schedule(self, params: dict[str, str], q: dict[str, str],
                         query: dict[str, list[str]]) -> None:
        self._send(200, self.app.schedules.change(_schedule_id(params), "pause"))

    def h_resume_schedule(self, params: dict[str, str], q: dict[str, str],
                          query: dict[str, list[str]]) -> None:
        self._send(200, self.app.schedules.change(_schedule_id(params), "resume"))

    def h_delete_schedule(self, params: dict[str, str], q: dict[str, str],
                          query: dict[str, list[str]]) -> None:
        self._send(200, self.app.schedules.change(_schedule_id(params), "delete"))

    # ---- usage policy (node/policies.py)

    def h_policy(self, params: dict[str, str], q: dict[str, str],
                 query: dict[str, list[str]]) -> None:
        self._send(200, self.app.policies.get())

    def h_set_policy(self, params: dict[str, str], q: dict[str, str],
                     query: dict[str, list[str]]) -> None:
        self._send(200, self.app.policies.change(self._body()))

    def h_events_ticket(self, params: dict[str, str], q: dict[str, str],
                        query: dict[str, list[str]]) -> None:
        """A stream ticket for ``GET /api/v1/events?ticket=`` (see StreamTickets),
        for the bearer token this request carried."""
        ticket, ttl_s = self.tickets.issue(self._token)
        self._send(200, {"ticket": ticket, "expires_in_s": ttl_s, "uses": 1})

    def h_node(self, params: dict[str, str], q: dict[str, str],
               query: dict[str, list[str]]) -> None:
        self._send(200, self.app.node_status())

    def h_cluster(self, params: dict[str, str], q: dict[str, str],
                  query: dict[str, list[str]]) -> None:
        self._send(200, cluster_view(self.app.cluster_status()))

    def h_history(self, params: dict[str, str], q: dict[str, str],
                  query: dict[str, list[str]]) -> None:
        """The last ``window_s`` seconds of per-second samples and unit runs
        (node/history.py): a voter's own, a non-voter's fetched from the leader."""
        from taskandgo.node.history import MAX_SPANS, WINDOW_S, fetch_from_voter

        window = _int(q.get("window_s", "300"), "window_s")
        if not 1 <= window <= WINDOW_S:
            raise InvalidTask("window_s", f"expected 1..{WINDOW_S} seconds")
        spans = _int(q.get("spans", "1000"), "spans")
        if not 0 <= spans <= MAX_SPANS:
            raise InvalidTask("spans", f"expected 0..{MAX_SPANS}")
        if self.app.voter is not None:
            self._send(200, self.app.history.snapshot(window, spans))
        else:
            self._send(200, fetch_from_voter(self.app, window, spans,
                                             self.headers.get("Authorization")))

    def h_healthz(self, params: dict[str, str], q: dict[str, str],
                  query: dict[str, list[str]]) -> None:
        self._send(200, {"status": "ok", "node": self.app.node_id})

    def h_readyz(self, params: dict[str, str], q: dict[str, str],
                 query: dict[str, list[str]]) -> None:
        st = self.app.node_status()
        self._send(200 if st["ready"] else 503,
                   {"ready": st["ready"], "role": st["role"], "leader_id": st["leader_id"]})

    def h_metrics(self, params: dict[str, str], q: dict[str, str],
                  query: dict[str, list[str]]) -> None:
        from taskandgo.node.metrics import render

        body, ctype = render(self.app)
        self._send(200, body, ctype)

    def h_dashboard(self, params: dict[str, str], q: dict[str, str],
                    query: dict[str, list[str]]) -> None:
        self._static("dashboard.html", "text/html; charset=utf-8")

    def h_dashboard_js(self, params: dict[str, str], q: dict[str, str],
                       query: dict[str, list[str]]) -> None:
        self._static("dashboard.js", "text/javascript; charset=utf-8")

    def h_dashboard_css(self, params: dict[str, str], q: dict[str, str],
                        query: dict[str, list[str]]) -> None:
        self._static("dashboard.css", "text/css; charset=utf-8")

    def h_openapi(self, params: dict[str, str], q: dict[str, str],
                  query: dict[str, list[str]]) -> None:
        self._static("openapi.json", "application/json")

    def _static(self, name: str, ctype: str) -> None:
        path = STATIC / name
        if not path.is_file():
            raise _NoRoute()
        self._send(200, path.read_bytes(), ctype)


def cluster_view(status: dict[str, Any]) -> dict[str, Any]:
    """The cluster status in one shape: every node with every documented key."""
    nodes = [{k: n.get(k, v) for k, v in CLUSTER_NODE_DEFAULTS.items()}
             for n in status.get("nodes", [])]
    return {"leader_id": status.get("leader_id", ""), "nodes": nodes,
            "tasks_by_status": status.get("tasks_by_status", {}),
            "dropped_results": status.get("dropped_results", 0),
            "committed_results": status.get("committed_results", 0)}


def _task_id(params: dict[str, str]) -> str:
    tid = params.get("id", "")
    if not tid:
        raise NotFound("task '' not found")
    return tid


def _schedule_id(params: dict[str, str]) -> str:
    sid = params.get("id", "")
    if not sid:
        raise NotFound("schedule '' not found")
    return sid


class Server(ThreadingHTTPServer):
    daemon_threads = True
    #: Listen backlog. The standard library's 5 made a burst of 17 connections
    #: (while the accept thread waited for the GIL) overflow the accept queue: the
    #: client saw its connection reset after sending.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that fails the TLS handshake or vanishes mid-request: one log
        # line, not a traceback on stderr.
        log.debug("HTTP connection from %s failed: %r", client_address, sys.exc_info()[1])


def create_http_server(app: NodeApp, host: str, port: int) -> tuple[ThreadingHTTPServer, int]:
    """Bind the HTTP server (port 0 picks a free one); returns it and its port.
    Serves HTTPS when the node has a TLS certificate.

    Called on the main thread, it also ignores SIGPIPE (Python's own default, which
    the CLI resets for ``taskandgo tasks | head``): a client that goes away while
    its response is written must be a BrokenPipeError in one handler thread, not a
    signal that kills the node (a closed dashboard tab did exactly that)."""
    if hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    handler = type("BoundHandler", (Handler,), {
        "app": app, "limiter": RateLimiter(getattr(app.cfg, "rate_limit", 0.0)),
        "streams": StreamLimiter(getattr(app.cfg, "max_streams_per_client", DEFAULT_PER_CLIENT),
                                 getattr(app.cfg, "max_streams", DEFAULT_TOTAL), "event streams"),
        "waits": wait_limiter(app, "http"),
        "tickets": StreamTickets(getattr(getattr(app.cfg, "auth", None), "tokens", ())),
        "request_timeout_s": float(getattr(app.cfg, "http_request_timeout_s",
                                           REQUEST_TIMEOUT_S)),
        "warned": _Warned(MAX_WARNED_CLIENTS),
        "large_bodies": threading.BoundedSemaphore(MAX_LARGE_BODIES),
        "hosts": HostPolicy.for_node(app.cfg, host)})
    server = Server((host, port), handler)
    ctx = tls_context(app.cfg)
    if ctx is not None:
        server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    return server, server.server_address[1]


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="http", daemon=True)
    t.start()
    return t
