"""Scale: memory per queued task on every node, and submit throughput with a deep queue.

    python bench/scale.py [--queued 1000000] [--batch 5000]

Starts a 3-node cluster whose workers accept nothing (every node runs with
--slots 1 and one long blocker per node keeps the slots busy), fills the queue with
no-op callable tasks through submit_many, and prints the resident memory growth per
queued task on each node and the submit rate at the start and at the end of the fill
(medians of the first and of the last five 10k-task windows). The nodes snapshot
every --snapshot-interval seconds (20 by default, instead of 600) so that snapshots
of the full queue are written during the fill; the script reports how many were
written, whether any election happened (Raft terms before and after) and the longest
single submit call (a stall would show there).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import BenchCluster
from taskandgo import Client
from taskandgo.node.client import task_spec


def rss(c: Client, addrs: list[str]) -> list[int]:
    return [c.node_status(a)["memory_rss"] for a in addrs]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queued", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--snapshot-interval", type=float, default=20.0)
    args = ap.parse_args()
    cluster = BenchCluster(3, slots=1, extra=["--max-queued", str(args.queued + 10),
                                              "--snapshot-interval",
                                              str(args.snapshot_interval)])
    try:
        cluster.wait_leader()
        with Client(cluster.addrs, timeout_s=120) as c:
            blockers = c.submit_many([task_spec("sh: sleep 3600", strategy="batch")
                                      for _ in range(3)])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(
                    c.get(b["task_id"])["status"] != "running" for b in blockers):
                time.sleep(0.1)
            before = rss(c, cluster.addrs)
            terms = [c.node_status(a)["raft_term"] for a in cluster.addrs]
            dumps = [os.path.join(cluster.dir, f"node-{i}", "raft.dump") for i in range(3)]
            seen_dumps: list[set] = [set() for _ in dumps]
            calls: list[float] = []
            rates = []
            n = 0
            t0 = time.perf_counter()
            window_start, window_n = t0, 0
            while n < args.queued:
                k = min(args.batch, args.queued - n)
                specs = [task_spec(call="taskandgo.node.builtins:noop", strategy="batch",
                                   priority="low") for _ in range(k)]
                t_call = time.perf_counter()
                c.submit_many(specs)
                calls.append(time.perf_counter() - t_call)
                for i, d in enumerate(dumps):
                    try:
                        seen_dumps[i].add(os.stat(d).st_mtime_ns)
                    except OSError:
                        pass
                n += k
                window_n += k
                if window_n >= 10_000:
                    now = time.perf_counter()
                    rates.append(window_n / (now - window_start))
                    window_start, window_n = now, 0
            total = time.perf_counter() - t0
            after = rss(c, cluster.addrs)
            terms_after = [c.node_status(a)["raft_term"] for a in cluster.addrs]
        per_task = [(a - b) / args.queued for a, b in zip(after, before)]
        print(f"scale: {args.queued} queued; memory per queued task "
              + ", ".join(f"node-{i} {p:.0f} B" for i, p in enumerate(per_task))
              + f"; submit {statistics.median(rates[:5]):.0f} tasks/s at the start, "
              f"{statistics.median(rates[-5:]):.0f} tasks/s at "
              f"the end ({args.queued / total:.0f} tasks/s overall)")
        print("scale: snapshots written during the fill: "
              + ", ".join(f"node-{i} {len(d)}" for i, d in enumerate(seen_dumps))
              + f"; Raft term {max(terms)} before, {max(terms_after)} after "
              f"({'no election' if max(terms_after) == max(terms) else 'ELECTION'}); "
              f"submit calls of {args.batch} tasks: "
              f"median {sorted(calls)[len(calls) // 2] * 1000:.0f} ms, "
              f"longest {max(calls) * 1000:.0f} ms")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
