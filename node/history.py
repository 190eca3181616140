"""The node's recent history, for the dashboard's charts and task stream.

Bounded and in memory, with no database: a ring of one sample per second for the
last :data:`WINDOW_S` seconds, and the most recent :data:`MAX_SPANS` unit runs.

Where it comes from. A voter reads the task events its own replica publishes on the
event bus (node/events.py) as each Raft entry applies: every voter applies the same
entries in the same order, and an event's ``at`` is the proposing leader's clock
carried in the command, so every voter builds the same history, and it goes on
across a leader change without a gap (the new leader had been recording all along).
Queue depth by priority is read from the local replica each second; CPU and memory
of every node come from the cluster status (the leader's worker table, which a
follower asks the leader for) every :data:`NODES_EVERY_S` seconds.

A non-voter has no replica and sees no task events: the HTTP route forwards its
request to a voter (see :func:`taskandgo.node.http.Handler.h_history`).

Contract of :meth:`History.snapshot`: samples are in time order, one per second
(a second with no sample, e.g. while the node was stopped, is simply absent);
``started``/``finished`` count unit runs (a whole task is one unit, a split task one
per chunk) that began/ended with a result in that second (a cancelled or handed-back
run did not finish); ``p50_s``/``p99_s`` are the
submit-to-final-state latencies of the tasks that ended in that second (None when
none did); spans are unit runs, open ones with ``end`` None.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskandgo.consensus.model import priority_name

log = logging.getLogger("taskandgo.history")

#: Seconds of per-second samples kept.
WINDOW_S = 600
#: Unit runs kept for the task stream (finished ones; open ones are bounded alike).
MAX_SPANS = 5000
#: Submit times remembered for the latency of tasks not finished yet.
MAX_PENDING = 100_000
#: How often every node's CPU and memory are asked for (a follower asks the leader).
NODES_EVERY_S = 2.0
#: A second's events are sampled this long after it ended (events of a second
#: arrive as their Raft entries apply, a little later).
SETTLE_S = 0.5
#: Unit statuses that end a run without it having finished (requeued, held back).
_UNFINISHED_ENDS = frozenset({"requeued", "queued"})
_FINAL = frozenset({"succeeded", "failed", "cancelled"})
WHOLE = -1


@dataclass
class Span:
    """One run of one unit on one node."""

    task_id: str
    chunk: int
    node: str
    start: float
    end: float | None = None
    status: str = "running"
    priority: int | None = None
    #: True once the unit's real start (the worker's, after any prefetch wait) was read.
    resolved: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "chunk": self.chunk, "node": self.node,
                "start": round(self.start, 3),
                "end": None if self.end is None else round(self.end, 3),
                "status": self.status, "priority": self.priority,
                "priority_name": None if self.priority is None else priority_name(self.priority)}


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values by nearest rank; values non-empty."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class History:
    """Per-second samples and unit spans. Thread-safe; :meth:`start` runs the thread
    that reads the bus and samples, :meth:`ingest` and :meth:`sample` are its steps
    (tests call them directly with their own clock).

    ``read_state(fn)`` runs fn on the local replica's state (None on a non-voter);
    ``cluster()`` returns the cluster status (raises when no leader is known)."""

    def __init__(self, node_id: str, bus: Any,
                 read_state: Callable[[Callable[[Any], Any]], Any] | None,
                 cluster: Callable[[], dict[str, Any]] | None,
                 window_s: int = WINDOW_S, max_spans: int = MAX_SPANS,
                 clock: Callable[[], float] = time.time) -> None:
        self.node_id = node_id
        self.bus = bus
        self.read_state = read_state
        self.cluster = cluster
        self.window_s = window_s
        self.max_spans = max_spans
        self.clock = clock
        self._lock = threading.Lock()
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=window_s)
        self.spans: collections.deque[Span] = collections.deque(maxlen=max_spans)
        self._open: dict[tuple[str, int], Span] = {}
        #: task id -> chunks with an open run (a task's end closes them without a scan)
        self._open_chunks: dict[str, dict[int, None]] = {}
        self._submitted: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: second -> [started, finished, latencies]
        self._buckets: dict[int, list[Any]] = {}
        self._last_second: int | None = None
        self._nodes: dict[str, dict[str, float]] = {}
        self._nodes_at = -math.inf
        self._unresolved: list[Span] = []

    # ------------------------------------------------------------------ thread

    def start(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self._run, args=(stop,), name="history", daemon=True)
        t.start()
        return t

    def _run(self, stop: threading.Event) -> None:
        seq = self.bus.seq  # only what happens from now on
        while not stop.is_set():
            try:
                events = self.bus.since(seq, 0.25)
                if events:
                    if events[0].get("seq", seq + 1) > seq + 1:
                        log.debug("history: %d events were gone from the bus",
                                  events[0]["seq"] - seq - 1)
                    seq = events[-1].get("seq", seq)
                    self.ingest(events)
                self.sample()
            except Exception:  # a failed step must not end the history
                log.exception("history step failed")
                stop.wait(1.0)

    # ------------------------------------------------------------------ steps

    def _bucket(self, at: float) -> list[Any]:
        second = int(at)
        if self._last_second is not None and second <= self._last_second:
            second = self._last_second + 1  # late: counted in the next sample
        return self._buckets.setdefault(second, [0, 0, []])

    def ingest(self, events: list[dict[str, Any]]) -> None:
        """Take task events in the bus's shape (see node/events.py)."""
        with self._lock:
            for e in events:
                if e.get("kind") != "task":
                    continue
                try:
                    self._ingest_one(str(e["task_id"]), str(e["status"]), int(e["chunk"]),
                                     str(e.get("node") or ""), float(e["at"]))
                except (KeyError, TypeError, ValueError):
                    continue

    def _ingest_one(self, tid: str, status: str, chunk: int, node: str, at: float) -> None:
        key = (tid, chunk)
        if status == "queued" and chunk == WHOLE and tid not in self._submitted \
                and key not in self._open:
            self._submitted[tid] = at
            if len(self._submitted) > MAX_PENDING:
                self._submitted.popitem(last=False)
            return
        if status == "running":
            if not node:
                return  # a split task was cut into chunks: not a run
            self._close(key, at, "requeued")  # a stale open run of the same unit
            span = Span(tid, chunk, node, at)
            self._open[key] = span
            self._open_chunks.setdefault(tid, {})[chunk] = None
            if len(self._open) > self.max_spans:  # the oldest open run is forgotten
                old = next(iter(self._open))
                self._open.pop(old)
                self._forget_open(old)
            self._bucket(at)[0] += 1
            return
        unit_status = status[len("chunk_"):] if status.startswith("chunk_") else status
        if key in self._open:
            # A run that ended with a result (a failed attempt to be retried too);
            # a cancelled or handed-back one did not finish.
            if unit_status in ("succeeded", "failed") or status == "retrying":
                self._bucket(at)[1] += 1
            self._close(key, at, unit_status if status not in _UNFINISHED_ENDS else status)
        if chunk == WHOLE and status in _FINAL:
            # The task ended: its latency, and any run still open was cancelled.
            for c in list(self._open_chunks.get(tid, ())):
                self._close((tid, c), at, "cancelled")
            submitted = self._submitted.pop(tid, None)
            if submitted is not None:
                self._bucket(at)[2].append(max(0.0, at - submitted))

    def _close(self, key: tuple[str, int], at: float, status: str) -> None:
        span = self._open.pop(key, None)
        if span is None:
            return
        self._forget_open(key)
        span.end = max(at, span.start)
        span.status = status
        self.spans.append(span)
        self._unresolved.append(span)

    def _forget_open(self, key: tuple[str, int]) -> None:
        chunks = self._open_chunks.get(key[0])
        if chunks is not None:
            chunks.pop(key[1], None)
            if not chunks:
                del self._open_chunks[key[0]]

    def sample(self) -> None:
        """Close every second that ended at least SETTLE_S ago into a sample."""
        now = self.clock()
        upto = int(now - SETTLE_S) - 1  # the last whole second to close
        with self._lock:
            if self._last_second is None:
                self._last_second = upto
                return
            if upto <= self._last_second:
                return
        queue = self._queue_depth()
        nodes = self._node_resources(now)
        self._resolve()
        with self._lock:
            first = max(self._last_second + 1, upto - self.window_s + 1)
            for second in range(first, upto + 1):
                started, finished, latencies = self._buckets.pop(second, (0, 0, []))
                self.samples.append({
                    "t": second, "started": started, "finished": finished,
                    "completed": len(latencies),
                    "p50_s": round(quantile(latencies, 0.5), 4) if latencies else None,
                    "p99_s": round(quantile(latencies, 0.99), 4) if latencies else None,
                    "queue": queue, "nodes": nodes})
            for second in [s for s in self._buckets if s <= upto]:
                del self._buckets[second]
            self._last_second = upto

    def _queue_depth(self) -> dict[str, int] | None:
        if self.read_state is None:
            return None
        try:
            byp = self.read_state(lambda s: dict(s.queued_by_priority))
        except Exception:  # noqa: BLE001 - a replica not started yet: no sample value
            return None
        return {priority_name(p): n for p, n in sorted(byp.items(), reverse=True)}

    def _node_resources(self, now: float) -> dict[str, dict[str, float]]:
        # Every NODES_EVERY_S; every second until the first answer (a node that asked
        # before there was a leader would otherwise show no nodes for that long).
        wait = NODES_EVERY_S if self._nodes else 1.0
        if self.cluster is None or now - self._nodes_at < wait:
            return self._nodes
        self._nodes_at = now
        try:
            status = self.cluster()
        except Exception:  # noqa: BLE001 - no leader right now: keep the last values
            return self._nodes
        self._nodes = {
            str(n.get("id", "")): {"cpu_percent": round(float(n.get("cpu_percent", 0.0)), 1),
                                   "memory_percent": round(float(n.get("memory_percent", 0.0)),
                                                           1),
                                   "memory_rss": int(n.get("memory_rss", 0))}
            for n in status.get("nodes", [])
            if n.get("role") not in ("unreachable", "unknown") and n.get("id")}
        return self._nodes

    def _resolve(self) -> None:
        """Fill in priorities (of open and newly closed runs) and the worker's real
        start of closed runs from the replica: the events carry neither."""
        with self._lock:
            todo = self._unresolved + [s for s in self._open.values() if s.priority is None]
            self._unresolved = []
        if not todo or self.read_state is None:
            return
        keys = [(s.task_id, s.chunk) for s in todo]

        def look(state: Any) -> list[tuple[int, float] | None]:
            out: list[tuple[int, float] | None] = []
            for tid, chunk in keys:
                task = state.tasks.get(tid)
                unit = task.unit_at(chunk) if task is not None else None
                out.append(None if unit is None else (task.priority, unit.started_at))
            return out

        try:
            found = self.read_state(look)
        except Exception:  # noqa: BLE001
            return
        with self._lock:
            for span, got in zip(todo, found):
                if got is None:
                    continue
                span.priority = got[0]
                if span.end is not None and not span.resolved:
                    span.resolved = True
                    # The unit's start as its worker reported it, when it belongs to
                    # this run (a later attempt has its own).
                    if span.start <= got[1] <= span.end:
                        span.start = got[1]

    # ------------------------------------------------------------------ reading

    def snapshot(self, window_s: int = 300, max_spans: int = 1000) -> dict[str, Any]:
        """The last window_s seconds of samples and up to max_spans of the most recent
        runs that overlap them (open ones first)."""
        now = self.clock()
        since = now - window_s
        with self._lock:
            samples = [s for s in self.samples if s["t"] >= since]
            open_spans = sorted(self._open.values(), key=lambda s: s.start)
            closed = [s for s in self.spans if s.end is not None and s.end >= since]
        spans = (open_spans + closed[::-1])[:max_spans]
        spans.sort(key=lambda s: s.start)
        return {"node": self.node_id, "now": round(now, 3), "interval_s": 1,
                "window_s": window_s, "samples": samples,
                "spans": [s.as_json() for s in spans]}


def fetch_from_voter(app: Any, window_s: int, max_spans: int,
                     authorization: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
    """A non-voter's history: the leader's, over HTTP(S) from the leader's own
    address, with the caller's bearer token (and this node's certificate where the
    nodes use mTLS). Raises Unavailable when no leader answers."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    from taskandgo.node.replica import Unavailable

    status = app.cluster_status()
    leader = next((n for n in status.get("nodes", []) if n.get("id") == status.get("leader_id")
                   and n.get("http_address")), None)
    if leader is None:
        raise Unavailable("no leader with an HTTP address known")
    cfg = app.cfg
    ctx: ssl.SSLContext | None = None
    if cfg.tls:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca or None)
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    url = (f"{'https' if ctx else 'http'}://{leader['http_address']}/api/v1/history"
           f"?window_s={int(window_s)}&spans={int(max_spans)}")
    req = urllib.request.Request(url, headers={"Authorization": authorization}
                                 if authorization else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as res:
            body: dict[str, Any] = json.loads(res.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            from taskandgo.node.security import Unauthenticated

            raise Unauthenticated("the leader refused the token") from None
        raise Unavailable(f"leader {leader['id']} answered {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise Unavailable(f"leader {leader['id']} unreachable: {exc}") from None
    body["forwarded_from"] = leader["id"]
    return body


__all__ = ["History", "Span", "fetch_from_voter", "quantile"]
