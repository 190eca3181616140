#!/usr/bin/env python3
"""Many workers: 100 simulated workers heartbeating to one leader, with tasks running.

    python bench/workers.py [--workers 100] [--procs 4] [--seconds 30] [--rate 200]

Starts a 3-node cluster and --procs processes that each play --workers/--procs
workers: every one sends the node's real Peer.Heartbeat (same message a node sends,
every 0.3 s, the node's default) to the leader, following its redirects. The
simulated workers offer no slots (they run nothing; the three real nodes run the
tasks, --rate no-op tasks per second, so the leader is busy meanwhile). Reports
missed leases (the leader's own "node down" events for any worker), the longest gap
between two acknowledged heartbeats of one worker (the lease is 3 s), heartbeat
round-trip times, and the leader's CPU use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from _cluster import BenchCluster
from taskandgo import Client
from taskandgo.node.client import task_spec
from taskandgo.node.security import PeerAuth
from taskandgo.protos import peer_pb2, peer_pb2_grpc

HEARTBEAT_S = 0.3


def simulate(first: int, count: int, addrs: list[str], seconds: float) -> None:
    """Child process: `count` workers heartbeating until `seconds` have passed."""
    channels = {a: grpc.insecure_channel(a) for a in addrs}
    leader = addrs[0]
    names = [f"sim-{i:03d}" for i in range(first, first + count)]
    last_ack = {n: time.monotonic() for n in names}
    max_gap = dict.fromkeys(names, 0.0)
    rtts: list[float] = []
    lock = threading.Lock()
    sent = acked = 0

    def done(fut: grpc.Future, name: str, t0: float) -> None:
        nonlocal leader, acked
        try:
            resp = fut.result()
        except grpc.RpcError:
            return
        now = time.monotonic()
        with lock:
            if resp.accepted:
                acked += 1
                rtts.append((now - t0) * 1000)
                max_gap[name] = max(max_gap[name], now - last_ack[name])
                last_ack[name] = now
            elif resp.leader_grpc in channels:
                leader = resp.leader_grpc

    end = time.monotonic() + seconds
    tick = time.monotonic()
    while tick < end:
        for i, name in enumerate(names):
            req = peer_pb2.HeartbeatRequest(
                node_id=name, grpc_address=f"127.0.0.1:{1 + first + i}", slots=0,
                capacity=0, free_slots=0, accepting=True, cpu_percent=1.0,
                memory_percent=1.0, memory_rss=50_000_000)
            t0 = time.monotonic()
            # Simulated workers speak as peers (the local cluster has no Raft password,
            # so the peer credential is empty; each names itself).
            md = PeerAuth.from_password(None).metadata(name, req.grpc_address)
            fut = peer_pb2_grpc.PeerStub(channels[leader]).Heartbeat.future(
                req, timeout=2.0, metadata=md)
            fut.add_done_callback(lambda f, n=name, t=t0: done(f, n, t))
            sent += 1
        tick += HEARTBEAT_S
        time.sleep(max(0.0, tick - time.monotonic()))  # fixed-rate schedule, not a wait
    time.sleep(1.0)  # let the last replies arrive
    now = time.monotonic()
    with lock:
        gaps = [max(max_gap[n], now - 1.0 - last_ack[n]) for n in names]
        print(json.dumps({"sent": sent, "acked": acked, "rtts": rtts, "max_gap": max(gaps)}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=200.0, help="no-op tasks per second meanwhile")
    ap.add_argument("--sim", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sim:
        first, count, addrs = args.sim.split(":", 2)
        simulate(int(first), int(count), addrs.split(","), args.seconds)
        return 0
    cluster = BenchCluster(3)
    procs: list[subprocess.Popen] = []
    try:
        li = cluster.wait_leader()
        addrs = [cluster.addrs[li]] + [a for i, a in enumerate(cluster.addrs) if i != li]
        leader_pid = cluster.procs[li].pid
        downs: list[str] = []
        stop = threading.Event()
        watcher = Client([addrs[0]], timeout_s=30)

        def watch() -> None:
            stream = watcher.watch_raw()
            try:
                for ev in stream:
                    if ev.kind == "node" and ev.status == "down":
                        downs.append(ev.node)
                    if stop.is_set():
                        stream.cancel()
                        return
            except grpc.RpcError:
                return

        threading.Thread(target=watch, daemon=True).start()
        per = args.workers // args.procs
        for p in range(args.procs):
            n = per if p < args.procs - 1 else args.workers - per * (args.procs - 1)
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--seconds", str(args.seconds),
                 "--sim", f"{p * per}:{n}:{','.join(addrs)}"], stdout=subprocess.PIPE, text=True))
        cpu0 = _cpu(leader_pid)
        t0 = time.monotonic()
        submitted = []
        with Client(addrs, timeout_s=30) as c:
            step = 0.1
            next_t = t0
            while time.monotonic() - t0 < args.seconds:
                batch = [task_spec(call="taskandgo.node.builtins:noop", strategy="batch")
                         for _ in range(max(1, int(args.rate * step)))]
                c.submit_many(batch)
                submitted += [s["id"] for s in batch]
                next_t += step
                time.sleep(max(0.0, next_t - time.monotonic()))  # pacing
            cpu = (_cpu(leader_pid) - cpu0) / (time.monotonic() - t0)
            results = [json.loads(p.communicate(timeout=args.seconds + 60)[0]) for p in procs]
            done = c.wait(submitted, timeout_s=120)
            nodes = len(c.cluster_status()["nodes"])
        stop.set()
        rtts = sorted(r for res in results for r in res["rtts"])
        sent = sum(r["sent"] for r in results)
        acked = sum(r["acked"] for r in results)
        gap = max(r["max_gap"] for r in results)
        ok = sum(1 for t in done if t["status"] == "succeeded")
        print(f"workers: {args.workers} simulated workers ({args.procs} processes) heartbeating "
              f"every {HEARTBEAT_S} s for {args.seconds:.0f} s, {ok} tasks run meanwhile: "
              f"{len(set(downs))} missed leases; longest gap between acknowledged heartbeats "
              f"{gap:.2f} s (lease 3 s); {acked}/{sent} acknowledged; heartbeat RTT p50 "
              f"{statistics.median(rtts):.1f} ms, p99 {rtts[int(len(rtts) * 0.99)]:.1f} ms; "
              f"leader CPU {cpu * 100:.0f}% of a core; cluster lists {nodes} nodes")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        cluster.stop()
    return 0


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100.0


if __name__ == "__main__":
    raise SystemExit(main())
