"""The leader's worker table: every worker as its last heartbeat described it.

Owned by the leader side (:class:`taskandgo.node.scheduling.Scheduler`), which
shares its lock with the table (the scheduler reads the table while building its
views); rebuilt by every new leader from the heartbeats it receives. Admission
checks a heartbeat against who sent it and the configured voters; the table is
bounded by --max-workers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from taskandgo.node import decisions as d
from taskandgo.node.config import NodeConfig, Voter
from taskandgo.node.events import EventBus, event
from taskandgo.node.security import Overloaded, PeerIdentity, PermissionDenied
from taskandgo.node.worker import WorkerSide
from taskandgo.protos import peer_pb2
from taskandgo.strategies.placement import amounts


@dataclass
class WorkerInfo:
    """The leader's record of a worker, from its last heartbeat (under the lock)."""

    node_id: str
    grpc_address: str = ""
    http_address: str = ""
    raft_address: str = ""
    voter: bool = False
    slots: int = 0
    capacity: int = 0
    free_slots: int = 0
    running: frozenset = frozenset()
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    memory_rss: int = 0
    accepting: bool = True
    last_seen: float = 0.0  # monotonic, on the leader
    last_seen_wall: float = 0.0
    down: bool = False
    raft_protocol: int = 0  # its release's RAFT_PROTOCOL (0: before 0.2)
    started_at: float = 0.0  # its process's start (wall clock), from its heartbeats
    resources: tuple[tuple[str, float], ...] = ()  # what it offers (sorted pairs)
    labels: tuple[tuple[str, str], ...] = ()  # its node labels (sorted pairs)

    def view(self) -> d.WorkerView:
        return d.WorkerView(self.node_id, self.slots, self.capacity, self.last_seen,
                            self.last_seen_wall, self.accepting, self.down, self.running,
                            self.resources, self.labels)


class WorkerTable:
    """node id -> :class:`WorkerInfo`, under ``lock`` (the scheduler's)."""

    def __init__(self, cfg: NodeConfig, bus: EventBus, worker: WorkerSide,
                 lock: threading.RLock) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.bus = bus
        self.worker = worker
        self._lock = lock
        self.workers: dict[str, WorkerInfo] = {}

    def update(self, req: peer_pb2.HeartbeatRequest) -> WorkerInfo:
        """Under the lock: record a heartbeat (a new entry makes room first and is
        announced as up, as is an entry that was down)."""
        running = frozenset((u.task_id, u.chunk, u.attempt, u.token) for u in req.running)
        w = self.workers.get(req.node_id)
        if w is None:
            self.make_room(req.node_id)
            w = self.workers[req.node_id] = WorkerInfo(req.node_id)
            self.bus.publish([event("node", "up", req.node_id, at=time.time())])
        w.grpc_address, w.http_address = req.grpc_address, req.http_address
        w.raft_address, w.voter = req.raft_address, req.voter
        w.slots, w.free_slots, w.running = req.slots, req.free_slots, running
        w.capacity = req.capacity or req.slots
        w.cpu_percent, w.memory_percent = req.cpu_percent, req.memory_percent
        w.memory_rss, w.accepting = req.memory_rss, req.accepting
        w.raft_protocol = req.raft_protocol
        w.started_at = req.started_at
        w.resources = amounts(req.resources)
        w.labels = tuple(sorted(req.node_labels.items()))
        w.last_seen, w.last_seen_wall = time.monotonic(), time.time()
        if w.down:
            w.down = False
            self.bus.publish([event("node", "up", req.node_id, at=time.time())])
        return w

    def make_room(self, node_id: str) -> None:
        """Under the lock, before a new worker entry: keep the table within
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

    def admit(self, req: peer_pb2.HeartbeatRequest, peer: PeerIdentity) -> None:
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

    def address_of(self, node_id: str) -> str | None:
        """A worker's gRPC address, None when the leader does not know it."""
        with self._lock:
            w = self.workers.get(node_id)
            return w.grpc_address if w is not None else None

    def voter_node_id(self, v: Voter) -> str:
        own = self.cfg.self_voter
        if own is not None and v.raft == own.raft:
            return self.node_id
        if self.worker.leader_id_hint and v.grpc == self.worker.leader_grpc_hint:
            return self.worker.leader_id_hint
        with self._lock:
            for w in self.workers.values():
                if w.raft_address == v.raft:
                    return w.node_id
        return v.grpc

    def nodes_status(self, now: float, leader_since: float | None) -> list[dict[str, Any]]:
        """Every worker and configured voter as ``cluster_status`` lists them."""
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
                "offer": dict(w.resources), "node_labels": dict(w.labels),
            })
        # A voter not heard from: unreachable once every live node has had a full
        # lease to report to this leader; until then, not known yet.
        settled = leader_since is not None and now - leader_since > self.cfg.lease_s
        nodes.extend({"id": v.grpc, "role": "unreachable" if settled else "unknown",
                      "voter": True, "grpc_address": v.grpc, "raft_address": v.raft,
                      "ready": False}
                     for v in self.cfg.voters if v.raft not in seen_raft)
        return nodes


__all__ = ["WorkerInfo", "WorkerTable"]
