"""HTTP on every node: the seed's ``POST /submit-task``, a JSON REST API with the
reach of the gRPC one, health endpoints, Prometheus metrics and the dashboard.

Served by the standard library's threading HTTP server; every handler maps the
node's typed errors to status codes (400 names the field, 404, 413, 503) and no
request can take the node down.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from taskandgo.node.app import NodeApp, NotFound, Unavailable
from taskandgo.node.tasks import InvalidTask

log = logging.getLogger("taskandgo.http")

MAX_BODY = 2 * 1024 * 1024
STATIC = Path(__file__).resolve().parent / "static"
SPEC_FIELDS = ("id", "task_id", "priority", "data", "argv", "call", "args", "args_json",
               "strategy", "shards", "items", "items_json", "timeout_s", "retries", "labels")


def spec_from_json(body: Any, where: str = "") -> dict[str, Any]:
    """A JSON task body (the seed's ``task_id``/``priority``/``data`` plus the API's
    optional fields) -> the raw dict that ``normalize`` checks."""
    if not isinstance(body, dict):
        raise InvalidTask(where or "body", "expected a JSON object")
    unknown = sorted(set(body) - set(SPEC_FIELDS))
    if unknown:
        raise InvalidTask(where + unknown[0], "unknown field")
    raw = dict(body)
    if "task_id" in raw:
        tid = raw.pop("task_id")
        if tid is not None and not isinstance(tid, (str, int)) or isinstance(tid, bool):
            raise InvalidTask(where + "task_id", "expected a string")
        raw["id"] = str(tid) if tid is not None else ""
    elif "id" in raw and not isinstance(raw["id"], str):
        raise InvalidTask(where + "id", "expected a string")
    return raw


class Handler(BaseHTTPRequestHandler):
    server_version = "TaskAndGo"
    protocol_version = "HTTP/1.1"
    app: NodeApp  # set on the subclass made by create_http_server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # -------------------------------------------------------------- plumbing

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
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, message: str, field: str = "") -> None:
        body = {"error": message, "code": code}
        if field:
            body["field"] = field
        self._send(code, body)

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise InvalidTask("Content-Length", "not a number") from None
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
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw.strip():
            raise InvalidTask("body", "empty; expected a JSON object")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise InvalidTask("body", f"not valid JSON: {exc}") from None

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        try:
            self._route(method, parts, query)
        except _TooLarge:
            self.close_connection = True
            self._error(413, f"request body larger than {MAX_BODY} bytes", "body")
        except InvalidTask as exc:
            self._error(400, str(exc), exc.field)
        except NotFound as exc:
            self._error(404, str(exc))
        except Unavailable as exc:
            self._error(503, str(exc))
        except _NoRoute:
            self._error(404, f"no such endpoint: {method} {url.path}")
        except _BadMethod:
            self._error(405, f"method {method} not allowed on {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "TaskAndGoError":
                code = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404}.get(getattr(exc, "code", ""), 503)
                self._error(code, getattr(exc, "message", str(exc)))
                return
            log.exception("HTTP %s %s failed", method, url.path)
            self._error(500, f"internal error: {type(exc).__name__}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -------------------------------------------------------------- routes

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]]) -> None:
        app = self.app
        q = {k: v[-1] for k, v in query.items()}
        if parts == ["submit-task"]:
            self._need(method, "POST")
            out = app.submit([spec_from_json(self._body())])[0]
            self._send(201 if out["created"] else 200, out)
        elif parts == ["healthz"]:
            self._send(200, {"status": "ok", "node": app.node_id})
        elif parts == ["readyz"]:
            st = app.node_status()
            self._send(200 if st["ready"] else 503,
                       {"ready": st["ready"], "role": st["role"], "leader_id": st["leader_id"]})
        elif parts == ["metrics"]:
            from taskandgo.node.metrics import render

            body, ctype = render(app)
            self._send(200, body, ctype)
        elif parts == [] or parts == ["index.html"]:
            self._static("dashboard.html", "text/html; charset=utf-8")
        elif parts == ["openapi.json"]:
            self._static("openapi.json", "application/json")
        elif parts[:2] == ["api", "v1"]:
            self._api(method, parts[2:], q, query)
        else:
            raise _NoRoute()

    def _api(self, method: str, rest: list[str], q: dict[str, str],
             query: dict[str, list[str]]) -> None:
        app = self.app
        if rest == ["tasks"]:
            if method == "POST":
                body = self._body()
                if isinstance(body, dict) and "tasks" in body:
                    if not isinstance(body["tasks"], list) or not body["tasks"]:
                        raise InvalidTask("tasks", "expected a non-empty list")
                    specs = [spec_from_json(b, f"tasks[{i}].") for i, b in enumerate(body["tasks"])]
                    self._send(201, {"results": app.submit(specs)})
                else:
                    out = app.submit([spec_from_json(body)])[0]
                    self._send(201 if out["created"] else 200, out)
                return
            self._need(method, "GET")
            limit = _int(q.get("limit", "100"), "limit")
            self._send(200, app.list(q.get("status", ""), query.get("label", []), limit,
                                     q.get("page_token", "")))
        elif len(rest) == 2 and rest[0] == "tasks":
            if method == "DELETE":
                self._send(200, app.cancel(rest[1]))
                return
            self._need(method, "GET")
            self._send(200, app.get(rest[1]))
        elif len(rest) == 3 and rest[0] == "tasks" and rest[2] == "cancel":
            self._need(method, "POST")
            self._send(200, app.cancel(rest[1]))
        elif rest == ["wait"]:
            self._need(method, "GET")
            ids = [i for v in query.get("id", []) for i in v.split(",") if i]
            if not ids:
                raise InvalidTask("id", "at least one task id")
            timeout = _float(q.get("timeout_s", "30"), "timeout_s")
            if not 0 < timeout <= 600:
                raise InvalidTask("timeout_s", "expected 0..600 seconds")
            self._send(200, app.wait(ids, timeout))
        elif rest == ["node"]:
            self._need(method, "GET")
            self._send(200, app.node_status())
        elif rest == ["cluster"]:
            self._need(method, "GET")
            self._send(200, app.cluster_status())
        elif rest == ["events"]:
            self._need(method, "GET")
            self._events(q)
        else:
            raise _NoRoute()

    def _events(self, q: dict[str, str]) -> None:
        """Server-Sent Events; resumable with Last-Event-ID (or ?after=)."""
        after = self.headers.get("Last-Event-ID") or q.get("after") or ""
        seq = _int(after, "after") if after else self.app.bus.seq
        task = q.get("task_id", "")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        deadline = time.monotonic() + _float(q.get("max_s", "3600"), "max_s")
        self.wfile.write(b"retry: 1000\n\n")
        self.wfile.flush()
        while time.monotonic() < deadline and not self.app._stop.is_set():
            events = self.app.events(seq, 15.0)
            if not events:
                self.wfile.write(b": keep-alive\n\n")
            for e in events:
                seq = e["seq"]
                if task and e["task_id"] != task:
                    continue
                self.wfile.write(f"id: {seq}\nevent: {e['kind']}\ndata: {json.dumps(e)}\n\n".encode())
            self.wfile.flush()

    def _static(self, name: str, ctype: str) -> None:
        path = STATIC / name
        if not path.is_file():
            raise _NoRoute()
        self._send(200, path.read_bytes(), ctype)

    @staticmethod
    def _need(method: str, allowed: str) -> None:
        if method != allowed:
            raise _BadMethod()


class _TooLarge(Exception):
    pass


class _NoRoute(Exception):
    pass


class _BadMethod(Exception):
    pass


def _int(value: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidTask(field, "expected an integer") from None


def _float(value: str, field: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidTask(field, "expected a number") from None


def create_http_server(app: NodeApp, host: str, port: int) -> tuple[ThreadingHTTPServer, int]:
    """Bind the HTTP server (port 0 picks a free one); returns it and its port."""
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server, server.server_address[1]


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="http", daemon=True)
    t.start()
    return t
