"""What durable acknowledgements cost: --fsync always vs --fsync never, side by side.

    python bench/durability.py [--tasks 10000] [--runs 3] [--rate 200] [--seconds 5]

For each mode a fresh local 3-node cluster (data dirs on the machine's disk, not
tmpfs: an fsync there is free and the figure would lie) runs the same workloads as
bench/throughput.py: bulk throughput of N no-op callable tasks, and submit-to-result
latency at a steady rate with the client on a follower. Runs of the two modes are
interleaved so a noisy machine hurts both alike. Prints medians, the ratio, and how
many fsyncs the nodes did (group commit: far fewer than tasks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import BenchCluster
from taskandgo import Client
from throughput import latency, throughput


def _disk_dir() -> str:
    # /tmp may be tmpfs on some machines; a dir beside the checkout is on real disk.
    base = Path(__file__).resolve().parent.parent / ".bench-data"
    base.mkdir(exist_ok=True)
    return str(base)


def _fsyncs(cluster: BenchCluster) -> int:
    total = 0
    for a in cluster.addrs:
        with Client([a], timeout_s=5) as c:
            total += int(c.node_status(a).get("raft_syncs", 0))
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    tempfile.tempdir = _disk_dir()
    modes = ("always", "never")
    tps: dict[str, list[float]] = {m: [] for m in modes}
    p50: dict[str, list[float]] = {m: [] for m in modes}
    p99: dict[str, list[float]] = {m: [] for m in modes}
    syncs: dict[str, int] = {}
    for r in range(args.runs):
        for mode in modes:
            cluster = BenchCluster(3, extra=["--fsync", mode])
            try:
                leader = cluster.wait_leader()
                before = _fsyncs(cluster)
                tps[mode].append(throughput(cluster.addrs, args.tasks))
                syncs[mode] = _fsyncs(cluster) - before
                follower = (leader + 1) % 3
                addrs = cluster.addrs[follower:] + cluster.addrs[:follower]
                a, b, _ = latency(addrs, args.rate, args.seconds)
                p50[mode].append(a)
                p99[mode].append(b)
                print(f"  run {r + 1} fsync={mode}: {tps[mode][-1]:.0f} tasks/s, "
                      f"p50 {a:.1f} ms p99 {b:.1f} ms, {syncs[mode]} fsyncs for "
                      f"{args.tasks} tasks (3 nodes)", flush=True)
            finally:
                cluster.stop()
    for mode in modes:
        print(f"fsync={mode}: throughput {statistics.median(tps[mode]):.0f} tasks/s; latency at "
              f"{args.rate:.0f} tasks/s p50 {statistics.median(p50[mode]):.1f} ms, p99 "
              f"{statistics.median(p99[mode]):.1f} ms (medians of {args.runs})")
    ratio = statistics.median(tps["always"]) / statistics.median(tps["never"])
    print(f"throughput with fsync = {ratio:.2f} of without")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
