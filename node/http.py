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

import contextlib
import io
import json
import logging
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from taskandgo.node.app import NodeApp, NotFound
from taskandgo.node.http_events import EventStream
from taskandgo.node.http_guard import (
    HostPolicy,
    _BadMethod,
    _DeadlineReader,
    _float,
    _int,
    _LengthRequired,
    _NoRoute,
    _Refused,
    _RequestTimeout,
    _TooLarge,
    tls_context,
)
from taskandgo.node.security import RateLimiter, TokenAuth, Unauthenticated, client_ip
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
    api_error,
    check_bearer,
    depth_ok,
    request_from_json,
    token_required,
)

log = logging.getLogger("taskandgo.http")

MAX_BODY = 2 * 1024 * 1024
#: Bodies above this size are read and parsed at most MAX_LARGE_BODIES at a time per
#: node: parsed JSON takes up to ~35 times its size (a 2 MiB body of small objects
#: became ~70 MB), and 16 such requests at once took a node from 55 MB to 1.1 GB.
LARGE_BODY = 256 * 1024
MAX_LARGE_BODIES = 4
#: JSON nested deeper than this is refused (400) before it reaches the state machine.
MAX_DEPTH = 64
MAX_ERROR_CHARS = 500
#: Default seconds a client has to send a request's line, headers and body
#: (``--http-request-timeout``); 408 and the connection closed after it.
REQUEST_TIMEOUT_S = 10.0
#: Client addresses remembered as already warned that ``?access_token=`` is
#: deprecated (one log line per client, not one per reconnect).
MAX_WARNED_CLIENTS = 1024
STATIC = Path(__file__).resolve().parent / "static"
#: Every node of ``GET /api/v1/cluster`` carries exactly these keys, whether the
#: answer came from this node (the leader) or was forwarded to the leader over gRPC.
CLUSTER_NODE_DEFAULTS: dict[str, Any] = {
    "id": "", "role": "unreachable", "voter": False, "grpc_address": "", "http_address": "",
    "raft_address": "", "slots": 0, "free_slots": 0, "running": [], "cpu_percent": 0.0,
    "memory_percent": 0.0, "memory_rss": 0, "ready": False, "last_seen_s": 0.0,
}
#: On every response. The dashboard loads its script and style from this node
#: (``/dashboard.js``, ``/dashboard.css``: no inline code runs), its icon is a data:
#: URL, and it talks only to this node (fetch and EventSource: ``connect-src`` from
#: ``default-src``). No page of this node may be framed (clickjacking).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: Methods that change state: refused when a browser sends them from another origin.
WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
#: Body types taken as JSON from a client that is not a browser (no ``Origin``, no
#: ``Sec-Fetch-*``): plain ``curl -d`` sends form encoding, as the seed's example does.
NON_BROWSER_BODY_TYPES = frozenset({"", "application/x-www-form-urlencoded", "text/plain"})
#: (path pattern, {method: handler name}); ``{id}`` matches one path segment.
ROUTES: list[tuple[tuple[str, ...], dict[str, str]]] = [
    (("submit-task",), {"POST": "submit_task"}),
    (("healthz",), {"GET": "healthz"}),
    (("readyz",), {"GET": "readyz"}),
    (("metrics",), {"GET": "metrics"}),
    ((), {"GET": "dashboard"}),
    (("index.html",), {"GET": "dashboard"}),
    (("dashboard.js",), {"GET": "dashboard_js"}),
    (("dashboard.css",), {"GET": "dashboard_css"}),
    (("openapi.json",), {"GET": "openapi"}),
    (("api", "v1", "tasks"), {"GET": "list_tasks", "POST": "create_tasks"}),
    (("api", "v1", "tasks", "{id}"), {"GET": "get_task", "DELETE": "cancel_task"}),
    (("api", "v1", "tasks", "{id}", "cancel"), {"POST": "cancel_task"}),
    (("api", "v1", "tasks", "{id}", "output"), {"GET": "task_output"}),
    (("api", "v1", "wait"), {"GET": "wait"}),
    (("api", "v1", "node"), {"GET": "node"}),
    (("api", "v1", "cluster"), {"GET": "cluster"}),
    (("api", "v1", "history"), {"GET": "history"}),
    (("api", "v1", "events"), {"GET": "events"}),
    (("api", "v1", "events", "ticket"), {"POST": "events_ticket"}),
]


#: Routes that hold no data: served without a token.
PAGES = frozenset({"dashboard", "dashboard_js", "dashboard_css", "openapi"})
#: Routes for probes and scrapers: without a token while read-only endpoints are open.
READ_ONLY = frozenset({"healthz", "readyz", "metrics"})


def match_route(parts: list[str]) -> tuple[dict[str, str], dict[str, str]] | None:
    """(methods, path params) of the route for these path segments, or None."""
    for pattern, methods in ROUTES:
        if len(pattern) != len(parts):
            continue
        params: dict[str, str] = {}
        for want, got in zip(pattern, parts):
            if want.startswith("{"):
                params[want.strip("{}")] = got
            elif want != got:
                break
        else:
            return methods, params
    return None


def allowed_methods(methods: dict[str, str]) -> list[str]:
    out = list(methods)
    if "GET" in out:
        out.append("HEAD")
    return out + ["OPTIONS"]


class Handler(EventStream):
    server_version = "TaskAndGo"
    protocol_version = "HTTP/1.1"
    #: Socket timeout for writes (a client that does not read its response).
    #: Reads have the tighter per-request deadline, ``request_timeout_s``.
    timeout = 120
    # Set on the subclass made by create_http_server:
    app: NodeApp
    limiter: RateLimiter
    hosts: HostPolicy
    #: Open event streams, per client address and in total (429 beyond).
    streams: StreamLimiter
    #: Open waits (GET /api/v1/wait), per client address and in total (429 beyond).
    waits: StreamLimiter
    #: Event-stream tickets (POST /api/v1/events/ticket).
    tickets: StreamTickets
    #: Seconds from waiting for a request to having read its headers and body.
    request_timeout_s: float = REQUEST_TIMEOUT_S
    #: Clients already warned about ``?access_token=`` (bounded, oldest forgotten).
    warned: _Warned
    #: Places for bodies over LARGE_BODY being read and handled (see _hold_large_body).
    large_bodies: threading.BoundedSemaphore

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            # The handshake runs here, on this connection's thread, not in the
            # accept loop where a slow client would hold up every other one; it
            # gets the request deadline, not the long write timeout.
            self.connection.settimeout(self.request_timeout_s)
            self.connection.do_handshake()
            self.connection.settimeout(self.timeout)
        # Reads through a deadline over each whole request: the socket timeout
        # alone is per read, and a byte a second would hold this thread for ever.
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection, float(self.timeout))
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """One request, whose line, headers and body must arrive within
        ``request_timeout_s`` of waiting for it (a body read after its route
        started counts too). Past it: 408 and the connection closed, or just closed
        when not a byte of a request came (an idle keep-alive connection)."""
        self._reader.arm(self.request_timeout_s)
        try:
            super().handle_one_request()
        except _RequestTimeout:
            self.close_connection = True
            if self._reader.received:
                self._request_timed_out()
        finally:
            self._reader.disarm()

    def _request_timed_out(self) -> None:
        """408 (before or after the request line and headers were parsed)."""
        self.close_connection = True
        self.request_version = self.protocol_version  # always send a status line
        for name in ("command", "requestline"):
            if not isinstance(getattr(self, name, None), str):
                setattr(self, name, "")
        log.debug("HTTP request from %s timed out: not sent within %g s (408)",
                 self.client_address[0], self.request_timeout_s)
        with contextlib.suppress(OSError):
            self._error(408, f"request not sent within {self.request_timeout_s:g} s "
                        "(--http-request-timeout)")

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # -------------------------------------------------------------- plumbing

    def send_response(self, code: int, message: str | None = None) -> None:
        """Every final response (not a ``100 Continue``) carries SECURITY_HEADERS."""
        super().send_response(code, message)
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)

    def _send(self, code: int, body: Any, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else (
            json.dumps(body).encode() if ctype == "application/json" else str(body).encode())
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, message: str, field: str = "",
               headers: dict[str, str] | None = None) -> None:
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "..."
        body: dict[str, Any] = {"error": message, "code": code}
        if field:
            body["field"] = field
        self._send(code, body, headers=headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (bad request line, headers too long,
        unknown method) as JSON too."""
        self.close_connection = True
        try:
            self._error(code, message or self.responses.get(code, ("error",))[0])
        except OSError:
            pass

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise _LengthRequired()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise InvalidTask("Content-Length", "not a number") from None
        if length < 0:
            raise InvalidTask("Content-Length", "negative")
        return length

    def _from_browser(self) -> bool:
        """True when a browser sent this request: browsers add ``Origin`` to every
        POST (fetch, forms) and ``Sec-Fetch-*`` wherever they support it; curl,
        scripts and the Python client send neither."""
        return any(h in self.headers for h in ("Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode"))

    def _check_write(self, method: str) -> None:
        """403 for a state-changing request a browser made from another origin (a
        page elsewhere posting to this node: CSRF). Without ``Origin`` a browser's
        ``Sec-Fetch-Site: cross-site`` says the same."""
        origin = self.headers.get("Origin")
        host = self.headers.get("Host", "")
        if origin is not None:
            if not self.hosts.origin_ok(origin, host):
                raise _Refused(403, f"cross-origin {method} refused: Origin {origin!r} is not "
                               f"this node's origin ({host}); add its name to "
                               "--http-allowed-hosts to allow it", "Origin")
        elif (self.headers.get("Sec-Fetch-Site") or "").strip().lower() == "cross-site":
            raise _Refused(403, f"cross-site {method} refused (Sec-Fetch-Site: cross-site)",
                           "Sec-Fetch-Site")

    def _check_body_type(self) -> None:
        """415 unless a JSON body says ``application/json``. A client that is not a
        browser may also send form encoding, ``text/plain`` or nothing (plain
        ``curl -d``, the seed's example); from a browser those are what a page on
        another site can send without asking (a "simple" request), so never."""
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype == "application/json":
            return
        if self._from_browser() or ctype not in NON_BROWSER_BODY_TYPES:
            raise _Refused(415, f"Content-Type {ctype or '(none)'} refused: send the body "
                           "as Content-Type: application/json", "Content-Type")

    def _body(self) -> Any:
        """The request body as JSON; 415 when its Content-Type is wrong (see
        :meth:`_check_body_type`); 400 naming ``body`` when empty, not JSON or
        nested too deep."""
        self._check_body_type()
        length = self._content_length()
        self._body_read = True
        if length > MAX_BODY:
            # Read (and drop) a moderately large body so the client gets to see the
            # 413 instead of a broken pipe; beyond that, just close the connection.
            left = length if length <= 8 * MAX_BODY else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
            raise _TooLarge()
        if length > LARGE_BODY:
            self._hold_large_body()
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw.strip():
            raise InvalidTask("body", "empty; expected a JSON object")
        try:
            body = json.loads(raw)
        except RecursionError:
            raise InvalidTask("body", f"nested deeper than {MAX_DEPTH} levels") from None
        except ValueError as exc:
            raise InvalidTask("body", f"not valid JSON: {exc}") from None
        if not depth_ok(body, MAX_DEPTH):
            raise InvalidTask("body", f"nested deeper than {MAX_DEPTH} levels")
        return body

    def _hold_large_body(self) -> None:
        """Take one of the node's places for a large body until this request ends,
        waiting at most until the request deadline; else 429 (connection closed: the
        body stays unread)."""
        wait_s = 0.0
        if self._reader.deadline is not None:
            wait_s = max(0.0, self._reader.deadline - time.monotonic())
        if not self.large_bodies.acquire(timeout=wait_s):
            self.close_connection = True
            raise _Refused(429, f"this node is reading {MAX_LARGE_BODIES} request bodies over "
                           f"{LARGE_BODY // 1024} KiB already; retry shortly", "body")
        self._large_body_held = True

    def _drain_unread_body(self) -> None:
        """Leave the connection at the next request: drop a body no handler read."""
        if self._body_read or self.close_connection:
            return
        try:
            length = self._content_length()
        except (_LengthRequired, InvalidTask):
            self.close_connection = True
            return
        if length > MAX_BODY:
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        self._large_body_held = False
        try:
            self._dispatch_held(method)
        finally:
            if self._large_body_held:
                self.large_bodies.release()

    def _dispatch_held(self, method: str) -> None:
        url = urlsplit(self.path)
        segments = url.path.split("/")[1:]
        if len(segments) > 1 and segments[-1] == "":
            segments.pop()  # tolerate one trailing slash
        # Split before unquoting, so an id may contain an encoded "/" (%2F).
        parts = [] if segments == [""] else [unquote(p) for p in segments]
        try:
            host = self.headers.get("Host")
            if host is None:
                raise _Refused(400, "a Host header is required", "Host")
            if not self.hosts.host_ok(host):
                # Before routing: a name re-pointed at this node (DNS rebinding)
                # learns nothing, not even which paths exist.
                raise _Refused(421, f"this node does not answer to Host {host!r}: use one of "
                               "its addresses, or add the name to --http-allowed-hosts "
                               "(TASKANDGO_HTTP_ALLOWED_HOSTS)", "Host")
            if method in WRITE_METHODS:
                self._check_write(method)
            query = parse_qs(url.query, keep_blank_values=True)
            self._route(method, parts, query)
        except _Refused as exc:
            self._error(exc.code, exc.message, exc.field,
                        headers={"Retry-After": "1"} if exc.code == 429 else None)
        except _RequestTimeout:
            self._request_timed_out()
        except _TooLarge:
            self.close_connection = True
            self._error(413, f"request body larger than {MAX_BODY} bytes", "body")
        except _LengthRequired:
            self.close_connection = True
            self._error(411, "send the body with a Content-Length (chunked bodies are not "
                        "accepted)", "body")
        except _NoRoute:
            self._error(404, f"no such endpoint: {method} {url.path}")
        except _BadMethod as exc:
            self._error(405, f"method {method} not allowed on {url.path}; allowed: {exc}",
                        headers={"Allow": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as exc:  # never let a request kill the thread silently
            # The one error table of both servers (bad input, not found, no leader,
            # tokens, rate limits, a forwarded call's failure); else 500.
            err = api_error(exc)
            if err is not None:
                self._error(err.http_status, err.message, err.field,
                            headers=err.http_headers() or None)
            else:
                log.exception("HTTP %s %s failed", method, url.path)
                self.close_connection = True
                self._error(500, f"internal error: {type(exc).__name__}")
        try:
            self._drain_unread_body()
        except (OSError, _RequestTimeout):
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def __getattr__(self, name: str) -> Any:
        # Any other method (PUT, PATCH, QUERY, ...) gets 405 with Allow on a known
        # path and 404 elsewhere, instead of the standard library's 501.
        if name.startswith("do_"):
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

    # -------------------------------------------------------------- routes

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        found = match_route(parts)
        if found is None:
            raise _NoRoute()
        methods, params = found
        allowed = allowed_methods(methods)
        if method == "OPTIONS":
            self.send_response(204)
            self.send_header("Allow", ", ".join(allowed))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        name = methods.get("GET" if method == "HEAD" else method)
        if name is None:
            raise _BadMethod(allowed)
        self._guard(name, query)
        handler: Callable[[dict[str, str], dict[str, str], dict[str, list[str]]], None] = \
            getattr(self, "h_" + name)
        handler(params, {k: v[-1] for k, v in query.items()}, query)

    def _guard(self, name: str, query: dict[str, list[str]]) -> None:
        """Token check and rate limit for the route ``name`` (see the module doc).
        The event stream takes, besides the header, a stream ticket (``?ticket=``)
        or, deprecated, the token itself (``?access_token=``)."""
        auth: TokenAuth = self.app.cfg.auth
        self._token: str | None = None
        if name in PAGES:
            return
        token = TokenAuth.parse_header(self.headers.get("Authorization"))
        if name == "events" and token is None and token_required(auth, False):
            tickets, values = query.get("ticket"), query.get("access_token")
            if tickets:
                self.limiter.take(client_ip(str(self.client_address[0])))
                self.tickets.redeem(tickets[-1])
                return
            if not values:
                raise Unauthenticated("missing bearer token or stream ticket: open the stream "
                                      "with ?ticket= from POST /api/v1/events/ticket")
            token = values[-1]
            self._warn_access_token()
        self._token = check_bearer(auth, token, name in READ_ONLY)
        if name not in READ_ONLY:
            self.limiter.take(client_ip(str(self.client_address[0])))

    def _warn_access_token(self) -> None:
        client = client_ip(str(self.client_address[0]))
        if self.warned.first_time(client):
            log.warning("HTTP event stream from %s authenticated with ?access_token=: the "
                        "token in a URL ends up in logs and history; this is deprecated and "
                        "goes in the next release. Ask POST /api/v1/events/ticket (Bearer "
                        "token) for a stream ticket and open the stream with ?ticket=", client)

    # One method per route: (path params, last value of each query parameter,
    # every value of each query parameter).

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


class _Warned:
    """Which clients were already told something: at most ``limit`` remembered, the
    oldest forgotten first (such a client is told once more). Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._seen: dict[str, None] = {}

    def first_time(self, client: str) -> bool:
        with self._lock:
            if client in self._seen:
                return False
            if len(self._seen) >= self.limit:
                del self._seen[next(iter(self._seen))]
            self._seen[client] = None
            return True


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
