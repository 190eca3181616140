"""Chaos: a 5-node cluster under a steady stream of submissions; each round kills
(-9) or stops (SIGSTOP) a random node, leader or not, holds the fault until more
work has been accepted, then restarts or resumes it. Ends with the invariant check.

The seed is printed; replay with TASKANDGO_CHAOS_SEED=<seed>. Rounds default to 6
(about a minute); TASKANDGO_CHAOS_ROUNDS=50 makes a long run.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import pytest
from harness import Cluster, wait_for
from taskandgo.node.client import TaskAndGoError, task_spec

pytestmark = pytest.mark.cluster


def test_chaos_rounds_lose_nothing_and_commit_nothing_twice(tmp_path: Path) -> None:
    seed = int(os.environ.get("TASKANDGO_CHAOS_SEED", random.randrange(1 << 30)))
    rounds = int(os.environ.get("TASKANDGO_CHAOS_ROUNDS", "6"))
    print(f"chaos seed {seed} rounds {rounds} (replay: TASKANDGO_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    cluster = Cluster(tmp_path, n=5, extra=["--lease", "1.5"])
    cluster.start()
    accepted: list[str] = []
    failed_submits: list[str] = []
    stop = threading.Event()
    counts = {"kills": 0, "stops": 0}

    def submitter() -> None:
        k = 0
        with cluster.client(timeout_s=30) as c:
            while not stop.is_set() and k < 100_000:
                spec = task_spec("python: print('ok')" if k % 5 else "sh: sleep 0.2; echo ok",
                                 id=f"chaos-{k}", strategy="batch" if k % 7 else "split",
                                 shards=0 if k % 7 else 3)
                k += 1
                try:
                    c.submit_many([spec])
                    accepted.append(spec["id"])
                except TaskAndGoError as exc:
                    # Not acknowledged: the client gave up. It may still have been
                    # committed; the invariant check covers only acknowledged ids.
                    failed_submits.append(f"{spec['id']}: {exc.code}")

    try:
        cluster.wait_ready()
        t = threading.Thread(target=submitter, daemon=True)
        t.start()
        for r in range(rounds):
            victim = rng.randrange(5)
            fault = rng.choice(["kill", "stop"])
            leader = cluster.leader_index()
            print(f"round {r}: {fault} node-{victim} (leader node-{leader})")
            before = len(accepted)
            if fault == "kill":
                cluster.kill(victim)
                counts["kills"] += 1
            else:
                cluster.kill(victim, signal.SIGSTOP)
                counts["stops"] += 1
            wait_for(lambda: len(accepted) >= before + 20, 60,  # noqa: B023 - polled right here
                     f"the others to accept work with node-{victim} down")
            if fault == "kill":
                cluster.start(victim)
            else:
                cluster.kill(victim, signal.SIGCONT)
            cluster.wait_ready(60)
        stop.set()
        t.join(60)
        print(f"chaos: rounds {rounds} kills {counts['kills']} stops {counts['stops']} "
              f"accepted {len(accepted)} unacknowledged {len(failed_submits)}")
        cluster.check_invariants(accepted, timeout_s=120)
        with cluster.client() as c:
            status = c.cluster_status()
            tasks = c.list_tasks(limit=10**6)
        # No task has retries, so every committed result is one unit's only one:
        # committed results == units that succeeded means nothing committed twice.
        units = sum(t["chunk_count"] or 1 for t in tasks if t["status"] == "succeeded")
        assert status["committed_results"] == units, (status["committed_results"], units)
        print(f"chaos: lost 0, committed twice 0 ({units} units, "
              f"{status['committed_results']} results committed), late results dropped "
              f"{status['dropped_results']}")
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        stop.set()
        cluster.stop()
