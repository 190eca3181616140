"""The node: wiring of its parts, and the API the gRPC and HTTP servers call.

Each step of a task's life is a part with a module of its own, holding the state it
owns and receiving its collaborators through its constructor (constructors start
nothing; :meth:`NodeApp.start` starts them):

* ``replica`` (node/replica.py): the Raft facade: propose with deadlines, read,
  status, cluster identity and fail-stop;
* ``submitter`` (node/submitting.py): client submits and cancels, batched into one
  Raft command per round (thread ``submit-flusher``);
* ``scheduler`` (node/scheduling.py): the leader: plans and proposes assignments,
  requeues units whose lease ran out, commits reported results, holds lower units
  back for an urgent submit (thread ``leader``), with every decision made by the
  pure functions of node/decisions.py;
* ``dispatcher`` (node/dispatching.py): sends committed assignments to workers
  (thread ``dispatch``, one sender thread per worker);
* ``worker`` (node/worker.py): the worker side: takes Dispatch, runs units in the
  executor, heartbeats to the leader (thread ``heartbeat``) and reports results
  until committed (thread ``reporter``);
* ``bus`` (node/events.py): the event bus for watchers and waiters;
* ``history`` (node/history.py): the last minutes of per-second samples and unit
  runs, for the dashboard's charts (thread ``history``).

Every node is a worker; only voters hold the replicated state. A non-voter
forwards client calls to a voter through :class:`taskandgo.Client`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from taskandgo.consensus.raft import RaftTimers, ReplicatedState
from taskandgo.consensus.state import PRIORITY_LEVELS, SchedulerState
from taskandgo.node.config import NodeConfig, Voter
from taskandgo.node.dispatching import Dispatcher, Peers
from taskandgo.node.events import EventBus
from taskandgo.node.executor import Executor
from taskandgo.node.history import History
from taskandgo.node.outputs import OutputStore
from taskandgo.node.placement import pending_reason, read_pending
from taskandgo.node.policies import PolicyBook
from taskandgo.node.replica import NotFound, Replica, Unavailable, list_args, task_to_api
from taskandgo.node.schedules import ScheduleBook
from taskandgo.node.scheduling import Scheduler, WorkerInfo
from taskandgo.node.security import PeerAuth, PeerIdentity
from taskandgo.node.submitting import Submitter
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.vocabulary import TaskSpec
from taskandgo.node.worker import WorkerSide
from taskandgo.protos import peer_pb2

log = logging.getLogger("taskandgo.node")

#: How often surviving objects are frozen out of the cyclic collector.
GC_FREEZE_S = 10.0
#: glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def _tune_malloc() -> None:
    """Make glibc give memory freed after a burst of large requests back to the OS.
    By default its mmap threshold rises to the largest block freed (up to 32 MiB):
    after one 2 MiB request body every later one came from the heap, whose free
    memory then stayed resident. A fixed 128 KiB threshold keeps large blocks
    mmap'd (unmapped on free) and a 1 MiB trim threshold returns the heap's free
    top; two malloc arenas instead of eight per core, since each kept its own
    burst-sized free memory (handler threads allocate under the GIL anyway).
    A periodic ``malloc_trim(0)`` was measured too and left out: with these it
    returned 1-2 MB and took up to 76 ms with the allocator locked. Figures in
    docs/security.md ("Stream tickets, slow requests and memory"). Python's own
    small-object arenas are not glibc's: they return only when wholly empty.
    No-op without glibc (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for param, value in ((_M_MMAP_THRESHOLD, 128 * 1024), (_M_TRIM_THRESHOLD, 1024 * 1024),
                         (_M_ARENA_MAX, 2)):
        mallopt(param, value)


class NodeApp:
    """One TaskAndGo node. Construct, :meth:`start`, and :meth:`stop`."""

    def __init__(self, cfg: NodeConfig, timers: RaftTimers | None = None) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.voter: Voter | None = cfg.self_voter
        self.timers = timers or RaftTimers(election_min_s=cfg.election_min_s,
                                           election_max_s=cfg.election_max_s,
                                           append_entries_period_s=cfg.append_entries_s,
                                           snapshot_interval_s=cfg.snapshot_interval_s)
        self._stop = threading.Event()
        self.metrics_hook: Callable[[str, float], None] | None = None
        # The parts. Callbacks between them are late-bound lambdas: a part calls
        # another only after start(), when all exist.
        self.bus = EventBus()
        self.replica = Replica(cfg, self.timers, self.bus,
                               on_applied=lambda: self.scheduler.wake(),
                               on_role_change=lambda: self.scheduler.wake(),
                               on_fatal=self._on_fatal)
        # Full outputs of the units run here (taskandgo output; node/outputs.py).
        self.outputs = OutputStore.for_node(cfg)
        self.executor = Executor(cfg.node_id, cfg.slots, lambda r: self.worker.on_unit_result(r),
                                 interpreters=cfg.interpreters, default_runner=cfg.default_runner,
                                 policy=cfg.policy,
                                 output_limit=cfg.output_limit,
                                 default_timeout_s=cfg.default_timeout_s,
                                 outputs=self.outputs)
        # Peer identity: the credential this node sends and checks on the peer API.
        self.peer_auth = PeerAuth.from_password(cfg.raft_password, cfg.peer_cert_names)
        self.peers = Peers(cfg, self.peer_auth)
        self.worker = WorkerSide(cfg, self.executor, self.replica, self.bus, self.peers,
                                 self._stop,
                                 report_local=lambda rs: self.scheduler.accept_own_results(rs),
                                 guard=self._guard)
        self.dispatcher = Dispatcher(cfg.node_id, self.replica, self.peers, self._stop,
                                     address_of=lambda w: self.scheduler.table.address_of(w),
                                     run_local=self.worker.run_local, observe=self._observe,
                                     guard=self._guard,
                                     arriving=lambda: self.scheduler.timing.arriving)
        self.scheduler = Scheduler(cfg, self.replica, self.bus, self.worker, self.dispatcher,
                                   self.peers, self._stop, observe=self._observe,
                                   guard=self._guard)
        self.submitter = Submitter(cfg, self.replica, self._stop,
                                   accepting=lambda: self.worker.accepting,
                                   hold_for=self.scheduler.hold_for,
                                   forward=self.forward_client, observe=self._observe,
                                   guard=self._guard, to_leader=self.leader_client,
                                   offers=lambda: self.worker.known_offers,
                                   fast_path=self.scheduler.fast_path)
        self.schedules = ScheduleBook(self.replica, forward=self.forward_client,
                                      to_leader=self.leader_client)
        self.policies = PolicyBook(self.replica, forward=self.forward_client,
                                   to_leader=self.leader_client)
        # A voter records from its own replica; a non-voter has none (its HTTP route
        # forwards to a voter).
        self.history = History(cfg.node_id, self.bus,
                               self.replica.read if self.voter is not None else None,
                               self.cluster_status)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start Raft (voters) and the node's threads. Raises IdentityError, before
        anything starts, when the data dir belongs to another cluster or voter set."""
        self.replica.start()
        self.submitter.start()
        self.scheduler.start()
        self.dispatcher.start()
        self.worker.start()
        if self.replica.raft is not None:
            self.history.start(self._stop)
            threading.Thread(target=self._guard(self._reaper_loop), name="reaper",
                             daemon=True).start()
        if self.cfg.kube_api and self.replica.raft is not None:
            from taskandgo.node.kube import PodWatcher

            self._pod_watcher = PodWatcher(self.cfg.namespace, self.cfg.pod_selector,
                                           self.worker_gone)
            self._pod_watcher.start()
        log.info("node %s started: grpc %s raft %s voter=%s", self.node_id,
                 self.cfg.grpc_address, self.cfg.raft_address, self.voter is not None)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        """fn as a thread's target that restarts it (after logging) if it raises,
        until the node stops."""
        def run() -> None:
            while not self._stop.is_set():
                try:
                    fn()
                    return
                except Exception:
                    log.exception("node %s: %s loop failed; restarting it", self.node_id,
                                  threading.current_thread().name)
                    self._stop.wait(0.2)
        return run

    def _observe(self, name: str, value_s: float) -> None:
        hook = self.metrics_hook
        if hook is not None:
            hook(name, value_s)

    def _on_fatal(self, reason: str) -> None:
        # Tick thread: the replica diverged; this node takes no more work.
        self.worker.accepting = False

    def drain(self, grace_s: float) -> None:
        """Stop taking work, hand leadership over if we hold it, and let running units
        finish and report (up to grace_s)."""
        self.worker.accepting = False
        deadline = time.monotonic() + grace_s
        self.hand_over_leadership(min(2.0, grace_s))
        while time.monotonic() < deadline and self.executor.active():
            self._stop.wait(0.05)
        left = self.executor.active()
        if left:
            # Out of time: kill what still runs and hand it back to be run elsewhere.
            log.info("node %s: handing back %d unfinished unit(s)", self.node_id, len(left))
            self.worker.handing_back = True
            self.executor.kill(left)
        report_by = time.monotonic() + 3.0
        while time.monotonic() < report_by and (self.executor.active()
                                                 or self.worker.unreported()):
            self._stop.wait(0.05)

    def hand_over_leadership(self, timeout_s: float) -> bool:
        return self.replica.hand_over_leadership(timeout_s, self._stop)

    def worker_gone(self, node_id: str, reason: str) -> int:
        return self.scheduler.worker_gone(node_id, reason)

    def stop(self) -> None:
        self._stop.set()
        if getattr(self, "_pod_watcher", None) is not None:
            self._pod_watcher.stop()
        self.scheduler.wake()
        self.worker.stop()
        self.executor.close()
        self.replica.stop()
        self.peers.close()

    def _reaper_loop(self) -> None:
        last_freeze = time.monotonic()
        _tune_malloc()
        while not self._stop.wait(0.1):
            self.replica.release_proposals(everything=False)
            if time.monotonic() - last_freeze > GC_FREEZE_S:
                last_freeze = time.monotonic()
                # The replicated state is hundreds of thousands of long-lived objects
                # without reference cycles (refcounting frees them). Left to the cyclic
                # collector, every full collection walks all of them with the GIL held:
                # tens of ms at 20k tasks, seconds at 1M, long enough to miss Raft
                # heartbeats. Collect, then move what survived out of the collector's
                # sight. A full collection is as cheap as a young one here (it walks
                # only what was made since the last freeze) and frees cyclic garbage
                # (tracebacks, closures of ended requests) instead of freezing it.
                gc.collect()
                gc.freeze()

    # ------------------------------------------------------------------ the parts' state

    @property
    def replicated(self) -> ReplicatedState | None:
        return self.replica.replicated

    @property
    def raft(self) -> Any:
        return self.replica.raft

    @property
    def fatal(self) -> str | None:
        """Why this replica stopped itself (it diverged from the cluster), or None."""
        return self.replica.fatal

    @property
    def fatal_event(self) -> threading.Event:
        return self.replica.fatal_event

    @property
    def accepting(self) -> bool:
        return self.worker.accepting

    @property
    def held_back(self) -> int:
        return self.worker.held_back

    @property
    def _elections(self) -> int:
        return self.replica.elections

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        return self.scheduler.workers

    def is_leader(self) -> bool:
        return self.replica.is_leader()

    def leader_voter(self) -> Voter | None:
        return self.replica.leader_voter()

    def leader_grpc(self) -> str | None:
        return self.worker.leader_grpc()

    def read(self, fn: Callable[[SchedulerState], Any]) -> Any:
        return self.replica.read(fn)

    # ------------------------------------------------------------------ client API
    # Every method returns plain dicts in the API's shape and raises InvalidTask,
    # NotFound or Unavailable. A non-voter forwards to a voter.

    def forward_client(self) -> Any:
        hint = self.worker.leader_grpc_hint
        targets = [hint] if hint else []
        targets += [v.grpc for v in self.cfg.voters if v.grpc not in targets]
        return self.client(targets, timeout_s=10.0)

    def leader_client(self) -> Any:
        """A Client to the leader (a voter's call that only the leader may decide:
        it alone knows every voter's release); Unavailable when none is known."""
        leader = self.replica.leader_voter()
        if leader is None:
            raise Unavailable("no leader known")
        return self.client([leader.grpc], timeout_s=10.0)

    def client(self, targets: list[str], timeout_s: float) -> Any:
        """A Client that talks to other nodes with this node's credentials."""
        return self.peers.client(targets, timeout_s)

    def submit(self, specs: Sequence[TaskSpec | Mapping[str, Any]],
               timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Submit specs: checked ones (the servers' :class:`TaskSpec`) or request
        mappings (checked here). See :meth:`Submitter.submit`."""
        # Submitter.submit passes each through tasks.normalize, which takes both.
        return self.submitter.submit(cast("list[dict[str, Any]]", list(specs)), timeout_s)

    def get(self, task_id: str) -> dict[str, Any]:
        if self.replicated is None:
            with self.forward_client() as c:
                return c.get(task_id)
        task = self.replica.get_task(task_id)
        if task["status"] in ("queued", "scheduled", "waiting"):
            task["pending_reason"] = self.pending_reason(task_id)
        return task

    def pending_reason(self, task_id: str) -> str:
        """Why a task has not started (node/placement.py pending_reason; "" when it
        has, or is unknown): read from this replica and the leader's last picture of
        the workers."""
        offers = self.worker.cluster_offers
        view = self.replica.read(lambda s: read_pending(s, task_id, offers))
        return pending_reason(view) if view is not None else ""

    def list_tasks(self, status: str = "", labels: list[str] | None = None,
                   limit: int = 100, page_token: str = "") -> dict[str, Any]:
        pairs, size, offset = list_args(status, labels, limit, page_token)
        if self.replicated is None:
            with self.forward_client() as c:
                return c.list_page(status, labels or [], size, page_token)
        return self.replica.list_page(status, pairs, size, offset)

    def cancel(self, task_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        if self.replicated is None:
            with self.forward_client() as c:
                return c.cancel(task_id)
        return self.submitter.cancel(task_id, timeout_s)

    def wait(self, task_ids: list[str], timeout_s: float) -> dict[str, Any]:
        """Block until every task is final or timeout; returns the tasks known."""
        if self.replicated is None:
            with self.forward_client() as c:
                return c.wait_raw(task_ids, timeout_s)
        return self.replica.wait_tasks(task_ids, timeout_s)

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
            # This node's container's CPU and memory (the host's when it has none;
            # resources_source says which): node/resources.py.
            **self.worker.resources.sample().as_status(),
            "memory_rss": self.worker.memory_rss(),
            # The cluster's default strategy (a non-voter: the one it was started with,
            # the voters decide), and this node's own when it differs.
            "strategy": self.default_strategy() or self.cfg.strategy,
            "strategy_configured": self.cfg.strategy, "ready": False, "leader_id": "",
            "queue_by_priority": {}, "queued": 0, "fatal": self.fatal or "",
            "sandbox": self.executor.sandbox.describe(),
        }
        st["offer"], st["node_labels"] = self.worker.offer()
        if self.replica.raft is not None:
            st.update(self.replica.status(include_digest))
            has_quorum = st.pop("has_quorum")
            lv = self.leader_voter()
            st["leader_id"] = self.scheduler.table.voter_node_id(lv) if lv else ""
            st["ready"] = lv is not None and has_quorum and self.fatal is None
        else:
            # Only a leader that accepted a heartbeat within the last lease: one that
            # died is not shown (nor this node ready) until another answers.
            st["leader_id"] = self.worker.followed_leader_id()
            st["ready"] = bool(st["leader_id"])
        return st

    def default_strategy(self) -> str:
        return self.replica.default_strategy()

    def settings(self) -> dict[str, str]:
        """The cluster-wide settings (a non-voter asks a voter)."""
        if self.replica.replicated is None:
            with self.forward_client() as c:
                return c.settings()
        return self.replica.settings()

    def set_settings(self, values: dict[str, str]) -> dict[str, str]:
        """Change cluster-wide settings (checked here; a non-voter forwards)."""
        from taskandgo.consensus.state import SETTINGS

        for key, value in values.items():
            if key not in SETTINGS:
                raise InvalidTask(key, "not a setting")
            if value not in SETTINGS[key]:
                raise InvalidTask(key, f"{value!r}: expected {' or '.join(SETTINGS[key])}")
        if not values:
            return self.settings()
        if self.replica.replicated is None:
            with self.forward_client() as c:
                return c.settings(**values)
        if not self.replica.is_leader():
            # Only the leader knows every voter's release (from their heartbeats),
            # which must all know the command before it is proposed.
            leader = self.replica.leader_voter()
            if leader is None:
                raise Unavailable("no leader known")
            with self.client([leader.grpc], timeout_s=10.0) as c:
                return c.settings(**values)
        return self.replica.write_settings(values)

    def cluster_status(self) -> dict[str, Any]:
        return self.scheduler.cluster_status()

    # ------------------------------------------------------------------ peer API

    def handle_heartbeat(self, req: peer_pb2.HeartbeatRequest,
                         peer: PeerIdentity) -> peer_pb2.HeartbeatResponse:
        return self.scheduler.handle_heartbeat(req, peer)

    def handle_dispatch(self, req: peer_pb2.DispatchRequest,
                        peer: PeerIdentity) -> tuple[int, int]:
        return self.worker.handle_dispatch(req, peer)

    def handle_kill(self, keys: list[tuple], peer: PeerIdentity) -> int:
        return self.worker.handle_kill(keys, peer)

    def handle_hold(self, req: peer_pb2.HoldRequest,
                    peer: PeerIdentity | None = None) -> peer_pb2.HoldResponse:
        """Hold from a peer (peer None: this node's own call). fan_out goes to the
        leader from any admitted peer; a plain hold (hand back this node's waiting
        units) is honoured only from the leader this node follows."""
        if req.fan_out:
            return self.scheduler.handle_hold_fan_out(req)
        if peer is None:
            return peer_pb2.HoldResponse(accepted=True,
                                         handed_back=self.worker.hold_local(req.min_priority))
        return self.worker.handle_hold(req, peer)

    def hold_workers(self, priority: int, timeout_s: float = 1.0) -> int:
        return self.scheduler.hold_workers(priority, timeout_s)

    def accept_peer_results(self, results: list[dict[str, Any]],
                            peer: PeerIdentity) -> tuple[bool, int]:
        return self.scheduler.accept_peer_results(results, peer)

    def accept_results(self, results: list[dict[str, Any]], timeout_s: float = 3.0) -> bool:
        return self.scheduler.accept_results(results, timeout_s)


__all__ = ["PRIORITY_LEVELS", "EventBus", "InvalidTask", "NodeApp", "NotFound", "Unavailable",
           "WorkerInfo", "task_to_api"]
