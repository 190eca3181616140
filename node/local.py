"""``taskandgo local``: an N-node cluster of real node processes on 127.0.0.1.

Node i serves gRPC on base+i, Raft on base+100+i and HTTP on base+1000+i. The
first ``voters`` nodes are Raft members; the rest are workers. Each node keeps
its journal under ``<data-dir>/node-i``, so stopping and starting the same
cluster keeps every accepted task. Ctrl-C or SIGTERM stops every node.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LocalNode:
    index: int
    node_id: str
    grpc_port: int
    raft_port: int
    http_port: int
    data_dir: str
    voter: bool

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def layout(nodes: int, base_port: int, voters: int, data_dir: str) -> list[LocalNode]:
    return [LocalNode(i, f"node-{i}", base_port + i, base_port + 100 + i, base_port + 1000 + i,
                      os.path.join(data_dir, f"node-{i}"), i < voters) for i in range(nodes)]


def node_argv(n: LocalNode, all_nodes: list[LocalNode], extra: list[str]) -> list[str]:
    voters = ",".join(f"127.0.0.1:{v.grpc_port}:{v.raft_port}" for v in all_nodes if v.voter)
    return [sys.executable, "-m", "taskandgo", "node", "--id", n.node_id, "--bind", "127.0.0.1",
            "--grpc-port", str(n.grpc_port), "--raft-port", str(n.raft_port),
            "--http-port", str(n.http_port), "--voters", voters, "--data-dir", n.data_dir,
            "--grace", "5"] + extra


def run_local(nodes: int, base_port: int, voters: int, data_dir: str, fresh: bool,
              extra: list[str]) -> int:
    voters = max(1, min(voters, nodes))
    if fresh and os.path.isdir(data_dir):
        shutil.rmtree(data_dir)
    plan = layout(nodes, base_port, voters, data_dir)
    procs: list[subprocess.Popen] = []
    print(f"TaskAndGo local cluster: {nodes} nodes ({voters} voters), data in {data_dir}")
    print("Open on loopback without authentication: for this machine only.")
    print(f"{'node':8} {'role':6} {'gRPC':16} {'HTTP':22} {'Raft':16}")
    for n in plan:
        os.makedirs(n.data_dir, exist_ok=True)
        # The node holds its own copy of the log's descriptor.
        with open(os.path.join(n.data_dir, "node.log"), "ab") as log:
            procs.append(subprocess.Popen(node_argv(n, plan, extra), stdout=log, stderr=log))
        print(f"{n.node_id:8} {'voter' if n.voter else 'worker':6} {n.grpc:16} "
              f"http://127.0.0.1:{n.http_port:<6} 127.0.0.1:{n.raft_port}")
    print(f"\nSubmit:  taskandgo submit --node {plan[0].grpc} --wait -- 'python: print(6*7)'")
    print(f"Status:  taskandgo status --all --node {plan[0].grpc}")
    print(f"Browser: http://127.0.0.1:{plan[0].http_port}/   logs: {data_dir}/node-*/node.log")
    print("Ctrl-C stops every node.", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    reported: set[int] = set()
    while not stop.wait(0.5):
        for n, p in zip(plan, procs):
            if p.poll() is not None and n.index not in reported:
                reported.add(n.index)
                print(f"{n.node_id} exited with code {p.returncode}; see "
                      f"{n.data_dir}/node.log", flush=True)
                why = _refusal(os.path.join(n.data_dir, "node.log"))
                if why:
                    print(f"  {why}\n  (--fresh starts this local cluster from empty data "
                          "dirs, dropping its tasks)", flush=True)
        if len(reported) == len(procs):
            return 1
    print("stopping...", flush=True)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    print("stopped.")
    return 0


def _refusal(log_path: str) -> str:
    """The reason a node gave for refusing to start (its data dir belongs to another
    cluster layout: other ports, another voter count), if it gave one."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()[-200:]
    except OSError:
        return ""
    for line in reversed(lines):
        if "refusing to start:" in line:
            return line.split("refusing to start:", 1)[1].strip()
    return ""
