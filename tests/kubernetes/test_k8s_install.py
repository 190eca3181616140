"""``helm install`` of chart/ as shipped into a real API server (tests/support/
control_plane.py), its pods run by the process kubelet (tests/support/
process_kubelet.py) as ``taskandgo node`` processes in network namespaces.

* defaults: the API server accepts every object, the StatefulSet controller creates
  the pods, they form one Raft cluster and run tasks; a task submitted through one
  pod's address (gRPC, and the seed's HTTP POST /submit-task) completes;
* each example values file in chart/ci is accepted and its pods created (held
  Pending: not run);
* ``helm upgrade`` keeps the generated Secret (``lookup``);
* HPA accepted by the API server; ServiceMonitor needs a CRD this machine lacks.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from chart_release import CHART, Kube, poll, wait_one_cluster
from taskandgo.node.client import task_spec

pytestmark = pytest.mark.cluster


def test_default_install_forms_one_cluster_and_runs_tasks(kube: Kube) -> None:
    rel = kube.release()
    t0 = time.monotonic()
    try:
        rel.install()
        installed = time.monotonic() - t0
        # The API server accepted and defaulted what the chart wrote.
        sts = kube.apps.read_namespaced_stateful_set(rel.fullname, rel.namespace)
        assert sts.spec.pod_management_policy == "Parallel"
        assert sts.spec.revision_history_limit == 10  # defaulted by the API server
        assert sts.spec.service_name == rel.headless
        pdb = kube.policy.read_namespaced_pod_disruption_budget(rel.fullname, rel.namespace)
        assert pdb.spec.max_unavailable == 1
        assert set(rel.secret()) == {"raft-password", "api-token"}
        svc = kube.core.read_namespaced_service(rel.headless, rel.namespace)
        assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
        pods = rel.wait_ready(3, timeout_s=120)
        ready = time.monotonic() - t0
        assert pods == [rel.pod_name(i) for i in range(3)]
        lead = wait_one_cluster(rel, 3)
        print(f"\ninstalled in {installed:.1f} s, 3 pods ready {ready:.1f} s after "
              f"helm install; leader {rel.pod_name(lead)}")
        # Each pod is the node named after it, with its volume claim's data dir.
        for i in range(3):
            st = rel.call("node_status", [rel.addr(i)], rel.addr(i), timeout_s=5)
            assert st["id"] == rel.pod_name(i)
            claim = kube.kubelet.claim_dir(rel.namespace, f"data-{rel.pod_name(i)}")
            assert any(claim.iterdir()), f"nothing written to {claim}"
        # A task through a follower pod's address (gRPC) completes...
        follower = next(i for i in range(3) if i != lead)
        specs = [task_spec(f"sh: echo run-{k} on $HOSTNAME", id=f"install-{k}",
                           strategy="batch") for k in range(6)]
        res = rel.call("submit_many", [rel.addr(follower)], specs, timeout_s=20)
        assert [r["task_id"] for r in res] == [s["id"] for s in specs]
        tasks = rel.call("wait", [rel.addr(follower)], [s["id"] for s in specs], 60,
                         timeout_s=70)
        assert [t["status"] for t in tasks] == ["succeeded"] * 6, tasks
        assert {t["node"] for t in tasks} <= {rel.pod_name(i) for i in range(3)}
        # ... and so does the seed's POST /submit-task through a pod's HTTP port.
        http = kube.kubelet.forward(f"{rel.namespace}/{rel.pod_name(follower)}", 8080)
        body = json.dumps({"task_id": "seed-1", "priority": "high",
                           "data": "task details"}).encode()
        req = urllib.request.Request(
            f"http://{http}/submit-task", data=body, method="POST",
            headers={"Content-Type": "application/json",
                     "Host": f"{rel.fqdn(follower)}:8080",
                     "Authorization": f"Bearer {rel.token()}"})
        with urllib.request.urlopen(req, timeout=20) as r:
            assert r.status in (200, 201, 202), r.status
        (seed,) = rel.call("wait", [rel.addr(lead)], ["seed-1"], 30, timeout_s=40)
        assert seed["status"] == "succeeded", seed
    except BaseException:
        print(rel.log())
        raise
    finally:
        rel.uninstall()


def _values(name: str) -> Path:
    return CHART / "ci" / name


@pytest.mark.parametrize("values", sorted(p.name for p in (CHART / "ci").glob("*.yaml")))
def test_example_values_are_accepted_by_the_api_server(kube: Kube, values: str) -> None:
    """Each example values file installs: every object passes the API server's
    validation and admission, and the StatefulSet controller creates its pods (held
    Pending here: running 7 pods of another DNS domain is not what this checks)."""
    import yaml

    vals: dict[str, Any] = yaml.safe_load(_values(values).read_text())
    rel = kube.release()
    kube.kubectl("create", "namespace", rel.namespace)
    kube.kubelet.hold(rel.namespace)
    args = ["-f", str(_values(values))]
    try:
        existing = vals.get("auth", {}).get("existingSecret")
        if existing:
            kube.kubectl("-n", rel.namespace, "create", "secret", "generic", existing,
                         "--from-literal=password=p" + "x" * 30,
                         "--from-literal=token=t" + "y" * 30)
        if vals.get("serviceMonitor", {}).get("enabled") and not _has_servicemonitor_crd(kube):
            # The ServiceMonitor kind needs Prometheus Operator's CRD (see
            # test_servicemonitor_is_accepted): everything else of this file is checked.
            args += ["--set", "serviceMonitor.enabled=false"]
        rel.install(*args)
        want = vals.get("replicaCount", 3)
        if vals.get("autoscaling", {}).get("enabled"):
            hpa = kube.kubectl("-n", rel.namespace, "get", "hpa", rel.fullname, "-o",
                               "json").stdout
            spec = json.loads(hpa)["spec"]
            assert spec["minReplicas"] == vals["autoscaling"]["minReplicas"]
            assert spec["scaleTargetRef"]["name"] == rel.fullname
            # The chart leaves replicas to the HPA, which the real controller raises to
            # minReplicas (no metrics needed for that).
            want = vals["autoscaling"]["minReplicas"]
            poll(lambda: kube.apps.read_namespaced_stateful_set(
                rel.fullname, rel.namespace).spec.replicas == want, 60,
                f"the HPA scaling the StatefulSet to {want}")
        if vals.get("kubernetesApi", {}).get("enabled"):
            kube.kubectl("-n", rel.namespace, "get", "role,rolebinding", rel.fullname)
        if vals.get("networkPolicy", {}).get("enabled"):
            kube.kubectl("-n", rel.namespace, "get", "networkpolicy", rel.fullname)
        names = poll(lambda: (p if len(p := rel.pod_names()) == want else None), 30,
                     f"{want} pods created by the StatefulSet controller")
        assert names == sorted(rel.pod_name(i) for i in range(want))
        print(f"\n{values}: accepted; {want} pods created")
    finally:
        rel.uninstall()


def _has_servicemonitor_crd(kube: Kube) -> bool:
    res = kube.kubectl("get", "crd", "servicemonitors.monitoring.coreos.com", check=False)
    return res.returncode == 0


def test_servicemonitor_is_accepted(kube: Kube) -> None:
    if not _has_servicemonitor_crd(kube):
        pytest.skip("the ServiceMonitor kind is Prometheus Operator's CRD "
                    "(monitoring.coreos.com/v1), which no package registry reachable here "
                    "ships and the chart does not carry; the rendered object is checked "
                    "offline by tests/cluster/test_chart.py")


def test_upgrade_keeps_the_generated_secret(kube: Kube) -> None:
    rel = kube.release()
    kube.kubectl("create", "namespace", rel.namespace)
    kube.kubelet.hold(rel.namespace)
    try:
        rel.install()
        before = rel.secret()
        assert len(before["raft-password"]) == 40 and len(before["api-token"]) == 40
        rel.upgrade("--set", "scheduler.slots=2")
        rel.upgrade("--set", "image.tag=0.1.1")
        assert rel.secret() == before
        # The same chart rendered without a cluster (no lookup) would make new values.
        out = kube.helm("template", rel.name, str(CHART), "--namespace", rel.namespace).stdout
        assert base64.b64encode(before["api-token"].encode()).decode() not in out
    finally:
        rel.uninstall()
