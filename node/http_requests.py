"""The HTTP server's request handling before a route runs: the routes table, bounded
bodies, the request deadline, the Host policy, browser checks on writes, the token
guard and the error format (:class:`RequestHandler`, the base of
:class:`taskandgo.node.http.Handler`, whose ``h_<name>`` methods are the routes).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler  # noqa: F401 (the base's base)
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from taskandgo.node.http_events import EventStream
from taskandgo.node.http_guard import (
    HostPolicy,
    _BadMethod,
    _DeadlineReader,
    _LengthRequired,
    _NoRoute,
    _Refused,
    _RequestTimeout,
    _TooLarge,
)
from taskandgo.node.security import RateLimiter, TokenAuth, Unauthenticated, client_ip
from taskandgo.node.streams import StreamLimiter, StreamTickets
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.vocabulary import api_error, check_bearer, depth_ok, token_required

if TYPE_CHECKING:
    from taskandgo.node.app import NodeApp

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
    (("api", "v1", "schedules"), {"GET": "list_schedules", "POST": "create_schedule"}),
    (("api", "v1", "schedules", "{id}"), {"GET": "get_schedule", "DELETE": "delete_schedule"}),
    (("api", "v1", "schedules", "{id}", "pause"), {"POST": "pause_schedule"}),
    (("api", "v1", "schedules", "{id}", "resume"), {"POST": "resume_schedule"}),
    (("api", "v1", "policy"), {"GET": "policy", "PUT": "set_policy"}),
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


class RequestHandler(EventStream):
    """Everything a request goes through before its route's handler runs: the
    request deadline, the Host policy, browser checks on writes, bounded bodies, the
    token guard, routing and the error format. Routes are taskandgo.node.http.Handler's
    ``h_<name>`` methods."""

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
