#!/usr/bin/env python3
"""Consensus-only ceiling: what the Raft layer alone does here, with the node's settings.

    python bench/consensus.py [--commands 20000] [--batch 1000] [--seconds 5]

Starts three processes on 127.0.0.1 that run the same Raft member the node runs
(taskandgo.consensus.raft.Raft: journal, dump file, timers, adaptive batching) with a
trivial replicated state that only counts tasks, and on the leader measures:

* commits/s with one ~150-byte task per command (many in flight);
* tasks/s with --batch tasks per command (as ``submit_many`` sends them);
* commit latency at a steady 200 commands/s, one at a time (p50 / p99).

Every task in TaskAndGo crosses three commits (submit, assign, complete), so the
scheduler's figures read as fractions of these.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from pysyncobj import SyncObjConsumer, replicated
from taskandgo.consensus.raft import Raft, RaftTimers

TASK = {"id": "task-0000000", "priority": 10, "strategy": "batch",
        "call": "taskandgo.node.builtins:noop", "args": [1, 2, 3],
        "labels": {"team": "bench"}}


class Counter(SyncObjConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.tasks = 0

    @replicated
    def add(self, batch: list) -> int:
        self.tasks += len(batch)
        return self.tasks


def node(index: int, ports: list[int], data: str, args: argparse.Namespace) -> None:
    me = f"127.0.0.1:{ports[index]}"
    partners = [f"127.0.0.1:{p}" for i, p in enumerate(ports) if i != index]
    counter = Counter()
    raft = Raft(me, partners, os.path.join(data, f"node-{index}"), "127.0.0.1", None,
                counter, RaftTimers())
    deadline = time.monotonic() + 30
    while raft.leader() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if raft.is_leader():
        measure(raft, counter, args)
    # Followers (and the leader when done) stay up until the parent ends them.
    while True:
        time.sleep(1)


def run(raft: Raft, counter: Counter, batches: list[list], window: int) -> float:
    """Propose every batch with at most `window` in flight; seconds until all commit."""
    sem = threading.BoundedSemaphore(window)
    done = threading.Event()
    left = [len(batches)]
    lock = threading.Lock()

    def cb(_res: object, err: int) -> None:
        sem.release()
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()
        if err != 0:
            print(f"commit failed: {err}", file=sys.stderr)

    t0 = time.perf_counter()
    for b in batches:
        sem.acquire()
        counter.add(b, callback=cb)
        raft.wake()
    done.wait(300)
    return time.perf_counter() - t0


def measure(raft: Raft, counter: Counter, args: argparse.Namespace) -> None:
    single = [[dict(TASK, id=f"t{i}")] for i in range(args.commands)]
    dt = run(raft, counter, single, window=1000)
    print(f"consensus: {args.commands / dt:.0f} commits/s at 1 task per command", flush=True)
    n = max(1, args.commands * 5 // args.batch)
    bulk = [[dict(TASK, id=f"b{j}-{i}") for i in range(args.batch)] for j in range(n)]
    dt = run(raft, counter, bulk, window=4)
    print(f"consensus: {n * args.batch / dt:.0f} tasks/s at {args.batch} tasks per command",
          flush=True)
    lat = []
    start = time.perf_counter()
    for i in range(int(200 * args.seconds)):
        due = start + i / 200
        if due > time.perf_counter():
            time.sleep(due - time.perf_counter())  # open-loop pacing
        ev = threading.Event()
        t0 = time.perf_counter()
        counter.add([dict(TASK, id=f"l{i}")], callback=lambda r, e, ev=ev: ev.set())
        raft.wake()
        if ev.wait(5):
            lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    print(f"consensus: commit latency at 200 commands/s p50 {statistics.median(lat):.2f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)]:.2f} ms", flush=True)
    expected = args.commands + n * args.batch + int(200 * args.seconds)
    if counter.tasks != expected:
        print(f"consensus: applied {counter.tasks} tasks, expected {expected}", flush=True)
        return
    print("DONE", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--node", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.node is not None:
        node(args.node, [int(p) for p in args.ports.split(",")], args.data, args)
        return 0
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    data = tempfile.mkdtemp(prefix="taskandgo-consensus-")
    out = os.path.join(data, "out")
    procs = []
    try:
        with open(out, "w") as fh:
            for i in range(3):
                procs.append(subprocess.Popen(  # noqa: PERF401 (one start per node, in order)
                    [sys.executable, __file__, "--node", str(i), "--ports",
                     ",".join(map(str, ports)), "--data", data,
                     "--commands", str(args.commands), "--batch", str(args.batch),
                     "--seconds", str(args.seconds)], stdout=fh, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with open(out) as rd:
                    text = rd.read()
                if "DONE" in text or all(p.poll() is not None for p in procs):
                    break
                time.sleep(0.2)
        print("".join(ln + "\n" for ln in text.splitlines() if ln != "DONE"), end="")
        return 0 if "DONE" in text else 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["rm", "-rf", data], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
