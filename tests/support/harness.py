"""A real cluster for tests: node processes on loopback, real Raft, real gRPC.

``Cluster(tmp_path, n)`` starts ``python -m taskandgo node`` processes on free
127.0.0.1 ports, each with its own data dir and log file. Every wait polls a
condition with a deadline; every process is ended by its pid in :meth:`stop`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from taskandgo import Client
from taskandgo.node.client import TaskAndGoError

FINAL = ("succeeded", "failed", "cancelled")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.05) -> Any:
    """Poll cond until it returns something truthy; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except (TaskAndGoError, OSError) as exc:
            last_exc = exc
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else ""))


def stop_processes(procs: list) -> None:
    """SIGCONT + SIGTERM every live process, wait up to 8 s in all, SIGKILL the rest; the
    list's entries become None. A node's processes (call workers, tasks) end with it: its
    lifeline (node/executor.py) ends them even after a kill -9."""
    for p in procs:
        if p is not None and p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
                p.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 8
    for i, p in enumerate(procs):
        if p is None:
            continue
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
        procs[i] = None


class Cluster:
    def __init__(self, root: Path, n: int = 3, voters: int | None = None, slots: int = 4,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 client_kw: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.n = n
        self.voters = n if voters is None else voters
        self.slots = slots
        self.extra = list(extra or [])
        self.env = dict(env or {})
        self.client_kw = dict(client_kw or {})  # token / TLS files for every client here
        ports = free_ports(3 * n)
        self.grpc_ports = ports[:n]
        self.raft_ports = ports[n:2 * n]
        self.http_ports = ports[2 * n:]
        self.procs: list[subprocess.Popen | None] = [None] * n
        voters_arg = ",".join(f"127.0.0.1:{self.grpc_ports[i]}:{self.raft_ports[i]}"
                              for i in range(self.voters))
        self.argvs = []
        for i in range(n):
            self.argvs.append([
                sys.executable, "-m", "taskandgo", "node", "--id", f"node-{i}",
                "--bind", "127.0.0.1", "--grpc-port", str(self.grpc_ports[i]),
                "--raft-port", str(self.raft_ports[i]), "--http-port", str(self.http_ports[i]),
                "--voters", voters_arg, "--data-dir", str(self.root / f"node-{i}"),
                "--slots", str(slots), "--grace", "2", *self.extra])
        print(f"cluster in {self.root}: grpc {self.grpc_ports} raft {self.raft_ports} "
              f"http {self.http_ports}")

    # -------------------------------------------------------------- processes

    def start(self, i: int | None = None) -> Cluster:
        for j in ([i] if i is not None else range(self.n)):
            (self.root / f"node-{j}").mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]),
                **self.env}
            # The node holds its own copy of the log's descriptor.
            with open(self.root / f"node-{j}.log", "ab") as log:
                self.procs[j] = subprocess.Popen(self.argvs[j], stdout=log, stderr=log,
                                                 env=env, cwd=self.root)
        return self

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.kill(p.pid, sig)
            if sig == signal.SIGKILL:
                p.wait(timeout=10)
                self.procs[i] = None

    def stop(self) -> None:
        stop_processes(self.procs)

    def logs(self) -> str:
        out = []
        for i in range(self.n):
            path = self.root / f"node-{i}.log"
            if path.exists():
                text = path.read_text(errors="replace")
                out.append(f"----- node-{i} -----\n{text[-6000:]}")
        return "\n".join(out)

    # -------------------------------------------------------------- clients

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self.grpc_ports[i]}"

    def http(self, i: int) -> str:
        return f"http://127.0.0.1:{self.http_ports[i]}"

    def client(self, i: int | None = None, timeout_s: float = 20.0) -> Client:
        nodes = [self.addr(i)] if i is not None else [self.addr(j) for j in range(self.n)
                                                      if self.procs[j] is not None]
        return Client(nodes, timeout_s=timeout_s, **self.client_kw)

    def statuses(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.n):
            if self.procs[i] is None:
                continue
            try:
                with Client([self.addr(i)], timeout_s=2, **self.client_kw) as c:
                    out.append(c.node_status(self.addr(i)))
            except TaskAndGoError:
                pass
        return out

    def leader_index(self) -> int | None:
        for i in range(self.voters):
            if self.procs[i] is None:
                continue
            try:
                with Client([self.addr(i)], timeout_s=2, **self.client_kw) as c:
                    if c.node_status(self.addr(i))["role"] == "leader":
                        return i
            except TaskAndGoError:
                pass
        return None

    def wait_ready(self, timeout_s: float = 30.0) -> int:
        """Wait until there is a leader and every live node knows it and has heard
        back from it; returns the leader's index."""
        def ready() -> int | None:
            leader = self.leader_index()
            if leader is None:
                return None
            sts = self.statuses()
            live = sum(p is not None for p in self.procs)
            if len(sts) != live or not all(s["ready"] for s in sts):
                return None
            with Client([self.addr(leader)], timeout_s=2, **self.client_kw) as c:
                nodes = c.cluster_status()["nodes"]
            if sum(1 for n in nodes if n.get("ready")) < live:
                return None
            return leader + 1
        return wait_for(ready, timeout_s, "a leader known to every node") - 1

    def check_invariants(self, accepted: list[str], timeout_s: float = 60.0,
                         allow: tuple[str, ...] = ("succeeded",)) -> None:
        """Every accepted task exists once and ends in an allowed final state; no
        result was committed twice; every live voter holds the same state."""
        with self.client() as c:
            tasks = c.wait(accepted, timeout_s=timeout_s) if accepted else []
            for t in tasks:
                assert t["status"] in allow, f"task {t['id']} ended {t['status']}: {t['error']}"
            listed = c.list_tasks(limit=10**6)
        ids = [t["id"] for t in listed]
        assert len(ids) == len(set(ids)), "a task id is listed twice"
        missing = set(accepted) - set(ids)
        assert not missing, f"accepted tasks lost: {sorted(missing)[:5]}"

        def agree() -> bool:
            digests = set()
            applied = set()
            for i in range(min(self.voters, self.n)):
                if self.procs[i] is None:
                    continue
                with Client([self.addr(i)], timeout_s=5, **self.client_kw) as c:
                    st = c.node_status(self.addr(i), include_digest=True)
                digests.add(st["state_digest"])
                applied.add(st["applied_index"])
            return len(digests) == 1 and len(applied) == 1

        wait_for(agree, 30.0, "every replica to hold the same state", every_s=0.2)


def serve(request: Any, c: Cluster) -> Iterator[Cluster]:
    """For fixtures: start ``c``, wait until it is ready and yield it; stop it after,
    printing its nodes' logs when a test of the requesting module failed."""
    c.start()
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()
        if any(getattr(i, "rep_call", None) is not None and i.rep_call.failed
               for i in request.session.items if i.module is request.module):
            print("\n===== node logs =====\n" + c.logs())
