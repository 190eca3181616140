"""End-to-end throughput and latency on a local 3-node cluster.

    python bench/throughput.py [--tasks 10000] [--runs 3] [--rate 200] [--seconds 10]
                               [--single 2000] [--fsync always|never] [--no-latency]

``--tasks 0`` skips the bulk run, ``--single 0`` the single-call loop.

Throughput: N no-op callable tasks (batch strategy) submitted by one client with
``submit_many`` (1,000 per call), first submit to last result. Single-call loop:
``--single`` tasks, one ``submit()`` call each in a loop, as a script calling the
client naively would (submit calls per second, and tasks per second to the last
result). Latency: tasks
submitted one at a time at a steady rate; submit-to-result is the time from the
submit call to the client seeing the task's ``succeeded`` event on a watch stream,
measured with the client on a follower and then on the leader.
Every task is committed to a Raft majority. Prints one line per figure (medians); each
run's line also says what a task cost: Raft entries (the leader's commit index over the
run) and CPU time of the leader and of the other two nodes, per task.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import BenchCluster
from taskandgo import Client
from taskandgo.node.client import task_spec

NOOP = "taskandgo.node.builtins:noop"


def throughput(addrs: list[str], n: int) -> float:
    with Client(addrs, timeout_s=120) as c:
        specs = [task_spec(call=NOOP, strategy="batch") for _ in range(n)]
        t0 = time.perf_counter()
        # The client's bulk path: calls of 1,000 specs, 4 in flight.
        c.submit_many(specs, batch=1000, in_flight=4)
        c.wait([s["id"] for s in specs], timeout_s=600)
        return n / (time.perf_counter() - t0)


def single_calls(addrs: list[str], n: int) -> tuple[float, float]:
    """N tasks, one ``submit`` call each from one caller in a loop (each call returns
    once its task is committed), then a wait for all results. Returns (submit calls
    per second, tasks per second from the first submit to the last result)."""
    with Client(addrs, timeout_s=120) as c:
        t0 = time.perf_counter()
        ids = [c.submit(call=NOOP, strategy="batch") for _ in range(n)]
        t1 = time.perf_counter()
        c.wait(ids, timeout_s=600)
        t2 = time.perf_counter()
    return n / (t1 - t0), n / (t2 - t0)


def latency(addrs: list[str], rate: float, seconds: float) -> tuple[float, float, int]:
    seen: dict[str, float] = {}
    started: dict[str, float] = {}
    stop = threading.Event()
    watch_client = Client(addrs[:1], timeout_s=30)

    def watch() -> None:
        stream = watch_client.watch_raw()
        try:
            for ev in stream:
                if ev.status == "succeeded" and ev.task_id not in seen:
                    seen[ev.task_id] = time.perf_counter()
                if stop.is_set():
                    stream.cancel()
                    return
        except grpc.RpcError:
            return  # cancelled at the end of the run

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    time.sleep(0.5)  # let the watch stream attach before the first submit
    n = int(rate * seconds)
    lock = threading.Lock()

    shared = Client(addrs[:1], timeout_s=30)  # one channel, as a real client would hold

    def submit(spec: dict) -> None:
        t0 = time.perf_counter()
        shared.submit_many([spec])
        with lock:
            started[spec["id"]] = t0

    clients = []
    t_start = time.perf_counter()
    for i in range(n):
        spec = task_spec(call=NOOP, strategy="batch")
        due = t_start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # open-loop pacing, not a wait for an outcome
        th = threading.Thread(target=submit, args=(spec,))
        th.start()
        clients.append(th)
    for th in clients:
        th.join(60)
    deadline = time.monotonic() + 60
    while len([k for k in started if k in seen]) < len(started) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    shared.close()
    lat = sorted((seen[k] - started[k]) * 1000 for k in started if k in seen)
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return p50, p99, len(lat)


class Costs:
    """Raft entries and each node's CPU time (user + system, from /proc) over a
    stretch of a run, per task: what a task costs besides its latency."""

    def __init__(self, cluster: BenchCluster) -> None:
        self.cluster = cluster
        self.start = self._sample()

    def _sample(self) -> tuple[int, list[float]]:
        import psutil

        with Client(self.cluster.addrs, timeout_s=10) as c:
            index = max(int(c.node_status(a).get("commit_index", 0)) for a in self.cluster.addrs)
        return index, [sum(psutil.Process(p.pid).cpu_times()[:2]) for p in self.cluster.procs]

    def per_task(self, tasks: int, leader: int) -> str:
        (i0, c0), (i1, c1) = self.start, self._sample()
        cpu = [(b - a) / max(1, tasks) * 1000 for a, b in zip(c0, c1)]
        return (f"{(i1 - i0) / max(1, tasks):.2f} Raft entries/task, CPU ms/task leader "
                f"{cpu[leader]:.2f}, others {sum(cpu) - cpu[leader]:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--single", type=int, default=2000,
                    help="tasks in the single-call loop (0: skip it)")
    ap.add_argument("--fsync", choices=("always", "never"), default=None,
                    help="the nodes' --fsync (default: the node's default, always)")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    args = ap.parse_args()
    cluster = BenchCluster(3, extra=["--fsync", args.fsync] if args.fsync else None)
    try:
        cluster.wait_leader()
        tps = []
        for r in range(args.runs if args.tasks else 0):
            tps.append(throughput(cluster.addrs, args.tasks))
            print(f"  run {r + 1}: {tps[-1]:.0f} tasks/s", flush=True)
        if tps:
            print(f"throughput: {statistics.median(tps):.0f} tasks/s (median of {args.runs} "
                  f"runs, {args.tasks} no-op callable tasks, 3 nodes)")
        if args.single:
            subs, done = [], []
            leader = cluster.wait_leader()
            for r in range(args.runs):
                costs = Costs(cluster)
                a, b = single_calls(cluster.addrs, args.single)
                subs.append(a)
                done.append(b)
                print(f"  run {r + 1}: {a:.0f} submit calls/s, {b:.0f} tasks/s "
                      f"({costs.per_task(args.single, leader)})", flush=True)
            print(f"single-call loop: {statistics.median(subs):.0f} submit calls/s, "
                  f"{statistics.median(done):.0f} tasks/s to the last result (median of "
                  f"{args.runs} runs, {args.single} tasks, one submit() call each)")
        # The client (submits and watch stream) on a follower, then on the leader: the
        # leader also plans, dispatches and commits, so the two differ.
        leader = cluster.wait_leader()
        follower = (leader + 1) % len(cluster.addrs)
        for where, i in (() if args.no_latency else
                         (("a follower", follower), ("the leader", leader))):
            addrs = cluster.addrs[i:] + cluster.addrs[:i]
            p50s, p99s = [], []
            for r in range(args.runs):
                costs = Costs(cluster)
                p50, p99, n = latency(addrs, args.rate, args.seconds)
                p50s.append(p50)
                p99s.append(p99)
                print(f"  run {r + 1}: p50 {p50:.1f} ms p99 {p99:.1f} ms ({n} tasks; "
                      f"{costs.per_task(n, leader)})", flush=True)
            print(f"latency at {args.rate:.0f} tasks/s, client on {where}: p50 "
                  f"{statistics.median(p50s):.1f} ms, p99 {statistics.median(p99s):.1f} ms "
                  f"(medians of {args.runs} runs)")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
