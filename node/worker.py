"""The worker side of a node: intake of Dispatch, the executor hand-off, heartbeats
and reporting results.

Every node is a worker. :class:`WorkerSide` owns what a worker knows: where the
leader is (from heartbeat replies; a voter asks its replica), whether it still takes
work, and the results not yet committed. It takes Dispatch, Hold and Kill only from
the leader it follows. The leader's own node uses the same methods: the leader's
scheduling hands it units through :meth:`WorkerSide.run_local`, asks it to hand
units back through :meth:`WorkerSide.hold_local`, and this side reports its results
to its own leader through ``report_local`` instead of gRPC. The constructor starts
nothing; :meth:`start` starts the heartbeat and reporter threads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import psutil
from taskandgo.consensus.raft import RAFT_PROTOCOL
from taskandgo.consensus.state import SchedulerState
from taskandgo.node import decisions as d
from taskandgo.node.config import NodeConfig
from taskandgo.node.dispatching import Peers
from taskandgo.node.events import EventBus
from taskandgo.node.executor import Executor, Work
from taskandgo.node.placement import Offer, remember_offers
from taskandgo.node.replica import Replica
from taskandgo.node.resources import ResourceMonitor, Resources
from taskandgo.node.security import PEER_PROTOCOL, PeerIdentity, PermissionDenied
from taskandgo.node.tasks import payload_for
from taskandgo.protos import peer_pb2
from taskandgo.strategies.placement import amounts

log = logging.getLogger("taskandgo.node")

#: A worker handed a Dispatch waits up to this long, in all, for its view of the
#: leader (a fresh heartbeat) and, on a voter, its replica to catch up with the
#: dispatched units, before it refuses them. Below DISPATCH_TIMEOUT_S.
DISPATCH_CHECK_S = 1.5


class WorkerSide:
    """This node as a worker. ``report_local(results)`` commits results when this
    node leads (True once committed)."""

    def __init__(self, cfg: NodeConfig, executor: Executor, replica: Replica, bus: EventBus,
                 peers: Peers, stop: threading.Event, *,
                 report_local: Callable[[list[dict[str, Any]]], bool],
                 guard: Callable[[Callable[[], None]], Callable[[], None]]) -> None:
        #: When this process started (heartbeats carry it: see the poison rule).
        self.started_at = time.time()
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.executor = executor
        self.replica = replica
        self.bus = bus
        self.peers = peers
        self._stop = stop
        self._report_local = report_local
        self._guard = guard
        self.accepting = True
        #: Draining: failures of killed units are handed back to be run elsewhere.
        self.handing_back = False
        #: Units this node handed back for a more urgent task (metric).
        self.held_back = 0
        self._unreported: dict[tuple, dict[str, Any]] = {}
        self._unreported_cond = threading.Condition()
        self._lease_lost: set[tuple] = set()  # units stopped by _check_lease
        self._intake = threading.Lock()
        self.leader_grpc_hint: str | None = None
        self.leader_id_hint = ""
        # A nudge for the heartbeat loop when a Dispatch names a leader this node
        # has not heard of yet.
        self._heartbeat_wake = threading.Event()
        #: When this node sent the last heartbeat a leader accepted (monotonic).
        self.lease_from = time.monotonic()
        self._voter_grpc = {v.grpc for v in cfg.voters}
        self._proc = psutil.Process()
        #: This node's CPU and memory (its container's when it has one): what
        #: heartbeats and status report.
        self.resources = ResourceMonitor()
        #: The live workers and what they offer, as the leader last answered a
        #: heartbeat (the leader sets its own): submit checks and pending reasons.
        self.cluster_offers: tuple[Offer, ...] = ()
        #: Those and the workers described as live within the last minute
        #: (placement.remember_offers): what the submit check reads.
        self.known_offers: tuple[Offer, ...] = ()
        self._offers_seen: dict[str, tuple[Offer, float]] = {}
        self._offers_lock = threading.Lock()

    def start(self) -> None:
        self.executor.start()
        for name, target in (("heartbeat", self._heartbeat_loop),
                             ("reporter", self._reporter_loop)):
            threading.Thread(target=self._guard(target), name=name, daemon=True).start()

    def stop(self) -> None:
        with self._unreported_cond:
            self._unreported_cond.notify_all()

    def unreported(self) -> int:
        return len(self._unreported)

    def memory_rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def followed_leader_id(self) -> str:
        """On a non-voter: the id of the leader that accepted this node's heartbeat
        within the last lease, else "" (a leader silent for a lease is not shown as
        the leader: it may be dead, and no other has answered yet)."""
        if time.monotonic() - self.lease_from > self.cfg.lease_s:
            return ""
        return self.leader_id_hint

    # ------------------------------------------------------------------ the leader

    def leader_grpc(self) -> str | None:
        """The leader's gRPC address: a voter's replica knows it; a non-voter has
        the address of the leader that last accepted its heartbeat."""
        if self.replica.raft is not None:
            v = self.replica.leader_voter()
            return v.grpc if v else None
        return self.leader_grpc_hint

    def leader_targets(self) -> list[str]:
        hint = self.leader_grpc()
        targets = [hint] if hint else []
        targets += [v.grpc for v in self.cfg.voters if v.grpc not in targets]
        return targets

    def set_leader_hint(self, address: str) -> None:
        """Remember where the leader is: only a configured voter's gRPC address (a
        reply cannot send this node's results or heartbeats anywhere else)."""
        if address in self._voter_grpc:
            self.leader_grpc_hint = address

    def require_leader(self, peer: PeerIdentity, what: str, wait_s: float) -> None:
        """Raise PermissionDenied unless peer is the leader this node follows: on a
        voter, the Raft leader's configured gRPC address; elsewhere, the address (and
        node id) of the leader that last accepted this node's heartbeat. A leader not
        known yet gets up to wait_s (a heartbeat round is started at once)."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.replica.raft is not None:
                lv = self.replica.leader_voter()
                known = lv.grpc if lv is not None else ""
                ok = known == peer.grpc_address
            else:
                known = self.leader_grpc_hint or ""
                ok = known == peer.grpc_address and (
                    not self.leader_id_hint or self.leader_id_hint == peer.node_id)
            if ok:
                return
            if time.monotonic() >= deadline or self._stop.is_set():
                raise PermissionDenied(f"{what} from {peer.node_id!r} at "
                                       f"{peer.grpc_address!r}, which is not the leader this "
                                       f"node follows ({known or 'none known'})")
            self._heartbeat_wake.set()
            self._stop.wait(0.02)

    # ------------------------------------------------------------------ heartbeats

    def heartbeat_request(self) -> peer_pb2.HeartbeatRequest:
        """This node's report: running set (with results not yet committed), free
        slots, capacity with the prefetch window, load, whether it takes work."""
        with self._unreported_cond:
            pending = list(self._unreported)
        running = set(self.executor.active()) | set(pending)
        cfg = self.cfg
        voter = cfg.self_voter is not None
        res = self.resources.sample()
        offer, labels = self.offer(res)
        return peer_pb2.HeartbeatRequest(
            node_id=self.node_id, grpc_address=cfg.grpc_address,
            http_address=cfg.http_address, raft_address=cfg.raft_address if voter else "",
            voter=voter, slots=cfg.slots, capacity=cfg.slots + cfg.prefetch,
            free_slots=self.executor.free_slots(),
            running=[peer_pb2.RunningUnit(task_id=k[0], chunk=k[1], attempt=k[2], token=k[3])
                     for k in running],
            cpu_percent=res.cpu_percent, memory_percent=res.memory_percent,
            memory_rss=self.memory_rss(), accepting=self.accepting,
            raft_protocol=RAFT_PROTOCOL, peer_protocol=PEER_PROTOCOL,
            started_at=self.started_at, resources=offer, node_labels=labels)

    def offer(self, res: Resources | None = None) -> tuple[dict[str, float], dict[str, str]]:
        """What this node offers units (node/placement.py): ``cpu`` cores and
        ``memory`` bytes as configured, else its container's limits (the cgroup),
        else the machine's; its named resources; and its node labels."""
        out = dict(self.cfg.offer)
        if "cpu" not in out or "memory" not in out:
            res = res or self.resources.sample()
            out.setdefault("cpu", float(res.cpu_limit_cores))
            out.setdefault("memory", float(res.memory_limit))
        return out, dict(self.cfg.node_labels)

    def note_offers(self, nodes: Iterable[peer_pb2.NodeOffer]) -> None:
        """Keep the leader's picture of the live workers (from a heartbeat answer)."""
        live = tuple(
            Offer(n.node_id, n.slots, amounts(n.resources), tuple(sorted(n.node_labels.items())))
            for n in nodes)
        with self._offers_lock:
            self._offers_seen, known = remember_offers(self._offers_seen, live,
                                                       time.monotonic())
        self.cluster_offers = live
        self.known_offers = known

    def kill(self, keys: list[tuple]) -> None:
        """Kill attempts the leader says are not this node's, and forget their
        results."""
        if not keys:
            return
        self.executor.kill(keys)
        with self._unreported_cond:
            for k in keys:
                self._unreported.pop(k, None)

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            # Every heartbeat period, or at once when a Dispatch came from a leader
            # this node has not heard of yet.
            self._heartbeat_wake.wait(self.cfg.heartbeat_s)
            self._heartbeat_wake.clear()
            if self._stop.is_set():
                return
            if self.replica.is_leader():
                # The leader's own units are covered while a majority answers it: a
                # leader cut off believes it leads for a while after another was
                # elected, which requeues these units after a lease.
                self.lease_from = time.monotonic() - self.replica.quorum_age_s()
                self._check_lease(time.monotonic())
                continue  # the leader loop records its own heartbeat
            self._check_lease(time.monotonic())
            sent = time.monotonic()
            req = self.heartbeat_request()
            for target in self.leader_targets()[:3]:
                if target == self.cfg.grpc_address:
                    continue
                try:
                    resp = self.peers.stub(target).Heartbeat(
                        req, timeout=max(0.5, self.cfg.heartbeat_s * 2),
                        metadata=self.peers.metadata)
                except grpc.RpcError:
                    continue
                if resp.accepted:
                    self.lease_from = sent
                    self.leader_id_hint = resp.leader_id
                    self.leader_grpc_hint = target
                    self.kill([(u.task_id, u.chunk, u.attempt, u.token) for u in resp.kill])
                    self.note_offers(resp.nodes)
                    break
                if resp.leader_grpc:
                    self.set_leader_hint(resp.leader_grpc)

    def _check_lease(self, now: float) -> None:
        """The worker's side of the lease. The leader requeues this node's units
        once it has not heard from it for a lease (counted from when it received a
        heartbeat, which is after this node sent it); so once a lease has passed
        since this node sent the last heartbeat a leader accepted, its units may be
        running elsewhere: stop them (their results would be refused). Results
        already in hand are kept and reported."""
        if now - self.lease_from <= self.cfg.lease_s:
            return
        keys = list(self.executor.active())
        if keys:
            log.warning("node %s: no leader accepted its heartbeat for %.1f s (the lease): "
                        "stopping its %d unit(s), which the leader runs elsewhere",
                        self.node_id, now - self.lease_from, len(keys))
            with self._unreported_cond:
                self._lease_lost.update(keys)
                if len(self._lease_lost) > 10_000:  # bounded: a result comes for each
                    self._lease_lost = set(keys)
            self.executor.kill(keys)

    # ------------------------------------------------------------------ intake

    def run_local(self, works: list[Work], floor: int | None = None) -> int:
        """Units from this node's own leader (already checked against the replica),
        with the floor of decisions.gate_arrivals (None: no gate)."""
        return self._run(works, floor)

    def _run(self, works: list[Work], floor: int | None = None) -> int:
        """Start (or queue) dispatched units. An older attempt of a unit this node
        still holds is killed first: the newer one was assigned by a committed
        command, so the older one's result would be refused anyway, and running
        both would run the unit twice and hold one slot too many. Units below the
        leader's floor that find no free slot are handed back at once (see
        decisions.gate_arrivals); returns how many were taken."""
        newer = {(w.task_id, w.chunk): w.attempt for w in works}
        older = [k for k in self.executor.active()
                 if k[2] < newer.get((k[0], k[1]), -1)]
        if older:
            self.kill(older)
        with self._intake:  # one intake at a time: the free slots stay as counted
            take, back = d.gate_arrivals([w.priority for w in works],
                                         self.executor.free_slots(), floor)
            n = self.executor.dispatch([works[i] for i in take])
        if back:
            self._hand_back([works[i] for i in back])
        return n

    def handle_dispatch(self, req: peer_pb2.DispatchRequest,
                        peer: PeerIdentity) -> tuple[int, int]:
        """Worker side of Dispatch: run the units if the call comes from the leader
        this node follows (PermissionDenied otherwise). A voter runs only units its
        own replica holds as running here with the same attempt and token, with the
        payload from its replica (it waits briefly for its replica to catch up);
        a non-voter has no replica and trusts the authenticated leader. Returns
        (units accepted, units refused)."""
        deadline = time.monotonic() + DISPATCH_CHECK_S
        if req.leader_id != peer.node_id:
            raise PermissionDenied(f"dispatch names leader {req.leader_id!r} but comes from "
                                   f"{peer.node_id!r}")
        self.require_leader(peer, "dispatch", DISPATCH_CHECK_S)
        if self.replica.replicated is not None:
            works = self._replica_works(req, deadline)
            refused = len(req.assignments) - len(works)
            if refused:
                log.warning("node %s: refused %d dispatched unit(s) from %s that its replica "
                            "does not hold as assigned here", self.node_id, refused,
                            peer.node_id)
            return self._run(works, req.floor if req.has_floor else None), refused
        works = []
        for a in req.assignments:
            try:
                payload = json.loads(a.payload_json)
            except ValueError:
                payload = {"data": ""}
            works.append(Work(a.task_id, a.chunk, a.chunk_count, a.attempt, a.token, payload,
                              a.priority))
        return self._run(works, req.floor if req.has_floor else None), 0

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
                if t is None or unit is None or unit.status != "running" \
                        or unit.attempt != attempt or unit.token != token:
                    continue
                out[key] = Work(t.id, key[1], t.chunk_count, attempt, token,
                                payload_for(t.spec, key[1], t.chunk_count), t.priority)
            return out

        seq = self.bus.seq
        while True:
            found.update(self.replica.read(held))
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
        self.require_leader(peer, "kill", min(0.3, DISPATCH_CHECK_S))
        return self.executor.kill(keys)

    def handle_hold(self, req: peer_pb2.HoldRequest, peer: PeerIdentity) -> peer_pb2.HoldResponse:
        """A plain Hold (hand back this node's waiting units below the priority),
        honoured only from the leader this node follows."""
        self.require_leader(peer, "hold", min(0.3, DISPATCH_CHECK_S))
        return peer_pb2.HoldResponse(accepted=True, handed_back=self.hold_local(req.min_priority))

    def hold_local(self, min_priority: int) -> int:
        """Hand back the units waiting in this node's prefetch window below
        min_priority: each is reported as a requeue (not a failure). Returns how many."""
        works = self.executor.hold(min_priority)
        self._hand_back(works)
        return len(works)

    def _hand_back(self, works: list[Work]) -> None:
        """Report units as handed back (requeued, not failed; no attempt used)."""
        now = time.time()
        for w in works:
            self.on_unit_result({
                "task_id": w.task_id, "chunk": w.chunk, "attempt": w.attempt, "token": w.token,
                "ok": False, "exit_code": 0, "result": "", "error": "", "node": self.node_id,
                "started_at": 0.0, "finished_at": now, "requeue": True, "held": True})
        self.held_back += len(works)

    # ------------------------------------------------------------------ reporting

    def on_unit_result(self, result: dict[str, Any]) -> None:
        """The executor's callback (any thread): keep the result until committed."""
        key = (result["task_id"], result["chunk"], result["attempt"], result["token"])
        if self.handing_back and not result.get("ok"):
            result = dict(result, requeue=True, error="handed back: node shutting down")
        with self._unreported_cond:
            if key in self._lease_lost:
                # Stopped by the worker's lease: not the task's failure; if no leader
                # has requeued it yet, this hands it back.
                self._lease_lost.discard(key)
                if not result.get("ok"):
                    result = dict(result, requeue=True,
                                  error="handed back: no leader heard from this node for a lease")
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
            ok = self._report(list(batch.values()))
            if ok:
                backoff = 0.0
                with self._unreported_cond:
                    for k in batch:
                        self._unreported.pop(k, None)
            else:
                backoff = min(1.0, backoff * 2 or 0.05)
                self._stop.wait(backoff)

    def _report(self, results: list[dict[str, Any]]) -> bool:
        """Send results to the leader (this node's own scheduling when it leads);
        True once they are committed."""
        if self.replica.is_leader():
            return self._report_local(results)
        req = peer_pb2.ReportResultsRequest(results=[peer_pb2.Result(**r) for r in results])
        for target in self.leader_targets()[:3]:
            if target == self.cfg.grpc_address:
                continue
            try:
                resp = self.peers.stub(target).ReportResults(req, timeout=5.0,
                                                             metadata=self.peers.metadata)
            except grpc.RpcError:
                continue
            if resp.accepted:
                return True
            if resp.leader_grpc:
                self.set_leader_hint(resp.leader_grpc)
        return False


__all__ = ["DISPATCH_CHECK_S", "WorkerSide"]
