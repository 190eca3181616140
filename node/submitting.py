"""Submitting: client submits and cancels, batched into replicated commands.

:class:`Submitter` checks a submit (spec shape, the call policy, the queue bound),
has lower units waiting in prefetch windows handed back first when the submit is
more urgent than what runs, and queues it; its flusher thread merges the queued
submits into one ``submit`` command per round (at once when idle, accumulating
while earlier commands are in flight, at most MAX_SUBMIT_BATCH tasks and about
MAX_SUBMIT_BYTES of payload) and retries a command that did not commit with the
same ids until the caller's deadline. A non-voter forwards to a voter. The
constructor starts nothing; :meth:`start` starts the flusher.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import ContextVar
from typing import Any

from taskandgo.consensus.commands import Cancel, Submit
from taskandgo.consensus.policy import POLICY_PROTOCOL
from taskandgo.consensus.raft import MAYBE_COMMITTED, fail_reason_name
from taskandgo.consensus.state import SchedulerState
from taskandgo.node import decisions as d
from taskandgo.node.config import NodeConfig
from taskandgo.node.placement import (
    PLACEMENT_PROTOCOL,
    Offer,
    placed,
    spec_request,
    spec_require,
    unfit_reason,
)
from taskandgo.node.replica import NotFound, Replica, Unavailable, spec_to_api
from taskandgo.node.security import Overloaded
from taskandgo.node.tasks import InvalidTask, normalize, spec_bytes
from taskandgo.node.timing import DELAYED_PROTOCOL, DEPENDENCY_PROTOCOL

log = logging.getLogger("taskandgo.node")

MAX_SUBMIT_BATCH = 5000
#: Submit calls merged into one command stop at about this many bytes of payload: a
#: Raft entry far above it would exceed the transport's frame bound on the way to the
#: followers (consensus/transport.py) and stall replication behind it.
MAX_SUBMIT_BYTES = 8 * 1024 * 1024
MAX_INFLIGHT_SUBMITS = 4
SUBMIT_RETRY_S = 3.0
#: A follower hands a submit of at most this many tasks to the leader over gRPC (the
#: leader can then assign them in the submit command itself: the fast path); bigger
#: ones go through Raft's own forwarding, which batches them with others.
MAX_FORWARD_SPECS = 16
#: Metadata of a submit one voter forwards to the leader: the receiver proposes it
#: itself and never forwards it again (two voters that each take the other for the
#: leader for a moment cannot pass it back and forth).
FORWARDED_HEADER = "x-taskandgo-forwarded"
#: Set while a server thread handles a submit that carried FORWARDED_HEADER.
FORWARDED: ContextVar[bool] = ContextVar("taskandgo_forwarded_submit", default=False)
#: A submit forwarded to the leader returns once this replica has applied it too
#: (read-your-writes at the node the client asked), or after this long at most.
LOCAL_APPLY_WAIT_S = 1.0


class Submitter:
    """Client submits and cancels. ``accepting()`` says whether this node takes
    work; ``hold_for(priority, task_ids)`` has the leader plan nothing below
    ``priority`` until those tasks are queued and lower units waiting in windows
    handed back (best effort, bounded); ``forward()`` gives a Client to a voter (non-voters);
    ``observe(name, seconds)`` records a metric."""

    def __init__(self, cfg: NodeConfig, replica: Replica, stop: threading.Event, *,
                 accepting: Callable[[], bool],
                 hold_for: Callable[[int, tuple[str, ...]], None],
                 forward: Callable[[], Any], observe: Callable[[str, float], None],
                 guard: Callable[[Callable[[], None]], Callable[[], None]],
                 to_leader: Callable[[], Any] | None = None,
                 offers: Callable[[], tuple[Offer, ...]] | None = None,
                 fast_path: Callable[[list[dict[str, Any]]], Any] | None = None) -> None:
        self.cfg = cfg
        #: The leader's fast path (Scheduler.fast_path): assignments a submit command
        #: carries for its own tasks, or None.
        self._fast_path = fast_path
        #: The live workers and what they offer (the leader's picture, see
        #: WorkerSide.cluster_offers): a request none of them could hold is refused.
        self._offers = offers
        #: Clients kept for forwarded submits, by their target list (see _kept).
        self._clients: dict[tuple[str, ...], Any] = {}
        self.replica = replica
        self._stop = stop
        self._accepting = accepting
        self._hold_for = hold_for
        self._forward = forward
        self._observe = observe
        self._guard = guard
        self._to_leader = to_leader
        # (specs, future, monotonic deadline, payload bytes) per submit call
        self._q: queue.Queue = queue.Queue()
        self._inflight = 0
        self._cond = threading.Condition()
        #: The lowest priority this node has seen queued, running, waiting to retry
        #: or submitted (None: none yet): see decisions.needs_hold.
        self._lowest_seen: int | None = None

    def start(self) -> None:
        if self.replica.replicated is not None:
            threading.Thread(target=self._guard(self._loop), name="submit-flusher",
                             daemon=True).start()

    def submit(self, raw_specs: list[dict[str, Any]],
               timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Submit tasks; returns once committed by a majority. InvalidTask (naming
        ``tasks[i].field`` in a batch), Overloaded (queue full), Unavailable."""
        if self.replica.fatal is not None:
            raise Unavailable(f"node stopped: its replica diverged ({self.replica.fatal})")
        if not self._accepting():
            raise Unavailable("node is shutting down")
        specs = []
        for i, raw in enumerate(raw_specs):
            try:
                spec = normalize(raw, self.replica.default_strategy() or self.cfg.strategy)
                self.cfg.policy.check(spec, self.cfg.default_runner)
                specs.append(spec)
            except InvalidTask as exc:
                if len(raw_specs) > 1:
                    raise InvalidTask(f"tasks[{i}].{exc.field}", exc.message) from None
                raise
        if any(placed(s) for s in specs):
            self._check_fit(specs, len(raw_specs) > 1)
        if self.replica.replicated is None:
            # A kept client: a channel opened per call cost a connection per submit.
            return self._kept(self._forward).submit_many([spec_to_api(s) for s in specs])
        level = max((DEPENDENCY_PROTOCOL if s.get("after") else DELAYED_PROTOCOL
                     for s in specs if s.get("after") or s.get("run_at")), default=0)
        if any(placed(s) for s in specs):
            level = max(level, PLACEMENT_PROTOCOL)
        if any(s.get("concurrency_keys") for s in specs):
            # A leader of an earlier release would not count the keys.
            level = max(level, POLICY_PROTOCOL)
        if level and not self.replica.voters_at(level):
            # A replica of an earlier release would queue such a task at once (and
            # diverge): only the leader knows every voter's release, from heartbeats.
            if self.replica.is_leader() or self._to_leader is None:
                raise Unavailable("a voter runs an earlier release that cannot keep delayed, "
                                  "dependent, placed or keyed tasks (run_at, after, "
                                  "resources, require, prefer, concurrency_keys); upgrade "
                                  "every voter first")
            with self._to_leader() as c:
                return c.submit_many([spec_to_api(s) for s in specs])
        if self._forwardable(specs):
            out = self._forward_to_leader(specs, timeout_s)
            if out is not None:
                return out
        if any(s.get("after") for s in specs):
            self._check_parents(specs, len(raw_specs) > 1)
        queued, lowest = self.replica.read(lambda s: (s.queued_count(), _lowest(s)))
        if queued + len(specs) > self.cfg.max_queued:
            raise Overloaded(f"queue is full ({queued} queued, bound {self.cfg.max_queued}); "
                             "retry later")
        top = max(s["priority"] for s in specs) if specs else 0
        seen = [p for p in (self._lowest_seen, lowest) if p is not None]
        seen_low = min(seen) if seen else None
        if d.needs_hold(top, seen_low):
            # Lower-priority units may wait in workers' prefetch windows, or be on
            # their way there (assignments and lower submits this replica cannot
            # see yet): have the leader stop planning below this priority until
            # these tasks are queued and hand the waiting ones back before this
            # submit is proposed, so none of them starts after it is accepted.
            self._hold_for(top, tuple(str(s["id"]) for s in specs))
        low = min(s["priority"] for s in specs) if specs else top
        self._lowest_seen = low if seen_low is None else min(seen_low, low)
        fut: Future = Future()
        self._q.put((specs, fut, time.monotonic() + min(timeout_s, SUBMIT_RETRY_S),
                     sum(spec_bytes(s) for s in specs)))
        try:
            out = fut.result(timeout=timeout_s)
        except FutureTimeout:
            raise Unavailable("submit was not committed in time (no leader?)") from None
        return [{"task_id": tid, "created": created, "status": status}
                for tid, created, status in out]

    def _forwardable(self, specs: list[dict[str, Any]]) -> bool:
        """Should this voter hand the submit to the leader over gRPC? Yes on a
        follower that knows its leader, for a few tasks the leader could assign at
        once (see Scheduler.fast_path), unless the submit was itself forwarded here.
        Whether every voter runs the fast path only the leader knows (from
        heartbeats); a leader of an earlier release takes it as any submit."""
        return (len(specs) <= MAX_FORWARD_SPECS and self._to_leader is not None
                and not FORWARDED.get() and not self.replica.is_leader()
                and self.replica.leader_voter() is not None
                and all(not (s.get("after") or s.get("run_at") is not None
                             or s.get("concurrency_keys")) for s in specs))

    def _forward_to_leader(self, specs: list[dict[str, Any]],
                           timeout_s: float) -> list[dict[str, Any]] | None:
        """Submit at the leader (one gRPC call on a kept channel), then wait until
        this replica has applied it. None: the leader could not take it (gone,
        deposed, unreachable): the caller proposes it here instead, with the same
        ids, so a forward that did commit is not repeated. Overloaded as the
        leader says."""
        import grpc
        from taskandgo.node.client import _spec_msg
        from taskandgo.protos import taskandgo_pb2 as pb

        leader = self.replica.leader_voter()
        if leader is None or self._to_leader is None:
            return None
        t0 = time.monotonic()
        try:
            c = self._kept(self._to_leader)
        except Unavailable:
            return None
        md = (*c._metadata, (FORWARDED_HEADER, "1"))
        req = pb.SubmitTasksRequest(tasks=[_spec_msg(spec_to_api(s)) for s in specs])
        try:
            resp = c._stub(leader.grpc).SubmitTasks(
                req, timeout=max(0.2, min(timeout_s, SUBMIT_RETRY_S)), metadata=md)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Overloaded(exc.details() or "queue is full; retry later") from None
            log.info("node %s: submit forwarded to the leader failed (%s); proposing it here",
                     self.cfg.node_id, exc.code())
            return None
        out = [{"task_id": r.task_id, "created": r.created, "status": r.status}
               for r in resp.results]
        self._await_local([r["task_id"] for r in out], t0 + LOCAL_APPLY_WAIT_S)
        self._observe("submit_commit", time.monotonic() - t0)
        return out

    def _kept(self, make: Callable[[], Any]) -> Any:
        """The kept Client for the targets ``make()`` names (a Client opens its
        channels only when first used, so making one to compare is cheap). Bounded:
        the targets are a voter, or a leader hint followed by the voters."""
        fresh = make()
        with self._cond:
            return self._clients.setdefault(tuple(fresh.nodes), fresh)

    def _await_local(self, ids: list[str], deadline: float) -> None:
        """Wait (until the monotonic deadline) until this replica holds every task:
        woken by the events of each applied command, not by a timer."""
        bus = self.replica.bus
        seq = bus.seq
        while not self.replica.read(lambda s: all(t in s.tasks for t in ids)):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            events = bus.since(seq, min(left, 0.1))
            if events:
                seq = events[-1]["seq"]

    def _check_fit(self, specs: list[dict[str, Any]], batch: bool) -> None:
        """A spec whose request or required labels no live worker could hold even
        idle is refused (InvalidTask naming ``resources`` or ``require``, and the
        largest node's capacity). Nothing is refused while no worker is known."""
        offers = self._offers() if self._offers is not None else ()
        for i, s in enumerate(specs):
            if not placed(s):
                continue
            why = unfit_reason(spec_request(s), spec_require(s), offers)
            if why is not None:
                name = "require" if why.startswith("no node has") else "resources"
                raise InvalidTask(f"tasks[{i}].{name}" if batch else name, why)

    def _check_parents(self, specs: list[dict[str, Any]], batch: bool) -> None:
        """Every id a spec's ``after`` names must be a task this replica holds, or one
        earlier in the same call (so no cycle can ever be made): InvalidTask naming
        ``after`` (``tasks[i].after``) otherwise."""
        wanted = sorted({p for s in specs for p in s.get("after") or ()})
        known = self.replica.read(lambda s: {p for p in wanted if p in s.tasks})
        earlier: set[str] = set()
        for i, s in enumerate(specs):
            missing = [p for p in s.get("after") or () if p not in known and p not in earlier]
            if missing:
                raise InvalidTask(f"tasks[{i}].after" if batch else "after",
                                  f"unknown task {missing[0]!r} (a task can wait only for "
                                  "tasks submitted before it)")
            earlier.add(str(s["id"]))

    def cancel(self, task_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Cancel a task (voters; retried until committed or SUBMIT_RETRY_S)."""
        fut: Future = Future()
        deadline = time.monotonic() + min(timeout_s, SUBMIT_RETRY_S)

        def propose() -> None:
            self.replica.propose(Cancel((task_id,), time.time()), callback=done)

        def done(result: Any, err: int) -> None:
            if err == 0 and result:
                fut.set_result(result[0])
            elif time.monotonic() < deadline:
                threading.Timer(0.05, propose).start()
            else:
                fut.set_exception(Unavailable(f"cancel not committed: {fail_reason_name(err)}"))

        propose()
        try:
            tid, status, _ = fut.result(timeout=timeout_s)
        except FutureTimeout:
            raise Unavailable("cancel was not committed in time") from None
        if status == "not_found":
            raise NotFound(f"task {task_id} not found")
        return {"task_id": tid, "status": status}

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            group = [first]
            n, size = len(first[0]), first[3]
            while n < MAX_SUBMIT_BATCH:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if size + item[3] > MAX_SUBMIT_BYTES:
                    self._q.put(item)  # the next command takes it
                    break
                group.append(item)
                n, size = n + len(item[0]), size + item[3]
            with self._cond:
                while self._inflight >= MAX_INFLIGHT_SUBMITS and not self._stop.is_set():
                    self._cond.wait(0.5)
            # A submit whose caller has given up must not commit behind its back.
            now = time.monotonic()
            for item in group:
                if item[2] <= now and not item[1].done():
                    item[1].set_exception(Unavailable("no leader: submit not committed in time"))
            group = [item for item in group if not item[1].done()]
            if not group:
                continue
            with self._cond:
                self._inflight += 1
            self._propose(group)

    def _propose(self, group: list) -> None:
        specs = [s for item in group for s in item[0]]
        t0 = time.monotonic()
        # On the leader, tasks that can start at once are assigned in this command.
        # Only an optimisation: whatever goes wrong there, the submit is proposed.
        fast = None
        if self._fast_path is not None:
            try:
                fast = self._fast_path(specs)
            except Exception:
                log.exception("node %s: fast path failed; submitting without it",
                              self.cfg.node_id)

        def done(result: Any, err: int) -> None:
            if fast is not None:
                both = err == 0 and isinstance(result, tuple) and len(result) == 2
                fast.done(result[1] if both else None, err if both or err else -1)
                if both:
                    result = result[0]
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()
            if err == 0:
                self._observe("submit_commit", time.monotonic() - t0)
            if err == 0 and isinstance(result, list) and len(result) == len(specs):
                i = 0
                for item_specs, fut, *_ in group:
                    if not fut.done():
                        fut.set_result(result[i:i + len(item_specs)])
                    i += len(item_specs)
                return
            # Not committed (or maybe committed: LEADER_CHANGED / UNKNOWN_OUTCOME):
            # retry with the same ids, which makes a repeat harmless.
            retry = [item for item in group if time.monotonic() < item[2] and not item[1].done()]
            for item in group:
                if item not in retry and not item[1].done():
                    item[1].set_exception(Unavailable(
                        f"no leader: submit not committed ({fail_reason_name(err)})"))
            if retry:
                def resubmit() -> None:
                    for it in retry:
                        self._q.put(it)

                threading.Timer(0.05 if err not in MAYBE_COMMITTED else 0.0, resubmit).start()

        if fast is None:
            self.replica.propose(Submit(tuple(specs), time.time()), callback=done)
        else:
            self.replica.propose(Submit(tuple(specs), time.time(), fast.entries, fast.lease_s),
                                 callback=done)


def _lowest(s: SchedulerState) -> int | None:
    """The lowest priority queued, running or waiting to retry in the replica (under
    its lock; bounded by the priority levels and the cluster's capacity)."""
    prios = set(s.queued_by_priority)
    tasks = s.tasks
    for tid, _chunk in (*s.running, *s.delayed):
        t = tasks.get(tid)
        if t is not None:
            prios.add(t.priority)
    return min(prios, default=None)


__all__ = ["FORWARDED", "FORWARDED_HEADER", "MAX_SUBMIT_BATCH", "MAX_SUBMIT_BYTES",
           "SUBMIT_RETRY_S", "Submitter"]
