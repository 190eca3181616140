"""The single-task fast path in the simulator (issue 14): the leader assigns a
submit's tasks in the submit command itself (Scheduler.fast_path, mirrored by
SimNode.fast_path and LeaderSide.plan_and_assign), and every invariant still holds.
``test_schedules`` runs the default schedules with it on; these tests show that the
schedules take it, and that its guard is what keeps strict priority."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from taskandgo.node import decisions
from taskandgo.strategies import QueuedUnit

from . import node as sim_node
from .invariants import Violation
from .test_sim import known_as, patched
from .world import SimConfig, World


def _count_fast(seeds: range) -> tuple[int, int, list[str]]:
    """(submit commands that carried assignments, submit commands, violations)."""
    fast = calls = 0
    bad: list[str] = []
    original = sim_node.SimNode.fast_path

    def counting(make: Any) -> Any:
        def fast_path(self: sim_node.SimNode, specs: list) -> Any:
            nonlocal fast, calls
            out = original(self, specs)
            calls += 1
            fast += out is not None
            return out
        return fast_path

    with patched(sim_node.SimNode, "fast_path", counting):
        for seed in seeds:
            w = World(seed, SimConfig.for_seed(seed))
            try:
                w.run()
            except Violation as v:
                if known_as(v) is None:
                    bad.append(f"seed {seed}: {v}")
    return fast, calls, bad


def test_schedules_take_the_fast_path_and_keep_every_invariant() -> None:
    fast, calls, bad = _count_fast(range(150))
    assert not bad, bad[:3]
    assert fast >= 20 and calls > fast  # taken, and not for every submit


def without_the_queue_check(fast_path: Any) -> Any:
    """A fast path that assigns a new task whatever waits in the queue before it."""
    def plan(view: decisions.PlanView, units: list[QueuedUnit]) -> Any:
        return decisions.plan_round(replace(view, queued=tuple(units)))
    return plan


def test_the_queue_check_is_what_keeps_priority_strict() -> None:
    """Given the fast path's check that nothing at or above a new task's priority is
    queued removed, schedules start a lower task on a free slot while a more urgent
    one waits (the 'priority' invariant catches it)."""
    seen: Counter[str] = Counter()
    with patched(decisions, "fast_path", without_the_queue_check):
        for seed in range(300):
            w = World(seed, SimConfig.for_seed(seed))
            try:
                w.run()
            except Violation as v:
                seen[v.kind] += 1
                if v.kind == "priority":
                    return
    pytest.fail(f"no schedule caught the fast path without its queue check (saw {dict(seen)})")
