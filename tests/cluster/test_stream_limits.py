"""Open event streams cannot starve a node (issue 12, item 4).

Real node processes on loopback, real gRPC WatchTasks streams and real HTTP event
streams (raw sockets, some from other 127.0.0.x source addresses). With a client
holding as many streams as it may, and many more attempts beyond, every attempt
beyond is refused at once (gRPC RESOURCE_EXHAUSTED, HTTP 429 with Retry-After), and
unary calls (GetNodeStatus, SubmitTasks, the HTTP API) and the peers' heartbeats
to that node still answer within a normal deadline. Before the bound, 40 open
streams made every unary call to the node time out.

Every wait polls with a deadline; every stream opened here is closed; the nodes are
ended by pid by the fixtures.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from typing import Any, Self

import grpc
import pytest
from harness import Cluster, serve, wait_for
from taskandgo.node.client import make_channel
from taskandgo.node.streams import STREAM_ACCEPTED
from taskandgo.protos import taskandgo_pb2 as pb
from taskandgo.protos import taskandgo_pb2_grpc as pb_grpc

pytestmark = pytest.mark.cluster

#: A normal deadline for a unary call on a loaded 2-core machine.
UNARY_DEADLINE_S = 3.0
PER_CLIENT = 8  # the default --max-streams-per-client
#: The small node: a total bound below its per-client bound, so one address reaches it.
SMALL_TOTAL, SMALL_PER_CLIENT = 4, 6


def _fixture(request: pytest.FixtureRequest, c: Cluster) -> Iterator[Cluster]:
    yield from serve(request, c)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """3 voters and 1 worker (node-3), default stream bounds."""
    yield from _fixture(request, Cluster(tmp_path_factory.mktemp("streams"), n=4, voters=3))


@pytest.fixture(scope="module")
def small(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One voter that serves at most SMALL_TOTAL streams per protocol."""
    yield from _fixture(request, Cluster(
        tmp_path_factory.mktemp("small"), n=1,
        extra=["--max-streams", str(SMALL_TOTAL),
               "--max-streams-per-client", str(SMALL_PER_CLIENT)]))


# ---------------------------------------------------------------------- gRPC helpers

class Streams:
    """WatchTasks calls to one node; closes them all (and their channels) on exit."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.channels: list[grpc.Channel] = []
        self.calls: list[Any] = []
        # initial_metadata() blocks: asked on these threads, each wait bounded.
        self.pool = futures.ThreadPoolExecutor(16)

    def open(self, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            if not self.channels or len(self.calls) % 50 == 0:
                self.channels.append(make_channel(self.addr))
            call = pb_grpc.SchedulerStub(self.channels[-1]).WatchTasks(pb.WatchTasksRequest())
            self.calls.append(call)
            out.append(call)
        return out

    def accepted(self, calls: list[Any], timeout_s: float = 10.0) -> None:
        """Every call was answered with the node's 'stream accepted' headers in time."""
        pending = [self.pool.submit(c.initial_metadata) for c in calls]
        for call, fut in zip(calls, pending):
            try:
                md = fut.result(timeout=timeout_s)
            except futures.TimeoutError:
                raise AssertionError(f"no answer to a stream within {timeout_s} s") from None
            assert STREAM_ACCEPTED in tuple(md or ()), \
                f"stream not accepted: {call.code() if call.done() else 'no accept header'}"
            assert not call.done()

    def close(self) -> None:
        for c in self.calls:
            c.cancel()
        for ch in self.channels:
            ch.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_refused(calls: list[Any], timeout_s: float = 15.0) -> list[str]:
    """Every call ends RESOURCE_EXHAUSTED within timeout_s; returns their details."""
    wait_for(lambda: all(c.done() for c in calls), timeout_s,
             f"{len(calls)} stream attempts to be refused")
    codes = {c.code() for c in calls}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    return [c.details() for c in calls]


def unary_calls_answer(addr: str, rounds: int = 10) -> None:
    """GetNodeStatus and SubmitTasks each answer `rounds` times within the deadline."""
    with make_channel(addr) as ch:
        stub = pb_grpc.SchedulerStub(ch)
        for i in range(rounds):
            t0 = time.monotonic()
            stub.GetNodeStatus(pb.NodeStatusRequest(), timeout=UNARY_DEADLINE_S)
            out = stub.SubmitTasks(pb.SubmitTasksRequest(tasks=[pb.TaskSpec(data=f"s{i}")]),
                                   timeout=UNARY_DEADLINE_S)
            assert len(out.results) == 1
            assert time.monotonic() - t0 < 2 * UNARY_DEADLINE_S


def heartbeats_answered(addr: str, for_s: float = 2.0) -> None:
    """For for_s seconds, the node (the leader) has heard every peer's heartbeat
    recently: a leader whose threads were all taken misses them within a second."""
    with make_channel(addr) as ch:
        stub = pb_grpc.SchedulerStub(ch)
        end = time.monotonic() + for_s
        for _ in range(1000):
            nodes = stub.GetClusterStatus(pb.ClusterStatusRequest(),
                                          timeout=UNARY_DEADLINE_S).nodes
            stale = [(n.id, n.last_seen_s) for n in nodes if not n.ready or n.last_seen_s > 1.0]
            assert nodes and not stale, f"peers not heard from: {stale}"
            if time.monotonic() >= end:
                return
            time.sleep(0.2)  # pacing between checks, not a wait for an outcome


class Hammer:
    """A thread that keeps making stream attempts (each must be refused) until
    stopped, at most max_attempts of them."""

    def __init__(self, addr: str, max_attempts: int = 300) -> None:
        self.addr, self.max_attempts = addr, max_attempts
        self.refused = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with make_channel(self.addr) as ch:
            stub = pb_grpc.SchedulerStub(ch)
            for _ in range(self.max_attempts):
                if self._stop.is_set():
                    return
                call = stub.WatchTasks(pb.WatchTasksRequest(), timeout=10)
                try:
                    next(call)
                    self.errors.append("a stream beyond the bound sent an event")
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.refused += 1
                    else:
                        self.errors.append(f"{exc.code()}: {exc.details()}")
                finally:
                    call.cancel()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


# ---------------------------------------------------------------------- HTTP helpers

def sse_open(port: int, source: str = "127.0.0.1",
             path: str = "/api/v1/events") -> tuple[socket.socket, int, str]:
    """Start an event stream from `source`: (socket, HTTP status, response head+body
    read so far). The socket stays open; the caller closes it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head = data.decode(errors="replace")
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/") else 0
    if status != 200:  # an error: read its (Content-Length) body too
        length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        while len(data.split(b"\r\n\r\n", 1)[-1]) < length and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head = data.decode(errors="replace")
    return s, status, head


def error_body(head: str) -> dict[str, Any]:
    return json.loads(head.split("\r\n\r\n", 1)[1])


def http_get(base: str, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(base + path, timeout=UNARY_DEADLINE_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def http_submit(base: str, data: str) -> int:
    req = urllib.request.Request(base + "/submit-task", method="POST",
                                 data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=UNARY_DEADLINE_S) as r:
        return r.status


class Sockets(list):
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self:
            s.close()


# ---------------------------------------------------------------------- tests

def test_grpc_streams_beyond_the_per_client_bound_are_refused_and_unary_calls_answer(
        cluster: Cluster) -> None:
    # Given a client holding as many WatchTasks streams to the leader as it may
    leader = cluster.wait_ready()
    addr = cluster.addr(leader)
    with Streams(addr) as streams:
        held = streams.open(PER_CLIENT)
        streams.accepted(held)
        # When it tries 200 more at once, and keeps trying
        beyond = streams.open(200)
        details = wait_refused(beyond)
        assert all(f"{PER_CLIENT} of {PER_CLIENT} allowed per client" in d for d in details)
        with Hammer(addr) as hammer:
            # Then unary calls and the peers' heartbeats still answer in time
            unary_calls_answer(addr)
            heartbeats_answered(addr)
        assert not hammer.errors, hammer.errors[:3]
        assert hammer.refused > 0
        assert all(not c.done() for c in held), "a held stream was dropped"
    # And once the client's streams are closed, it may open new ones
    with Streams(addr) as again:
        wait_for(lambda: _accepted_now(again), 15, "a new stream to be accepted")


def _accepted_now(streams: Streams) -> bool:
    call = streams.open(1)[0]
    md = streams.pool.submit(call.initial_metadata).result(timeout=10)
    ok = STREAM_ACCEPTED in tuple(md or ())
    call.cancel()
    return ok


def test_grpc_streams_beyond_the_node_total_are_refused(small: Cluster) -> None:
    # Given a node that serves at most SMALL_TOTAL streams, all of them open
    addr = small.addr(0)
    with Streams(addr) as streams:
        held = streams.open(SMALL_TOTAL)
        streams.accepted(held)
        # When 40, then 500 more are tried
        for n in (40, 500):
            details = wait_refused(streams.open(n), timeout_s=30)
            # Then each is refused naming the node's bound, and unary calls answer
            assert all(f"{SMALL_TOTAL} of {SMALL_TOTAL} allowed" in d for d in details)
            unary_calls_answer(addr, rounds=5)
        assert all(not c.done() for c in held)


def test_a_worker_relaying_a_stream_passes_the_voters_refusal_on(cluster: Cluster) -> None:
    # Given a worker, which relays event streams from the leader, and this address
    # (the worker's too, on loopback) holding all its places at the leader, the
    # last through an event stream at the worker
    leader = cluster.wait_ready()
    worker = 3
    wait_for(lambda: _leader_known(cluster, worker, leader), 15, "the worker to know the leader")
    port = cluster.http_ports[worker]
    with Streams(cluster.addr(leader)) as streams, Sockets() as held:
        streams.accepted(streams.open(PER_CLIENT - 1))
        s, status, head = sse_open(port)
        held.append(s)
        assert status == 200, head
        wait_refused(streams.open(1))  # the relayed stream holds the last place
        # When another stream is started at the worker, over HTTP and over gRPC
        s, status, head = sse_open(port)
        s.close()
        # Then each is refused with the leader's reason
        assert status == 429, head
        assert "per client" in error_body(head)["error"]
        with Streams(cluster.addr(worker)) as via_worker:
            assert "per client" in wait_refused(via_worker.open(1))[0]
        unary_calls_answer(cluster.addr(worker), rounds=3)
        # And when the relayed stream's client goes away, its place at the leader frees
        held.pop().close()

        def reopened() -> bool:
            s, status, _ = sse_open(port)
            s.close()
            return status == 200
        wait_for(reopened, 15, "the worker's relayed stream to free its place")


def _leader_known(cluster: Cluster, i: int, leader: int) -> bool:
    with make_channel(cluster.addr(i)) as ch:
        st = pb_grpc.SchedulerStub(ch).GetNodeStatus(pb.NodeStatusRequest(), timeout=2)
    return bool(st.ready) and st.leader_id == f"node-{leader}"


def test_http_event_streams_beyond_the_per_client_bound_get_429(cluster: Cluster) -> None:
    # Given a client holding as many event streams to a node as it may
    leader = cluster.wait_ready()
    port, base = cluster.http_ports[leader], cluster.http(leader)
    with Sockets() as held:
        for _ in range(PER_CLIENT):
            s, status, head = sse_open(port)
            held.append(s)
            assert status == 200, head
        # When it tries 50 more
        for _ in range(50):
            s, status, head = sse_open(port)
            s.close()
            # Then each gets 429 with Retry-After and a JSON reason
            assert status == 429, head
            assert "retry-after:" in head.lower()
            assert f"{PER_CLIENT} of {PER_CLIENT} allowed per client" in error_body(head)["error"]
        # And another address still gets a stream, and the API answers
        s, status, head = sse_open(port, source="127.0.0.2")
        held.append(s)
        assert status == 200, head
        assert http_get(base, "/api/v1/node")[0] == 200
        assert http_submit(base, "during streams") == 201
    # And closed streams free their places
    def reopened() -> bool:
        s, status, _ = sse_open(port)
        s.close()
        return status == 200
    wait_for(reopened, 15, "an event stream to be accepted again")


def test_http_event_streams_beyond_the_node_total_get_429(small: Cluster) -> None:
    # Given a node that serves at most SMALL_TOTAL event streams, all open (from 2 addresses)
    port, base = small.http_ports[0], small.http(0)
    with Sockets() as held:
        for i in range(SMALL_TOTAL):
            s, status, head = sse_open(port, source=f"127.0.0.{2 + i % 2}")
            held.append(s)
            assert status == 200, head
        # When other addresses try
        for source in ("127.0.0.1", "127.0.0.4", "127.0.0.5"):
            s, status, head = sse_open(port, source=source)
            s.close()
            # Then they are refused naming the node's bound, and the API answers
            assert status == 429, head
            assert f"{SMALL_TOTAL} of {SMALL_TOTAL} allowed" in error_body(head)["error"]
        assert http_get(base, "/api/v1/node")[0] == 200
