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

Guarantees (property-tested): a unit is assigned at most once; a worker never gets
more units than its free slots; units are taken in queue order, so the assigned
units form a prefix of the queue (a lower-priority unit never starts while a
higher one that is still queued could not).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Worker:
    node_id: str
    free_slots: int


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


def plan(queued: list[QueuedUnit], workers: list[Worker]) -> list[Assignment]:
    """Assign queued units, in order, to workers with free slots.

    ``workers`` lists every live worker, including those with no free slot (they
    count when a split task's default chunk count is the number of live nodes).
    Stops at the first unit that cannot be placed, so order is never violated."""
    free = {w.node_id: max(0, w.free_slots) for w in workers}
    order = [w.node_id for w in workers]  # stable tie-break
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

    for unit in queued:
        if unit.chunk == WHOLE and unit.strategy == SPLIT:
            count = chunk_count_for(unit, len(workers))
            placed = 0
            for i in range(count):
                node = next_rr()
                if node is None:
                    break
                free[node] -= 1
                out.append(Assignment(unit.task_id, i, count, node))
                placed += 1
            if placed < count:
                return out
            continue
        node = next_rr() if unit.chunk != WHOLE else best()
        if node is None:
            return out
        free[node] -= 1
        out.append(Assignment(unit.task_id, unit.chunk, unit.chunk_count, node))
    return out
