"""The HTTP event stream (Server-Sent Events): ``GET /api/v1/events``, resumable,
bounded per client and in total, relayed from a voter by a node without a replica.

:class:`EventStream` is the part of :class:`taskandgo.node.http.Handler` that serves
it (the handler's base class).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

import grpc
from taskandgo.node.http_guard import _float, _int
from taskandgo.node.security import client_ip
from taskandgo.node.streams import StreamLimiter, TooManyStreams, upstream_refused
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.vocabulary import api_error, dict_from_message, http_status_of

if TYPE_CHECKING:
    from taskandgo.node.app import NodeApp

#: An SSE stream sends a comment at least this often so proxies keep it open.
KEEPALIVE_S = 15.0


class EventStream(BaseHTTPRequestHandler):
    """The event stream routes of the HTTP handler (its base class)."""

    app: NodeApp
    streams: StreamLimiter

    def _error(self, code: int, message: str, field: str = "",
               headers: dict[str, str] | None = None) -> None:
        raise NotImplementedError  # the handler's own (taskandgo.node.http.Handler)

    # -------------------------------------------------------------- events

    def h_events(self, params: dict[str, str], q: dict[str, str],
                 query: dict[str, list[str]]) -> None:
        """Server-Sent Events, resumable with ``Last-Event-ID`` (or ``?after=``).

        Each event's id is this node's event sequence number. Events without an id
        are advisory and never replayed: ``leader`` (this node saw the leader
        change) and ``reset`` (events were missed: the id is from before this node
        restarted, or older than its buffer; refetch state)."""
        header = (self.headers.get("Last-Event-ID") or "").strip()
        after_text, field = (header, "Last-Event-ID") if header else (q.get("after", ""), "after")
        after = _int(after_text, field) if after_text or "after" in q else None
        if after is not None and after < 0:
            raise InvalidTask(field, "expected an event id (>= 0)")
        task = q.get("task_id", "")
        max_s = _float(q.get("max_s", "3600"), "max_s")
        if not 0 < max_s <= 86400:
            raise InvalidTask("max_s", "expected 0..86400 seconds")
        # A stream holds this connection's thread while open: bounded per client
        # address and in total (--max-streams-per-client, --max-streams), 429 beyond.
        with contextlib.ExitStack() as slot:
            try:
                slot.enter_context(self.streams.hold(client_ip(str(self.client_address[0]))))
            except TooManyStreams as exc:
                err = api_error(exc)
                assert err is not None
                self._error(err.http_status, err.message, headers=err.http_headers())
                return
            if self.command == "HEAD":
                self._start_stream()
            elif self.app.replicated is None:
                self._relay_events(after, task, max_s)
            else:
                self._start_stream()
                self._stream_events(after, task, max_s)

    def _start_stream(self) -> None:
        """The event stream's response headers (and, but for HEAD, its retry hint)."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        self.wfile.write(b"retry: 1000\n\n")
        self.wfile.flush()

    def _stream_events(self, after: int | None, task: str, max_s: float) -> None:
        app = self.app
        seq = app.bus.seq if after is None else after
        out: list[bytes] = []
        if seq > app.bus.seq:  # an id from before this node restarted
            seq = app.bus.seq
            out.append(_sse_advisory("reset", app.node_id))
        leader = app.leader_grpc()
        now = time.monotonic()
        deadline, last_write = now + max_s, 0.0
        while now < deadline and not app._stop.is_set():
            if self._client_gone():
                return  # free its place now, not at the next write that fails
            events = app.events(seq, min(1.0, deadline - now))
            if events and events[0]["seq"] > seq + 1:
                out.append(_sse_advisory("reset", app.node_id))
            for e in events:
                seq = e["seq"]
                if not task or e["task_id"] == task:
                    out.append(_sse(e, seq))
            if app.leader_grpc() != leader:
                leader = app.leader_grpc()
                out.append(_sse_advisory("leader", app.node_status()["leader_id"], "changed"))
            now = time.monotonic()
            if not out and now - last_write >= KEEPALIVE_S:
                out.append(b": keep-alive\n\n")
            if out:
                self.wfile.write(b"".join(out))
                self.wfile.flush()
                out, last_write = [], now

    def _client_gone(self) -> bool:
        """True once an event-stream client has closed its end. Such a client sends
        nothing after its request, so a readable socket is its EOF (or bytes no one
        will read: a TLS close, a stray write), and the stream ends."""
        conn = self.connection
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            if isinstance(conn, ssl.SSLSocket):
                return True
            return conn.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _relay_events(self, after: int | None, task: str, max_s: float) -> None:
        """A worker holds no replicated state: relay a voter's stream (its ids). The
        response starts only once the voter accepted the stream: its refusal is this
        request's answer (429 when the voter holds too many streams, 503 unreachable)."""
        with self.app.forward_client() as c:
            stream = c.watch_raw([task] if task else None, after or 0)
            finished = threading.Event()

            def watch() -> None:
                # Ends the voter's stream after max_s, or as soon as this client
                # goes away (no event may come for long): it holds a place there.
                end = time.monotonic() + max_s
                while not finished.wait(0.5):
                    if time.monotonic() >= end or self._client_gone():
                        stream.cancel()
                        return

            threading.Thread(target=watch, name="sse-relay-watch", daemon=True).start()
            try:
                refused = upstream_refused(stream)
                if refused is not None:
                    code = refused[0].name
                    status = http_status_of(code)
                    self._error(status, f"the voter refused the event stream: {refused[1]}",
                                headers={"Retry-After": "1"} if status == 429 else None)
                    return
                self._start_stream()
                for msg in stream:
                    ev = dict_from_message(msg)
                    self.wfile.write(_sse(ev, ev["seq"]))
                    self.wfile.flush()
            except grpc.RpcError:
                pass  # the voter went away or max_s passed: the client reconnects
            finally:
                finished.set()
                stream.cancel()


def _sse(event: dict[str, Any], seq: int) -> bytes:
    return f"id: {seq}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode()


def _sse_advisory(kind: str, node: str, status: str = "") -> bytes:
    data = {"kind": kind, "task_id": "", "status": status or kind, "chunk": -1, "node": node,
            "at": time.time()}
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
