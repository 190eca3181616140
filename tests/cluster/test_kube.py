"""Kubernetes API integration, run against a stand-in API (tests/support/kube_standin.py):
nothing on these machines can play a real Kubernetes API server, so these tests
exercise the official client and TaskAndGo's use of it against a stand-in that
serves pod list and watch, and replace the API port-forward by direct loopback
addresses (said again where it happens)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from harness import Cluster, wait_for
from kube_standin import KubeStandIn, pod
from taskandgo.node.kube import pod_gone, status_all_via_api

pytestmark = pytest.mark.cluster


def test_deleted_pod_has_its_work_requeued_at_once(tmp_path: Path) -> None:
    standin = KubeStandIn([pod(f"node-{i}") for i in range(3)])
    # A 30 s lease: only the pod-deleted event can requeue within the test's 10 s.
    c = Cluster(tmp_path, n=3, extra=["--lease", "30"],
                env={"TASKANDGO_KUBERNETES_API": "true",
                     "TASKANDGO_KUBERNETES_API_URL": standin.url,
                     "TASKANDGO_POD_SELECTOR": "app.kubernetes.io/instance=taskandgo"})
    c.start()
    try:
        leader = c.wait_ready()
        wait_for(lambda: standin.watcher_count() >= 3, 20, "every node watching pods")
        victim = next(i for i in range(3) if i != leader)
        with c.client(leader) as cl:
            tid = cl.submit("sh: sleep 1; echo $TASKANDGO_CHUNK_INDEX", strategy="split",
                            shards=3)
            wait_for(lambda: any(ch["node"] == f"node-{victim}" and ch["status"] == "running"
                                 for ch in cl.get(tid)["chunks"]), 20, "a chunk on the victim")
            c.kill(victim, signal.SIGSTOP)  # silent, but well within its 30 s lease
            t0 = time.monotonic()
            standin.emit("DELETED", pod(f"node-{victim}"))
            task = cl.wait(tid, timeout_s=10)[0]
            took = time.monotonic() - t0
        assert task["status"] == "succeeded" and took < 10
        moved = [ch for ch in task["chunks"] if ch["attempts"] == 2]
        assert moved and all(ch["node"] != f"node-{victim}" for ch in moved)
        print(f"requeued on pod deletion; task finished {took:.2f} s after the event")
        c.kill(victim)
    finally:
        c.stop()
        standin.close()


def test_status_all_through_the_api_lists_every_pod(cluster3: Cluster) -> None:
    standin = KubeStandIn([pod(f"node-{i}") for i in range(3)]
                          + [pod("node-9", phase="Pending")])
    try:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = standin.url
        api = client.CoreV1Api(client.ApiClient(cfg))

        class Direct:  # stand-in for the API port-forward: the pod's loopback address
            def __init__(self, pod_name: str) -> None:
                self.address = cluster3.addr(int(pod_name.split("-")[1]))

            def close(self) -> None:
                pass

        nodes = status_all_via_api("default", "taskandgo", api=api,
                                   forward=lambda a, ns, name: Direct(name))
        assert [n["id"] for n in nodes] == ["node-0", "node-1", "node-2"]
        assert [n["role"] for n in nodes].count("leader") == 1
    finally:
        standin.close()


def test_which_pod_events_mean_gone() -> None:
    from kubernetes.client import V1ObjectMeta, V1Pod, V1PodStatus

    def p(phase: str = "Running", reason: str | None = None, deleting: bool = False) -> V1Pod:
        deleted_at = "2026-11-27T00:00:00Z" if deleting else None
        return V1Pod(metadata=V1ObjectMeta(name="x", deletion_timestamp=deleted_at),
                     status=V1PodStatus(phase=phase, reason=reason))

    assert pod_gone("DELETED", p()) == "pod deleted"
    assert pod_gone("MODIFIED", p("Failed", "Evicted")) == "pod evicted"
    assert pod_gone("MODIFIED", p("Failed")) == "pod failed"
    assert pod_gone("MODIFIED", p(deleting=True)) is None  # draining on its own
    assert pod_gone("MODIFIED", p()) is None
