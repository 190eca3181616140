"""TaskAndGo's own use of the Kubernetes API, against a real API server with the
chart's RBAC (``kubernetesApi.enabled``):

* the leader's pod watch (node/kube.py, in-cluster config from the service-account
  token the process kubelet projects) sees a force-deleted pod whose node dropped off
  the network and requeues its work at once, long before the worker's lease (30 s
  here) could expire (without kubernetesApi this test fails: the task waits for the
  lease);
* the chart's ServiceAccount may list and watch the release's pods and nothing else:
  no Secrets, no other namespace, no writes;
* ``taskandgo status --all --kube`` finds the pods through the real API. Reaching each
  pod goes through the API server's port-forward, which the API server hands to the
  node's kubelet streaming server: the process kubelet has none, so the CLI reports
  each pod unreachable, and the rest of the path (listing, then asking each node) is
  run with the process kubelet's own forward in place of the streaming.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from chart_release import Kube, Release, poll, wait_one_cluster
from kubernetes import client
from taskandgo.node.kube import status_all_via_api

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def api_release(kube: Kube) -> Iterator[Release]:
    rel = kube.release()
    try:
        rel.install("--set", "kubernetesApi.enabled=true", "--set", "scheduler.leaseSeconds=30")
        rel.wait_ready(3)
        yield rel
    except BaseException:
        print(rel.log())
        raise
    finally:
        rel.uninstall()


def sa_token(kube: Kube, rel: Release) -> str:
    req = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
        audiences=[], expiration_seconds=600))
    res = kube.core.create_namespaced_service_account_token(rel.fullname, rel.namespace, req)
    return str(res.status.token)


def as_sa(kube: Kube, token: str, method: str, path: str) -> int:
    """HTTP status of one request to the API server with the ServiceAccount's token."""
    ctx = ssl.create_default_context(cafile=str(kube.plane.pki / "ca.crt"))
    req = urllib.request.Request(kube.plane.server + path, method=method,
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_leader_requeues_a_deleted_pods_work_through_a_real_watch(
        kube: Kube, api_release: Release) -> None:
    rel = api_release
    lead = wait_one_cluster(rel, 3)
    victim = next(i for i in range(3) if i != lead)
    logs = kube.kubelet.root / f"pod_{rel.namespace}_{rel.pod_name(lead)}.log"
    res = rel.call("submit_many", [rel.addr(lead)], [
        {"id": "watched", "data": "sh: sleep 3; echo $TASKANDGO_CHUNK_INDEX",
         "strategy": "split", "shards": 3}], timeout_s=10)
    assert res[0]["task_id"] == "watched"

    def on_victim() -> bool:
        task = rel.call("get", [rel.addr(lead)], "watched", timeout_s=5)
        return any(ch["node"] == rel.pod_name(victim) and ch["status"] == "running"
                   for ch in task.get("chunks", []))

    poll(on_victim, 30, "a chunk running on the victim pod")
    # The leader's watch is up (a pod deleted before a node's first list is not
    # something the watch can know of: its lease covers that).
    poll(lambda: kube.kubelet.api_connections(f"{rel.namespace}/{rel.pod_name(lead)}") >= 1,
         30, "the leader's pod watch connected")
    # As after a node failure: the victim's node drops off the network (no closed
    # connection tells the leader anything), its pod is force-deleted, and the
    # replacement waits for a node (held Pending: a replacement that starts would
    # tell the leader itself, within seconds, that it runs nothing).
    kube.kubelet.cut(f"{rel.namespace}/{rel.pod_name(victim)}")
    kube.kubelet.hold(rel.namespace)
    t0 = time.monotonic()
    kube.kubectl("-n", rel.namespace, "delete", "pod", rel.pod_name(victim),
                 "--grace-period=0", "--force")
    (task,) = rel.call("wait", [rel.addr(lead)], ["watched"], 25, timeout_s=30)
    took = time.monotonic() - t0
    assert task["status"] == "succeeded", task
    moved = [ch for ch in task["chunks"] if ch["attempts"] == 2]
    assert moved and all(ch["node"] != rel.pod_name(victim) for ch in moved), task["chunks"]
    # The lease is 30 s: only the watch can have requeued the chunk this soon.
    assert took < 20, f"task finished {took:.1f} s after the delete"
    text = logs.read_text(errors="replace")
    assert "pod watch failed" not in text, text[-3000:]
    print(f"\nforce-deleted {rel.pod_name(victim)}; its chunk requeued and the task done "
          f"{took:.1f} s later (lease 30 s)")
    kube.kubelet.release_hold(rel.namespace)
    rel.wait_ready(3, timeout_s=90)  # recreated, for the tests after this one


def test_service_account_reads_only_its_pods(kube: Kube, api_release: Release) -> None:
    rel = api_release
    token = sa_token(kube, rel)
    ns = rel.namespace
    allowed = {
        ("GET", f"/api/v1/namespaces/{ns}/pods"): 200,
        ("GET", f"/api/v1/namespaces/{ns}/pods/{rel.pod_name(0)}"): 200,
        ("GET", f"/api/v1/namespaces/{ns}/pods?watch=true&timeoutSeconds=1"): 200,
        ("GET", f"/api/v1/namespaces/{ns}/secrets"): 403,
        ("GET", f"/api/v1/namespaces/{ns}/secrets/{rel.fullname}"): 403,
        ("GET", "/api/v1/namespaces/default/pods"): 403,
        ("GET", "/api/v1/pods"): 403,
        ("DELETE", f"/api/v1/namespaces/{ns}/pods/{rel.pod_name(0)}"): 403,
        ("GET", f"/api/v1/namespaces/{ns}/configmaps"): 403,
    }
    got = {k: as_sa(kube, token, *k) for k in allowed}
    assert got == allowed


def test_status_all_kube_finds_the_pods_through_the_api(kube: Kube,
                                                       api_release: Release) -> None:
    rel = api_release
    wait_one_cluster(rel, 3)
    # The CLI as a user runs it, with a kubeconfig.
    res = subprocess.run(
        [sys.executable, "-m", "taskandgo", "status", "--all", "--kube", "--namespace",
         rel.namespace, "--release", rel.name, "--json"],
        capture_output=True, text=True, timeout=120, env=kube.plane.env(), check=False)
    out = res.stdout + res.stderr
    for i in range(3):
        assert rel.pod_name(i) in out, out
    # Reaching each pod needs the kubelet's streaming (port-forward) server.
    assert "unreachable" in out, out
    # The same path with the process kubelet's forward in place of the streaming.

    class Forward:
        def __init__(self, pod: str) -> None:
            self.address = kube.kubelet.forward(f"{rel.namespace}/{pod}", 7000)

        def close(self) -> None:
            pass

    import os

    os.environ["TASKANDGO_TOKEN"] = rel.token()
    try:
        nodes = status_all_via_api(rel.namespace, rel.name, api=client.CoreV1Api(kube.api),
                                   forward=lambda a, ns, pod: Forward(pod))
    finally:
        del os.environ["TASKANDGO_TOKEN"]
    assert [n["id"] for n in nodes] == [rel.pod_name(i) for i in range(3)], nodes
    assert [n["role"] for n in nodes].count("leader") == 1
    print("\n" + json.dumps([(n["id"], n["role"]) for n in nodes]))
