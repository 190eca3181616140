"""The chart installed with helm into a real API server, its pods run by the process
kubelet: helpers shared by tests/kubernetes.

:class:`Kube` bundles the control plane (tests/support/control_plane.py), the process
kubelet (tests/support/process_kubelet.py) and helm; :class:`Release` is one
``helm install`` of ``chart/`` (as shipped) into a namespace of its own, with
waits on its pods and a client that reaches them by their DNS names from a client
network namespace on the pods' bridge. Every wait has a deadline.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_tool
from control_plane import ControlPlane
from process_kubelet import ProcessKubelet

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart"
GRPC_PORT = 7000


def poll(cond: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.25) -> Any:
    """``cond()``'s first truthy value, polled until ``timeout_s``; TimeoutError naming
    ``what`` (and the last exception, if any) otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - kept for the message
            last = exc
        time.sleep(every_s)  # polling a condition, bounded by the deadline
    raise TimeoutError(f"{what}: not within {timeout_s:g} s" + (f" (last error: {last})"
                                                                 if last else ""))


class Kube:
    """A control plane, a process kubelet running its pods, and helm against them."""

    def __init__(self, plane: ControlPlane, kubelet: ProcessKubelet) -> None:
        from kubernetes import client

        self.plane = plane
        self.kubelet = kubelet
        self.api = plane.api_client()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.policy = client.PolicyV1Api(self.api)

    def helm(self, *args: str, timeout_s: float = 180.0, check: bool = True
             ) -> subprocess.CompletedProcess:
        res = subprocess.run([helm_tool.helm_path(), *args], capture_output=True, text=True,
                             timeout=timeout_s, env=self.plane.env(), check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def kubectl(self, *args: str, check: bool = True, timeout_s: float = 60.0
                ) -> subprocess.CompletedProcess:
        return self.plane.kubectl(*args, check=check, timeout_s=timeout_s)

    def release(self, name: str = "taskandgo", namespace: str | None = None) -> Release:
        ns = namespace or f"t-{secrets.token_hex(3)}"
        return Release(self, name, ns)


class Release:
    """One helm release of chart/ in its own namespace."""

    def __init__(self, kube: Kube, name: str, namespace: str) -> None:
        self.kube = kube
        self.name = name
        self.namespace = namespace
        # The chart's fullname: the release name alone when it holds "taskandgo".
        self.fullname = name if "taskandgo" in name else f"{name}-taskandgo"
        self.headless = f"{self.fullname}-headless"
        self._agent_env: dict[str, str] | None = None
        self._agent: Any = None

    # -------------------------------------------------------------- helm

    def install(self, *args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
        return self.kube.helm("install", self.name, str(CHART), "--namespace", self.namespace,
                              "--create-namespace", *args, timeout_s=timeout_s)

    def upgrade(self, *args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
        return self.kube.helm("upgrade", self.name, str(CHART), "--namespace", self.namespace,
                              *args, timeout_s=timeout_s)

    def uninstall(self, timeout_s: float = 120.0) -> None:
        """helm uninstall, delete the namespace, and wait until its pods are gone."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        self.kube.helm("uninstall", self.name, "--namespace", self.namespace, check=False)
        self.kube.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)
        poll(lambda: not self.pod_names(all_phases=True), timeout_s,
             f"pods of {self.namespace} gone")

    # -------------------------------------------------------------- pods

    def pod_name(self, i: int) -> str:
        return f"{self.fullname}-{i}"

    def pods(self) -> list[Any]:
        return list(self.kube.core.list_namespaced_pod(
            self.namespace, label_selector=f"app.kubernetes.io/instance={self.name}").items)

    def pod_names(self, all_phases: bool = False) -> list[str]:
        return sorted(p.metadata.name for p in self.pods()
                      if all_phases or p.metadata.deletion_timestamp is None)

    @staticmethod
    def is_ready(pod: Any) -> bool:
        return bool(pod.metadata.deletion_timestamp is None and pod.status is not None
                    and pod.status.phase == "Running"
                    and any(c.type == "Ready" and c.status == "True"
                            for c in pod.status.conditions or []))

    def ready_pods(self) -> list[str]:
        return sorted(p.metadata.name for p in self.pods() if self.is_ready(p))

    def wait_ready(self, n: int, timeout_s: float = 120.0) -> list[str]:
        """Wait until n pods of the release are Running and Ready."""
        return list(poll(lambda: (r if len(r := self.ready_pods()) >= n else None),
                         timeout_s, f"{n} ready pods in {self.namespace}"))

    def fqdn(self, i: int) -> str:
        return f"{self.pod_name(i)}.{self.headless}.{self.namespace}.svc.cluster.local"

    def addr(self, i: int) -> str:
        return f"{self.fqdn(i)}:{GRPC_PORT}"

    def addrs(self, n: int) -> list[str]:
        return [self.addr(i) for i in range(n)]

    def secret(self) -> dict[str, str]:
        s = self.kube.core.read_namespaced_secret(self.fullname, self.namespace)
        return {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}

    def token(self) -> str:
        return self.secret()["api-token"]

    # -------------------------------------------------------------- clients

    def agent_env(self) -> dict[str, str]:
        if self._agent_env is None:
            tests_dir = str(Path(__file__).resolve().parent)
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("TASKANDGO_", "POD_", "KUBERNETES_"))
                   and k != "SCHEDULER_STRATEGY"}
            env["PYTHONPATH"] = os.pathsep.join(p for p in [tests_dir, env.get("PYTHONPATH", "")]
                                                if p)
            env["TASKANDGO_TOKEN"] = self.token()
            self._agent_env = env
        return self._agent_env

    def agent(self) -> Any:
        """This release's client: a netns.py agent in the kubelet's client namespace
        (the pods' DNS names resolve there) holding the release's API token."""
        if self._agent is None:
            import netns

            kl = self.kube.kubelet
            self._agent = netns.Agent(kl.client_ns, kl.root / f"agent-{self.namespace}.log",
                                      self.agent_env())
        return self._agent

    def call(self, op: str, nodes: list[str], *args: Any, timeout_s: float = 10.0,
             **kwargs: Any) -> Any:
        return self.agent().call(op, nodes, *args, timeout_s=timeout_s, **kwargs)

    def call_async(self, op: str, nodes: list[str], *args: Any, timeout_s: float = 10.0,
                   **kwargs: Any) -> Any:
        return self.agent().call_async(op, nodes, *args, timeout_s=timeout_s, **kwargs)

    def statuses(self, n: int) -> dict[int, dict[str, Any] | None]:
        from taskandgo.node.client import TaskAndGoError

        out: dict[int, dict[str, Any] | None] = {}
        for i in range(n):
            try:
                out[i] = self.call("node_status", [self.addr(i)], self.addr(i), timeout_s=3)
            except TaskAndGoError:
                out[i] = None
        return out

    def leader(self, n: int, timeout_s: float = 60.0) -> int:
        """The ordinal of the pod every answering pod agrees leads."""
        def one() -> int | None:
            st = self.statuses(n)
            leaders = [i for i, s in st.items() if s is not None and s["role"] == "leader"]
            return leaders[0] if len(leaders) == 1 else None
        return int(poll(lambda: (x + 1 if (x := one()) is not None else None), timeout_s,
                        "one leader") - 1)

    def log(self, tail: int = 6000) -> str:
        return self.kube.kubelet.logs(tail)


def one_cluster(rel: Release, n: int) -> int | None:
    """The leader's ordinal once every one of the n pods answers, follows that leader
    in the same term and is ready; else None."""
    st = rel.statuses(n)
    if any(s is None for s in st.values()):
        return None
    leaders = [i for i, s in st.items() if s and s["role"] == "leader"]
    if len(leaders) != 1:
        return None
    lead = leaders[0]
    term = st[lead]["raft_term"]  # type: ignore[index]
    if all(s is not None and s["ready"] and s["leader_id"] == rel.pod_name(lead)
           and s["raft_term"] == term for s in st.values()):
        return lead
    return None


def wait_one_cluster(rel: Release, n: int, timeout_s: float = 60.0) -> int:
    return int(poll(lambda: (x + 1 if (x := one_cluster(rel, n)) is not None else None),
                    timeout_s, f"one Raft cluster of {n} pods") - 1)


class Load:
    """Steady submits from a thread: one task per call, to every pod's address (the
    client moves on when one does not answer), each retried with the same id until
    acknowledged (ids are idempotency keys). ``stall_s`` is the longest time one
    task took from its first try to its acknowledgement. Bounded: at most
    ``max_tasks`` tasks and ``max_s`` seconds."""

    def __init__(self, rel: Release, n: int, spec: Callable[[str], dict[str, Any]],
                 prefix: str, every_s: float = 0.1, max_tasks: int = 3000,
                 max_s: float = 300.0) -> None:
        import threading

        self.rel, self.n, self.spec, self.prefix = rel, n, spec, prefix
        self.every_s, self.max_tasks, self.max_s = every_s, max_tasks, max_s
        self.acked: list[str] = []
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> Load:
        self.thread.start()
        return self

    def _run(self) -> None:
        from taskandgo.node.client import TaskAndGoError

        t_end = time.monotonic() + self.max_s
        k = 0
        while not self.stop_event.is_set() and k < self.max_tasks and time.monotonic() < t_end:
            tid = f"{self.prefix}-{k:05d}"
            t0 = time.monotonic()
            while time.monotonic() < t_end:
                try:
                    self.rel.call("submit_many", self.rel.addrs(self.n), [self.spec(tid)],
                                  timeout_s=5)
                    break
                except TaskAndGoError as exc:
                    self.errors.append(f"{tid}: {exc.code} {exc.message[:120]}")
                    time.sleep(0.2)  # retry pacing; bounded by t_end
            else:
                return
            self.latencies.append(time.monotonic() - t0)
            self.acked.append(tid)
            k += 1
            self.stop_event.wait(self.every_s)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)

    @property
    def stall_s(self) -> float:
        return max(self.latencies, default=0.0)

    def summary(self) -> str:
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] if lat else 0.0
        return (f"{len(self.acked)} tasks acknowledged, submit latency p50 {p50 * 1000:.0f} ms, "
                f"longest stall {self.stall_s:.2f} s, {len(self.errors)} failed tries")
