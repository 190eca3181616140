"""The node: wires Raft, the leader loop, the executor, heartbeats and reporting.

Threads (all daemon, all stop on :meth:`NodeApp.stop`):

* PySyncObj's tick thread applies commands and fires callbacks (never blocked);
* ``submit-flusher`` batches client submits into one Raft command per round
  (at once when idle, accumulating while earlier commands are in flight);
* ``leader`` plans and proposes assignments, requeues units of workers whose lease
  ran out, commits reported results, and compacts finished tasks — only while this
  node is the Raft leader and has applied an entry of its own term;
* ``dispatch`` sends committed assignments to workers (one RPC per worker);
* ``heartbeat`` reports this node's running set and free slots to the leader and
  kills what the leader says is no longer ours;
* ``reporter`` sends finished units' results to the leader until committed.

Every node is a worker; only voters hold the replicated state. A non-voter
forwards client calls to a voter through :class:`taskandgo.Client`.
"""

from __future__ import annotations

import collections
import gc
import itertools
import logging
import queue
import random
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import psutil

from taskandgo.consensus.identity import ClusterIdentity, check_data_dir, record_cluster_id, \
    record_divergence
from taskandgo.consensus.raft import FAIL_REASON, MAYBE_COMMITTED, RAFT_PROTOCOL, Raft, \
    RaftTimers, ReplicatedState, fail_reason_name
from taskandgo.consensus.state import FAILED, FINAL, PRIORITY_LEVELS, SUCCEEDED, SchedulerState, \
    priority_name
from taskandgo.node.config import NodeConfig, Voter
from taskandgo.node.executor import Executor, Work
from taskandgo.node.security import PEER_PROTOCOL, Overloaded, PeerAuth, PeerIdentity, \
    PermissionDenied
from taskandgo.node.tasks import InvalidTask, check_status, normalize, payload_for, spec_bytes
from taskandgo.protos import peer_pb2, peer_pb2_grpc
from taskandgo.strategies import QueuedUnit, Worker, plan

log = logging.getLogger("taskandgo.node")

MAX_SUBMIT_BATCH = 5000
#: Submit calls merged into one command stop at about this many bytes of payload: a
#: Raft entry far above it would exceed the transport's frame bound on the way to the
#: followers (consensus/transport.py) and stall replication behind it.
MAX_SUBMIT_BYTES = 8 * 1024 * 1024
MAX_INFLIGHT_SUBMITS = 4
MAX_INFLIGHT_ASSIGNS = 3
#: Peers restart within seconds: reconnect quickly instead of gRPC's default
#: backoff of up to two minutes.
PEER_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1000)]
SUBMIT_RETRY_S = 3.0
#: How often surviving objects are frozen out of the cyclic collector.
GC_FREEZE_S = 10.0
#: A prefetch window holds about this much work (seconds per slot, at the recent
#: run time), up to the worker's --prefetch.
PREFETCH_WORK_S = 0.2
DISPATCH_TIMEOUT_S = 2.0
#: How often the leader proposes an audit point (ReplicatedState.verify).
VERIFY_EVERY_S = 2.0
#: A worker handed a Dispatch waits up to this long, in all, for its view of the
#: leader (a fresh heartbeat) and, on a voter, its replica to catch up with the
#: dispatched units, before it refuses them. Below DISPATCH_TIMEOUT_S.
DISPATCH_CHECK_S = 1.5


class Unavailable(Exception):
    """No leader can be reached now (gRPC UNAVAILABLE / HTTP 503); safe to retry."""


class NotFound(Exception):
    """No such task (gRPC NOT_FOUND / HTTP 404)."""


@dataclass
class WorkerInfo:
    node_id: str
    grpc_address: str = ""
    http_address: str = ""
    raft_address: str = ""
    voter: bool = False
    slots: int = 0
    capacity: int = 0
    free_slots: int = 0
    running: set = field(default_factory=set)
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    memory_rss: int = 0
    accepting: bool = True
    last_seen: float = 0.0  # monotonic, on the leader
    last_seen_wall: float = 0.0
    down: bool = False
    raft_protocol: int = 0  # its release's RAFT_PROTOCOL (0: before 0.2)


class EventBus:
    """Recent events with sequence numbers, for watchers and waiters."""

    def __init__(self, maxlen: int = 50_000) -> None:
        self._events: collections.deque = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self.seq = 0

    def publish(self, events: list[dict[str, Any]]) -> None:
        with self._cond:
            for e in events:
                self.seq += 1
                e["seq"] = self.seq
                self._events.append(e)
            self._cond.notify_all()

    def since(self, seq: int, timeout_s: float) -> list[dict[str, Any]]:
        """Events after seq, waiting up to timeout_s for the first one."""
        with self._cond:
            if self.seq <= seq:
                self._cond.wait(timeout_s)
            if self.seq <= seq:
                return []
            # The newest (self.seq - seq) events, walked from the right: slicing from
            # the left walks the whole buffer (50k events) under the lock, which
            # stalled the Raft tick thread's publish once the buffer was full.
            n = min(self.seq - seq, len(self._events))
            out = list(itertools.islice(reversed(self._events), n))
            out.reverse()
            return out

    def wait(self, timeout_s: float) -> None:
        with self._cond:
            self._cond.wait(timeout_s)


class NodeApp:
    """One TaskAndGo node. Construct, :meth:`start`, and :meth:`stop`."""

    def __init__(self, cfg: NodeConfig, timers: RaftTimers | None = None) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.bus = EventBus()
        self.voter: Voter | None = cfg.self_voter
        self.timers = timers or RaftTimers(election_min_s=cfg.election_min_s,
                                           election_max_s=cfg.election_max_s,
                                           append_entries_period_s=cfg.append_entries_s,
                                           snapshot_interval_s=cfg.snapshot_interval_s)
        self.replicated: ReplicatedState | None = None
        self.raft: Raft | None = None
        self.executor = Executor(cfg.node_id, cfg.slots, self._on_unit_result,
                                 interpreters=cfg.interpreters, default_runner=cfg.default_runner,
                                 policy=cfg.policy,
                                 output_limit=cfg.output_limit,
                                 default_timeout_s=cfg.default_timeout_s)
        self.accepting = True
        self._handing_back = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._raft_to_voter = {v.raft: v for v in cfg.voters}
        # submit batching
        self._submit_q: queue.Queue = queue.Queue()
        self._submit_inflight = 0
        self._submit_cond = threading.Condition()
        # leader state (in memory only; rebuilt by a new leader)
        self._lock = threading.RLock()
        self.workers: dict[str, WorkerInfo] = {}
        self._leader_wake = threading.Event()
        self._leader_since: float | None = None
        self._leader_ready = False
        self._barrier_pending = False
        # Assignments proposed but not yet applied, by command: planning skips their
        # units and counts their slots, so several assign commands can be in flight.
        self._assigning: dict[int, list[tuple[str, int, str]]] = {}
        self._assign_seq = 0
        # Units whose result is being committed: they no longer hold a slot.
        self._completing: dict[tuple[str, int], str] = {}
        self._completions: list[tuple[dict[str, Any], Future | None]] = []
        self._complete_inflight = 0
        self._requeue_recent: dict[tuple, float] = {}
        self._dispatch_q: queue.Queue = queue.Queue()
        # Committed assign batches handed to the dispatcher / delivered to workers.
        self._dispatch_put_n = 0
        self._senders: dict[str, queue.Queue] = {}
        self._dispatch_done_n = 0
        self._dispatch_cond = threading.Condition(self._lock)
        # While a hold is in progress (a higher-priority task is being submitted):
        # plan nothing below this priority, until the given monotonic time.
        self._floor: tuple[int, float] | None = None
        # Moving average of recent units' run times (None: none seen as leader yet).
        self._run_ewma: float | None = None
        self.held_back = 0
        self._last_compact = 0.0
        self._elections = 0
        self._last_leader: str | None = None
        # worker side
        self._unreported: dict[tuple, dict[str, Any]] = {}
        self._unreported_cond = threading.Condition()
        self._leader_grpc_hint: str | None = None
        self._proposals: dict[int, tuple[float, Callable[[Any, int], None]]] = {}
        self._proposal_seq = 0
        self._leader_id_hint = ""
        # Peer identity: the credential this node sends and checks on the peer API;
        # the Raft addresses of voters heard running a release that knows random
        # fencing tokens (see _random_tokens); a nudge for the heartbeat loop when a
        # Dispatch names a leader this node has not heard of yet.
        self.peer_auth = PeerAuth.from_password(cfg.raft_password, cfg.peer_cert_names)
        # Raft address -> RAFT_PROTOCOL reported by that voter (see _voters_at).
        self._voter_levels: dict[str, int] = {}
        self._heartbeat_wake = threading.Event()
        self._voter_grpc = {v.grpc for v in cfg.voters}
        self._channels: dict[str, grpc.Channel] = {}
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        psutil.cpu_percent(None)
        self.metrics_hook: Callable[[str, float], None] | None = None
        #: Why this replica stopped itself (it diverged from the cluster), or None.
        self.fatal: str | None = None
        self.fatal_event = threading.Event()
        self.identity: ClusterIdentity | None = None
        self._last_verify = 0.0
        self._started_wall = time.time()  # see _requeue_tail

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start Raft (voters) and the node's threads. Raises IdentityError, before
        anything starts, when the data dir belongs to another cluster or voter set."""
        if self.voter is not None:
            self.identity = check_data_dir(self.cfg.data_dir,
                                           [v.raft for v in self.cfg.voters], self.voter.raft)
            if self.identity.adopted:
                log.warning("node %s: data dir %s has a journal but no cluster identity "
                            "(written by an earlier release): recorded voters %s for it",
                            self.node_id, self.cfg.data_dir, ",".join(self.identity.voters))
            self.replicated = ReplicatedState(listener=self._on_state_events)
            partners = [v.raft for v in self.cfg.voters if v.raft != self.voter.raft]
            self.raft = Raft(self.voter.raft, partners, self.cfg.data_dir, self.cfg.bind,
                             self.cfg.raft_password, self.replicated, self.timers,
                             on_state_changed=self._on_raft_state, fsync=self.cfg.fsync,
                             cluster_id=self.identity.cluster_id, on_fatal=self._on_fatal,
                             on_cluster_id=self._on_cluster_id)
        for name, target in (
            ("submit-flusher", self._submit_loop), ("leader", self._leader_loop),
            ("dispatch", self._dispatch_loop), ("heartbeat", self._heartbeat_loop),
            ("reporter", self._reporter_loop), ("reaper", self._reaper_loop),
        ):
            if name in ("submit-flusher", "leader", "reaper") and self.raft is None:
                continue
            t = threading.Thread(target=self._guard(target), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.cfg.kube_api and self.raft is not None:
            from taskandgo.node.kube import PodWatcher

            self._pod_watcher = PodWatcher(self.cfg.namespace, self.cfg.pod_selector,
                                           self.worker_gone)
            self._pod_watcher.start()
        log.info("node %s started: grpc %s raft %s voter=%s", self.node_id,
                 self.cfg.grpc_address, self.cfg.raft_address, self.voter is not None)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    fn()
                    return
                except Exception:  # noqa: BLE001 - a loop must never die silently
                    log.exception("node %s: %s loop failed; restarting it", self.node_id,
                                  threading.current_thread().name)
                    self._stop.wait(0.2)
        return run

    def drain(self, grace_s: float) -> None:
        """Stop taking work, hand leadership over if we hold it, and let running units
        finish and report (up to grace_s)."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        self.hand_over_leadership(min(2.0, grace_s))
        while time.monotonic() < deadline and self.executor.active():
            self._stop.wait(0.05)
        left = self.executor.active()
        if left:
            # Out of time: kill what still runs and hand it back to be run elsewhere.
            log.info("node %s: handing back %d unfinished unit(s)", self.node_id, len(left))
            self._handing_back = True
            self.executor.kill(left)
        report_by = time.monotonic() + 3.0
        while time.monotonic() < report_by and (self.executor.active() or self._unreported):
            self._stop.wait(0.05)

    def hand_over_leadership(self, timeout_s: float) -> bool:
        """If this node leads, ask a caught-up follower to take over and wait (up to
        timeout_s) until it has; scheduling then stalls for one round, not for an
        election timeout. Returns True when this node no longer leads."""
        if self.raft is None or len(self.cfg.voters) < 2 or not self.raft.is_leader():
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.raft.transfer_leadership()
            step = time.monotonic() + 0.25
            while time.monotonic() < min(step, deadline):
                if not self.raft.is_leader():
                    log.info("node %s: handed leadership over", self.node_id)
                    return True
                self._stop.wait(0.01)
        log.warning("node %s: leadership handover did not complete", self.node_id)
        return False

    def worker_gone(self, node_id: str, reason: str) -> int:
        """A worker is known to be gone (its pod was deleted or evicted): on the
        leader, requeue its units now rather than at lease expiry. Returns how many
        units were requeued (0 on other nodes)."""
        if not self.is_leader() or not self._leader_ready or node_id == self.node_id:
            return 0
        assert self.replicated is not None
        units = self.read(lambda s: s.running_on(node_id))
        with self._lock:
            w = self.workers.get(node_id)
            if w is not None:
                w.last_seen = time.monotonic() - self.cfg.lease_s - 1.0
        if units:
            log.warning("node %s: %s is gone (%s); requeueing %d unit(s)", self.node_id,
                        node_id, reason, len(units))
            self.replicated.requeue([list(u) + self._requeue_tail() for u in units],
                                    time.time(), f"worker {node_id}: {reason}")
        return len(units)

    def stop(self) -> None:
        self._stop.set()
        if getattr(self, "_pod_watcher", None) is not None:
            self._pod_watcher.stop()
        self._leader_wake.set()
        with self._unreported_cond:
            self._unreported_cond.notify_all()
        self.executor.close()
        if self.raft is not None:
            self.raft.destroy()
        for ch in list(self._channels.values()):
            ch.close()

    # ------------------------------------------------------------------ raft info

    def is_leader(self) -> bool:
        return self.raft is not None and self.fatal is None and self.raft.is_leader()

    def _on_fatal(self, reason: str) -> None:
        """This replica diverged (on the Raft tick thread, which has already stopped
        applying and acknowledging): stop serving at once, record why in the data dir
        so a restart refuses to rejoin, and let the main loop exit non-zero."""
        self.fatal = reason
        self.accepting = False
        log.critical("node %s: replica diverged from the cluster, stopping: %s",
                     self.node_id, reason)
        record_divergence(self.cfg.data_dir, reason)
        self.fatal_event.set()

    def _on_cluster_id(self, cluster_id: str) -> None:
        # Tick thread, once per data dir: remember the agreed id beside the journal.
        ident = self.identity
        if ident is not None and ident.cluster_id != cluster_id:
            self.identity = record_cluster_id(self.cfg.data_dir, ident, cluster_id)
            log.info("node %s: cluster id %s recorded in %s", self.node_id, cluster_id,
                     self.cfg.data_dir)

    def _maybe_verify(self, now: float) -> None:
        """Leader: propose an audit point every few seconds (ReplicatedState.verify)
        when the log moved since the last one, once every voter runs a release that
        knows the command."""
        if now - self._last_verify < VERIFY_EVERY_S or self.replicated is None \
                or self.raft is None or not self._voters_at(1):
            return
        self._last_verify = now
        index, window, summary = self.replicated.last_audit()
        if index and self.raft.applied_index() <= index:
            return  # nothing applied since: an idle cluster writes nothing
        proposal = self.replicated.cluster_id or uuid.uuid4().hex
        self.replicated.verify(proposal, index, window, summary)
        if self.raft is not None:
            self.raft.wake()

    def leader_voter(self) -> Voter | None:
        if self.raft is None:
            return None
        addr = self.raft.leader()
        return self._raft_to_voter.get(addr) if addr else None

    def leader_grpc(self) -> str | None:
        if self.raft is not None:
            v = self.leader_voter()
            return v.grpc if v else None
        return self._leader_grpc_hint

    def _on_raft_state(self, old: int, new: int) -> None:
        self._leader_wake.set()
        if new == 2:
            self._elections += 1
        if old == 2 and new != 2:
            # Deposed: PySyncObj will not call our own pending commands back.
            threading.Thread(target=self._release_proposals, args=(True,), daemon=True).start()

    def propose(self, command: str, *args: Any, callback: Callable[[Any, int], None],
                timeout_s: float = 2.0) -> None:
        """Propose a replicated command; callback(result, err) is called exactly once:
        when it applies, when PySyncObj reports failure, or with LEADER_CHANGED after
        timeout_s or when this node stops leading (PySyncObj does not call a deposed
        leader back). A command released that way may still commit later, so every
        caller retries with the same ids or relies on fencing."""
        assert self.replicated is not None
        with self._lock:
            self._proposal_seq += 1
            pid = self._proposal_seq
            self._proposals[pid] = (time.monotonic() + timeout_s, callback)

        def once(result: Any, err: int) -> None:
            with self._lock:
                entry = self._proposals.pop(pid, None)
            if entry is not None:
                entry[1](result, err)

        getattr(self.replicated, command)(*args, callback=once)
        if self.raft is not None:
            self.raft.wake()

    def _release_proposals(self, everything: bool) -> None:
        """Fail pending proposals that are past their deadline (or all of them)."""
        now = time.monotonic()
        with self._lock:
            due = [pid for pid, (deadline, _) in self._proposals.items()
                   if everything or deadline <= now]
            callbacks = [self._proposals.pop(pid)[1] for pid in due]
        for cb in callbacks:
            try:
                cb(None, FAIL_REASON.LEADER_CHANGED)
            except Exception:  # noqa: BLE001
                log.exception("releasing a proposal failed")

    def _reaper_loop(self) -> None:
        last_freeze = time.monotonic()
        while not self._stop.wait(0.1):
            self._release_proposals(everything=False)
            if time.monotonic() - last_freeze > GC_FREEZE_S:
                last_freeze = time.monotonic()
                # The replicated state is hundreds of thousands of long-lived objects
                # without reference cycles (refcounting frees them). Left to the cyclic
                # collector, every full collection walks all of them with the GIL held:
                # tens of ms at 20k tasks, seconds at 1M, long enough to miss Raft
                # heartbeats. Collect the young generations, then move what survived
                # out of the collector's sight.
                gc.collect(1)
                gc.freeze()

    def read(self, fn: Callable[[SchedulerState], Any]) -> Any:
        assert self.replicated is not None
        return self.replicated.read(fn)

    def _on_state_events(self, events: list) -> None:
        self.bus.publish([
            {"kind": k, "task_id": tid, "status": st, "chunk": ch, "node": nd, "at": at}
            for (k, tid, st, ch, nd, at) in events])
        self._leader_wake.set()

    # ------------------------------------------------------------------ client API
    # Every method returns plain dicts in the API's shape and raises InvalidTask,
    # NotFound or Unavailable. A non-voter forwards to a voter.

    def forward_client(self) -> Any:
        targets = [self._leader_grpc_hint] if self._leader_grpc_hint else []
        targets += [v.grpc for v in self.cfg.voters if v.grpc not in targets]
        return self.client(targets, timeout_s=10.0)

    def submit(self, raw_specs: list[dict[str, Any]], timeout_s: float = 10.0) -> list[dict[str, Any]]:
        if self.fatal is not None:
            raise Unavailable(f"node stopped: its replica diverged ({self.fatal})")
        if not self.accepting:
            raise Unavailable("node is shutting down")
        specs = []
        for i, raw in enumerate(raw_specs):
            try:
                spec = normalize(raw, self.cfg.strategy)
                self.cfg.policy.check(spec, self.cfg.default_runner)
                specs.append(spec)
            except InvalidTask as exc:
                if len(raw_specs) > 1:
                    raise InvalidTask(f"tasks[{i}].{exc.field}", exc.message) from None
                raise
        if self.replicated is None:
            with self.forward_client() as c:
                return c.submit_many([_spec_to_api(s) for s in specs])
        queued = self.read(lambda s: s.queued_count())
        if queued + len(specs) > self.cfg.max_queued:
            raise Overloaded(f"queue is full ({queued} queued, bound {self.cfg.max_queued}); "
                             "retry later")
        top = max(s["priority"] for s in specs) if specs else 0
        if self.read(lambda s: s.running_below(top)):
            # Lower-priority units may wait in workers' prefetch windows: have them
            # handed back before this task is accepted, so none of them starts
            # after it while it is queued.
            self._hold_for(top)
        fut: Future = Future()
        self._submit_q.put((specs, fut, time.monotonic() + min(timeout_s, SUBMIT_RETRY_S),
                            sum(spec_bytes(s) for s in specs)))
        try:
            out = fut.result(timeout=timeout_s)
        except FutureTimeout:
            raise Unavailable("submit was not committed in time (no leader?)") from None
        return [{"task_id": tid, "created": created, "status": status}
                for tid, created, status in out]

    def get(self, task_id: str) -> dict[str, Any]:
        if self.replicated is None:
            with self.forward_client() as c:
                return c.get(task_id)
        t = self.read(lambda s: s.tasks[task_id].as_dict() if task_id in s.tasks else None)
        if t is None:
            if self.leader_voter() is None:
                # A voter that has not heard from a leader (just restarted, cut off) may
                # simply not have caught up: let the client ask another node.
                raise Unavailable("this replica has no leader yet and may be behind; retry")
            raise NotFound(f"task {task_id} not found")
        return task_to_api(t)

    def list(self, status: str = "", labels: list[str] | None = None, limit: int = 100,
             page_token: str = "") -> dict[str, Any]:
        check_status(status)
        pairs = []
        for item in labels or []:
            k, sep, v = item.partition("=")
            if not sep:
                raise InvalidTask("labels", f"{item!r}: expected key=value")
            pairs.append((k, v))
        if not 0 <= limit <= 10_000:
            raise InvalidTask("limit", "expected 0..10000")
        limit = limit or 100
        try:
            offset = int(page_token or 0)
        except ValueError:
            raise InvalidTask("page_token", "not a token from a previous response") from None
        if offset < 0:
            raise InvalidTask("page_token", "not a token from a previous response")
        if self.replicated is None:
            with self.forward_client() as c:
                return c.list_page(status, labels or [], limit, page_token)

        def page(s: SchedulerState) -> tuple[list, int]:
            tasks = s.list_tasks(status, pairs)
            return [t.as_dict() for t in tasks[offset:offset + limit]], len(tasks)

        tasks, total = self.read(page)
        nxt = str(offset + limit) if offset + limit < total else ""
        return {"tasks": [task_to_api(t) for t in tasks], "next_page_token": nxt, "total": total}

    def cancel(self, task_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        if self.replicated is None:
            with self.forward_client() as c:
                return c.cancel(task_id)
        fut: Future = Future()
        deadline = time.monotonic() + min(timeout_s, SUBMIT_RETRY_S)

        def propose() -> None:
            assert self.replicated is not None
            self.propose("cancel", [task_id], time.time(), callback=done)

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

    def wait(self, task_ids: list[str], timeout_s: float) -> dict[str, Any]:
        """Block until every task is final or timeout; returns the tasks known."""
        if self.replicated is None:
            with self.forward_client() as c:
                return c.wait_raw(task_ids, timeout_s)
        deadline = time.monotonic() + max(0.0, min(timeout_s or 30.0, 600.0))
        ids = list(dict.fromkeys(task_ids))

        def unfinished(among: set[str]) -> Callable[[SchedulerState], set[str]]:
            return lambda s: {t for t in among if t not in s.tasks or s.tasks[t].status not in FINAL}

        # Check every id once, then only the ids that events name (a full check
        # again whenever events may have been missed), not every id on every event.
        seq = self.bus.seq
        pending = self.read(unfinished(set(ids)))
        last_full = time.monotonic()
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = self.bus.since(seq, min(left, 0.5))
            gap = bool(events) and events[0]["seq"] > seq + 1
            if events:
                seq = events[-1]["seq"]
            if gap or time.monotonic() - last_full > 1.0:
                pending = self.read(unfinished(pending))
                last_full = time.monotonic()
            else:
                touched = {e["task_id"] for e in events} & pending
                if touched:
                    pending -= touched - self.read(unfinished(touched))
        tasks = self.read(lambda s: [s.tasks[t].as_dict() for t in ids if t in s.tasks])
        return {"tasks": [task_to_api(t) for t in tasks], "complete": not pending}

    def events(self, after_seq: int, timeout_s: float) -> list[dict[str, Any]]:
        return self.bus.since(after_seq, timeout_s)

    def node_status(self, include_digest: bool = False) -> dict[str, Any]:
        st: dict[str, Any] = {
            "id": self.node_id, "role": "worker", "voter": self.voter is not None,
            "grpc_address": self.cfg.grpc_address, "http_address": self.cfg.http_address,
            "raft_address": self.cfg.raft_address if self.voter else "",
            "slots": self.cfg.slots, "free_slots": self.executor.free_slots(),
            "prefetch": self.cfg.prefetch, "held_back": self.held_back,
            "running": [f"{k[0]}" + (f"#{k[1]}" if k[1] >= 0 else "")
                        for k in self.executor.active()],
            "cpu_percent": psutil.cpu_percent(None),
            "memory_percent": psutil.virtual_memory().percent,
            "memory_rss": self._proc.memory_info().rss,
            "strategy": self.cfg.strategy, "ready": False, "leader_id": "",
            "queue_by_priority": {}, "queued": 0, "fatal": self.fatal or "",
            "sandbox": self.executor.sandbox.describe(),
        }
        if self.raft is not None:
            st["cluster_id"] = self.raft.cluster_id
            st["fsync"] = self.cfg.fsync
            st["raft_syncs"] = self.raft.durability()["syncs"]
            st["foreign_peers"] = [f"{p} (cluster {c})"
                                   for p, c in sorted(self.raft.foreign_peers().items())]
            rs = self.raft.status()
            st["role"] = {0: "follower", 1: "candidate", 2: "leader"}.get(rs.get("state"), "follower")
            st["raft_term"] = rs.get("raft_term", 0)
            st["commit_index"] = rs.get("commit_idx", 0)
            st["applied_index"] = rs.get("last_applied", 0)
            lv = self.leader_voter()
            st["leader_id"] = self._voter_node_id(lv) if lv else ""
            st["ready"] = lv is not None and bool(rs.get("has_quorum", True)) \
                and self.fatal is None
            byp = self.read(lambda s: dict(s.queued_by_priority))
            st["queue_by_priority"] = {priority_name(p): n for p, n in sorted(byp.items())}
            st["queued"] = sum(byp.values())
            if include_digest:
                import hashlib

                def digest(s: SchedulerState) -> tuple[str, int]:
                    return hashlib.sha256(repr(s.fingerprint()).encode()).hexdigest(), \
                        self.raft.status().get("last_applied", 0) if self.raft else 0

                st["state_digest"], st["applied_index"] = self.read(digest)
        else:
            st["leader_id"] = self._leader_id_hint
            st["ready"] = self._leader_grpc_hint is not None
        return st

    def _voter_node_id(self, v: Voter) -> str:
        if self.voter is not None and v.raft == self.voter.raft:
            return self.node_id
        if self._leader_id_hint and v.grpc == self._leader_grpc_hint:
            return self._leader_id_hint
        with self._lock:
            for w in self.workers.values():
                if w.raft_address == v.raft:
                    return w.node_id
        return v.grpc

    def cluster_status(self) -> dict[str, Any]:
        if not self.is_leader():
            target = self.leader_grpc()
            if target is None:
                raise Unavailable("no leader known")
            with self.client([target], timeout_s=5.0) as c:
                return c.cluster_status()
        now = time.monotonic()
        nodes = []
        with self._lock:
            known = list(self.workers.values())
        seen_raft = {w.raft_address for w in known}
        for w in known:
            alive = now - w.last_seen < self.cfg.lease_s
            nodes.append({
                "id": w.node_id, "role": "leader" if w.node_id == self.node_id else
                ("follower" if w.voter else "worker"),
                "voter": w.voter, "grpc_address": w.grpc_address, "http_address": w.http_address,
                "raft_address": w.raft_address, "slots": w.slots, "free_slots": w.free_slots,
                "running": sorted(f"{k[0]}" + (f"#{k[1]}" if k[1] >= 0 else "") for k in w.running),
                "cpu_percent": w.cpu_percent, "memory_percent": w.memory_percent,
                "memory_rss": w.memory_rss, "ready": alive and w.accepting,
                "last_seen_s": round(now - w.last_seen, 3),
            })
        # A voter not heard from: unreachable once every live node has had a full
        # lease to report to this leader; until then, not known yet.
        settled = self._leader_since is not None and now - self._leader_since > self.cfg.lease_s
        for v in self.cfg.voters:
            if v.raft not in seen_raft:
                nodes.append({"id": v.grpc, "role": "unreachable" if settled else "unknown",
                              "voter": True,
                              "grpc_address": v.grpc, "raft_address": v.raft, "ready": False})
        counts, dropped, committed, byp = self.read(
            lambda s: (s.counts_by_status(), s.dropped_results, s.committed_results,
                       dict(s.queued_by_priority)))
        return {"leader_id": self.node_id, "nodes": nodes, "tasks_by_status": counts,
                "dropped_results": dropped, "committed_results": committed,
                "queue_by_priority": {priority_name(p): n for p, n in sorted(byp.items())}}

    # ------------------------------------------------------------------ submits

    def _submit_loop(self) -> None:
        assert self.replicated is not None
        while not self._stop.is_set():
            try:
                first = self._submit_q.get(timeout=0.2)
            except queue.Empty:
                continue
            group = [first]
            n, size = len(first[0]), first[3]
            while n < MAX_SUBMIT_BATCH:
                try:
                    item = self._submit_q.get_nowait()
                except queue.Empty:
                    break
                if size + item[3] > MAX_SUBMIT_BYTES:
                    self._submit_q.put(item)  # the next command takes it
                    break
                group.append(item)
                n, size = n + len(item[0]), size + item[3]
            with self._submit_cond:
                while self._submit_inflight >= MAX_INFLIGHT_SUBMITS and not self._stop.is_set():
                    self._submit_cond.wait(0.5)
            # A submit whose caller has given up must not commit behind its back.
            now = time.monotonic()
            for item in group:
                if item[2] <= now and not item[1].done():
                    item[1].set_exception(Unavailable("no leader: submit not committed in time"))
            group = [item for item in group if not item[1].done()]
            if not group:
                continue
            with self._submit_cond:
                self._submit_inflight += 1
            self._propose_submit(group)

    def _propose_submit(self, group: list) -> None:
        assert self.replicated is not None
        specs = [s for item in group for s in item[0]]
        t0 = time.monotonic()

        def done(result: Any, err: int) -> None:
            with self._submit_cond:
                self._submit_inflight -= 1
                self._submit_cond.notify_all()
            if err == 0 and self.metrics_hook:
                self.metrics_hook("submit_commit", time.monotonic() - t0)
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
                threading.Timer(0.05 if err not in MAYBE_COMMITTED else 0.0,
                                lambda: [self._submit_q.put(it) for it in retry]).start()

        self.propose("submit", specs, time.time(), callback=done)

    # ------------------------------------------------------------------ leader

    def _leader_loop(self) -> None:
        assert self.replicated is not None and self.raft is not None
        last_lease_check = 0.0
        while not self._stop.is_set():
            self._leader_wake.wait(0.05)
            self._leader_wake.clear()
            leader = self.raft.leader()
            if leader != self._last_leader:
                self._last_leader = leader
                v = self._raft_to_voter.get(leader) if leader else None
                self.bus.publish([{"kind": "leader", "task_id": "",
                                   "status": "changed" if v else "none", "chunk": -1,
                                   "node": self._voter_node_id(v) if v else "",
                                   "at": time.time()}])
            if not self.raft.is_leader():
                if self._leader_since is not None:
                    log.info("node %s: no longer leader", self.node_id)
                self._leader_since = None
                self._leader_ready = False
                continue
            now = time.monotonic()
            if self._leader_since is None:
                self._become_leader(now)
            if not self._leader_ready:
                continue
            self._heartbeat_self()
            self._flush_completions()
            if len(self._assigning) < MAX_INFLIGHT_ASSIGNS:
                self._plan_and_assign()
            if now - last_lease_check > 0.2:
                last_lease_check = now
                self._check_leases(now)
            self._maybe_verify(now)
            if now - self._last_compact > 10.0:
                self._last_compact = now
                self.replicated.compact(time.time(), self.cfg.retention_s, self.cfg.max_finished)

    def _become_leader(self, now: float) -> None:
        """A new leader: forget the old view of workers (they get a full lease to
        report in) and wait until an entry of our term has applied, so the state
        read below includes every committed command."""
        assert self.replicated is not None
        log.info("node %s: became leader", self.node_id)
        self._leader_since = now
        with self._lock:
            self._assigning.clear()
            self._completing.clear()
            self._run_ewma = None
        with self._lock:
            for w in self.workers.values():
                w.last_seen = now
        self.bus.publish([{"kind": "leader", "task_id": "", "status": "elected", "chunk": -1,
                           "node": self.node_id, "at": time.time()}])

        def ready(_: Any, err: int) -> None:
            if err == 0 and self._leader_since == now:
                self._leader_ready = True
            self._leader_wake.set()

        self._leader_ready = False
        self.propose("requeue", [], time.time(), "", callback=ready)

    def _heartbeat_self(self) -> None:
        now = time.monotonic()
        if now - getattr(self, "_self_hb_at", 0.0) < self.cfg.heartbeat_s / 2:
            return
        self._self_hb_at = now
        kill = self._record_heartbeat(self._heartbeat_request())
        if kill:
            self.executor.kill(kill)
            with self._unreported_cond:
                for k in kill:
                    self._unreported.pop(k, None)

    def _live_workers(self, now: float) -> list[WorkerInfo]:
        with self._lock:
            return [w for w in self.workers.values()
                    if now - w.last_seen < self.cfg.lease_s and w.accepting]

    def _plan_and_assign(self) -> None:
        assert self.replicated is not None
        live = self._live_workers(time.monotonic())
        if not live:
            return
        with self._lock:
            pending = [u for units in self._assigning.values() for u in units]
            completing = dict(self._completing)
        pending_keys = {(tid, chunk) for tid, chunk, _ in pending}
        pending_tasks = {tid for tid, _, _ in pending}

        floor = self._floor
        if floor is not None and time.monotonic() > floor[1]:
            floor = self._floor = None
        # A window holds about PREFETCH_WORK_S of work per slot at the recent run
        # time: deep for no-ops, none for units of a second or more (a long unit
        # waiting in a window could sit behind another while a different worker has
        # a free slot). None until this leader has seen results.
        ewma = self._run_ewma
        per_slot = 0.0 if ewma is None else PREFETCH_WORK_S / max(ewma, 1e-4)

        def snapshot(s: SchedulerState) -> tuple[list[Worker], list[QueuedUnit]]:
            busy: dict[str, int] = {}
            prios = set(s.queued_by_priority)
            for key, w in s.running.items():
                if completing.get(key) != w:
                    busy[w] = busy.get(w, 0) + 1
                    t = s.tasks.get(key[0])
                    if t is not None:
                        prios.add(t.priority)
            for _, _, w in pending:
                busy[w] = busy.get(w, 0) + 1
            # Prefetch (units beyond a worker's slots, waiting there to start) only
            # while every queued and running unit has the same priority: then no
            # unit can start ahead of a more urgent one. A more urgent submit has
            # the windows handed back first (see submit).
            same = len(prios) <= 1
            workers = [Worker(w.node_id, max(0, w.slots + (
                min(max(0, (w.capacity or w.slots) - w.slots), int(w.slots * per_slot))
                if same else 0) - busy.get(w.node_id, 0)))
                for w in live]
            total = sum(w.free_slots for w in workers)
            if total == 0:
                return workers, []
            head = s.peek_queued(total + len(pending_keys))
            units = [QueuedUnit(t.id, chunk, t.priority, t.strategy, int(t.spec.get("shards", 0)),
                                len(t.spec.get("items") or ()), t.chunk_count)
                     for t, chunk in head
                     if (t.id, chunk) not in pending_keys
                     and not (chunk == -1 and t.id in pending_tasks)]
            if floor is not None and any(p >= floor[0] for p in s.queued_by_priority):
                # The urgent task is queued: priority order takes it from here.
                self._floor = None
            elif floor is not None:
                # Stop at the first unit below the floor (order is a prefix).
                for i, u in enumerate(units):
                    if u.priority < floor[0]:
                        units = units[:i]
                        break
            return workers, units

        workers, units = self.read(snapshot)
        if not units:
            return
        assignments = plan(units, workers)
        if not assignments:
            return
        t0 = time.monotonic()
        with self._lock:
            self._assign_seq += 1
            cid = self._assign_seq
            self._assigning[cid] = [(a.task_id, a.chunk, a.worker) for a in assignments]

        def done(result: Any, err: int) -> None:
            with self._lock:
                self._assigning.pop(cid, None)
                if err == 0 and result:
                    self._dispatch_put_n += 1
                self._dispatch_cond.notify_all()
            if self.metrics_hook:
                self.metrics_hook("commit_latency", time.monotonic() - t0)
            if err == 0 and result:
                self._dispatch_q.put(result)
            self._leader_wake.set()

        # Fencing tokens are drawn here, at random, and carried in the command (so
        # every replica records the same ones): a peer cannot guess a unit's token
        # from the ones it has seen.
        # A random fencing token, once every voter knows them (RAFT_PROTOCOL 2): an
        # earlier release would count tokens itself and diverge.
        random_tokens = self._voters_at(2)
        self.propose("assign", [(a.task_id, a.chunk, a.chunk_count, a.worker)
                                + ((secrets.randbits(63) or 1,) if random_tokens else ())
                                for a in assignments],
                     time.time(), self.cfg.lease_s, callback=done)

    def _voters_at(self, level: int) -> bool:
        """True once every other voter has reported a release at RAFT_PROTOCOL
        ``level`` or above. Before that an earlier release's replica would read the
        feature's commands differently (and diverge) or not at all (and wedge)."""
        own = self.voter.raft if self.voter is not None else None
        return all(self._voter_levels.get(v.raft, 0) >= level
                   for v in self.cfg.voters if v.raft != own)

    def _requeue_tail(self) -> list:
        """What a requeued unit carries besides its key: this node's start time, once
        every voter knows it (RAFT_PROTOCOL 3). Only a leader already running when a
        unit started can tell that its node died rather than the whole cluster
        restarting (consensus/state.py apply_requeue, the poison rule)."""
        return [self._started_wall] if self._voters_at(3) else []

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._dispatch_q.get(timeout=0.2)
            except queue.Empty:
                continue
            t0 = time.monotonic()

            def payloads(s: SchedulerState) -> dict[str, list[Work]]:
                by_worker: dict[str, list[Work]] = {}
                now_wall = time.time()
                for tid, chunk, count, attempt, token, worker in batch:
                    t = s.tasks.get(tid)
                    if t is None:
                        continue
                    if attempt == 1 and self.metrics_hook:
                        self.metrics_hook("queue_wait", max(0.0, now_wall - t.created_at))
                    by_worker.setdefault(worker, []).append(
                        Work(tid, chunk, count, attempt, token, payload_for(t.spec, chunk, count),
                             t.priority))
                return by_worker

            by_worker = self.read(payloads)
            remote = [w for w in by_worker if w != self.node_id]
            left = [len(remote) + 1]

            def delivered(_f: Any = None, left: list = left) -> None:
                with self._lock:
                    left[0] -= 1
                    if left[0] == 0:
                        self._dispatch_done_n += 1
                        self._dispatch_cond.notify_all()

            for worker, works in by_worker.items():
                if worker == self.node_id:
                    self.executor.dispatch(works)
                    continue
                with self._lock:
                    info = self.workers.get(worker)
                if info is None:
                    delivered()
                    continue  # lease check requeues these
                req = peer_pb2.DispatchRequest(leader_id=self.node_id, assignments=[
                    peer_pb2.Assignment(task_id=w.task_id, chunk=w.chunk,
                                        chunk_count=w.chunk_count, attempt=w.attempt,
                                        token=w.token, payload_json=_dumps(w.payload),
                                        priority=w.priority)
                    for w in works])
                self._send_dispatch(worker, info.grpc_address, req, delivered)
            delivered()
            if self.metrics_hook:
                self.metrics_hook("dispatch_latency", time.monotonic() - t0)

    def _send_dispatch(self, worker: str, address: str, req: Any,
                       done: Callable[[], None]) -> None:
        """Queue a Dispatch for the worker's sender thread. One thread per worker
        makes blocking calls, in order: a gRPC future would start a channel thread
        whenever the channel was idle (most calls at moderate rates), and a slow
        worker delays only its own dispatches."""
        with self._lock:
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
                    with self._lock:
                        if q.empty():
                            self._senders.pop(worker, None)
                            return
                continue
            idle = 0
            try:
                # wait_for_ready: a channel still backing off from a peer that was
                # not up yet must not fail the dispatch at once.
                peer_pb2_grpc.PeerStub(self._channel(address)).Dispatch(
                    req, timeout=DISPATCH_TIMEOUT_S, wait_for_ready=True, metadata=self._peer_md)
            except grpc.RpcError as exc:
                log.warning("node %s: dispatch to %s failed: %s", self.node_id, worker, exc.code())
            finally:
                done()

    def _check_leases(self, now: float) -> None:
        """Requeue units whose worker is gone (no heartbeat within the lease) or
        that a live worker does not run (a dispatch that never arrived)."""
        assert self.replicated is not None and self._leader_since is not None
        units = self.read(lambda s: s.running_units())
        wall = time.time()
        grace = max(2.5, 4 * self.cfg.heartbeat_s)
        lost: list[tuple] = []
        reasons = []
        with self._lock:
            for tid, chunk, attempt, token, worker, started in units:
                key = (tid, chunk, attempt, token)
                w = self.workers.get(worker)
                if w is None:
                    if now - self._leader_since > self.cfg.lease_s:
                        lost.append(key)
                        reasons.append(f"worker {worker} unknown to the new leader")
                elif now - w.last_seen > self.cfg.lease_s:
                    lost.append(key)
                    reasons.append(f"worker {worker} missed its lease")
                elif key not in w.running and w.last_seen_wall > started + grace \
                        and now - self._leader_since > grace:
                    lost.append(key)
                    reasons.append(f"worker {worker} is not running it")
            for w in self.workers.values():
                if not w.down and now - w.last_seen > self.cfg.lease_s:
                    w.down = True
                    self.bus.publish([{"kind": "node", "task_id": "", "status": "down",
                                       "chunk": -1, "node": w.node_id, "at": wall}])
        self._requeue_recent = {k: t for k, t in self._requeue_recent.items() if now - t < 2.0}
        lost = [k for k in lost if k not in self._requeue_recent]
        if not lost:
            return
        for k in lost:
            self._requeue_recent[k] = now
        log.warning("node %s: requeueing %d unit(s): %s", self.node_id, len(lost), reasons[0])
        self.replicated.requeue([list(k) + self._requeue_tail() for k in lost], wall,
                                reasons[0])

    def _flush_completions(self) -> None:
        assert self.replicated is not None
        with self._lock:
            if not self._completions or self._complete_inflight >= 4:
                return
            group, self._completions = self._completions, []
            self._complete_inflight += 1
        results = []
        for r, _ in group:
            r = dict(r)
            if not r.get("ok"):
                attempt = max(1, int(r.get("attempt", 1)))
                r["backoff_s"] = min(60.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
            results.append(r)

        def done(result: Any, err: int) -> None:
            with self._lock:
                self._complete_inflight -= 1
                if err == 0:
                    for r, _ in group:
                        self._completing.pop((r["task_id"], int(r["chunk"])), None)
                        if not r.get("requeue"):
                            rt = max(0.0, float(r.get("finished_at", 0) or 0)
                                     - float(r.get("started_at", 0) or 0))
                            e = self._run_ewma
                            self._run_ewma = rt if e is None else 0.9 * e + 0.1 * rt
                        if self.metrics_hook:
                            self.metrics_hook("run_time", max(0.0, float(r.get("finished_at", 0))
                                                              - float(r.get("started_at", 0))))
                else:
                    self._completions.extend(g for g in group if g[1] is None or not g[1].done())
            for _, fut in group:
                if fut is not None and not fut.done():
                    if err == 0:
                        fut.set_result(True)
                    elif not self.is_leader():
                        fut.set_result(False)
            self._leader_wake.set()

        self.propose("complete", results, time.time(), callback=done, timeout_s=3.0)

    # ------------------------------------------------------------------ prefetch holds

    def _hold_for(self, priority: int, timeout_s: float = 1.0) -> None:
        """Before a submit of this priority: have the leader take back lower units
        waiting in prefetch windows. Best effort within timeout_s."""
        if self.is_leader():
            self.hold_workers(priority, timeout_s)
            return
        target = self.leader_grpc()
        if not target:
            return
        try:
            peer_pb2_grpc.PeerStub(self._channel(target)).Hold(
                peer_pb2.HoldRequest(min_priority=priority, fan_out=True),
                timeout=timeout_s + 0.5, metadata=self._peer_md)
        except grpc.RpcError as exc:
            log.info("node %s: hold at the leader failed: %s", self.node_id, exc.code())

    def hold_workers(self, priority: int, timeout_s: float = 1.0) -> int:
        """Leader: stop planning below priority, let committed assignments reach their
        workers, then have every worker with a prefetch window hand back its waiting
        units below priority. Returns how many were handed back."""
        deadline = time.monotonic() + timeout_s
        # The floor lasts until the submit has had time to commit; the planner then
        # takes the new task first anyway.
        self._floor = (priority, deadline + 2.0)
        with self._lock:
            # Assignments already proposed must reach their workers before the hold,
            # or a unit could arrive after it and start.
            proposed = set(self._assigning)
            while proposed & set(self._assigning) and time.monotonic() < deadline:
                self._dispatch_cond.wait(max(0.001, deadline - time.monotonic()))
            put = self._dispatch_put_n
            while self._dispatch_done_n < put and time.monotonic() < deadline:
                self._dispatch_cond.wait(max(0.001, deadline - time.monotonic()))
            targets = [w for w in self.workers.values()
                       if (w.capacity or w.slots) > w.slots and not w.down]
        n = 0
        futs = []
        for w in targets:
            if w.node_id == self.node_id:
                n += self.handle_hold(peer_pb2.HoldRequest(min_priority=priority)).handed_back
                continue
            stub = peer_pb2_grpc.PeerStub(self._channel(w.grpc_address))
            futs.append(stub.Hold.future(peer_pb2.HoldRequest(min_priority=priority),
                                         timeout=max(0.05, deadline - time.monotonic()),
                                         metadata=self._peer_md))
        for f in futs:
            try:
                n += f.result().handed_back
            except grpc.RpcError as exc:
                log.info("node %s: hold at a worker failed: %s", self.node_id, exc.code())
        return n

    def handle_hold(self, req: peer_pb2.HoldRequest,
                    peer: PeerIdentity | None = None) -> peer_pb2.HoldResponse:
        """Hold from a peer (peer None: this node's own call). fan_out goes to the
        leader from any admitted peer; a plain hold (hand back this node's waiting
        units) is honoured only from the leader this node follows."""
        if peer is not None and not req.fan_out:
            self._require_leader(peer, "hold", min(0.3, DISPATCH_CHECK_S))
        if req.fan_out:
            if not self.is_leader():
                return peer_pb2.HoldResponse(accepted=False)
            return peer_pb2.HoldResponse(accepted=True,
                                         handed_back=self.hold_workers(req.min_priority))
        works = self.executor.hold(req.min_priority)
        now = time.time()
        for w in works:
            self._on_unit_result({
                "task_id": w.task_id, "chunk": w.chunk, "attempt": w.attempt, "token": w.token,
                "ok": False, "exit_code": 0, "result": "", "error": "", "node": self.node_id,
                "started_at": 0.0, "finished_at": now, "requeue": True, "held": True})
        self.held_back += len(works)
        return peer_pb2.HoldResponse(accepted=True, handed_back=len(works))

    def accept_peer_results(self, results: list[dict[str, Any]],
                            peer: PeerIdentity) -> tuple[bool, int]:
        """Leader side of ReportResults from a peer: only results for units assigned
        to that peer are committed (each recorded as run by it); the others are
        dropped and counted. Returns (committed, how many were refused); not
        committed (False) when this node does not lead, so the peer retries."""
        if not self.is_leader() or not self._leader_ready:
            return False, 0

        def mine(s: SchedulerState) -> list[bool]:
            out = []
            for r in results:
                try:
                    key = (str(r["task_id"]), int(r["chunk"]))
                except (KeyError, TypeError, ValueError):
                    out.append(False)
                    continue
                out.append(s.running.get(key) == peer.node_id)
            return out

        flags = self.read(mine)
        ok = [dict(r, node=peer.node_id) for r, f in zip(results, flags) if f]
        refused = len(results) - len(ok)
        if refused:
            log.info("node %s: dropped %d result(s) from %s for units not assigned to it",
                     self.node_id, refused, peer.node_id)
        if not ok:
            return True, refused
        return self.accept_results(ok), refused

    def accept_results(self, results: list[dict[str, Any]], timeout_s: float = 3.0) -> bool:
        """Leader side of ReportResults: True once the results are committed."""
        if not self.is_leader() or not self._leader_ready:
            return False
        futs = []
        with self._lock:
            for r in results:
                fut: Future = Future()
                futs.append(fut)
                self._completions.append((r, fut))
                self._completing[(r["task_id"], int(r["chunk"]))] = str(r.get("node", ""))
        # Propose from this thread (no hop through the leader loop); completions that
        # arrive while 4 commands are in flight go with the next one.
        self._flush_completions()
        self._leader_wake.set()
        try:
            return all(f.result(timeout=timeout_s) for f in futs)
        except FutureTimeout:
            return False

    def _record_heartbeat(self, req: peer_pb2.HeartbeatRequest) -> list[tuple]:
        """Leader side of Heartbeat: update the worker table; return the units the
        worker runs that are not its to run (cancelled, requeued, finished)."""
        running = {(u.task_id, u.chunk, u.attempt, u.token) for u in req.running}
        with self._lock:
            w = self.workers.get(req.node_id)
            if w is None:
                self._make_room(req.node_id)
                w = self.workers[req.node_id] = WorkerInfo(req.node_id)
                self.bus.publish([{"kind": "node", "task_id": "", "status": "up", "chunk": -1,
                                   "node": req.node_id, "at": time.time()}])
            w.grpc_address, w.http_address = req.grpc_address, req.http_address
            w.raft_address, w.voter = req.raft_address, req.voter
            w.slots, w.free_slots, w.running = req.slots, req.free_slots, running
            w.capacity = req.capacity or req.slots
            w.cpu_percent, w.memory_percent = req.cpu_percent, req.memory_percent
            w.memory_rss, w.accepting = req.memory_rss, req.accepting
            w.raft_protocol = req.raft_protocol
            if req.voter and req.raft_address:
                self._voter_levels[req.raft_address] = req.raft_protocol
            w.last_seen, w.last_seen_wall = time.monotonic(), time.time()
            if w.down:
                w.down = False
                self.bus.publish([{"kind": "node", "task_id": "", "status": "up", "chunk": -1,
                                   "node": req.node_id, "at": time.time()}])
        if not running or not self._leader_ready:
            return []

        def stale(s: SchedulerState) -> list[tuple]:
            out = []
            for key in running:
                tid, chunk, attempt, token = key
                t = s.tasks.get(tid)
                unit = t.unit_at(chunk) if t is not None else None
                if unit is None or unit.status != "running" or unit.token != token \
                        or s.running.get((tid, chunk)) != req.node_id:
                    if unit is not None and unit.token == token \
                            and unit.status in (SUCCEEDED, FAILED):
                        continue  # its result is committed; the worker just has not heard
                    out.append(key)
            return out

        return self.read(stale)

    def _make_room(self, node_id: str) -> None:
        """Under self._lock, before a new worker entry: keep the table within
        --max-workers by forgetting nodes that are down (longest silent first); raise
        Overloaded when every entry is live. This node always has room for itself."""
        if len(self.workers) < self.cfg.max_workers or node_id == self.node_id:
            return
        down = sorted((w for w in self.workers.values() if w.down and w.node_id != self.node_id),
                      key=lambda w: w.last_seen)
        for w in down[:len(self.workers) - self.cfg.max_workers + 1]:
            del self.workers[w.node_id]
        if len(self.workers) >= self.cfg.max_workers:
            raise Overloaded(f"the leader tracks {len(self.workers)} workers, the most "
                             "--max-workers allows; retry later")

    def _admit_heartbeat(self, req: peer_pb2.HeartbeatRequest, peer: PeerIdentity) -> None:
        """Raise PermissionDenied unless the heartbeat is consistent with who sent it
        and with the cluster: it names the caller's own node id and gRPC address; a
        voter's addresses are a configured voter's (and only a voter may claim them);
        no other live worker holds that address; it is not this node's identity."""
        if req.node_id != peer.node_id or req.grpc_address != peer.grpc_address:
            raise PermissionDenied(f"heartbeat for {req.node_id!r} at {req.grpc_address!r} "
                                   f"sent by {peer.node_id!r} at {peer.grpc_address!r}")
        if req.node_id == self.node_id or req.grpc_address == self.cfg.grpc_address:
            raise PermissionDenied(f"heartbeat claims this node's identity ({req.node_id!r})")
        voter = next((v for v in self.cfg.voters if v.grpc == req.grpc_address), None)
        if (voter is not None) != bool(req.voter) or (
                voter is not None and req.raft_address != voter.raft) or (
                voter is None and req.raft_address):
            raise PermissionDenied(f"heartbeat from {req.node_id!r}: voter={req.voter} at "
                                   f"{req.grpc_address!r} / raft {req.raft_address!r} does not "
                                   "match the configured voters")
        with self._lock:
            for w in self.workers.values():
                if w.node_id != req.node_id and not w.down and (
                        w.grpc_address == req.grpc_address
                        or (req.raft_address and w.raft_address == req.raft_address)):
                    raise PermissionDenied(f"heartbeat from {req.node_id!r}: address "
                                           f"{req.grpc_address!r} belongs to live node "
                                           f"{w.node_id!r}")

    def _require_leader(self, peer: PeerIdentity, what: str, wait_s: float) -> None:
        """Raise PermissionDenied unless peer is the leader this node follows: on a
        voter, the Raft leader's configured gRPC address; elsewhere, the address (and
        node id) of the leader that last accepted this node's heartbeat. A leader not
        known yet gets up to wait_s (a heartbeat round is started at once)."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.raft is not None:
                lv = self.leader_voter()
                known = lv.grpc if lv is not None else ""
                ok = known == peer.grpc_address
            else:
                known = self._leader_grpc_hint or ""
                ok = known == peer.grpc_address and (
                    not self._leader_id_hint or self._leader_id_hint == peer.node_id)
            if ok:
                return
            if time.monotonic() >= deadline or self._stop.is_set():
                raise PermissionDenied(f"{what} from {peer.node_id!r} at "
                                       f"{peer.grpc_address!r}, which is not the leader this "
                                       f"node follows ({known or 'none known'})")
            self._heartbeat_wake.set()
            self._stop.wait(0.02)

    def _set_leader_hint(self, address: str) -> None:
        """Remember where the leader is: only a configured voter's gRPC address (a
        reply cannot send this node's results or heartbeats anywhere else)."""
        if address in self._voter_grpc:
            self._leader_grpc_hint = address

    # ------------------------------------------------------------------ worker side

    def _heartbeat_request(self) -> peer_pb2.HeartbeatRequest:
        with self._unreported_cond:
            pending = list(self._unreported)
        running = set(self.executor.active()) | set(pending)
        return peer_pb2.HeartbeatRequest(
            node_id=self.node_id, grpc_address=self.cfg.grpc_address,
            http_address=self.cfg.http_address,
            raft_address=self.cfg.raft_address if self.voter else "",
            voter=self.voter is not None, slots=self.cfg.slots,
            capacity=self.cfg.slots + self.cfg.prefetch, free_slots=self.executor.free_slots(),
            running=[peer_pb2.RunningUnit(task_id=k[0], chunk=k[1], attempt=k[2], token=k[3])
                     for k in running],
            cpu_percent=psutil.cpu_percent(None), memory_percent=psutil.virtual_memory().percent,
            memory_rss=self._proc.memory_info().rss, accepting=self.accepting,
            raft_protocol=RAFT_PROTOCOL, peer_protocol=PEER_PROTOCOL)

    def handle_heartbeat(self, req: peer_pb2.HeartbeatRequest,
                         peer: PeerIdentity) -> peer_pb2.HeartbeatResponse:
        """Leader side of a peer's Heartbeat (see _admit_heartbeat for who is
        admitted); elsewhere, where the leader is (only the leader's worker table is
        current, so only the leader judges the rest)."""
        if req.node_id != peer.node_id or req.grpc_address != peer.grpc_address:
            raise PermissionDenied(f"heartbeat for {req.node_id!r} at {req.grpc_address!r} "
                                   f"sent by {peer.node_id!r} at {peer.grpc_address!r}")
        if not self.is_leader():
            return peer_pb2.HeartbeatResponse(accepted=False, leader_grpc=self.leader_grpc() or "")
        self._admit_heartbeat(req, peer)
        kill = self._record_heartbeat(req)
        return peer_pb2.HeartbeatResponse(accepted=True, leader_grpc=self.cfg.grpc_address,
                                          leader_id=self.node_id, kill=[
            peer_pb2.RunningUnit(task_id=k[0], chunk=k[1], attempt=k[2], token=k[3]) for k in kill])

    def _leader_targets(self) -> list[str]:
        hint = self.leader_grpc()
        targets = [hint] if hint else []
        targets += [v.grpc for v in self.cfg.voters if v.grpc not in targets]
        return targets

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            # Every heartbeat period, or at once when a Dispatch came from a leader
            # this node has not heard of yet.
            self._heartbeat_wake.wait(self.cfg.heartbeat_s)
            self._heartbeat_wake.clear()
            if self._stop.is_set():
                return
            if self.is_leader():
                continue  # the leader loop records its own heartbeat
            req = self._heartbeat_request()
            for target in self._leader_targets()[:3]:
                if target == self.cfg.grpc_address:
                    continue
                try:
                    resp = peer_pb2_grpc.PeerStub(self._channel(target)).Heartbeat(
                        req, timeout=max(0.5, self.cfg.heartbeat_s * 2), metadata=self._peer_md)
                except grpc.RpcError:
                    continue
                if resp.accepted:
                    self._leader_id_hint = resp.leader_id
                    self._leader_grpc_hint = target
                    if resp.kill:
                        keys = [(u.task_id, u.chunk, u.attempt, u.token) for u in resp.kill]
                        self.executor.kill(keys)
                        with self._unreported_cond:
                            for k in keys:
                                self._unreported.pop(k, None)
                    break
                if resp.leader_grpc:
                    self._set_leader_hint(resp.leader_grpc)

    def handle_dispatch(self, req: peer_pb2.DispatchRequest,
                        peer: PeerIdentity) -> tuple[int, int]:
        """Worker side of Dispatch: run the units if the call comes from the leader
        this node follows (PermissionDenied otherwise). A voter runs only units its
        own replica holds as running here with the same attempt and token, with the
        payload from its replica (it waits briefly for its replica to catch up);
        a non-voter has no replica and trusts the authenticated leader. Returns
        (units accepted, units refused)."""
        import json

        deadline = time.monotonic() + DISPATCH_CHECK_S
        if req.leader_id != peer.node_id:
            raise PermissionDenied(f"dispatch names leader {req.leader_id!r} but comes from "
                                   f"{peer.node_id!r}")
        self._require_leader(peer, "dispatch", DISPATCH_CHECK_S)
        if self.replicated is not None:
            works = self._replica_works(req, deadline)
            refused = len(req.assignments) - len(works)
            if refused:
                log.warning("node %s: refused %d dispatched unit(s) from %s that its replica "
                            "does not hold as assigned here", self.node_id, refused,
                            peer.node_id)
            return self.executor.dispatch(works), refused
        works = []
        for a in req.assignments:
            try:
                payload = json.loads(a.payload_json)
            except ValueError:
                payload = {"data": ""}
            works.append(Work(a.task_id, a.chunk, a.chunk_count, a.attempt, a.token, payload,
                              a.priority))
        return self.executor.dispatch(works), 0

    def _replica_works(self, req: peer_pb2.DispatchRequest, deadline: float) -> list[Work]:
        """The dispatched units this voter's replica holds as running here with the
        dispatched attempt and token, as Work built from the replica (waiting until
        deadline for units it has not applied yet)."""
        me = self.node_id
        wanted = {(a.task_id, a.chunk): (a.attempt, a.token) for a in req.assignments}
        found: dict[tuple[str, int], Work] = {}

        def held(s: SchedulerState) -> dict[tuple[str, int], Work]:
            out = {}
            for key, (attempt, token) in wanted.items():
                if key in found or s.running.get(key) != me:
                    continue
                t = s.tasks.get(key[0])
                unit = t.unit_at(key[1]) if t is not None else None
                if unit is None or unit.status != "running" or unit.attempt != attempt \
                        or unit.token != token:
                    continue
                out[key] = Work(t.id, key[1], t.chunk_count, attempt, token,
                                payload_for(t.spec, key[1], t.chunk_count), t.priority)
            return out

        seq = self.bus.seq
        while True:
            found.update(self.read(held))
            left = deadline - time.monotonic()
            if len(found) == len(wanted) or left <= 0 or self._stop.is_set():
                break
            # Wait for the next applied command (its events), not a fixed time.
            events = self.bus.since(seq, min(left, 0.05))
            if events:
                seq = events[-1]["seq"]
        return [found[(a.task_id, a.chunk)] for a in req.assignments
                if (a.task_id, a.chunk) in found]

    def handle_kill(self, keys: list[tuple], peer: PeerIdentity) -> int:
        """Kill units, if asked by the leader this node follows."""
        self._require_leader(peer, "kill", min(0.3, DISPATCH_CHECK_S))
        return self.executor.kill(keys)

    def _on_unit_result(self, result: dict[str, Any]) -> None:
        key = (result["task_id"], result["chunk"], result["attempt"], result["token"])
        if self._handing_back and not result.get("ok"):
            result = dict(result, requeue=True, error="handed back: node shutting down")
        with self._unreported_cond:
            self._unreported[key] = result
            self._unreported_cond.notify_all()

    def _reporter_loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            with self._unreported_cond:
                if not self._unreported:
                    self._unreported_cond.wait(0.5)
                batch = dict(list(self._unreported.items())[:2000])
            if not batch:
                continue
            ok = False
            if self.is_leader():
                ok = self.accept_results(list(batch.values()))
            else:
                req = peer_pb2.ReportResultsRequest(results=[
                    peer_pb2.Result(**{k: v for k, v in r.items()}) for r in batch.values()])
                for target in self._leader_targets()[:3]:
                    if target == self.cfg.grpc_address:
                        continue
                    try:
                        resp = peer_pb2_grpc.PeerStub(self._channel(target)).ReportResults(
                            req, timeout=5.0, metadata=self._peer_md)
                    except grpc.RpcError:
                        continue
                    if resp.accepted:
                        ok = True
                        break
                    if resp.leader_grpc:
                        self._set_leader_hint(resp.leader_grpc)
            if ok:
                backoff = 0.0
                with self._unreported_cond:
                    for k in batch:
                        self._unreported.pop(k, None)
            else:
                backoff = min(1.0, backoff * 2 or 0.05)
                self._stop.wait(backoff)

    def _channel(self, target: str) -> grpc.Channel:
        from taskandgo.node.client import make_channel

        ch = self._channels.get(target)
        if ch is None:
            cfg = self.cfg
            ch = self._channels[target] = make_channel(
                target, cfg.tls_ca if cfg.tls else None, cfg.tls_cert, cfg.tls_key,
                options=PEER_CHANNEL_OPTIONS)
        return ch

    @property
    def _peer_md(self) -> tuple:
        """Metadata of this node's peer calls: the peer credential and who is calling
        (see PeerAuth). The first API token goes along only so that nodes of an
        earlier release, which took it on the peer API, still admit this one during
        a rolling upgrade; nodes of this release ignore it there."""
        md = self.peer_auth.metadata(self.node_id, self.cfg.grpc_address)
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


# ---------------------------------------------------------------------- shapes

def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def _spec_to_api(spec: dict[str, Any]) -> dict[str, Any]:
    """Stored spec -> the API's TaskSpec shape."""
    out: dict[str, Any] = {"id": spec["id"], "priority": str(spec.get("priority", ""))}
    for k in ("data", "call", "strategy"):
        if spec.get(k):
            out[k] = spec[k]
    if spec.get("argv"):
        out["argv"] = list(spec["argv"])
    if "args" in spec:
        out["args_json"] = _dumps(spec["args"])
    if "items" in spec:
        out["items_json"] = _dumps(spec["items"])
    for k in ("shards", "timeout_s", "retries"):
        if spec.get(k):
            out[k] = spec[k]
    if spec.get("labels"):
        out["labels"] = dict(spec["labels"])
    return out


def task_to_api(t: dict[str, Any]) -> dict[str, Any]:
    """State's task dict -> the API's Task shape (same for gRPC and HTTP)."""
    out = {k: t[k] for k in ("id", "priority", "strategy", "status", "attempts", "node",
                             "exit_code", "result", "error", "created_at", "started_at",
                             "finished_at", "chunk_count", "chunks_done", "chunks")}
    out["spec"] = _spec_to_api(t["spec"])
    out["priority_name"] = t.get("priority_name", "")
    return out


__all__ = ["NodeApp", "Unavailable", "NotFound", "InvalidTask", "task_to_api", "PRIORITY_LEVELS"]
