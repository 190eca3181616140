"""Stream tickets, request deadlines, bounded waits and large bodies (issue 12, item 7
and the stream-limit follow-ups).

Real node processes on loopback (a voter, node-0, and a worker that relays to it,
node-1) with two API tokens, real sockets (some from other 127.0.0.x source
addresses), real gRPC. Settings come from the environment, so the same nodes start
on a release without them (where these tests fail, as they should).

Every wait polls with a deadline; every socket opened here is closed; the nodes are
ended by pid by the fixture.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import make_channel
from taskandgo.node.streams import StreamTickets
from taskandgo.protos import taskandgo_pb2 as pb
from taskandgo.protos import taskandgo_pb2_grpc as pb_grpc

pytestmark = pytest.mark.cluster

TOKEN, OTHER_TOKEN = "tok-a-0123456789", "tok-b-9876543210"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"
REQUEST_TIMEOUT_S = 3.0
MAX_WAITS, MAX_WAITS_PER_CLIENT = 3, 2
MAX_STREAMS_PER_CLIENT = 4
#: A normal deadline for a call on a loaded 2-core machine.
CALL_DEADLINE_S = 3.0
DEPRECATION = "authenticated with ?access_token="


@pytest.fixture(scope="module")
def nodes(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """node-0 (the voter) and node-1 (a worker) with API tokens and small bounds."""
    c = Cluster(tmp_path_factory.mktemp("limits"), n=2, voters=1,
                env={"TASKANDGO_API_TOKENS": f"{TOKEN},{OTHER_TOKEN}",
                     "TASKANDGO_HTTP_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
                     "TASKANDGO_MAX_WAITS": str(MAX_WAITS),
                     "TASKANDGO_MAX_WAITS_PER_CLIENT": str(MAX_WAITS_PER_CLIENT),
                     "TASKANDGO_MAX_STREAMS_PER_CLIENT": str(MAX_STREAMS_PER_CLIENT)},
                client_kw={"token": TOKEN})
    yield from serve(request, c)


# ---------------------------------------------------------------------- raw HTTP

class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1]) if lines[0].startswith("HTTP/") else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in
                        (line.partition(":") for line in lines[1:])}

    def json(self) -> Any:
        return json.loads(self.body)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))


def read_response(s: socket.socket, timeout_s: float = 10.0) -> Response:
    """One response (head and a Content-Length body, or what came before EOF)."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if b"\r\n\r\n" in data:
            r = Response(data)
            length = int(r.headers.get("content-length", "-1"))
            if (length >= 0 and len(r.body) >= length) or "text/event-stream" in data.decode(
                    errors="replace"):
                return r
        ready, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return Response(data)


def call(port: int, method: str, path: str, headers: str = AUTH, body: bytes = b"",
         source: str = "127.0.0.1", timeout_s: float = 10.0) -> Response:
    with connect(port, source) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        return read_response(s, timeout_s)


def ticket(port: int, token: str = TOKEN) -> str:
    r = call(port, "POST", "/api/v1/events/ticket", f"Authorization: Bearer {token}\r\n")
    assert r.status == 200, (r.status, r.body)
    return str(r.json()["ticket"])


def closed_by_peer(s: socket.socket, timeout_s: float) -> bool:
    """True once the node has closed the connection (EOF or reset) within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([s], [], [], 0.2)
        if ready:
            try:
                if s.recv(65536) == b"":
                    return True
            except OSError:
                return True
    return False


# ---------------------------------------------------------------------- stream tickets

def test_a_stream_ticket_opens_one_event_stream_at_any_node_and_only_once(
        nodes: Cluster) -> None:
    port0, port1 = nodes.http_ports
    # A ticket is asked for with the bearer token, never with a token in the URL
    r = call(port0, "POST", "/api/v1/events/ticket", headers="")
    assert r.status == 401 and r.json()["field"] == "Authorization"
    r = call(port0, "POST", f"/api/v1/events/ticket?access_token={TOKEN}", headers="")
    assert r.status == 401
    r = call(port0, "POST", "/api/v1/events/ticket")
    assert r.status == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["expires_in_s"] == 30 and body["uses"] == 1
    first = body["ticket"]
    assert TOKEN not in first and TOKEN.encode().hex() not in first

    # Given a ticket, the event stream opens with it, without a token
    with connect(port0) as s:
        s.sendall(f"GET /api/v1/events?ticket={first} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{port0}\r\n\r\n".encode())
        assert read_response(s).status == 200
    # But only once
    r = call(port0, "GET", f"/api/v1/events?ticket={first}", headers="")
    assert r.status == 401 and r.json()["field"] == "ticket"
    assert "already used" in r.json()["error"]
    # A ticket from one node opens a stream at another (a Service may send the two
    # requests to different pods): here the worker, which relays the voter's stream
    second = ticket(port0)
    with connect(port1) as s:
        s.sendall(f"GET /api/v1/events?ticket={second} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{port1}\r\n\r\n".encode())
        assert read_response(s).status == 200
    # And the other token's tickets work too
    with connect(port0) as s:
        s.sendall(f"GET /api/v1/events?ticket={ticket(port0, OTHER_TOKEN)} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{port0}\r\n\r\n".encode())
        assert read_response(s).status == 200

    # Refused: garbage, an expired ticket, one made under a token the cluster does
    # not have, and no ticket at all
    expired, _ = StreamTickets((TOKEN.encode(),), clock=lambda: time.time() - 120).issue(TOKEN)
    forged, _ = StreamTickets((b"tok-z",)).issue("tok-z")
    for bad, says in (("not-a-ticket", "length"), (expired, "expired"),
                      (forged, "not issued for a token"), ("", "")):
        r = call(port0, "GET", f"/api/v1/events?ticket={bad}", headers="")
        assert r.status == 401, (bad, r.status)
        assert says in r.json()["error"]


def test_a_token_in_the_url_still_works_and_is_logged_once_per_client(nodes: Cluster) -> None:
    port = nodes.http_ports[0]
    log = Path(nodes.root / "node-0.log")
    # Given clients opening the event stream with ?access_token= (deprecated)
    for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"):
        with connect(port, source) as s:
            s.sendall(f"GET /api/v1/events?access_token={TOKEN} HTTP/1.1\r\n"
                      f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
            # Then the stream still opens
            assert read_response(s).status == 200

    # And the node warns once per client address, without the token
    def warnings() -> list[str]:
        return [ln for ln in log.read_text(errors="replace").splitlines() if DEPRECATION in ln]
    wait_for(lambda: len(warnings()) >= 2, 10, "a deprecation warning per client")
    lines = warnings()
    assert len(lines) == 2, lines
    assert any("127.0.0.1" in ln for ln in lines) and any("127.0.0.2" in ln for ln in lines)
    assert not any(TOKEN in ln for ln in lines)
    # A wrong token in the URL is still refused
    assert call(port, "GET", "/api/v1/events?access_token=wrong", headers="").status == 401


def test_the_dashboard_opens_its_event_stream_with_a_ticket_not_the_token(
        nodes: Cluster, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs the playwright package (pip install playwright)")
    from test_dashboard import CHROMIUM_FLAGS, _chromium

    executable = _chromium()
    urls: list[str] = []
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True,
            args=CHROMIUM_FLAGS, bypass_csp=True)  # bypass: Playwright's polling evaluates
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: urls.append(req.url))
            page.set_default_timeout(20_000)
            # Given the dashboard of a node with API tokens, which asks for one
            page.goto(nodes.http(0) + "/")
            page.wait_for_selector("#token-form:not([hidden])")
            # When the token is given
            page.fill("#token-form input[name=token]", TOKEN)
            page.click("#token-form button")
            # Then the page goes live, its event stream opened with a stream ticket
            page.wait_for_function("document.querySelector('#conn').textContent"
                                   ".includes('live')")
            assert not errors, errors
        finally:
            context.close()
    streams = [u for u in urls if "/api/v1/events?" in u]
    assert streams and all("ticket=" in u for u in streams), streams
    assert not [u for u in urls if "access_token" in u or TOKEN in u]


# ---------------------------------------------------------------------- slow requests

def test_a_body_sent_one_byte_a_second_gets_408_and_the_connection_closes(
        nodes: Cluster) -> None:
    port = nodes.http_ports[0]
    for what, head in (
            ("body", (f"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{AUTH}"
                      "Content-Type: application/json\r\nContent-Length: 60\r\n\r\n")),
            ("headers", f"GET /api/v1/node HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n")):
        with connect(port) as s:
            # Given a client that sends its request's start, then one byte a second
            s.sendall(head.encode())
            t0 = time.monotonic()
            r = Response(b"")
            for _ in range(int(REQUEST_TIMEOUT_S) + 8):
                try:
                    s.sendall(b"x")
                except OSError:
                    break
                ready, _, _ = select.select([s], [], [], 1.0)  # paces the bytes, 1 s apart
                if ready:
                    answered_s = time.monotonic() - t0
                    r = read_response(s, 5)
                    break
            # Then it is answered 408 when the request deadline passes, and closed
            assert r.status == 408, (what, r.status, r.body[:200])
            assert answered_s < REQUEST_TIMEOUT_S + 2.5
            assert r.headers.get("connection") == "close"
            assert "request not sent within" in json.loads(r.body)["error"]
            assert closed_by_peer(s, 5), f"{what}: connection left open after 408"

    # An idle connection that never sends a byte is closed without an answer
    with connect(port) as s:
        t0 = time.monotonic()
        assert closed_by_peer(s, REQUEST_TIMEOUT_S + 3)
        assert time.monotonic() - t0 >= REQUEST_TIMEOUT_S - 0.5
    # A client that is slow but within the deadline is served, and so is everyone else
    with connect(port) as s:
        body = json.dumps({"data": "in two halves"}).encode()
        s.sendall(f"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{AUTH}"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                  "\r\n".encode() + body[:10])
        assert not select.select([s], [], [], 0.5)[0]  # the half-way pause
        s.sendall(body[10:])
        assert read_response(s).status == 201
    assert call(port, "GET", "/api/v1/node").status == 200


def test_large_bodies_are_read_a_few_at_a_time(nodes: Cluster) -> None:
    """Parsed JSON takes up to ~35 times its size: at most 4 bodies over 256 KiB are
    read at once; another waits until its request deadline, then gets 429."""
    port = nodes.http_ports[0]
    big = 1024 * 1024
    head = (f"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{AUTH}"
            f"Content-Type: application/json\r\nContent-Length: {big}\r\n\r\n")
    # Given a connection whose request deadline started first
    with connect(port) as late, connect(port) as a, connect(port) as b, \
            connect(port) as c, connect(port) as d:
        # And four clients each part-way through a large body
        for s in (a, b, c, d):
            s.sendall(head.encode() + b'{"data": "' + b"x" * 1000)
        # (a few round trips through the node: their handlers have taken their places)
        for _ in range(3):
            assert call(port, "GET", "/api/v1/node").status == 200
        # When the first connection sends a whole large body too
        late.sendall(head.encode() + b'{"data": "' + b"y" * (big - 12) + b'"}')
        with futures.ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda s: read_response(s, REQUEST_TIMEOUT_S + 5),
                                    (late, a, b, c, d)))
    # Then it is refused with 429 naming the bound once its deadline passes, and the
    # stalled ones get 408
    assert [r.status for r in answers] == [429, 408, 408, 408, 408]
    assert "4 request bodies" in answers[0].json()["error"]
    assert answers[0].headers.get("retry-after")
    # And a large body is served again once they are gone
    body = json.dumps({"tasks": [{"data": f"{i}" + "z" * 1000} for i in range(300)]}).encode()
    r = call(port, "POST", "/api/v1/tasks", AUTH + "Content-Type: application/json\r\n", body)
    assert r.status == 201, (r.status, r.body[:200])


# ---------------------------------------------------------------------- waits

def test_waits_beyond_the_bound_are_refused_and_other_calls_answer(nodes: Cluster) -> None:
    port, addr = nodes.http_ports[0], nodes.addr(0)
    md = (("authorization", f"Bearer {TOKEN}"),)
    held_s = 6.0

    def wait_http(source: str) -> Response:
        return call(port, "GET", f"/api/v1/wait?id=never&timeout_s={held_s}", source=source,
                    timeout_s=held_s + 5)

    def one_refused_at_once(attempts: list[futures.Future[Any]], status: Any) -> Any:
        """Of attempts made together, exactly one is answered at once, refused."""
        done, _ = futures.wait(attempts, timeout=CALL_DEADLINE_S,
                               return_when=futures.FIRST_COMPLETED)
        assert len(done) == 1, "no attempt (or several) answered at once"
        first = done.pop()
        assert status(first.result()), first.result()
        assert sum(f.done() for f in attempts) == 1, "a wait within the bound was answered"
        return first.result()

    with futures.ThreadPoolExecutor(8) as pool:
        # Given one client address making one wait more than it may, at once
        http_held = [pool.submit(wait_http, "127.0.0.1") for _ in range(MAX_WAITS_PER_CLIENT + 1)]
        # Then one of them is refused at once with 429, the others wait
        r = one_refused_at_once(http_held, lambda r: r.status == 429)
        assert f"{MAX_WAITS_PER_CLIENT} of {MAX_WAITS_PER_CLIENT} allowed per client" in \
            r.json()["error"] and r.headers.get("retry-after")
        # And when two other addresses each make one, one takes the node's last place
        others = [pool.submit(wait_http, source) for source in ("127.0.0.2", "127.0.0.3")]
        r = one_refused_at_once(others, lambda r: r.status == 429)
        assert f"{MAX_WAITS} of {MAX_WAITS} allowed" in r.json()["error"]
        # And other calls still answer
        t0 = time.monotonic()
        assert call(port, "GET", "/api/v1/node").status == 200
        assert time.monotonic() - t0 < CALL_DEADLINE_S

        # The same over gRPC (a bound of its own)
        with make_channel(addr) as ch:
            stub = pb_grpc.SchedulerStub(ch)
            grpc_held = [stub.WaitTasks.future(
                pb.WaitTasksRequest(task_ids=["never"], timeout_s=held_s),
                timeout=held_s + 5, metadata=md) for _ in range(MAX_WAITS_PER_CLIENT + 1)]
            done = wait_for(lambda: [f for f in grpc_held if f.done()], CALL_DEADLINE_S,
                            "a WaitTasks beyond the bound to be refused")
            assert len(done) == 1
            assert done[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "allowed per client" in done[0].details()
            stub.GetNodeStatus(pb.NodeStatusRequest(), timeout=CALL_DEADLINE_S, metadata=md)
            # And the Python client's wait rides it out: it tries again within its deadline
            with nodes.client(0) as c:
                tid = c.submit("waited for")
                assert c.wait(tid, timeout_s=held_s + 15)[0]["status"] == "succeeded"
            for f in grpc_held:
                if f is not done[0]:
                    assert len(f.result(timeout=held_s + 10).tasks) == 0
        statuses = sorted(f.result(timeout=held_s + 10).status for f in http_held + others)
        assert statuses == [200, 200, 200, 429, 429]


# ---------------------------------------------------------------------- taskandgo watch

def test_watch_refused_prints_the_reason_not_a_traceback(nodes: Cluster, tmp_path: Path) -> None:
    addr = nodes.addr(0)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    md = (("authorization", f"Bearer {TOKEN}"),)
    with make_channel(addr) as ch:
        stub = pb_grpc.SchedulerStub(ch)
        # Given this address holding as many WatchTasks streams as it may
        held = [stub.WatchTasks(pb.WatchTasksRequest(), metadata=md)
                for _ in range(MAX_STREAMS_PER_CLIENT)]
        try:
            with futures.ThreadPoolExecutor(len(held)) as pool:  # initial_metadata blocks
                for f in [pool.submit(h.initial_metadata) for h in held]:
                    f.result(timeout=10)
            # When `taskandgo watch` is run
            res = subprocess.run([sys.executable, "-m", "taskandgo", "watch", "--node", addr,
                                  "--token-file", str(token_file)], capture_output=True,
                                 text=True, timeout=60, check=False,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                     [str(Path(__file__).resolve().parents[1] / "support"),
                                      os.environ.get("PYTHONPATH", "")])})
        finally:
            for h in held:
                h.cancel()
    # Then it says why, in one line, and exits 2
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "RESOURCE_EXHAUSTED" in res.stderr and "allowed per client" in res.stderr
