"""A throwaway local cluster for benchmarks (real node processes on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from taskandgo import Client
from taskandgo.node.client import TaskAndGoError


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class BenchCluster:
    def __init__(self, n: int = 3, slots: int = 4, extra: list[str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="taskandgo-bench-")
        ports = _free_ports(3 * n)
        self.grpc = ports[:n]
        voters = ",".join(f"127.0.0.1:{ports[i]}:{ports[n + i]}" for i in range(n))
        self.procs: list = []
        self.argvs: list[list[str]] = []
        self.logs: list = []
        for i in range(n):
            argv = [sys.executable, "-m", "taskandgo", "node", "--id", f"node-{i}",
                    "--grpc-port", str(ports[i]), "--raft-port", str(ports[n + i]),
                    "--http-port", str(ports[2 * n + i]), "--voters", voters,
                    "--data-dir", os.path.join(self.dir, f"node-{i}"), "--slots", str(slots),
                    *(extra or [])]
            log = open(os.path.join(self.dir, f"node-{i}.log"), "ab")  # noqa: SIM115 (closed by the caller)
            self.argvs.append(argv)
            self.logs.append(log)
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
        self.addrs = [f"127.0.0.1:{p}" for p in self.grpc]

    def wait_leader(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, a in enumerate(self.addrs):
                if self.procs[i] is None:
                    continue
                try:
                    with Client([a], timeout_s=1) as c:
                        st = c.node_status(a)
                        if st["role"] == "leader" and c.cluster_status()["nodes"] and all(
                                n.get("ready") for n in c.cluster_status()["nodes"]):
                            return i
                except TaskAndGoError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("no leader")

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None:
            p.kill()
            p.wait()
            self.procs[i] = None

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # Each node's call workers and task processes end with it, even after a kill -9
        # (they hold its lifeline: node/executor.py, Lifeline).
