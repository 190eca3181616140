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

import heapq
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

    # Labels and capacities do not change while planning: which nodes carry a
    # unit's required labels, how many preferred labels each meets, and whether
    # any could ever hold a request, are worked out once per distinct value.
    able: dict[tuple[str, ...], list[int]] = {}
    prefs: dict[tuple[tuple[str, ...], int], int] = {}
    ever: dict[tuple[Amounts, tuple[str, ...]], bool] = {}

    able_sets: dict[tuple[str, ...], frozenset[int]] = {}
    index = {n: i for i, n in enumerate(order)}

    def able_nodes(require: tuple[str, ...]) -> list[int]:
        got = able.get(require)
        if got is None:
            got = able[require] = [i for i, n in enumerate(order) if labels_ok(require, labels[n])]
        return got

    def able_set(require: tuple[str, ...]) -> frozenset[int]:
        got = able_sets.get(require)
        if got is None:
            got = able_sets[require] = frozenset(able_nodes(require))
        return got

    # Best fit per distinct (request, require, prefer): a heap of the nodes that can
    # take it, by (-preferred labels met, what is left, position). Within one plan
    # a node's free resources and slots only shrink, so a node that cannot take it
    # never can again; when a node's resources change (take) each heap gets its new
    # key and the old entry is dropped when met (versions).
    heaps: dict[tuple[Amounts, tuple[str, ...], tuple[str, ...]], list] = {}
    version = [0] * len(order)

    def key_of(request: Amounts, prefer: tuple[str, ...], i: int) -> tuple[int, float, int]:
        node = order[i]
        p = 0
        if prefer:
            got = prefs.get((prefer, i))
            p = prefs[(prefer, i)] = preferred(prefer, labels[node]) if got is None else got
        return (-p, leftover(request, res[node], caps[node]), i)

    def fit(unit: QueuedUnit) -> str | None:
        request, prefer = unit.request, unit.prefer
        sig = (request, unit.require, prefer)
        h = heaps.get(sig)
        if h is None:
            h = heaps[sig] = [(key_of(request, prefer, i), version[i], i)
                              for i in able_nodes(unit.require)
                              if free[order[i]] > 0 and request_fits(request, res[order[i]])]
            heapq.heapify(h)
        while h:
            _key, ver, i = h[0]
            node = order[i]
            if ver != version[i] or free[node] <= 0 or not request_fits(request, res[node]):
                heapq.heappop(h)
                continue
            return node
        return None

    def changed(node: str) -> None:
        """``node``'s free resources shrank: its new key in every heap it may be in."""
        i = index[node]
        version[i] += 1
        if free[node] <= 0:
            return
        for (request, require, prefer), h in heaps.items():
            if h and request_fits(request, res[node]) and i in able_set(require):
                heapq.heappush(h, (key_of(request, prefer, i), version[i], i))

    def ever_fits(unit: QueuedUnit) -> bool:
        sig = (unit.request, unit.require)
        got = ever.get(sig)
        if got is None:
            got = ever[sig] = any(request_fits(unit.request, caps[order[i]])
                                  for i in able_nodes(unit.require))
        return got

    def pick(unit: QueuedUnit, spread: bool) -> str | None:
        node = fit(unit) if unit.placed else next_rr() if spread else best()
        if node is not None:
            free[node] -= 1
            if unit.request:
                take(res[node], unit.request)
                if heaps:
                    changed(node)
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
