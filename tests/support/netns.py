"""Pods as network namespaces, for the network-fault tests (root only).

:class:`NetCluster` builds, per test run, a private network out of Linux network
namespaces whose names all start with ``tg<pid>``:

* ``tg<pid>-sw``: the switch, holding the bridge ``br0``;
* ``tg<pid>-n0`` .. ``-n2``: one per node ("pod"), with a veth ``eth0`` at
  ``10.99.X.(i+1)/24`` whose peer (``p<i>``) sits on the bridge;
* ``tg<pid>-cl``: a client namespace on the same bridge (``10.99.X.100``).

X is derived from the pid. Every link is created with ``ip -n`` inside the
namespaces, so the host's own namespace is never touched: no link, address,
route, NAT or firewall rule is added there. Each namespace gets
``/etc/netns/<ns>/hosts`` (which ``ip netns exec`` bind-mounts over
``/etc/hosts``) carrying the StatefulSet names
``taskandgo-N.taskandgo.default.svc.cluster.local``, and a ``resolv.conf`` that
points at the namespace's own loopback, so no lookup can leave the namespace.

Nodes run as ``ip netns exec <ns> python -m taskandgo node ...`` (``ip netns exec``
execs in place: the Popen pid is the node). The test process stays in the host
namespace and cannot reach 10.99.X, so client calls go through an :class:`Agent`:
this file run as a script inside the client namespace, answering one JSON request
per line with a :class:`taskandgo.Client` call. Every call carries a timeout and
every wait on the test side has a deadline.

Partitions are nft tables inside a node's namespace (:meth:`NetCluster.partition`).
:meth:`NetCluster.teardown` ends every process in the run's namespaces by pid (the
nodes, their warm-pool and task children, the agent), deletes the namespaces
(their links, bridge and nft tables go with them) and the ``/etc/netns`` entries.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

STS_NAME = "taskandgo"
SERVICE = "taskandgo"
K8S_NAMESPACE = "default"
GRPC_PORT = 7000
RAFT_PORT = 7100
HTTP_PORT = 8080
CLIENT_HOST = 100
NETNS_ETC = Path("/etc/netns")

#: Client methods the agent may call.
AGENT_OPS = {"submit_many", "get", "list", "wait", "wait_raw", "node_status", "cluster_status",
             "cancel", "status_all"}


# ----------------------------------------------------------------------------- helpers


def run(argv: list[str], input: str | None = None, timeout_s: float = 20.0,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a short command (ip, nft) with a deadline; raise with its stderr on failure."""
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout_s,
                         check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}")
    return res


def _netns_list() -> set[str]:
    res = run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}


def netns_pids(ns: str) -> list[int]:
    """Every process whose network namespace is ``ns``."""
    res = run(["ip", "netns", "pids", ns], check=False, timeout_s=10)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def unavailable_reason(install: bool = True) -> str | None:
    """Why network-namespace tests cannot run here (None when they can). Installs
    nftables with apt-get when ``nft`` is missing and we are root."""
    if sys.platform != "linux" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return ("needs root to create network namespaces and nft rules "
                f"(running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not found"
    if shutil.which("nft") is None:
        if not install or shutil.which("apt-get") is None:
            return "`nft` not found (install nftables)"
        try:
            res = subprocess.run(["apt-get", "install", "-y", "nftables"], capture_output=True,
                                 text=True, timeout=240, check=False,
                                 env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`nft` not found and apt-get install -y nftables failed: {exc}"
        if shutil.which("nft") is None:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
            return f"`nft` not found and apt-get install -y nftables failed: {tail[0]}"
    # A root user in a container may still lack the capabilities or kernel support.
    probe = f"tg{os.getpid()}-probe"
    try:
        run(["ip", "netns", "add", probe])
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create network namespaces: {exc}"
    try:
        run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        run(["ip", "netns", "exec", probe, "nft", "add", "table", "inet", "probe"])
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"bridge, veth or nftables unavailable in a network namespace: {exc}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# ----------------------------------------------------------------------------- agent


class Call(Future):
    """One agent call in flight; ``timeout_s`` is the Client timeout it was given."""

    timeout_s: float = 10.0


class Agent:
    """A client process inside a namespace; :meth:`call` runs one Client method there.

    ``call(op, nodes, *args, timeout_s=.., **kwargs)`` builds
    ``Client(nodes, timeout_s=timeout_s)`` in the agent and returns
    ``getattr(client, op)(*args, **kwargs)``; a TaskAndGoError comes back as
    :class:`taskandgo.node.client.TaskAndGoError` with its code. Calls may overlap.
    """

    def __init__(self, ns: str, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - open while the agent runs
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-u", str(Path(__file__).resolve()),
             "agent"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
            start_new_session=True)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending: dict[int, Call] = {}
        self._next = 0
        self._reader = threading.Thread(target=self._read, name="agent-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                fut = self._pending.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_result({"ok": False, "code": "AGENT_EXITED", "message": "agent exited"})

    def call_async(self, op: str, nodes: list[str], *args: Any, timeout_s: float = 10.0,
                   **kwargs: Any) -> Call:
        assert op in AGENT_OPS, op
        fut = Call()
        fut.timeout_s = timeout_s
        with self._lock:
            self._next += 1
            rid = self._next
            self._pending[rid] = fut
        req = {"id": rid, "op": op, "nodes": list(nodes), "timeout_s": timeout_s,
               "args": list(args), "kwargs": kwargs}
        try:
            assert self.proc.stdin is not None
            with self._write_lock:
                self.proc.stdin.write((json.dumps(req) + "\n").encode())
                self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            with self._lock:
                self._pending.pop(rid, None)
            fut.set_result({"ok": False, "code": "AGENT_EXITED", "message": str(exc)})
        return fut

    @staticmethod
    def result(fut: Call, wait_s: float | None = None) -> Any:
        """The call's value, or TaskAndGoError. Waits at most the call's own timeout
        plus a margin (the agent's Client gives up by then)."""
        from taskandgo.node.client import TaskAndGoError

        limit = wait_s if wait_s is not None else fut.timeout_s * 2 + 15
        try:
            msg = fut.result(timeout=limit)
        except FutureTimeout:
            raise TaskAndGoError("AGENT_TIMEOUT", f"no answer from the agent in {limit:g} s") \
                from None
        if msg.get("ok"):
            return msg["result"]
        raise TaskAndGoError(msg.get("code", "UNKNOWN"), msg.get("message", ""))

    def call(self, op: str, nodes: list[str], *args: Any, timeout_s: float = 10.0,
             **kwargs: Any) -> Any:
        return self.result(self.call_async(op, nodes, *args, timeout_s=timeout_s, **kwargs))

    def close(self) -> None:
        """Close stdin (the agent exits on EOF) and wait for it, killing it (by pid)
        if it does not go within 5 s."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()


def agent_main() -> int:
    """Runs inside the client namespace: JSON requests on stdin, answers on stdout."""
    from taskandgo.node.client import Client, TaskAndGoError

    out_lock = threading.Lock()

    def answer(msg: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()

    def handle(req: dict[str, Any]) -> None:
        t0 = time.monotonic()
        try:
            if req.get("op") not in AGENT_OPS:
                raise ValueError(f"op {req.get('op')!r} not allowed")
            with Client(req["nodes"], timeout_s=float(req["timeout_s"])) as c:
                value = getattr(c, req["op"])(*req.get("args", []), **req.get("kwargs", {}))
            answer({"id": req["id"], "ok": True, "result": value,
                    "elapsed": time.monotonic() - t0})
        except TaskAndGoError as exc:
            answer({"id": req["id"], "ok": False, "code": exc.code, "message": exc.message,
                    "elapsed": time.monotonic() - t0})
        except Exception as exc:  # noqa: BLE001 - report, never die
            answer({"id": req["id"], "ok": False, "code": "AGENT",
                    "message": f"{type(exc).__name__}: {exc}", "elapsed": time.monotonic() - t0})

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except ValueError:
            continue
        threading.Thread(target=handle, args=(req,), daemon=True).start()
    return 0


# ----------------------------------------------------------------------------- cluster


class NetCluster:
    """Three voters, each in its own network namespace, plus a client namespace."""

    def __init__(self, root: Path, n: int = 3, lease_s: float = 1.5) -> None:
        self.root = Path(root)
        self.n = n
        self.lease_s = lease_s
        pid = os.getpid()
        existing = _netns_list()
        self.prefix = f"tg{pid}"
        if any(ns.startswith(self.prefix + "-") for ns in existing):
            self.prefix = f"tg{pid}{secrets.token_hex(2)}"
        self.x = pid % 254 + 1
        self.switch = f"{self.prefix}-sw"
        self.node_ns = [f"{self.prefix}-n{i}" for i in range(n)]
        self.client_ns = f"{self.prefix}-cl"
        self.ips = [f"10.99.{self.x}.{i + 1}" for i in range(n)]
        self.client_ip = f"10.99.{self.x}.{CLIENT_HOST}"
        self.names = [f"{STS_NAME}-{i}.{SERVICE}.{K8S_NAMESPACE}.svc.cluster.local"
                      for i in range(n)]
        self.node_ids = [f"{STS_NAME}-{i}" for i in range(n)]
        self.password = secrets.token_urlsafe(24)
        self.table = f"{self.prefix}_partition"
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.agent: Agent | None = None
        self._made_ns: list[str] = []
        self._made_etc: list[Path] = []
        self._made_netns_etc = False
        self._partitioned: set[int] = set()
        self._logs: list[Any] = []
        print(f"netns cluster {self.prefix}: subnet 10.99.{self.x}.0/24, nodes {self.ips}, "
              f"client {self.client_ip}, dir {self.root}")

    # -------------------------------------------------------------- network

    def _add_ns(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self._made_ns.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _hosts(self) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{ip}\t{name} {sid}" for ip, name, sid in zip(self.ips, self.names,
                                                                  self.node_ids)]
        lines.append(f"{self.client_ip}\tclient")
        return "\n".join(lines) + "\n"

    def _etc(self, ns: str) -> None:
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir(parents=True)
            self._made_netns_etc = True
        d = NETNS_ETC / ns
        d.mkdir(exist_ok=False)
        self._made_etc.append(d)
        (d / "hosts").write_text(self._hosts())
        # Lookups of anything not in hosts go to this namespace's own loopback
        # (nothing listens there), never to a real DNS server.
        (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _plug(self, ns: str, port: str, ip: str) -> None:
        run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "-n", self.switch, "link", "set", port, "master", "br0"])
        run(["ip", "-n", self.switch, "link", "set", port, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def create_network(self) -> None:
        self._add_ns(self.switch)
        run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.node_ns):
            self._add_ns(ns)
            self._etc(ns)
            self._plug(ns, f"p{i}", self.ips[i])
        self._add_ns(self.client_ns)
        self._etc(self.client_ns)
        self._plug(self.client_ns, "pc", self.client_ip)

    def partition(self, i: int) -> None:
        """Cut node i off from the other nodes: an nft table in its namespace drops
        everything to and from their addresses (the client namespace still reaches it)."""
        others = ", ".join(ip for j, ip in enumerate(self.ips) if j != i)
        ruleset = (
            f"table inet {self.table} {{\n"
            f"  chain input {{ type filter hook input priority 0; policy accept;\n"
            f"    ip saddr {{ {others} }} drop\n  }}\n"
            f"  chain output {{ type filter hook output priority 0; policy accept;\n"
            f"    ip daddr {{ {others} }} drop\n  }}\n"
            f"}}\n")
        run(["ip", "netns", "exec", self.node_ns[i], "nft", "-f", "-"], input=ruleset)
        self._partitioned.add(i)

    def heal(self, i: int) -> None:
        run(["ip", "netns", "exec", self.node_ns[i], "nft", "delete", "table", "inet",
             self.table])
        self._partitioned.discard(i)

    def rules(self, i: int) -> str:
        return run(["ip", "netns", "exec", self.node_ns[i], "nft", "list", "ruleset"],
                   check=False).stdout

    # -------------------------------------------------------------- processes

    def env(self) -> dict[str, str]:
        """The environment of every process in the namespaces: this one's, without any
        TASKANDGO_* / POD_* / KUBERNETES_* settings of the host (the test is hermetic),
        plus tests/support on PYTHONPATH and this run's Raft password."""
        tests_dir = str(Path(__file__).resolve().parent)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TASKANDGO_", "POD_", "KUBERNETES_"))
               and k != "SCHEDULER_STRATEGY"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in [tests_dir, env.get("PYTHONPATH", "")] if p)
        env["TASKANDGO_RAFT_PASSWORD"] = self.password
        return env

    def cli(self, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``taskandgo ARGS`` (the real CLI) inside the client namespace."""
        return subprocess.run(["ip", "netns", "exec", self.client_ns, sys.executable, "-m",
                               "taskandgo", *args], capture_output=True, text=True,
                              timeout=timeout_s, env=self.env(), start_new_session=True,
                              check=False)

    def node_argv(self, i: int) -> list[str]:
        voters = ",".join(f"{name}:{GRPC_PORT}:{RAFT_PORT}" for name in self.names)
        return ["ip", "netns", "exec", self.node_ns[i],
                sys.executable, "-m", "taskandgo", "node", "--id", self.node_ids[i],
                "--bind", self.ips[i], "--advertise", self.names[i],
                "--grpc-port", str(GRPC_PORT), "--raft-port", str(RAFT_PORT),
                "--http-port", str(HTTP_PORT), "--voters", voters,
                "--data-dir", str(self.root / f"node-{i}"), "--lease", str(self.lease_s),
                "--grace", "2"]

    def start(self) -> NetCluster:
        env = self.env()
        for i in range(self.n):
            (self.root / f"node-{i}").mkdir(parents=True, exist_ok=True)
            log = open(self.root / f"node-{i}.log", "ab")  # noqa: SIM115 - closed in teardown
            self._logs.append(log)
            self.procs[i] = subprocess.Popen(self.node_argv(i), stdout=log, stderr=log, env=env,
                                             cwd=self.root, start_new_session=True)
        self.agent = Agent(self.client_ns, self.root / "agent.log", env)
        return self

    def addr(self, i: int) -> str:
        return f"{self.names[i]}:{GRPC_PORT}"

    def addrs(self, idx: list[int] | range | None = None) -> list[str]:
        return [self.addr(i) for i in (range(self.n) if idx is None else idx)]

    def call(self, op: str, nodes: list[str], *args: Any, timeout_s: float = 10.0,
             **kwargs: Any) -> Any:
        assert self.agent is not None
        return self.agent.call(op, nodes, *args, timeout_s=timeout_s, **kwargs)

    def statuses(self, idx: list[int] | range | None = None, include_digest: bool = False,
                 timeout_s: float = 2.0) -> dict[int, dict[str, Any] | None]:
        """Each node's own status, asked in parallel; None where it did not answer."""
        assert self.agent is not None
        from taskandgo.node.client import TaskAndGoError

        idx = list(range(self.n) if idx is None else idx)
        futs = {i: self.agent.call_async("node_status", [self.addr(i)], self.addr(i),
                                         include_digest=include_digest, timeout_s=timeout_s)
                for i in idx}
        out: dict[int, dict[str, Any] | None] = {}
        for i, fut in futs.items():
            try:
                out[i] = Agent.result(fut)
            except TaskAndGoError:
                out[i] = None
        return out

    def leaders(self, idx: list[int] | range | None = None) -> dict[int, dict[str, Any]]:
        """The nodes (among idx) that call themselves leader, with their status."""
        return {i: st for i, st in self.statuses(idx).items()
                if st is not None and st["role"] == "leader"}

    def exited(self) -> list[str]:
        """Nodes whose process has ended (a node must not die in these tests)."""
        return [f"{self.node_ids[i]} (exit {p.returncode})" for i, p in enumerate(self.procs)
                if p is not None and p.poll() is not None]

    def logs(self, tail: int = 8000) -> str:
        out = []
        for name in [f"node-{i}.log" for i in range(self.n)] + ["agent.log"]:
            path = self.root / name
            if path.exists():
                out.append(f"----- {name} -----\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -------------------------------------------------------------- teardown

    def _stop_nodes(self) -> None:
        from harness import stop_processes

        stop_processes(self.procs)

    def _kill_namespace_pids(self, ns: str) -> list[int]:
        """SIGKILL every process left in ``ns`` (warm-pool workers and task
        subprocesses run in their own process groups), by pid. Returns those still
        there after a bounded wait."""
        killed: dict[int, str | None] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = [p for p in netns_pids(ns) if p != os.getpid()]
            if not pids:
                return []
            for pid in pids:
                st = _start_time(pid)
                if pid in killed and killed[pid] == st:
                    continue  # already signalled; waiting for it to go
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed[pid] = st
                except ProcessLookupError:
                    pass
            time.sleep(0.05)  # bounded by deadline: waiting for the kernel to reap
        return netns_pids(ns)

    def teardown(self) -> list[str]:
        """Undo everything this run made; returns problems (empty when clean). Safe to
        call on a half-built cluster and more than once."""
        problems: list[str] = []
        steps = []
        if self.agent is not None:
            steps.append(("close the agent", self.agent.close))
        steps.append(("stop the nodes", self._stop_nodes))
        for label, fn in steps:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep cleaning
                problems.append(f"{label}: {exc}")
        for ns in list(self._made_ns):
            try:
                left = self._kill_namespace_pids(ns)
                if left:
                    problems.append(f"processes left in {ns}: {left}")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"kill processes in {ns}: {exc}")
        for i in list(self._partitioned):
            try:
                self.heal(i)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"delete nft table in {self.node_ns[i]}: {exc}")
        # Deleting a namespace deletes its veth ends (and so their peers), the bridge
        # and its nft tables.
        for ns in reversed(self._made_ns):
            try:
                run(["ip", "netns", "del", ns])
                self._made_ns.remove(ns)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"ip netns del {ns}: {exc}")
        for d in list(self._made_etc):
            try:
                shutil.rmtree(d)
                self._made_etc.remove(d)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"remove {d}: {exc}")
        if self._made_netns_etc:
            try:
                NETNS_ETC.rmdir()  # only if empty: another run may be using it
            except OSError:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()
        still = sorted(ns for ns in _netns_list() if ns.startswith(self.prefix + "-"))
        if still:
            problems.append(f"namespaces still present: {still}")
        return problems


if __name__ == "__main__":
    if sys.argv[1:] == ["agent"]:
        raise SystemExit(agent_main())
    raise SystemExit("usage: netns.py agent  "
                     "(run by tests/cluster/test_netns.py inside a namespace)")
