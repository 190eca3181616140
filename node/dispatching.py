"""Dispatching: sending committed assignments (and other leader messages) to workers.

:class:`Peers` holds this node's channels to other nodes and the metadata its peer
calls carry. :class:`Dispatcher` takes each committed assign batch from the leader,
reads the units' payloads from the replica, hands this node's own units to its
worker side and sends every other worker one Dispatch, in order, from one sender
thread per worker. It counts batches handed to it and delivered, so a hold can wait
until every committed assignment has reached its worker. The constructors start
nothing; :meth:`Dispatcher.start` starts the dispatch thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

import grpc
from taskandgo.node import decisions as d
from taskandgo.node.config import NodeConfig
from taskandgo.node.executor import Work
from taskandgo.node.replica import Replica, dumps
from taskandgo.node.security import PeerAuth
from taskandgo.node.tasks import payload_for
from taskandgo.protos import peer_pb2, peer_pb2_grpc

log = logging.getLogger("taskandgo.node")

#: Peers restart within seconds: reconnect quickly instead of gRPC's default
#: backoff of up to two minutes.
PEER_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1000)]
DISPATCH_TIMEOUT_S = 2.0


class Peers:
    """Channels to other nodes (one per address, kept) and this node's peer
    credentials. Thread-safe enough: a channel made twice by a race is harmless."""

    def __init__(self, cfg: NodeConfig, peer_auth: PeerAuth) -> None:
        self.cfg = cfg
        self.peer_auth = peer_auth
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, target: str) -> peer_pb2_grpc.PeerStub:
        return peer_pb2_grpc.PeerStub(self.channel(target))

    def channel(self, target: str) -> grpc.Channel:
        from taskandgo.node.client import make_channel

        ch = self._channels.get(target)
        if ch is None:
            cfg = self.cfg
            ch = self._channels[target] = make_channel(
                target, cfg.tls_ca if cfg.tls else None, cfg.tls_cert, cfg.tls_key,
                options=PEER_CHANNEL_OPTIONS)
        return ch

    @property
    def metadata(self) -> tuple:
        """Metadata of this node's peer calls: the peer credential and who is calling
        (see PeerAuth). The first API token goes along only so that nodes of an
        earlier release, which took it on the peer API, still admit this one during
        a rolling upgrade; nodes of this release ignore it there."""
        md = self.peer_auth.metadata(self.cfg.node_id, self.cfg.grpc_address)
        tokens = self.cfg.auth.tokens
        return md + ((("authorization", "Bearer " + tokens[0].decode()),) if tokens else ())

    def client(self, targets: list[str], timeout_s: float) -> Any:
        """A Client that talks to other nodes with this node's credentials."""
        from taskandgo.node.client import Client

        tokens = self.cfg.auth.tokens
        cfg = self.cfg
        return Client(targets, timeout_s=timeout_s, token=tokens[0].decode() if tokens else "",
                      tls_ca=cfg.tls_ca if cfg.tls else None,
                      tls_cert=cfg.tls_cert if cfg.tls else None,
                      tls_key=cfg.tls_key if cfg.tls else None)

    def close(self) -> None:
        for ch in list(self._channels.values()):
            ch.close()


def _priorities(s: Any) -> Iterator[int]:
    """Under the replica's lock: the priority of every unit queued, running (or
    waiting in a window) or waiting to retry, and of every task waiting for its
    parents (the state queues it by itself, with no submit and no hold, the moment
    its last parent ends: a lower unit taken into a window now could start after
    it). The leader plans with the same priorities (Scheduler._plan_and_assign)."""
    yield from s.queued_by_priority
    tasks = s.tasks
    for tid, _chunk in (*s.running, *s.delayed):
        t = tasks.get(tid)
        if t is not None:
            yield t.priority
    for tid in s.waiting:
        t = tasks.get(tid)
        if t is not None:
            yield t.priority


#: See Dispatcher.undelivered (above any Dispatch's own deadline).
UNDELIVERED_S = 10.0


class Dispatcher:
    """Delivers committed assign batches. ``address_of(worker)`` gives a worker's
    gRPC address (None: unknown to the leader; its units are left to the lease
    check); ``run_local(works, floor)`` hands this node's own units to its worker
    side, with the floor a Dispatch carries (see decisions.gate_arrivals);
    ``observe(name, seconds)`` records a metric; ``arriving()`` gives the priorities
    the state will queue by itself soon (see :func:`_priorities`)."""

    def __init__(self, node_id: str, replica: Replica, peers: Peers, stop: threading.Event,
                 *, address_of: Callable[[str], str | None],
                 run_local: Callable[[list[Work], int | None], int],
                 observe: Callable[[str, float], None],
                 guard: Callable[[Callable[[], None]], Callable[[], None]],
                 arriving: Callable[[], Iterable[int]] = frozenset) -> None:
        self.node_id = node_id
        self.replica = replica
        self.peers = peers
        self._stop = stop
        self._address_of = address_of
        self._run_local = run_local
        self._observe = observe
        self._guard = guard
        #: Priorities of delayed tasks and schedule slots the state queues by itself
        #: soon (Timekeeper.arriving): they count in a Dispatch's floor too.
        self._arriving = arriving
        self._q: queue.Queue = queue.Queue()
        self._senders: dict[str, queue.Queue] = {}
        self._cond = threading.Condition()
        # Committed assign batches handed to the dispatcher / delivered to workers.
        self._put_n = 0
        self._done_n = 0
        # Batch number -> (the highest priority in it, when put), until delivered.
        self._undelivered: dict[int, tuple[int, float]] = {}

    def start(self) -> None:
        threading.Thread(target=self._guard(self._loop), name="dispatch", daemon=True).start()

    def put(self, batch: list, priority: int | None = None) -> None:
        """A committed assign command's result: (task_id, chunk, chunk_count,
        attempt, token, worker) per unit, and the highest priority among them.
        Counted at once (see wait_delivered, undelivered)."""
        with self._cond:
            self._put_n += 1
            seq = self._put_n
            if priority is not None:
                self._undelivered[seq] = (priority, time.monotonic())
        self._q.put((seq, batch))

    def undelivered(self) -> frozenset[int]:
        """The priorities of batches put and not yet delivered to their workers (or
        failed). One older than UNDELIVERED_S is forgotten: a batch a bug left
        behind must not stop planning below its priority for ever."""
        with self._cond:
            if not self._undelivered:
                return frozenset()
            old = time.monotonic() - UNDELIVERED_S
            for seq in [s for s, (_p, t) in self._undelivered.items() if t < old]:
                del self._undelivered[seq]
            return frozenset(p for p, _t in self._undelivered.values())

    def wait_delivered(self, deadline: float) -> None:
        """Wait (until the monotonic deadline) until every batch put so far has
        been delivered to its workers or failed."""
        with self._cond:
            put = self._put_n
            while self._done_n < put and time.monotonic() < deadline:
                self._cond.wait(max(0.001, deadline - time.monotonic()))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                seq, batch = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            self._dispatch(seq, batch)

    def _dispatch(self, seq: int, batch: list) -> None:
        t0 = time.monotonic()
        observe = self._observe

        def payloads(s: Any) -> tuple[dict[str, list[Work]], int | None]:
            by_worker: dict[str, list[Work]] = {}
            now_wall = time.time()
            for tid, chunk, count, attempt, token, worker in batch:
                t = s.tasks.get(tid)
                if t is None:
                    continue
                if attempt == 1:
                    observe("queue_wait", max(0.0, now_wall - t.created_at))
                by_worker.setdefault(worker, []).append(
                    Work(tid, chunk, count, attempt, token, payload_for(t.spec, chunk, count),
                         t.priority))
            return by_worker, d.dispatch_floor(chain(_priorities(s), self._arriving()))

        by_worker, floor = self.replica.read(payloads)
        remote = [w for w in by_worker if w != self.node_id]
        left = [len(remote) + 1]

        def delivered(left: list = left) -> None:
            with self._cond:
                left[0] -= 1
                if left[0] == 0:
                    self._done_n += 1
                    self._undelivered.pop(seq, None)
                    self._cond.notify_all()

        for worker, works in by_worker.items():
            if worker == self.node_id:
                self._run_local(works, floor)
                continue
            address = self._address_of(worker)
            if address is None:
                delivered()
                continue  # lease check requeues these
            req = peer_pb2.DispatchRequest(leader_id=self.node_id, assignments=[
                peer_pb2.Assignment(task_id=w.task_id, chunk=w.chunk,
                                    chunk_count=w.chunk_count, attempt=w.attempt,
                                    token=w.token, payload_json=dumps(w.payload),
                                    priority=w.priority)
                for w in works], has_floor=floor is not None, floor=floor or 0)
            self._send(worker, address, req, delivered)
        delivered()
        observe("dispatch_latency", time.monotonic() - t0)

    def _send(self, worker: str, address: str, req: Any, done: Callable[[], None]) -> None:
        """Queue a Dispatch for the worker's sender thread. One thread per worker
        makes blocking calls, in order: a gRPC future would start a channel thread
        whenever the channel was idle (most calls at moderate rates), and a slow
        worker delays only its own dispatches."""
        with self._cond:
            q = self._senders.get(worker)
            if q is None:
                q = self._senders[worker] = queue.Queue()
                threading.Thread(target=self._guard(lambda: self._sender_loop(worker, q)),
                                 name=f"dispatch-{worker}", daemon=True).start()
            q.put((address, req, done))

    def _sender_loop(self, worker: str, q: queue.Queue) -> None:
        idle = 0
        while not self._stop.is_set():
            try:
                address, req, done = q.get(timeout=0.5)
            except queue.Empty:
                idle += 1
                if idle >= 60:  # 30 s without work: end (a new one starts on demand)
                    with self._cond:
                        if q.empty():
                            self._senders.pop(worker, None)
                            return
                continue
            idle = 0
            try:
                # wait_for_ready: a channel still backing off from a peer that was
                # not up yet must not fail the dispatch at once.
                self.peers.stub(address).Dispatch(
                    req, timeout=DISPATCH_TIMEOUT_S, wait_for_ready=True,
                    metadata=self.peers.metadata)
            except grpc.RpcError as exc:
                log.warning("node %s: dispatch to %s failed: %s", self.node_id, worker, exc.code())
            finally:
                done()


__all__ = ["DISPATCH_TIMEOUT_S", "PEER_CHANNEL_OPTIONS", "Dispatcher", "Peers"]
