"""Planning: (queued units in priority order, live workers) -> assignments.

Pure functions: no I/O, no clock, no Raft, no gRPC. The leader calls :func:`plan`
with a snapshot of the queue head and of the workers it has heard from, proposes
the result as one Raft command, and dispatches what was committed.

Two strategies, chosen per task:

* ``batch``: a whole task goes to the worker with the most free slots; the
  leader later groups each worker's assignments into one RPC.
* ``split``: a task not yet cut is cut into chunks (its ``shards``, else one per
  item, else one per live worker) and the chunks are spread round-robin over the
  workers with free slots; chunks that do not fit now stay queued and are planned
  like any other unit later.

A unit with a resource request or label constraints goes where it fits (see
strategies/placement.py for the policy: required labels, free resources, preferred
labels, then best fit); a unit that fits no live worker even when that worker is
idle (its capacity or labels rule it out) is passed over rather than blocking the
queue behind it: it waits for a node that can take it.

A unit holding a concurrency key whose limit is reached (``key_room``: how many more
units holding each limited key may be assigned now) is passed over too, and waits
for a unit holding the key to end; a split task's chunks are assigned only as far
as the room goes (the rest stay queued).

Guarantees (property-tested): a unit is assigned at most once; a worker never gets
more units than its free slots, nor more of any resource than it has free; every
unit's required labels hold on its worker; no concurrency key gets more units than
its room; units are taken in queue order, so the assigned units form a prefix of
the queue once the units no live worker could ever take and those whose keys are
at their limit are set aside (a lower-priority unit never starts while a higher one
that is still queued could not).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from taskandgo.strategies.placement import (
    Amounts,
    labels_ok,
    leftover,
    preferred,
    request_fits,
    take,
)

SPLIT = "split"
BATCH = "batch"
STRATEGIES = (SPLIT, BATCH)
WHOLE = -1


@dataclass(frozen=True)
class QueuedUnit:
    """A queued whole task (``chunk == -1``) or chunk of a split task. ``kind``: what
    it runs, for run-time estimates (see node/decisions.py unit_kind); planning
    itself ignores it."""

    task_id: str
    chunk: int
    priority: int
    strategy: str
    shards: int = 0
    n_items: int = 0
    chunk_count: int = 0
    kind: str = ""
    #: Resources each unit of it needs (sorted (name, amount) pairs; see placement).
    request: Amounts = ()
    #: Labels its worker must have (``key=value`` or ``key``), and would rather have.
    require: tuple[str, ...] = ()
    prefer: tuple[str, ...] = ()
    #: Concurrency keys each unit holds while assigned (consensus/policy.py).
    keys: tuple[str, ...] = ()

    @property
    def placed(self) -> bool:
        """Does it need more than a free slot (a request or label constraints)?"""
        return bool(self.request or self.require or self.prefer)


@dataclass(frozen=True)
class Worker:
    """A live worker: its free slots, and (for units with requests or constraints)
    what it has free of each resource, its capacity of each, its labels."""

    node_id: str
    free_slots: int
    free: Amounts = ()
    capacity: Amounts = ()
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Assignment:
    task_id: str
    chunk: int
    chunk_count: int
    worker: str


def chunk_count_for(unit: QueuedUnit, live_workers: int) -> int:
    """How many chunks a split task is cut into at its first dispatch."""
    if unit.shards > 0:
        return unit.shards
    if unit.n_items > 0:
        return unit.n_items
    return max(1, live_workers)


def plan(queued: list[QueuedUnit], workers: list[Worker],
         key_room: Mapping[str, int] | None = None) -> list[Assignment]:
    """Assign queued units, in order, to workers with free slots.

    ``workers`` lists every live worker, including those with no free slot (they
    count when a split task's default chunk count is the number of live nodes).
    ``key_room``: for each concurrency key with a limit, how many more units
    holding it may be assigned now (keys not in it are unlimited).
    Stops at the first unit that cannot be placed, so order is never violated,
    except that a unit no live worker could take even idle, or one whose keys have
    no room left, is passed over."""
    room = dict(key_room) if key_room else {}

    def key_free(unit: QueuedUnit) -> bool:
        return not room or all(room.get(k, 1) > 0 for k in unit.keys)

    def hold(unit: QueuedUnit) -> None:
        for k in unit.keys:
            if k in room:
                room[k] -= 1

    free = {w.node_id: max(0, w.free_slots) for w in workers}
    order = [w.node_id for w in workers]  # stable tie-break
    res = {w.node_id: dict(w.free) for w in workers}
    caps = {w.node_id: dict(w.capacity) for w in workers}
    labels = {w.node_id: dict(w.labels) for w in workers}
    out: list[Assignment] = []
    rr = 0  # round-robin cursor for spreading chunks

    def best() -> str | None:
        top, top_free = None, 0
        for node in order:
            if free[node] > top_free:
                top, top_free = node, free[node]
        return top

    def next_rr() -> str | None:
        nonlocal rr
        for _ in range(len(order)):
            node = order[rr % len(order)]
            rr += 1
            if free[node] > 0:
                return node
        return None

    def fit(unit: QueuedUnit) -> str | None:
        top, top_key = None, None
        for i, node in enumerate(order):
            if free[node] <= 0 or not labels_ok(unit.require, labels[node]) \
                    or not request_fits(unit.request, res[node]):
                continue
            key = (-preferred(unit.prefer, labels[node]),
                   leftover(unit.request, res[node], caps[node]), i)
            if top_key is None or key < top_key:
                top, top_key = node, key
        return top

    def ever_fits(unit: QueuedUnit) -> bool:
        return any(labels_ok(unit.require, labels[n]) and request_fits(unit.request, caps[n])
                   for n in order)

    def pick(unit: QueuedUnit, spread: bool) -> str | None:
        node = fit(unit) if unit.placed else next_rr() if spread else best()
        if node is not None:
            free[node] -= 1
            take(res[node], unit.request)
        return node

    for unit in queued:
        if unit.placed and not ever_fits(unit):
            continue  # waits for a node that can take it; see the module docstring
        if unit.keys and not key_free(unit):
            continue  # waits for its key; see the module docstring
        if unit.chunk == WHOLE and unit.strategy == SPLIT:
            count = chunk_count_for(unit, len(workers))
            for i in range(count):
                if unit.keys and not key_free(unit):
                    break  # the other chunks stay queued for the key
                node = pick(unit, True)
                if node is None:
                    return out
                out.append(Assignment(unit.task_id, i, count, node))
                hold(unit)
            continue
        node = pick(unit, unit.chunk != WHOLE)
        if node is None:
            return out
        out.append(Assignment(unit.task_id, unit.chunk, unit.chunk_count, node))
        if unit.keys:
            hold(unit)
    return out
