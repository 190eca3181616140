"""Schedules at scale: many active schedules firing every minute, on a 3-node cluster;
and a dependency fan-in.

    python bench/schedules.py [--schedules 10000] [--minutes 2] [--cron '* * * * *']
    python bench/schedules.py --fanin 1000 [--rounds 5]

Creates the schedules (each a no-op task: opaque data, recorded by the echo runner),
waits for the next whole minute, then for ``--minutes`` minutes of fires. Prints, per
fire measured: the lateness (the slot's task created, i.e. the fire committed, minus
the slot time) p50/p99/max, how many slots fired and were missed or fired twice, and
the leader's CPU over the window (percent of one core) with the idle baseline before
the schedules existed.

``--fanin N``: N parent tasks (no-ops) and one child ``after`` all of them, submitted
together, ``--rounds`` times; prints the time from the last parent's end to the
child's start (median and max), i.e. what the dependency costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import BenchCluster
from taskandgo import Client


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def fan_in(cluster: BenchCluster, n: int, rounds: int) -> None:
    from taskandgo.node.client import task_spec

    gaps = []
    with Client(cluster.addrs, timeout_s=120) as c:
        for r in range(rounds):
            parents = [task_spec(f"p{r}-{i}", id=f"p{r}-{i}") for i in range(n)]
            child = task_spec("child", id=f"child-{r}", after=[p["id"] for p in parents])
            c.submit_many([*parents, child], batch=n + 1)
            done = c.wait([child["id"]], timeout_s=120)[0]
            ends = [t["finished_at"] for t in c.wait([p["id"] for p in parents], 60)]
            gaps.append(done["started_at"] - max(ends))
    print(f"fan-in of {n}: last parent's end to the child's start: median "
          f"{1000 * statistics.median(gaps):.0f} ms, max {1000 * max(gaps):.0f} ms "
          f"over {rounds} rounds")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fanin", type=int, default=0, help="measure a fan-in of N parents")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--schedules", type=int, default=10_000)
    ap.add_argument("--minutes", type=int, default=2)
    ap.add_argument("--cron", default="* * * * *")
    ap.add_argument("--period-s", type=float, default=60.0,
                    help="the cron's period (60 for every minute)")
    args = ap.parse_args()
    cluster = BenchCluster(3, slots=8)
    if args.fanin:
        try:
            cluster.wait_leader()
            fan_in(cluster, args.fanin, args.rounds)
        finally:
            cluster.stop()
        return 0
    try:
        leader = cluster.wait_leader()
        pid = cluster.procs[leader].pid
        t0, c0 = time.monotonic(), _cpu_s(pid)
        time.sleep(5)  # measuring the idle leader's CPU over a fixed window
        idle = 100 * (_cpu_s(pid) - c0) / (time.monotonic() - t0)
        with Client(cluster.addrs, timeout_s=120) as c:
            created = time.monotonic()

            def make(i: int) -> None:
                c.create_schedule(id=f"b{i}", cron=args.cron,
                                  task={"data": f"b{i}", "labels": {"bench": "schedules"}})

            with ThreadPoolExecutor(32) as pool:
                list(pool.map(make, range(args.schedules)))
            made_s = time.monotonic() - created
            print(f"{args.schedules} schedules created in {made_s:.1f} s", flush=True)
            start = (int(time.time() // args.period_s) + 1) * args.period_s
            end = start + args.minutes * args.period_s
            time.sleep(max(0.0, start - time.time()))  # until the first measured slot
            t1, c1 = time.monotonic(), _cpu_s(pid)
            time.sleep(max(0.0, end - time.time()))
            busy = 100 * (_cpu_s(pid) - c1) / (time.monotonic() - t1)
            # Every slot of the window, once its fire can have committed.
            deadline = time.monotonic() + 120
            want = {f"b{i}@{int(start + k * args.period_s)}" for i in range(args.schedules)
                    for k in range(args.minutes)}
            while time.monotonic() < deadline:
                tasks = [t for t in c.list_tasks(labels=["bench=schedules"], limit=10**7)
                         if start <= t["slot"] < end]
                if {t["id"] for t in tasks} >= want:
                    break
                time.sleep(1)  # polling the replica, bounded by the deadline
        late = [t["created_at"] - t["slot"] for t in tasks]
        ids = [t["id"] for t in tasks]
        print(f"fires measured: {len(tasks)} of {len(want)} slots "
              f"({args.minutes} x {args.schedules}); missed {len(want - set(ids))}, "
              f"fired twice {len(ids) - len(set(ids))}")
        print(f"fire lateness: p50 {1000 * statistics.median(late):.0f} ms, "
              f"p99 {1000 * _pct(late, 0.99):.0f} ms, max {1000 * max(late):.0f} ms")
        print(f"leader CPU: {busy:.0f}% of a core while firing (idle before: {idle:.0f}%)")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
