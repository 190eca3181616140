"""Placement for the node: a task's request and constraints as the API takes them,
a node's offer (capacity and labels) as it advertises it, the submit check against
the cluster, and why a task has not started yet.

Everything here is pure (no clock, no I/O): parsing, the submit check
(:func:`unfit_reason`) and :func:`pending_reason`, which reads the same values the
planner reads (strategies/placement.py for what fits where) so what it says agrees
with what planning does next.

Stored form (the replicated spec; keys absent when unset, so specs of earlier
releases read the same): ``resources`` {name: amount} (``cpu`` cores, ``memory``
bytes, named resources), ``require`` and ``prefer`` lists of ``key=value`` or
``key`` terms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskandgo.consensus.policy import spec_keys
from taskandgo.node.tasks import LABEL_KEY_RE, InvalidTask
from taskandgo.strategies.placement import (
    EPSILON,
    Amounts,
    amounts,
    format_amount,
    format_amounts,
    labels_ok,
    request_fits,
    take,
)
from taskandgo.strategies.planner import (
    SPLIT,
    WHOLE,
    Assignment,
    QueuedUnit,
    Worker,
    chunk_count_for,
    plan,
)

#: RAFT_PROTOCOL of placement (consensus/raft.py): specs with a request or label
#: terms are proposed only once every voter (every possible leader) plans by them.
PLACEMENT_PROTOCOL = 8
#: At most this many resources per request or offer, and label terms per task.
MAX_RESOURCES = 16
MAX_TERMS = 16
#: Resource names: like label keys.
RESOURCE_RE = LABEL_KEY_RE
_QUANTITY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_SUFFIX = {"": 1.0, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 1024.0, "Mi": 1024.0 ** 2, "Gi": 1024.0 ** 3, "Ti": 1024.0 ** 4,
           "KiB": 1024.0, "MiB": 1024.0 ** 2, "GiB": 1024.0 ** 3, "TiB": 1024.0 ** 4,
           "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
#: Amounts at most this large (1 EiB of memory; far more than any count).
MAX_AMOUNT = float(1 << 60)


def parse_quantity(value: Any, field: str) -> float:
    """A resource amount: a number, or text in Kubernetes' quantity forms (``500m``
    CPU, ``2Gi``, ``512Mi``, ``1G``). InvalidTask naming ``field`` otherwise;
    negative, infinite and absurd amounts are refused."""
    if isinstance(value, bool):
        raise InvalidTask(field, "expected a number or a quantity such as 2, 500m, 4Gi")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        m = _QUANTITY_RE.fullmatch(value)
        if not m or m.group(2) not in _SUFFIX:
            raise InvalidTask(field, f"{value[:32]!r}: expected a number or a quantity such "
                              "as 2, 500m, 4Gi")
        out = float(m.group(1)) * _SUFFIX[m.group(2)]
    else:
        raise InvalidTask(field, "expected a number or a quantity such as 2, 500m, 4Gi")
    if not math.isfinite(out) or not 0 <= out <= MAX_AMOUNT:
        raise InvalidTask(field, f"expected an amount 0..{MAX_AMOUNT:g}")
    return out


def parse_pairs(text: str, field: str) -> dict[str, str]:
    """``a=1,b=2`` (or ``a=1 b=2``) as a mapping; InvalidTask naming ``field``."""
    out: dict[str, str] = {}
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise InvalidTask(field, f"{part[:64]!r}: expected NAME=VALUE")
        out[k] = v
    return out


def check_resources(raw: Any, field: str = "resources") -> dict[str, float]:
    """A request or offer: {name: amount} (or ``name=amount,...`` text), names as
    label keys, amounts as :func:`parse_quantity`; zero amounts dropped."""
    if raw in (None, "", {}):
        return {}
    if isinstance(raw, str):
        raw = parse_pairs(raw, field)
    if not isinstance(raw, Mapping) or len(raw) > MAX_RESOURCES:
        raise InvalidTask(field, f"expected at most {MAX_RESOURCES} name: amount pairs")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not RESOURCE_RE.fullmatch(k):
            raise InvalidTask(field, f"bad resource name {str(k)[:64]!r}")
        amount = parse_quantity(v, f"{field}.{k}")
        if amount:
            out[k] = amount
    return dict(sorted(out.items()))


def check_terms(raw: Any, field: str) -> tuple[str, ...]:
    """Label terms (``key=value`` or ``key``; a list, or comma-separated text), each
    once, in order; InvalidTask naming ``field``."""
    if raw in (None, "", [], ()):
        return ()
    if isinstance(raw, str):
        raw = [t.strip() for t in raw.split(",") if t.strip()]
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_TERMS:
        raise InvalidTask(field, f"expected at most {MAX_TERMS} terms key=value or key")
    for t in raw:
        if not isinstance(t, str):
            raise InvalidTask(field, "expected terms key=value or key")
        k, _, v = t.partition("=")
        if not LABEL_KEY_RE.fullmatch(k) or len(v) > 255:
            raise InvalidTask(field, f"{t[:64]!r}: expected key=value or key")
    return tuple(dict.fromkeys(raw))


def check_labels(raw: Any, field: str) -> dict[str, str]:
    """Node labels: {key: value} or ``k=v,...`` text; InvalidTask naming ``field``."""
    if raw in (None, "", {}):
        return {}
    if isinstance(raw, str):
        raw = parse_pairs(raw, field)
    if not isinstance(raw, Mapping) or len(raw) > 64:
        raise InvalidTask(field, "expected at most 64 key=value pairs")
    for k, v in raw.items():
        if not isinstance(k, str) or not LABEL_KEY_RE.fullmatch(k) \
                or not isinstance(v, str) or len(v) > 255:
            raise InvalidTask(field, f"bad label {str(k)[:64]}={str(v)[:64]}")
    return dict(sorted(raw.items()))


def spec_request(spec: Mapping[str, Any]) -> Amounts:
    """A stored spec's request as the planner's sorted pairs."""
    return amounts(spec.get("resources"))


def spec_require(spec: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(spec.get("require") or ())


def spec_prefer(spec: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(spec.get("prefer") or ())


def placed(spec: Mapping[str, Any]) -> bool:
    """Does a stored spec carry a request or constraints (RAFT_PROTOCOL 8)?"""
    return bool(spec.get("resources") or spec.get("require") or spec.get("prefer"))


# ---------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class Offer:
    """A live worker as placement sees it: slots, capacity per resource, labels."""

    node_id: str
    slots: int
    resources: Amounts = ()
    labels: tuple[tuple[str, str], ...] = ()


#: How long a worker's offer still counts for the submit check after the leader last
#: described it as live: a heartbeat late on a busy machine (or a node restarting)
#: must not get a request that fits it refused as fitting no node.
OFFER_MEMORY_S = 60.0


def remember_offers(seen: Mapping[str, tuple[Offer, float]], live: Iterable[Offer],
                    now: float, memory_s: float = OFFER_MEMORY_S
                    ) -> tuple[dict[str, tuple[Offer, float]], tuple[Offer, ...]]:
    """The offers seen within ``memory_s``: ``seen`` (node -> (offer, last seen))
    updated with the ``live`` ones at ``now``, and all of them by node id (what the
    submit check reads; pending reasons read only the live ones)."""
    out = {n: (o, t) for n, (o, t) in seen.items() if now - t <= memory_s}
    for o in live:
        out[o.node_id] = (o, now)
    return out, tuple(o for _n, (o, _t) in sorted(out.items()))


def unfit_reason(request: Amounts, require: Sequence[str],
                 offers: Iterable[Offer]) -> str | None:
    """Why no node of the cluster could ever run a unit with this request and these
    required labels, even idle (None: one could, or no offer is known yet: then
    nothing is refused). Names the required labels nobody has, else the largest
    node's capacity."""
    offers = list(offers)
    if not offers or (not request and not require):
        return None
    if any(labels_ok(require, dict(o.labels)) and request_fits(request, dict(o.resources))
           for o in offers):
        return None
    labelled = [o for o in offers if labels_ok(require, dict(o.labels))]
    if not labelled:
        return f"no node has {', '.join(require)}"
    big = max(labelled, key=lambda o: _size(request, dict(o.resources)))
    return (f"requests {format_amounts(request)}, more than any node has: the largest "
            f"is {big.node_id} with {format_amounts(big.resources)}")


def _size(request: Amounts, resources: Mapping[str, float]) -> tuple[float, ...]:
    """How close a node comes to a request (the shortfall, then the capacity)."""
    short = sum(max(0.0, a - resources.get(n, 0.0)) / max(a, 1e-9) for n, a in request)
    return (-short, sum(resources.get(n, 0.0) for n, _ in request))


# ---------------------------------------------------------------------- why pending


@dataclass(frozen=True)
class PendingView:
    """What :func:`pending_reason` reads about one task that has not started.

    ``status``: its status (``queued``, ``scheduled``, ``waiting``); ``run_at``: a
    scheduled task's start (as shown); ``waiting_for``: parents not ended yet.
    For a queued task: ``unit``, its first queued unit as the planner sees it;
    ``ahead``: how many queued units plan before it (``ahead_higher`` of them of a
    higher priority); ``head``: those units, when there are few enough for planning
    to reach it (fewer than the free slots: the leader reads that much of the
    queue's head, decisions.queue_depth_needed; else empty); ``workers``: the live
    workers with what each has free now (as decisions.free_slots gives them)."""

    status: str
    run_at: str = ""
    waiting_for: tuple[str, ...] = ()
    unit: QueuedUnit | None = None
    ahead: int = 0
    ahead_higher: int = 0
    head: tuple[QueuedUnit, ...] = ()
    workers: tuple[Worker, ...] = ()
    #: How many more units holding each limited concurrency key may be assigned
    #: (decisions.key_room; None: no limits), and for a task whose key is at its
    #: limit: (key, limit, units holding it, some of the tasks holding it).
    key_room: Mapping[str, int] | None = None
    key_full: tuple[str, int, int, tuple[str, ...]] | None = None
    #: Fair share (consensus/fairshare.py): the task's tenant, how many units of
    #: other tenants of its priority go first though queued after it, and the
    #: weights of those tenants and its own (None: fair share off).
    fair: tuple[str, int, tuple[tuple[str, float], ...]] | None = None


def offers_of(workers: Iterable[Worker]) -> tuple[Offer, ...]:
    """The planner's workers as offers (slots unknown there: 1)."""
    return tuple(Offer(w.node_id, 1, w.capacity, w.labels) for w in workers)


def pending_reason(v: PendingView) -> str:
    """Why the task has not started, in one sentence: its start time, its parents;
    no node that could ever hold it; else what the planner (strategies.plan) does
    with the units ahead of it and then it, on the workers as they are now: it is
    placed ("about to start"), the units ahead take the room or block it ("N units
    ahead"), or it does not fit what is left (no free slot, or which resource is
    short and the most any node has free of it)."""
    if v.status == "scheduled":
        return f"scheduled for {v.run_at}" if v.run_at else "scheduled for later"
    if v.status == "waiting":
        if v.waiting_for:
            more = f" and {len(v.waiting_for) - 3} more" if len(v.waiting_for) > 3 else ""
            return "waiting for " + ", ".join(v.waiting_for[:3]) + more
        return "waiting for its dependencies"
    if v.status != "queued" or v.unit is None:
        return ""
    unit = v.unit
    if not v.workers:
        return "no live worker"
    why = unfit_reason(unit.request, unit.require, offers_of(v.workers)) if unit.placed \
        else None
    if why is not None:
        return why
    if v.key_full is not None:
        key, limit, n, by = v.key_full
        more = f" and {n - len(by)} more" if n > len(by) else ""
        return (f"concurrency key {key} at its limit {n}/{limit}"
                + (f" (held by {', '.join(by)}{more})" if by else ""))
    if len(v.head) < v.ahead:
        return _ahead(v)  # the leader reads no further than the free slots: see PendingView
    out = plan([*v.head, unit], list(v.workers), v.key_room)
    if any(a.task_id == unit.task_id for a in out):
        return "about to start (planned at the next round)"
    offers = offers_of(v.workers)
    reachable = [u for u in v.head
                 if not u.placed or unfit_reason(u.request, u.require, offers) is None]
    if sum(1 for a in out if a.task_id != unit.task_id) < _units(reachable, len(v.workers)):
        return _ahead(v)  # planning stopped at a unit ahead of it
    left = _after(v.workers, v.head, out)
    able = [w for w in left if labels_ok(unit.require, dict(w.labels))
            and request_fits(unit.request, dict(w.capacity))]
    with_slot = [w for w in able if w.free_slots > 0]
    if not with_slot:
        if v.ahead:
            return _ahead(v)
        if len(able) == 1:
            return f"no free slot: {able[0].node_id}, the one node that can take it, is busy"
        return f"no free slot on the {len(able)} nodes that can take it"
    return _short(unit.request, with_slot)


def queued_unit(task: Any, chunk: int) -> QueuedUnit:
    """A queued unit of a replica's task as the planner sees it."""
    from taskandgo.node.decisions import unit_kind

    spec = task.spec
    return QueuedUnit(task.id, chunk, task.priority, task.strategy, int(spec.get("shards", 0)),
                      len(spec.get("items") or ()), task.chunk_count, unit_kind(spec),
                      spec_request(spec), spec_require(spec), spec_prefer(spec),
                      spec_keys(spec))


def read_pending(s: Any, task_id: str, offers: Sequence[Offer]) -> PendingView | None:
    """Under the replica's lock: the :class:`PendingView` of a task that has not
    started (None for any other, or an unknown one). ``s`` is the SchedulerState;
    ``offers`` the live workers as the leader last described them. Counts the units
    ahead in one pass over the queue's heap (it holds dead entries too: skipped);
    what each worker has free is its slots and offer minus the running units there
    (the same sums the leader plans with, decisions.free_slots)."""
    from taskandgo.node import decisions as d
    from taskandgo.node.vocabulary import rfc3339

    t = s.tasks.get(task_id)
    if t is None:
        return None
    status = t.status
    if status == "scheduled":
        when = s.scheduled.get(task_id) or t.spec.get("run_at") or 0.0
        return PendingView(status, run_at=rfc3339(when) if when else "")
    if status == "waiting":
        return PendingView(status, waiting_for=tuple(s.waiting.get(task_id, ())))
    if status != "queued":
        return None
    live = [e for e in s.heap if e[2] == task_id and s._is_live_entry(e)]
    if not live:
        return None
    mine = min(live)
    ahead = higher = 0
    fair = None
    if s.fair is not None:
        # In the order the state serves (fair share within a level), not the heap's.
        from taskandgo.consensus.fairshare import standing, weight_of

        ahead, higher, over = standing(s.fair, mine, s.tasks, s._is_live_entry, s.weights)
        me = s.fair.tenant(t.spec)
        fair = (me, sum(over.values()), tuple((n, weight_of(s.weights, n))
                                              for n in sorted([*over, me])))
    for e in s.heap if s.fair is None else ():
        if e[:2] < mine[:2] and e[2] != task_id and s._is_live_entry(e):
            ahead += 1
            if s.tasks[e[2]].priority > t.priority:
                higher += 1
    tasks = s.tasks
    workers = tuple(d.WorkerView(o.node_id, o.slots, resources=o.resources, labels=o.labels)
                    for o in offers)
    summary = d.summarize_running(
        s.running, lambda tid: x.priority if (x := tasks.get(tid)) else None, (),
        lambda tid: spec_request(x.spec) if (x := tasks.get(tid)) is not None
        and "resources" in x.spec else ())
    free = d.free_slots(d.PlanView(0.0, workers, running_summary=summary))
    room = sum(w.free_slots for w in free)
    head: tuple[QueuedUnit, ...] = ()
    if ahead and ahead < room:
        head = tuple(queued_unit(x, c) for x, c in s.peek_queued(ahead + 1)
                     if x.id != task_id)[:ahead]
    key_room = key_full = None
    if s.limits:
        from taskandgo.node.policies import holders

        key_room = d.key_room(s.limits, s.key_held, ())
        full = s.at_limit(spec_keys(t.spec))
        if full:
            key_full = (full, s.limits[full], s.key_held.get(full, 0), tuple(holders(s, full)))
    return PendingView(status, unit=queued_unit(t, mine[3]), ahead=ahead, ahead_higher=higher,
                       head=head, workers=free, key_room=key_room, key_full=key_full,
                       fair=fair)


def _ahead(v: PendingView) -> str:
    noun = "unit" if v.ahead == 1 else "units"
    if v.fair is not None and v.fair[1]:
        tenant, n, weights = v.fair
        first = "unit" if n == 1 else "units"
        rest = f"; {v.ahead} {noun} ahead in all" if v.ahead != n else ""
        return (f"tenant {tenant or '(none)'} over its share: {n} {first} of other tenants "
                f"at this priority go first (weights "
                + ", ".join(f"{k or '(none)'}={w:g}" for k, w in weights) + ")" + rest)
    if v.ahead_higher == v.ahead:
        return f"{v.ahead} higher-priority {noun} ahead"
    return f"{v.ahead} {noun} ahead in the queue ({v.ahead_higher} of higher priority)"


def _units(head: Sequence[QueuedUnit], n_workers: int) -> int:
    """How many assignments placing all of ``head`` makes (a split task's chunks)."""
    return sum(chunk_count_for(u, n_workers) if u.chunk == WHOLE and u.strategy == SPLIT
               else 1 for u in head)


def _after(workers: Sequence[Worker], head: Sequence[QueuedUnit],
           out: Sequence[Assignment]) -> list[Worker]:
    """The workers with what the assignments of the units ahead took subtracted."""
    req = {u.task_id: u.request for u in head}
    slots = {w.node_id: w.free_slots for w in workers}
    free = {w.node_id: dict(w.free) for w in workers}
    for a in out:
        if a.task_id in req:
            slots[a.worker] -= 1
            take(free[a.worker], req[a.task_id])
    return [Worker(w.node_id, slots[w.node_id], amounts(free[w.node_id]), w.capacity, w.labels)
            for w in workers]


def _short(request: Amounts, workers: Sequence[Worker]) -> str:
    """"needs cpu=4; the most free on any node is cpu=2.5 (node-1)": for the first
    requested resource that no node with a free slot has enough of."""
    for name, amount in request:
        best = max(workers, key=lambda w: dict(w.free).get(name, 0.0))
        most = dict(best.free).get(name, 0.0)
        if most + EPSILON < amount:
            return (f"needs {name}={format_amount(name, amount)}; the most free on any node "
                    f"is {name}={format_amount(name, max(0.0, most))} ({best.node_id})")
    return (f"needs {format_amounts(request)} on one node; no node with a free slot has "
            "all of it free")


__all__ = [
    "MAX_RESOURCES",
    "MAX_TERMS",
    "OFFER_MEMORY_S",
    "PLACEMENT_PROTOCOL",
    "Offer",
    "PendingView",
    "check_labels",
    "check_resources",
    "check_terms",
    "offers_of",
    "parse_quantity",
    "pending_reason",
    "placed",
    "queued_unit",
    "read_pending",
    "remember_offers",
    "spec_prefer",
    "spec_request",
    "spec_require",
    "unfit_reason",
]
