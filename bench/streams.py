"""Unary and peer calls to a node while clients hold WatchTasks streams open to it.

    python bench/streams.py [--attempts 0,40,500] [--calls 10] [-- NODE FLAGS...]

Starts a 3-node cluster on 127.0.0.1 (tests/support/harness.py), then for each number of
stream attempts K: opens K WatchTasks streams to the leader (50 per channel), waits
until every attempt is either refused or open, and measures from another channel
GetNodeStatus and SubmitTasks (deadline 5 s each: a timeout counts as 5 s) and the
freshness of the followers' heartbeats in the leader's cluster status (a follower
last heard from more than a lease ago is shown not ready). Prints one line per K.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from harness import Cluster
from taskandgo.node.client import make_channel
from taskandgo.protos import taskandgo_pb2 as pb
from taskandgo.protos import taskandgo_pb2_grpc as pb_grpc

DEADLINE_S = 5.0


def open_streams(addr: str, k: int) -> tuple[list, list, dict[str, int]]:
    """K stream attempts; returns (channels, calls, {"open": n, "refused": n, ...})."""
    channels = [make_channel(addr) for _ in range((k + 49) // 50)]
    calls = [pb_grpc.SchedulerStub(channels[i // 50]).WatchTasks(pb.WatchTasksRequest())
             for i in range(k)]
    # An attempt is settled once refused (done) or answered with headers; old nodes
    # send no headers on an idle stream, so give up waiting after a few seconds.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not all(c.done() for c in calls):
        time.sleep(0.1)
    counts: dict[str, int] = {"open": 0}
    for c in calls:
        if c.done():
            name = c.code().name
            counts[name] = counts.get(name, 0) + 1
        else:
            counts["open"] += 1
    return channels, calls, counts


def timed(fn: object) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        fn()  # type: ignore[operator]
        return time.perf_counter() - t0, "OK"
    except grpc.RpcError as exc:
        return time.perf_counter() - t0, exc.code().name


def measure(addr: str, calls: int) -> dict[str, object]:
    ch = make_channel(addr)
    stub = pb_grpc.SchedulerStub(ch)
    status = [timed(lambda: stub.GetNodeStatus(pb.NodeStatusRequest(), timeout=DEADLINE_S))
              for _ in range(calls)]
    submit = [timed(lambda: stub.SubmitTasks(pb.SubmitTasksRequest(
        tasks=[pb.TaskSpec(data="bench")]), timeout=DEADLINE_S)) for _ in range(calls)]
    try:
        nodes = stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=DEADLINE_S).nodes
        heard = (f"{sum(n.ready for n in nodes)}/{len(nodes)} ready, max last_seen "
                 f"{max(n.last_seen_s for n in nodes):.2f} s")
    except grpc.RpcError as exc:
        heard = exc.code().name
    ch.close()

    def summary(rows: list[tuple[float, str]]) -> str:
        ms = [t * 1000 for t, _ in rows]
        bad = [c for _, c in rows if c != "OK"]
        return (f"p50 {statistics.median(ms):7.1f} ms max {max(ms):7.1f} ms"
                + (f" failed {len(bad)}/{len(rows)} ({bad[0]})" if bad else ""))

    return {"status": summary(status), "submit": summary(submit), "heartbeats": heard}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attempts", default="0,40,500")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("extra", nargs="*", help="node flags, after --")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="taskandgo-bench-") as root:
        cluster = Cluster(Path(root), n=3, extra=args.extra)
        cluster.start()
        try:
            leader = cluster.wait_ready()
            addr = cluster.addr(leader)
            for k in (int(x) for x in args.attempts.split(",")):
                channels, calls, counts = open_streams(addr, k)
                time.sleep(1.0)  # let a starved leader miss its followers' heartbeats
                row = measure(addr, args.calls)
                print(f"{k:4d} stream attempts {counts}: GetNodeStatus {row['status']}; "
                      f"SubmitTasks {row['submit']}; heartbeats {row['heartbeats']}",
                      flush=True)
                for c in calls:
                    c.cancel()
                for ch in channels:
                    ch.close()
                # Streams end on the server within a second of the cancel.
                time.sleep(2.0)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
