"""Placement: does a unit's request fit a worker, and which worker takes it.

Pure functions over plain values (no I/O, no clock). A unit may request resources
(``cpu`` in cores, ``memory`` in bytes, any named resource such as ``gpu``: a
mapping name -> amount), require node labels (``zone=a``: the label has that value;
``gpu``: the label is present) and prefer labels (the same forms, soft). A worker
advertises its capacity per resource and its labels; what is free is its capacity
minus the requests of the units it holds. A resource a worker does not advertise
is 0 there.

Policy (see docs/architecture.md, *Placement*): a unit goes only to a worker with a
free slot, every required label, and at least its request free of every resource
(never over-committed). Among those, the one matching the most preferred labels;
then the **best fit**: the worker left with the least free of what the unit
requested (as a fraction of its capacity), so partly used workers fill up first
and whole workers stay free for big requests; then the worker order given (stable).
A unit that requests nothing and has no constraints keeps the slot-only placement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: (name, amount) pairs, sorted by name: a request or a capacity, hashable.
Amounts = tuple[tuple[str, float], ...]
#: Tolerance for float sums of requests (0.1 + 0.2 fits in 0.3).
EPSILON = 1e-9


def amounts(m: Mapping[str, float] | Iterable[tuple[str, float]] | None) -> Amounts:
    """A mapping (or pairs) as sorted (name, amount) pairs, zero amounts dropped."""
    if not m:
        return ()
    items = m.items() if isinstance(m, Mapping) else m
    return tuple(sorted((str(k), float(v)) for k, v in items if float(v) != 0.0))


def label_ok(term: str, labels: Mapping[str, str]) -> bool:
    """Does a node with ``labels`` meet ``term`` (``key=value`` or ``key``)?"""
    key, sep, value = term.partition("=")
    if not sep:
        return key in labels
    return labels.get(key) == value


def labels_ok(terms: Iterable[str], labels: Mapping[str, str]) -> bool:
    """Every term met."""
    return all(label_ok(t, labels) for t in terms)


def request_fits(request: Amounts, free: Mapping[str, float]) -> bool:
    """Is at least ``request`` free of every resource it names?"""
    return all(free.get(name, 0.0) + EPSILON >= amount for name, amount in request)


def take(free: dict[str, float], request: Amounts) -> None:
    """Subtract a request from ``free`` in place."""
    for name, amount in request:
        free[name] = free.get(name, 0.0) - amount


def leftover(request: Amounts, free: Mapping[str, float],
             capacity: Mapping[str, float]) -> float:
    """What a worker would have left of the requested resources after taking the
    request, as fractions of its capacity, summed (smaller: a tighter fit)."""
    out = 0.0
    for name, amount in request:
        cap = capacity.get(name, 0.0)
        if cap > 0:
            out += (free.get(name, 0.0) - amount) / cap
    return out


def preferred(terms: Iterable[str], labels: Mapping[str, str]) -> int:
    """How many preferred terms a node meets."""
    return sum(1 for t in terms if label_ok(t, labels))


def format_amount(name: str, amount: float) -> str:
    """An amount as people read it: memory in MiB/GiB, others as numbers."""
    if name == "memory":
        for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
            if abs(amount) >= size:
                return f"{amount / size:.3g}{unit}"
        return f"{amount:.0f}"
    return f"{amount:.3g}"


def format_amounts(m: Mapping[str, float] | Amounts) -> str:
    """``cpu=4 memory=2Gi gpu=1`` (empty: ``nothing``)."""
    pairs = sorted(m.items()) if isinstance(m, Mapping) else list(m)
    return " ".join(f"{k}={format_amount(k, v)}" for k, v in pairs) or "nothing"


__all__ = ["EPSILON", "Amounts", "amounts", "format_amount", "format_amounts", "label_ok",
           "labels_ok", "leftover", "preferred", "request_fits", "take"]
