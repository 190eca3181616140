"""Simulator schedules with fair share on (issue 18, item 4): a client sets the
tenant label and weights before submitting, every task is one of two to four
tenants', and the simulated leaders plan from the real state's fair order
(SchedulerState.peek_queued) with the real decisions. Every invariant holds
through faults and leader changes: replicas agree (their fingerprints include
the tenants' virtual times), strict priority, nothing lost or run twice.
Replay one: World(seed, replace(SimConfig.for_seed(seed), tenants=fair_weights(seed)))."""

from __future__ import annotations

import os
import random
from dataclasses import replace

from .invariants import Violation
from .test_sim import known_as
from .world import SimConfig, World

#: Fair-share schedules: seeds run.
FAIR_SEEDS = int(os.environ.get("TASKANDGO_SIM_FAIR_SEEDS", "120"))


def fair_weights(seed: int) -> tuple[float, ...]:
    """Two to four tenants' weights, drawn apart from the seed's other choices."""
    r = random.Random(f"fair-{seed}")
    return tuple(r.choice((1.0, 2.0, 3.0, 0.5)) for _ in range(r.randint(2, 4)))


def test_fair_share_schedules() -> None:
    failures = []
    engaged = 0
    for seed in range(FAIR_SEEDS):
        w = World(seed, replace(SimConfig.for_seed(seed), tenants=fair_weights(seed)))
        try:
            w.run()
        except Violation as v:
            if known_as(v) is None:
                failures.append(f"\n=== fair-share schedule {seed} broke an invariant ===\n"
                                f"{v}\n{w.describe()}\n")
            continue
        # No task is submitted before the policy is applied.
        assert w.truth.fair is not None or not w.truth.tasks, seed
        teams = {(t.spec.get("labels") or {}).get("team", "") for t in w.truth.tasks.values()}
        engaged += len(teams) > 1
    assert not failures, "".join(failures[:3])
    assert engaged >= FAIR_SEEDS // 2  # most worlds had several tenants' tasks
