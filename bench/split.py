"""Split fan-out: one task cut into 100 chunks of no-op work, submit to gathered result.

    python bench/split.py [--chunks 100] [--runs 5]

Prints the median and the runs (3-node local cluster, every command committed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import BenchCluster
from taskandgo import Client


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    cluster = BenchCluster(3)
    try:
        cluster.wait_leader()
        times = []
        with Client(cluster.addrs, timeout_s=60) as c:
            for _ in range(args.runs):
                t0 = time.perf_counter()
                tid = c.submit(call="taskandgo.node.builtins:noop", strategy="split",
                               shards=args.chunks)
                task = c.wait(tid, timeout_s=120)[0]
                times.append((time.perf_counter() - t0) * 1000)
                assert task["status"] == "succeeded" and task["chunks_done"] == args.chunks
        print(f"split: {args.chunks} chunks submit-to-gathered-result median "
              f"{statistics.median(times):.0f} ms (runs: {', '.join(f'{t:.0f}' for t in times)})")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
