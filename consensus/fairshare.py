"""Fair share between tenants within a priority level (issue 18, item 4).

With a tenant label set (consensus/policy.py; ``team``, say), a task's tenant is
its ``labels[team]`` ("" when it has none), and the queued units of one priority
level are served by start-time fair queuing between tenants instead of first come
first served:

* each tenant has a sub-queue per level, in the order the plain queue has (queue
  key, then sequence number), so order within a tenant is unchanged;
* each tenant has a virtual time per level (its tag); the level serves the
  tenant with the lowest tag (ties: the earlier head unit), and serving a unit
  advances that tenant's tag by ``1 / weight`` (weight from the policy, 1 when not
  listed), so over a backlog tenants get units in proportion to their weights;
* the level's virtual time is the highest tag served so far; a tenant that becomes
  active again (its first queued unit at the level) starts at
  ``max(its tag, the level's virtual time)``: an idle tenant banks no credit, and
  one served ahead of its share keeps the debt while others are queued;
* a level with nothing queued forgets its tags (nobody is behind anybody then).

Across levels nothing changes: the levels are merged by their earliest queued unit
(the plain queue's key, with aging), so the level served next is the one the plain
queue would serve next; only which unit of that level goes is fair. Without a
tenant label the state keeps no :class:`FairQueue` and orders as before.

The fair queue is derived from the plain heap (``SchedulerState.heap``) plus the
tags: the sub-queues and counts are rebuilt from the heap on load
(:meth:`FairQueue.build`); only the tags and virtual times are state of their own
(snapshot ``fair``, fingerprint). :meth:`FairQueue.order` (what ``peek_queued``
returns) simulates serving without changing anything, so it is exactly the order
the state serves when the planner assigns a prefix of it; ``apply_assign`` calls
:meth:`FairQueue.served` for each unit it really assigns.

Pure, deterministic and total like consensus/state.py: no set is iterated, every
choice is broken by values (tags, entries, tenant names), nothing raises.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator, Mapping
from typing import Any

#: A queue entry as in SchedulerState.heap: (key, qseq, task_id, chunk).
Entry = tuple[float, int, str, int]


def tenant_of(spec: Any, label: str) -> str:
    """A stored spec's tenant under ``label``: its label value, "" when it has none
    (or anything that is not a string)."""
    labels = spec.get("labels") if isinstance(spec, dict) else None
    value = labels.get(label) if isinstance(labels, dict) else None
    return value if isinstance(value, str) else ""


def weight_of(weights: Mapping[str, float], tenant: str) -> float:
    """A tenant's weight: the policy's (validated there: 0 < w), else 1."""
    w = weights.get(tenant, 1.0)
    return w if w > 0 else 1.0


class Level:
    """One priority level's sub-queues (derived), counts (derived) and tags."""

    __slots__ = ("live", "subs", "tags", "v")

    def __init__(self) -> None:
        self.subs: dict[str, list[Entry]] = {}  # tenant -> heap of its entries
        self.live: dict[str, int] = {}  # tenant -> queued units (entries may be dead)
        self.tags: dict[str, float] = {}  # tenant -> virtual time of its next unit
        self.v = 0.0  # the highest tag served


class FairQueue:
    """The fair-share index over the queue of a SchedulerState (see module doc)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.levels: dict[int, Level] = {}

    @classmethod
    def build(cls, label: str, heap: list[Entry], tasks: Mapping[str, Any],
              live: Callable[[Entry], bool]) -> FairQueue:
        """The index of the live entries of ``heap``, every tag at 0 (a label just
        set, or a snapshot load before :meth:`restore`)."""
        fq = cls(label)
        for e in sorted(e for e in heap if live(e)):
            t = tasks[e[2]]
            fq.pushed(t.priority, t.spec, e)
        return fq

    # ---------------------------------------------------------------- updates

    def pushed(self, priority: int, spec: Any, entry: Entry) -> None:
        """A unit joined the queue (``entry`` is also on the plain heap)."""
        lv = self.levels.get(priority)
        if lv is None:
            lv = self.levels[priority] = Level()
        tenant = tenant_of(spec, self.label)
        n = lv.live.get(tenant, 0)
        if n == 0:
            # Active again: from the level's virtual time, never from below it.
            tag = lv.tags.get(tenant)
            lv.tags[tenant] = lv.v if tag is None or tag < lv.v else tag
        lv.live[tenant] = n + 1
        heapq.heappush(lv.subs.setdefault(tenant, []), entry)

    def served(self, priority: int, spec: Any, weights: Mapping[str, float]) -> None:
        """A queued unit of this level and tenant was assigned (call before
        :meth:`left`): its tenant's tag advances by 1/weight."""
        lv = self.levels.get(priority)
        if lv is None:
            return
        tenant = tenant_of(spec, self.label)
        tag = lv.tags.get(tenant, lv.v)
        if tag > lv.v:
            lv.v = tag
        lv.tags[tenant] = tag + 1.0 / weight_of(weights, tenant)

    def left(self, priority: int, spec: Any) -> None:
        """A unit left the queue (assigned, cancelled, failed, cut into chunks)."""
        lv = self.levels.get(priority)
        if lv is None:
            return
        tenant = tenant_of(spec, self.label)
        n = lv.live.get(tenant, 0) - 1
        if n > 0:
            lv.live[tenant] = n
            return
        lv.live.pop(tenant, None)
        lv.subs.pop(tenant, None)  # only dead entries are left in it
        if not lv.live:
            del self.levels[priority]
        elif lv.tags.get(tenant, lv.v) <= lv.v:
            lv.tags.pop(tenant, None)  # no debt: it would restart at v anyway

    def compact(self, live: Callable[[Entry], bool]) -> None:
        """Drop dead entries from sub-queues that hold mostly dead ones."""
        for lv in self.levels.values():
            for tenant, sub in lv.subs.items():
                if len(sub) > 64 and len(sub) > 2 * lv.live.get(tenant, 0):
                    kept = [e for e in sub if live(e)]
                    heapq.heapify(kept)
                    lv.subs[tenant] = kept

    # ---------------------------------------------------------------- reads

    def order(self, live: Callable[[Entry], bool],
              weights: Mapping[str, float]) -> Iterator[Entry]:
        """The live queued entries in the order the state serves them, lazily:
        levels by their earliest entry (as the plain queue), within a level the
        tenant with the lowest tag (serving one advances it by 1/weight in this
        walk only; nothing is changed). Dead entries at a sub-queue's top are
        popped (invisible to every other read)."""
        walkers: dict[tuple[int, str], _Walker] = {}
        tags: dict[tuple[int, str], float] = {}
        vs: dict[int, float] = {}
        picks: dict[int, list[tuple[float, Entry, str]]] = {}
        mins: dict[int, list[tuple[Entry, str]]] = {}
        levels: list[tuple[Entry, int]] = []
        for prio, lv in self.levels.items():
            for tenant, sub in lv.subs.items():
                while sub and not live(sub[0]):
                    heapq.heappop(sub)
                if not sub:
                    continue
                w = walkers[(prio, tenant)] = _Walker(sub, live)
                head = w.head
                if head is None:
                    continue
                tag = lv.tags.get(tenant, lv.v)
                tags[(prio, tenant)] = tag
                picks.setdefault(prio, []).append((tag, head, tenant))
                mins.setdefault(prio, []).append((head, tenant))
            if prio in picks:
                vs[prio] = lv.v
                heapq.heapify(picks[prio])
                heapq.heapify(mins[prio])
                levels.append((mins[prio][0][0], prio))
        heapq.heapify(levels)
        while levels:
            first, prio = heapq.heappop(levels)
            m = mins[prio]
            while m and walkers[(prio, m[0][1])].head != m[0][0]:
                heapq.heappop(m)
            if not m:
                continue
            if m[0][0] != first:
                heapq.heappush(levels, (m[0][0], prio))  # stale: the level moved on
                continue
            p = picks[prio]
            while p and not (walkers[(prio, p[0][2])].head == p[0][1]
                             and tags[(prio, p[0][2])] == p[0][0]):
                heapq.heappop(p)  # stale: that tenant has moved on
            if not p:
                continue  # cannot happen (a head left has its pick); never raise
            tag, head, tenant = heapq.heappop(p)
            yield head
            w = walkers[(prio, tenant)]
            w.advance()
            tag += 1.0 / weight_of(weights, tenant)
            tags[(prio, tenant)] = tag
            if w.head is not None:
                heapq.heappush(p, (tag, w.head, tenant))
                heapq.heappush(m, (w.head, tenant))
            while m and walkers[(prio, m[0][1])].head != m[0][0]:
                heapq.heappop(m)
            if m:
                heapq.heappush(levels, (m[0][0], prio))

    def tenant(self, spec: Any) -> str:
        return tenant_of(spec, self.label)

    # ---------------------------------------------------------------- state

    def to_data(self) -> list[list[Any]]:
        """The tags and virtual times as plain data (snapshot ``fair``), sorted."""
        return [[prio, lv.v, sorted([t, g] for t, g in lv.tags.items())]
                for prio, lv in sorted(self.levels.items())]

    def restore(self, data: Any) -> None:
        """Tags and virtual times from :meth:`to_data` onto an index just built from
        the same queue (levels it no longer has are skipped)."""
        for row in data if isinstance(data, list) else ():
            try:
                prio, v, tags = int(row[0]), float(row[1]), row[2]
                lv = self.levels.get(prio)
                if lv is None:
                    continue
                lv.v = v
                lv.tags = {str(t): float(g) for t, g in tags}
            except Exception:  # noqa: BLE001 - totality: a bad row is skipped
                continue

    def fingerprint(self) -> tuple:
        return (self.label, tuple((p, v, tuple(tuple(x) for x in tags))
                                  for p, v, tags in self.to_data()))


class _Walker:
    """Walks one sub-queue's heap in order without popping it (a side heap of
    candidate indices, as SchedulerState.peek_queued walks the plain heap),
    skipping dead entries."""

    __slots__ = ("frontier", "head", "heap", "live")

    def __init__(self, heap: list[Entry], live: Callable[[Entry], bool]) -> None:
        self.heap = heap
        self.live = live
        self.frontier: list[tuple[Entry, int]] = [(heap[0], 0)] if heap else []
        self.head: Entry | None = None
        self.advance()

    def advance(self) -> None:
        heap, frontier = self.heap, self.frontier
        while frontier:
            entry, i = heapq.heappop(frontier)
            for j in (2 * i + 1, 2 * i + 2):
                if j < len(heap):
                    heapq.heappush(frontier, (heap[j], j))
            if self.live(entry):
                self.head = entry
                return
        self.head = None




def standing(fq: FairQueue, mine: Entry, tasks: Mapping[str, Any],
             live: Callable[[Entry], bool], weights: Mapping[str, float]
             ) -> tuple[int, int, dict[str, int]]:
    """Where the unit of entry ``mine`` stands in the fair order: how many units
    are served before it, how many of those have a higher priority, and per other
    tenant of its level how many of its units go first though they were queued
    after it (what fair share puts ahead of it; empty: nothing).

    The same order as :meth:`FairQueue.order`, computed without walking it (a read
    for "why pending", under the replica's lock, for a unit perhaps 100,000 deep):
    within a level, order walks each tenant's units in queue order with its tag
    advancing by 1/weight and always serves the lowest (tag, entry), so the level's
    order is its units sorted by those pairs (the tags summed the same way); across
    levels, order serves the level whose earliest unit left is earliest, so a unit
    goes after every unit of another level whose level's earliest-left at that
    point (a suffix minimum, non-decreasing) is earlier than its own."""
    task = tasks[mine[2]]
    prio, tenant = task.priority, fq.tenant(task.spec)
    own: list[tuple[float, Entry, str]] = []
    suffix_min: dict[int, list[Entry]] = {}
    for p, lv in fq.levels.items():
        units: list[tuple[float, Entry, str]] = []
        for t, sub in lv.subs.items():
            step = 1.0 / weight_of(weights, t)
            tag = lv.tags.get(t, lv.v)
            for e in sorted(e for e in sub if live(e)):
                units.append((tag, e, t))
                tag += step
        units.sort()
        low: list[Entry] = []
        for u in reversed(units):
            low.append(u[1] if not low or u[1] < low[-1] else low[-1])
        low.reverse()
        suffix_min[p] = low
        if p == prio:
            own = units
    at = next((i for i, u in enumerate(own) if u[1] == mine), None)
    if at is None:
        return 0, 0, {}
    first = suffix_min[prio][at]
    ahead, higher = at, 0
    for p, low in suffix_min.items():
        if p != prio:
            n = bisect.bisect_left(low, first)
            ahead += n
            if p > prio:
                higher += n
    over: dict[str, int] = {}
    for _tag, e, t in own[:at]:
        if t != tenant and e[:2] > mine[:2]:
            over[t] = over.get(t, 0) + 1
    return ahead, higher, over


__all__ = ["Entry", "FairQueue", "Level", "standing", "tenant_of", "weight_of"]
