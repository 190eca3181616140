"""The simulated world: one clock, one RNG, a replicated log, a network, faults.

Everything that varies comes from ``random.Random(seed)``; nothing reads the real
clock or starts a thread, so a seed replays exactly. One :meth:`World.step` advances
the clock by a random tick, maybe injects a fault and a client call, commits and
applies log entries, delivers due messages, lets every running node act, and checks
the invariants (``invariants.py``).

Consensus is modelled, not run: :class:`Log` is a linearizable sequence of committed
commands plus the current leader's uncommitted proposals. A proposal commits after
a random delay while its leader reaches a majority; a leader change commits a random
prefix of the proposals that could have reached a majority and loses the rest
(PySyncObj's LEADER_CHANGED: "may or may not have committed"). Each voter applies
committed commands in order to its own real
:class:`~taskandgo.consensus.state.SchedulerState`, possibly lagging; a restarted
voter starts from an empty state and replays the log (its journal).
"""

from __future__ import annotations

import heapq
import pickle
import random
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from taskandgo.consensus.commands import WritePolicy
from taskandgo.consensus.state import FINAL, SchedulerState
from taskandgo.node.decisions import RETRY_CAP_S

from .invariants import Checker, Violation
from .node import SimNode, apply

PRIORITIES = (0, 10, 20, 30)


@dataclass(frozen=True)
class SimConfig:
    """The shape of one simulated cluster and how hostile its world is."""

    voters: int = 3
    workers: int = 1  # nodes that run tasks but hold no replica
    slots: int = 2
    prefetch: int = 3
    lease_s: float = 3.0
    heartbeat_s: float = 0.3
    steps: int = 100
    drain_s: float = 600.0  # at most this long without faults for every task to end
    # ... and never this long without a unit ending: longer than the longest retry
    # backoff (a task whose retry waits for it has nothing else to do meanwhile)
    stall_s: float = RETRY_CAP_S * 1.5 + 10.0
    p_fault: float = 0.05  # per step
    p_submit: float = 0.3
    p_cancel: float = 0.02
    p_drop: float = 0.03
    p_dup: float = 0.03
    delay_s: tuple[float, float] = (0.001, 0.08)
    commit_s: tuple[float, float] = (0.002, 0.06)
    tick_s: tuple[float, float] = (0.02, 0.2)
    max_tasks: int = 16
    p_long: float = 0.05  # a unit runs 3-8 s, longer than a lease
    #: Placement (issue 18): the cpu each node offers, by node in order (cycled),
    #: and about half the tasks request some; empty (the default schedules): none.
    cpus: tuple[float, ...] = ()
    #: Concurrency keys (issue 18): the limit of key "api", set by a client before
    #: any task is submitted; about half the tasks hold it. 0 (the default
    #: schedules): no keys, no limit.
    key_limit: int = 0
    #: Fair share (issue 18): the weights of tenants team-0, team-1, ..., set with
    #: the tenant label "team" by a client before any task is submitted; each task
    #: is one tenant's (by its id). Empty (the default schedules): fair share off.
    tenants: tuple[float, ...] = ()
    #: The single-task fast path (issue 14): the leader assigns a submit's tasks in
    #: the submit command when they can start at once (Scheduler.fast_path).
    fast_path: bool = True

    @classmethod
    def for_seed(cls, seed: int, steps: int = 60) -> SimConfig:
        """A cluster shape drawn from the seed, so the suite covers many shapes."""
        r = random.Random(f"config-{seed}")
        lease_s, heartbeat_s = r.choice(((3.0, 0.3), (3.0, 0.3), (1.5, 0.3), (1.0, 0.2)))
        return cls(voters=r.choice((1, 3, 3, 3, 5)), workers=r.choice((0, 0, 1, 2)),
                   lease_s=lease_s, heartbeat_s=heartbeat_s,
                   tick_s=r.choice(((0.02, 0.2), (0.05, 0.4))),
                   slots=r.choice((1, 2, 2, 3)), prefetch=r.choice((0, 2, 4)),
                   p_fault=r.choice((0.0, 0.03, 0.06, 0.1)),
                   p_drop=r.choice((0.0, 0.03, 0.1)), p_dup=r.choice((0.0, 0.05)),
                   p_long=r.choice((0.05, 0.05, 0.3)), steps=steps)


def placement_cpus(seed: int) -> tuple[float, ...]:
    """For the placement schedules (test_sim.test_placement_schedules): the cpu the
    nodes offer, 1, 2 or 4 each, drawn apart from the seed's other choices."""
    r = random.Random(f"placement-{seed}")
    return tuple(r.choice((1.0, 2.0, 4.0)) for _ in range(3))


def placement_request(cfg: SimConfig, tid: str) -> dict[str, float]:
    """The cpu a task requests: none without placement; else by its id (no draw from
    the world's random numbers), for about half the tasks, 0.5 to 2 CPUs."""
    if not cfg.cpus:
        return {}
    h = sum(map(ord, tid)) * 2654435761 % 2 ** 32
    return {} if h % 2 else {"cpu": (0.5, 1.0, 2.0)[h // 2 % 3]}


@dataclass
class Msg:
    src: str
    dst: str
    kind: str
    body: Any


@dataclass
class Entry:
    """One log entry: a command proposed by ``proposer`` under ``term``."""

    term: int
    proposer: str
    pid: int
    name: str
    blob: bytes  # the pickled arguments: every replica gets its own copy, as over Raft
    commit_at: float
    replicable: bool  # its leader reached a majority when it was proposed


class Network:
    """Messages between nodes: delayed (so reordered), dropped, duplicated, cut."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.queue: list[tuple[float, int, Msg]] = []
        self.cut: set[frozenset[str]] = set()
        self.seq = 0

    def connected(self, a: str, b: str) -> bool:
        return a == b or frozenset((a, b)) not in self.cut

    def send(self, src: str, dst: str, kind: str, body: Any) -> None:
        w = self.world
        if w.rng.random() < w.cfg.p_drop:
            w.trace(f"{src}->{dst} {kind} dropped")
            return
        copies = 2 if w.rng.random() < w.cfg.p_dup else 1
        for _ in range(copies):
            self.seq += 1
            heapq.heappush(self.queue, (w.now + w.rng.uniform(*w.cfg.delay_s), self.seq,
                                        Msg(src, dst, kind, body)))

    def deliver_due(self) -> None:
        w = self.world
        while self.queue and self.queue[0][0] <= w.now:
            m = heapq.heappop(self.queue)[2]
            dst = w.nodes[m.dst]
            if not dst.running() or not self.connected(m.src, m.dst):
                continue  # lost with a crashed, paused or cut-off receiver
            dst.on_message(m)

    def partition(self, side: list[str]) -> None:
        others = [n for n in self.world.nodes if n not in side]
        self.cut = {frozenset((a, b)) for a in side for b in others}


class Log:
    """The replicated log: committed entries, the leader's pending ones, the term."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.entries: list[Entry] = []
        self.pending: list[Entry] = []
        self.term = 0
        self.leader: str | None = None
        self.election_at: float | None = 0.0

    def reaches_majority(self, nid: str) -> bool:
        w = self.world
        known = w.majority.get(nid)
        if known is None:
            voters = [n for n in w.nodes.values() if n.voter]
            ok = sum(1 for v in voters if v.running() and w.net.connected(nid, v.id))
            known = w.majority[nid] = ok > len(voters) // 2
        return known

    def healthy(self) -> bool:
        ld = self.world.nodes.get(self.leader or "")
        return ld is not None and ld.running() and self.reaches_majority(ld.id)

    def propose(self, node: SimNode, pid: int, name: str, args: tuple) -> str:
        """Take a proposal from ``node`` (the leader, or a follower forwarding to it):
        "accepted"; "refused" when no leader can be reached (the proposer hears at
        once); "swallowed" by a deposed leader that has not heard of the new term (it
        stays in that leader's own log and never commits)."""
        w = self.world
        if node.leading_term is not None and node.leading_term != self.term:
            return "swallowed"
        if self.leader is None or not w.net.connected(node.id, self.leader) \
                or not w.nodes[self.leader].running():
            return "refused"
        last = self.pending[-1].commit_at if self.pending else w.now
        self.pending.append(Entry(self.term, node.id, pid, name, pickle.dumps(args),
                                  max(last, w.now + w.rng.uniform(*w.cfg.commit_s)),
                                  self.healthy()))
        return "accepted"

    def leader_lost(self) -> None:
        """The leader crashed or stepped down: an election follows."""
        self.leader = None

    def tick(self) -> None:
        w = self.world
        healthy = self.healthy()
        if not healthy and self.election_at is None:
            self.election_at = w.now + w.rng.uniform(0.3, 1.2)
        if self.election_at is not None and w.now >= self.election_at:
            self.elect()
            healthy = self.healthy()
        while healthy and self.pending and self.pending[0].commit_at <= w.now:
            self.commit(self.pending.pop(0))

    def commit(self, e: Entry) -> None:
        self.entries.append(e)
        self.world.on_commit(len(self.entries), e)

    def elect(self, exclude: str | None = None) -> None:
        """A new term. A prefix of the pending entries that reached a majority commits
        under the new leader; the rest is lost."""
        w = self.world
        cands = sorted(n.id for n in w.nodes.values()
                       if n.voter and n.running() and n.id != exclude
                       and self.reaches_majority(n.id))
        if not cands:
            self.election_at = w.now + 0.5
            return
        reached = 0
        while reached < len(self.pending) and self.pending[reached].replicable:
            reached += 1
        keep = w.rng.randint(0, reached)
        for e in self.pending[:keep]:
            self.commit(e)
        for e in self.pending[keep:]:
            w.trace(f"lost uncommitted {e.name} of {e.proposer}")
        self.pending = []
        self.term += 1
        self.leader = w.rng.choice(cands)
        self.election_at = None
        w.trace(f"term {self.term}: {self.leader} leads (kept {keep} pending)")
        w.nodes[self.leader].become_leader(self.term)


@dataclass
class ClientCall:
    """A client's submit of some tasks, retried with the same ids until acknowledged."""

    specs: list[dict[str, Any]]
    tries: int = 0
    hold: str = "none"  # what the submit's prefetch hold did: none / ok / failed
    gives_up_at: float | None = None  # the client's own timeout of the current try


class World:
    """One simulated cluster under one seed. ``run()`` plays a whole schedule."""

    def __init__(self, seed: int, cfg: SimConfig | None = None) -> None:
        self.seed = seed
        self.cfg = cfg or SimConfig.for_seed(seed)
        self.rng = random.Random(seed)
        self.now = 0.0
        self.step_no = 0
        self.events: deque[str] = deque(maxlen=40)
        self.net = Network(self)
        self.log = Log(self)
        self.truth = SchedulerState()  # every committed command, applied at commit
        self.clock_offset: dict[str, float] = {}
        self.nodes: dict[str, SimNode] = {}
        ids = [f"v{i}" for i in range(self.cfg.voters)] + [f"w{i}" for i in range(self.cfg.workers)]
        for nid in ids:
            self.clock_offset[nid] = 1_000_000.0  # wall clocks: far from 0, may jump
            self.nodes[nid] = SimNode(self, nid, voter=nid.startswith("v"))
        self.checker = Checker(self)
        self.calls: dict[str, ClientCall] = {}  # task id -> its submit
        self.call_list: list[ClientCall] = []
        self.majority: dict[str, bool] = {}  # who reaches a majority (cleared each step)
        self.acked: set[str] = set()
        self.retries: list[ClientCall] = []
        self.next_task = 0
        self.next_pid = 0
        self.faulty = True
        self.restart_at: dict[str, float] = {}
        self.resume_at: dict[str, float] = {}
        self.heal_at: float | None = None
        self.policy_retry_at = 0.0

    # ------------------------------------------------------------------ helpers

    def trace(self, text: str) -> None:
        self.events.append(f"{self.now:8.3f} #{self.step_no:<4} {text}")

    def offer_of(self, nid: str) -> dict[str, float]:
        """What node ``nid`` offers (its heartbeat's resources; none without placement)."""
        if not self.cfg.cpus:
            return {}
        return {"cpu": self.cfg.cpus[list(self.nodes).index(nid) % len(self.cfg.cpus)]}

    def wall(self, nid: str) -> float:
        return self.now + self.clock_offset[nid]

    def pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def on_commit(self, index: int, e: Entry) -> None:
        args = pickle.loads(e.blob)
        self.checker.before_commit(e.name, args)
        _, events = apply(self.truth, e.name, args)
        self.checker.after_commit(index, e.name, args, events)

    # ------------------------------------------------------------------ the schedule

    def run(self) -> None:
        """Play ``cfg.steps`` faulty steps, then heal everything and run until every
        acknowledged task has ended; a liveness violation if no unit ends for
        ``stall_s`` meanwhile (or the whole drain takes ``drain_s``)."""
        try:
            for _ in range(self.cfg.steps):
                self.step()
            self.faulty = False
            self.heal_all()
            end = self.now + self.cfg.drain_s
            self.checker.progress_at = self.now
            while self.now < end and not self.settled() and \
                    self.now - self.checker.progress_at < self.cfg.stall_s:
                self.step()
            self.checker.at_end()
        except Violation as v:
            v.world = self
            raise

    def settled(self) -> bool:
        return all(self.truth.tasks[t].status in FINAL for t in self.acked) and not any(
            c.gives_up_at is not None for c in self.call_list) and not self.retries

    def step(self) -> None:
        self.step_no += 1
        self.now += self.rng.uniform(*self.cfg.tick_s)
        self.majority = {}  # faults and recoveries below may change it
        self.timed_recoveries()
        if self.faulty and self.rng.random() < self.cfg.p_fault:
            self.fault()
            self.majority = {}
        retries, self.retries = self.retries, []
        for call in retries:
            self.client_submit(call)
        if (self.cfg.key_limit and not self.truth.limits) \
                or (self.cfg.tenants and not self.truth.tenant_label):
            self.client_policy()  # before any task (no draw: see client_policy)
        elif self.faulty and self.rng.random() < self.cfg.p_submit:
            self.client_submit()
        if self.faulty and self.rng.random() < self.cfg.p_cancel:
            self.client_cancel()
        if self.faulty and self.step_no in (3, 20):
            self.client_schedule()
        self.log.tick()
        self.replicate()
        self.net.deliver_due()
        order = list(self.nodes.values())
        self.rng.shuffle(order)
        for n in order:
            if n.running():
                n.tick()
        self.checker.after_step()

    def replicate(self) -> None:
        """Voters that hear from the leader apply committed entries, some lagging."""
        log = self.log
        for n in self.nodes.values():
            if not n.voter or not n.running():
                continue
            if n.leading_term is not None and n.leading_term != log.term and \
                    log.leader is not None and self.net.connected(n.id, log.leader):
                n.step_down()  # hears the new term
            if log.leader is None or not self.net.connected(n.id, log.leader):
                continue
            n.known_leader = log.leader
            target = len(log.entries)
            if self.rng.random() < 0.3:
                target = min(target, n.applied + self.rng.randint(0, 2))
            if target > n.applied:
                n.apply_to(target)

    # ------------------------------------------------------------------ clients

    def client_submit(self, call: ClientCall | None = None) -> None:
        if call is None:
            if self.next_task >= self.cfg.max_tasks:
                return
            specs = []
            for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
                self.next_task += 1
                tid = f"t{self.next_task}"
                prio = self.rng.choice(PRIORITIES)
                split = self.rng.random() < 0.3
                spec = {"id": tid, "priority": prio, "strategy": "split" if split else "batch",
                        "retries": self.rng.choice((0, 0, 1, 2)), "data": tid}
                if split:
                    spec["shards"] = self.rng.choice((0, 2, 3))
                request = placement_request(self.cfg, tid)
                # Only requests every node could hold: one that only some can is
                # passed over while they are down (by design, not a strict-priority
                # defect), one that none can is refused at submit.
                if request and request["cpu"] <= min(
                        self.offer_of(n)["cpu"] for n in self.nodes):
                    spec["resources"] = request
                if self.cfg.key_limit and sum(map(ord, tid)) % 2 == 0:
                    spec["concurrency_keys"] = ["api"]
                if self.cfg.tenants:  # by its id: no draw from the world's numbers
                    n = sum(map(ord, tid)) * 40503 % len(self.cfg.tenants)
                    spec["labels"] = {"team": f"team-{n}"}
                known = sorted(self.truth.tasks)
                if self.rng.random() < 0.15:
                    # A delayed task: runnable a few seconds from now (by the wall
                    # clocks as they start; a clock fault moves a node's).
                    spec["run_at"] = self.now + 1_000_000.0 + self.rng.uniform(0.1, 4.0)
                elif known and self.rng.random() < 0.2:
                    # A dependent task: waits for one to three committed tasks.
                    spec["after"] = self.rng.sample(known, min(len(known),
                                                               self.rng.choice((1, 1, 2, 3))))
                    if self.rng.random() < 0.3:
                        spec["after_any"] = True
                specs.append(spec)
            call = ClientCall(specs)
            self.call_list.append(call)
            for s in specs:
                self.calls[s["id"]] = call
        voters = [n for n in self.nodes.values() if n.voter and n.running()]
        if not voters:
            return
        node = self.rng.choice(voters)
        call.tries += 1
        call.gives_up_at = self.now + 10.5
        self.trace(f"client submit {[s['id'] for s in call.specs]} "
                   f"prio {[s['priority'] for s in call.specs]} at {node.id} (try {call.tries})")
        node.client_submit(call, call.tries)

    def on_submit_done(self, call: ClientCall, try_no: int, ok: bool) -> None:
        """A submit try answered. The client hears only its current try (an older try
        that commits late is not an acknowledgement: its caller had given up)."""
        if try_no != call.tries or call.gives_up_at is None:
            return
        call.gives_up_at = None
        ids = [s["id"] for s in call.specs]
        self.trace(f"client submit {ids} {'acknowledged' if ok else 'failed'}")
        if ok:
            self.acked.update(ids)
        elif call.tries < 4:
            self.retries.append(call)  # the client tries again on the next step

    def client_schedule(self) -> None:
        """Create a schedule firing every second, with a random overlap policy."""
        voters = [n for n in self.nodes.values() if n.voter and n.running()]
        if not voters:
            return
        sid = f"s{self.step_no}"
        op = {"op": "create", "id": sid, "cron": "* * * * * *", "tz": "UTC",
              # The lowest priority: a slot's task queues behind every task accepted
              # before it (a higher one, every second, would starve lower ones).
              "template": {"priority": PRIORITIES[0], "strategy": "batch", "data": sid},
              "overlap": self.rng.choice(("allow", "forbid", "replace")), "missed": "latest",
              "catchup_s": 10.0}
        node = self.rng.choice(voters)
        self.trace(f"client creates schedule {sid} ({op['overlap']}) at {node.id}")
        node.client_schedule(op)

    def client_policy(self) -> None:
        """Set key "api"'s limit through the first running voter (each step until it
        is committed; in worlds with keys only)."""
        voters = [n for n in self.nodes.values() if n.voter and n.running()]
        if not voters or self.now < self.policy_retry_at:
            return
        node = voters[0]
        self.policy_retry_at = self.now + 3.0  # unless answered first

        def done(result: Any, err: int) -> None:
            self.policy_retry_at = 0.0

        ops: tuple[tuple[Any, ...], ...] = (("limit", "api", self.cfg.key_limit),) \
            if self.cfg.key_limit else ()
        if self.cfg.tenants:
            ops += (("tenant_label", "team"),
                    *(("weight", f"team-{i}", w) for i, w in enumerate(self.cfg.tenants)))
        self.trace(f"client sets the policy {ops} at {node.id}")
        node.propose(WritePolicy(ops, node.wall()), callback=done)

    def client_cancel(self) -> None:
        known = sorted(self.truth.tasks)
        voters = [n for n in self.nodes.values() if n.voter and n.running()]
        if known and voters:
            tid = self.rng.choice(known)
            node = self.rng.choice(voters)
            self.trace(f"client cancel {tid} at {node.id}")
            node.client_cancel(tid)

    # ------------------------------------------------------------------ faults

    def fault(self) -> None:
        r = self.rng
        nid = r.choice(sorted(self.nodes))
        node = self.nodes[nid]
        kind = r.choice(("crash", "pause", "partition", "leader", "leader", "clock"))
        if kind == "crash" and node.up:
            self.trace(f"FAULT crash {nid}")
            node.crash()
            self.restart_at[nid] = self.now + r.uniform(0.5, 8.0)
        elif kind == "pause" and node.running():
            self.resume_at[nid] = self.now + r.uniform(0.3, 6.0)
            self.trace(f"FAULT pause {nid} until {self.resume_at[nid]:.3f}")
            node.pause()
        elif kind == "partition":
            side = r.sample(sorted(self.nodes), r.randint(1, max(1, len(self.nodes) - 1)))
            self.trace(f"FAULT partition {sorted(side)} | rest")
            self.net.partition(side)
            self.heal_at = self.now + r.uniform(0.5, 8.0)
        elif kind == "leader" and self.log.leader is not None:
            self.trace(f"FAULT leader change away from {self.log.leader}")
            self.log.elect(exclude=self.log.leader)
        elif kind == "clock":
            jump = r.uniform(-90.0, 90.0)
            self.clock_offset[nid] += jump
            self.trace(f"FAULT clock of {nid} jumps {jump:+.1f}s")

    def timed_recoveries(self) -> None:
        for call in self.call_list:
            if call.gives_up_at is not None and self.now >= call.gives_up_at:
                self.on_submit_done(call, call.tries, False)  # its node died or hung
        for nid, at in list(self.restart_at.items()):
            if self.now >= at:
                del self.restart_at[nid]
                self.trace(f"restart {nid}")
                self.nodes[nid].restart()
        for nid, at in list(self.resume_at.items()):
            if self.now >= at:
                del self.resume_at[nid]
                self.trace(f"resume {nid}")
                self.nodes[nid].resume()
        if self.heal_at is not None and self.now >= self.heal_at:
            self.heal_at = None
            self.trace("heal partition")
            self.net.cut = set()

    def heal_all(self) -> None:
        self.trace("--- faults end: heal, restart, resume everything ---")
        for nid in list(self.restart_at):
            self.restart_at[nid] = self.now
        for nid in list(self.resume_at):
            self.resume_at[nid] = self.now
        if self.net.cut:
            self.heal_at = self.now
        self.timed_recoveries()
        self.cfg = replace(self.cfg, p_drop=min(self.cfg.p_drop, 0.01))

    def describe(self) -> str:
        return (f"seed {self.seed}: {self.cfg}\nlast {len(self.events)} events of "
                f"{self.step_no} steps:\n" + "\n".join(self.events))
