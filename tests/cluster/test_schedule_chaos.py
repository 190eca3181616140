"""Chaos for periodic schedules (issue 17): ten schedules firing every second on a
5-voter cluster while the leader is killed (-9, then restarted) or frozen (SIGSTOP,
then SIGCONT) around fire times, at least 100 times. At most two nodes are impaired at
once, so a majority is always up: every slot must be fired, each exactly once (one
task per (schedule, slot), every one run to the end), and the replicas agree.

The seed is printed; replay with TASKANDGO_SCHEDULE_CHAOS_SEED=<seed>;
TASKANDGO_SCHEDULE_CHAOS_FAULTS sets how many faults (100).
"""

from __future__ import annotations

import os
import random
import signal
import time
from itertools import pairwise
from pathlib import Path

import pytest
from harness import Cluster, wait_for
from taskandgo.node.client import Client, TaskAndGoError

pytestmark = pytest.mark.cluster

SCHEDULES = [f"chaos-{i}" for i in range(10)]
#: A node killed and restarted this recently counts as impaired (still starting).
RESTART_S = 2.0


def _leader(c: Cluster, impaired: set[int]) -> int | None:
    """The leader as a healthy node names it (one quick call)."""
    for i in range(c.n):
        if i in impaired or c.procs[i] is None:
            continue
        try:
            with Client([c.addr(i)], timeout_s=0.5) as cl:
                leader = cl.node_status(c.addr(i)).get("leader_id", "")
        except TaskAndGoError:
            continue
        if leader.startswith("node-"):
            return int(leader.removeprefix("node-"))
    return None


def test_every_slot_fires_exactly_once_while_leaders_die(tmp_path: Path) -> None:
    seed = int(os.environ.get("TASKANDGO_SCHEDULE_CHAOS_SEED", random.randrange(1 << 30)))
    faults = int(os.environ.get("TASKANDGO_SCHEDULE_CHAOS_FAULTS", "100"))
    print(f"schedule chaos seed {seed} faults {faults} "
          f"(replay: TASKANDGO_SCHEDULE_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    c = Cluster(tmp_path, n=5, extra=["--lease", "1.5", "--election-timeout", "0.2-0.4"])
    c.start()
    stopped: dict[int, float] = {}  # node -> when to resume it
    restarted: dict[int, float] = {}  # node -> when it was restarted
    counts = {"kills": 0, "stops": 0}
    try:
        c.wait_ready(60)
        with c.client() as cl:
            for sid in SCHEDULES:
                cl.create_schedule(id=sid, cron="* * * * * *",
                                   task={"data": sid, "labels": {"schedule": sid}})
        t_start = time.monotonic()
        deadline = t_start + 30 + 1.5 * faults
        while counts["kills"] + counts["stops"] < faults and time.monotonic() < deadline:
            now = time.monotonic()
            for i, at in list(stopped.items()):
                if now >= at:
                    os.kill(c.procs[i].pid, signal.SIGCONT)  # type: ignore[union-attr]
                    del stopped[i]
            for i, at in list(restarted.items()):
                if now - at > RESTART_S:
                    del restarted[i]
            impaired = set(stopped) | set(restarted)
            leader = _leader(c, impaired)
            if leader is None or leader in impaired or len(impaired) >= 2:
                # Not yet: a new leader, or a node back (the loop polls the cluster).
                continue
            # Around a fire time: within 0.4 s before or after a whole second.
            if 0.4 <= time.time() % 1.0 < 0.6:
                target = int(time.time()) + 1 - rng.uniform(0.0, 0.4)
                wait_for(lambda t=target: time.time() >= t, 2, "the fault's moment",
                         every_s=0.005)
            # Two kills to three stops: a killed node takes about 2 s to be back (a new
            # process), a stopped one under one, so the faults keep coming faster.
            if rng.random() < 0.4:
                c.kill(leader)
                c.start(leader)
                restarted[leader] = time.monotonic()
                counts["kills"] += 1
            else:
                os.kill(c.procs[leader].pid, signal.SIGSTOP)  # type: ignore[union-attr]
                stopped[leader] = time.monotonic() + rng.uniform(0.3, 0.8)
                counts["stops"] += 1
        elapsed = time.monotonic() - t_start
        for i in list(stopped):
            os.kill(c.procs[i].pid, signal.SIGCONT)  # type: ignore[union-attr]
        stopped.clear()
        c.wait_ready(60)
        end_slot = int(time.time()) + 2
        with c.client() as cl:
            wait_for(lambda: all(cl.get_schedule(s)["last_slot"] >= end_slot
                                 for s in SCHEDULES), 30, "every schedule past the end slot")
            for sid in SCHEDULES:
                cl.pause_schedule(sid)
            views = {sid: cl.get_schedule(sid) for sid in SCHEDULES}
            tasks = cl.list_tasks(limit=1_000_000)
        by_sched: dict[str, list[int]] = {sid: [] for sid in SCHEDULES}
        for t in tasks:
            if t["schedule_id"] in by_sched:
                assert t["id"] == f"{t['schedule_id']}@{int(t['slot'])}"
                by_sched[t["schedule_id"]].append(int(t["slot"]))
        fired = duplicates = misses = 0
        for sid, slots in by_sched.items():
            slots.sort()
            fired += len(slots)
            duplicates += len(slots) - len(set(slots))
            misses += sum(b - a - 1 for a, b in pairwise(slots))
            assert views[sid]["fires_total"] == len(slots), (sid, views[sid])
            assert views[sid]["skipped_total"] == 0, (sid, views[sid]["recent"])
            assert slots[-1] >= end_slot, (sid, slots[-5:])
        print(f"schedule chaos: {counts['kills']} kills, {counts['stops']} stops in "
              f"{elapsed:.0f} s; {fired} slots fired, {duplicates} duplicates, "
              f"{misses} missed")
        assert counts["kills"] + counts["stops"] >= faults
        assert duplicates == 0 and misses == 0
        # A task whose node was killed twice while running it ends failed (the poison
        # rule), not run again: every other one succeeded.
        c.check_invariants([t["id"] for t in tasks if t["schedule_id"] in by_sched],
                           timeout_s=120, allow=("succeeded", "failed"))
        with c.client() as cl:
            ended = cl.wait([t["id"] for t in tasks if t["schedule_id"] in by_sched], 60)
        failed = [t for t in ended if t["status"] == "failed"]
        assert all("died" in t["error"] for t in failed), failed[:3]
        print(f"schedule chaos: {len(failed)} task(s) ended failed by the poison rule")
    finally:
        for i in list(stopped):
            if c.procs[i] is not None:
                os.kill(c.procs[i].pid, signal.SIGCONT)  # type: ignore[union-attr]
        c.stop()
