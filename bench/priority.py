"""Priority under load: with 10 ms tasks, 2,000 low queued, then 100 high submitted.

    python bench/priority.py [--low 2000] [--high 100] [--mode bulk|one]

``--mode bulk`` submits the high tasks in one call; ``--mode one`` one call each,
``--interval-ms`` (10) apart, as users send them. Counts the exceptions: low-priority
tasks whose real start on their worker came after some high task was accepted (its
``created_at``, stamped before the commit) and before that high task started (tasks
already running do not count: they started before).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import BenchCluster
from taskandgo import Client
from taskandgo.node.client import task_spec

SLEEP = "taskandgo.node.builtins:sleep"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--low", type=int, default=2000)
    ap.add_argument("--high", type=int, default=100)
    ap.add_argument("--prefetch", type=int, help="node --prefetch to test with (default: the "
                    "node's default)")
    ap.add_argument("--mode", choices=("bulk", "one"), default="bulk",
                    help="high tasks in one call (bulk) or one call each (one)")
    ap.add_argument("--interval-ms", type=float, default=10.0,
                    help="--mode one: time between two high submits")
    args = ap.parse_args()
    cluster = BenchCluster(3, extra=[] if args.prefetch is None else
                           ["--prefetch", str(args.prefetch)])
    try:
        cluster.wait_leader()
        with Client(cluster.addrs, timeout_s=120) as c:
            lows = [task_spec(call=SLEEP, args=[0.01], priority="low", strategy="batch")
                    for _ in range(args.low)]
            for i in range(0, len(lows), 1000):
                c.submit_many(lows[i:i + 1000])
            highs = [task_spec(call=SLEEP, args=[0.01], priority="high", strategy="batch")
                     for _ in range(args.high)]
            # Let the lows fill the workers' slots and prefetch windows first.
            deadline = time.monotonic() + 60
            while not c.list_tasks(status="running", limit=10) and time.monotonic() < deadline:
                time.sleep(0.01)
            accepted = time.time()
            if args.mode == "bulk":
                c.submit_many(highs)
            else:
                for h in highs:
                    c.submit_many([h])
                    time.sleep(args.interval_ms / 1000)  # pacing, as users send them
            done = c.wait([s["id"] for s in lows + highs], timeout_s=600)
            held = sum(int(c.node_status(a).get("held_back", 0)) for a in cluster.addrs)
        by_id = {t["id"]: t for t in done}
        high_starts = [by_id[s["id"]]["started_at"] for s in highs]
        last_high = max(high_starts)
        windows = [(by_id[s["id"]]["created_at"], by_id[s["id"]]["started_at"]) for s in highs]
        exceptions = sum(1 for s in lows if any(
            a < by_id[s["id"]]["started_at"] < b for a, b in windows))
        print(f"priority ({args.mode}): {exceptions} low-priority tasks started after a high "
              f"one was accepted and before it started ({args.low} low, {args.high} high, "
              f"10 ms tasks, prefetch "
              f"{'node default' if args.prefetch is None else args.prefetch}, "
              f"{held} waiting units handed back); last high started "
              f"{(last_high - accepted) * 1000:.0f} ms after acceptance")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
