"""Pods going away for real: the StatefulSet controller of a real control plane
recreating and rolling the chart's pods, run by the process kubelet.

* ``kubectl delete pod`` of the leader under load: the controller recreates it, it
  rejoins with its volume claim's data, no acknowledged task is lost;
* ``helm upgrade`` changing the image tag under steady submits: the pods are rolled
  from the highest ordinal down, each drained on SIGTERM (the leader handing its
  leadership over) within its grace period, no task lost; the longest submit stall
  is printed.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from chart_release import Kube, Load, Release, poll, wait_one_cluster
from taskandgo.node.client import task_spec

pytestmark = pytest.mark.cluster


def sh_task(tid: str) -> dict[str, Any]:
    return task_spec("sh: sleep 0.2; echo done", id=tid, strategy="batch")


def final_check(rel: Release, ids: list[str], n: int) -> list[dict[str, Any]]:
    """Every acknowledged task exists once and succeeded."""
    tasks: list[dict[str, Any]] = []
    for k in range(0, len(ids), 200):
        tasks += rel.call("wait", rel.addrs(n), ids[k:k + 200], 120, timeout_s=130)
    bad = [(t["id"], t["status"]) for t in tasks if t["status"] != "succeeded"]
    assert not bad, f"tasks not succeeded: {bad[:10]}"
    assert [t["id"] for t in tasks] == ids
    return tasks


def deletions(kube: Kube, rel: Release) -> list[str]:
    """The release's pods in the order their deletion reached the process kubelet
    (it acts on every one: a pod is only gone once it has stopped the container)."""
    mark = f"{rel.namespace}/"
    return [e.split(mark, 1)[1].split(":", 1)[0] for e in list(kube.kubelet.events)
            if mark in e and "deletion requested" in e]


def test_deleted_leader_pod_is_recreated_and_rejoins_with_its_data(kube: Kube) -> None:
    rel = kube.release()
    load = None
    try:
        rel.install()
        rel.wait_ready(3)
        lead = wait_one_cluster(rel, 3)
        victim = rel.pod_name(lead)
        old_uid = kube.core.read_namespaced_pod(victim, rel.namespace).metadata.uid
        claim = kube.kubelet.claim_dir(rel.namespace, f"data-{victim}")
        load = Load(rel, 3, sh_task, "del").start()
        poll(lambda: len(load.acked) >= 20, 60, "20 tasks acknowledged before the delete")
        before = {p.name: (p.stat().st_ino, p.stat().st_size)
                  for p in claim.rglob("*") if p.is_file()}
        t0 = time.monotonic()
        kube.kubectl("-n", rel.namespace, "delete", "pod", victim, "--wait=false")
        new = poll(lambda: (p if (p := kube.core.read_namespaced_pod(victim, rel.namespace))
                            .metadata.uid != old_uid and Release.is_ready(p) else None),
                   120, f"{victim} recreated and ready")
        back = time.monotonic() - t0
        lead2 = wait_one_cluster(rel, 3)
        poll(lambda: len(load.acked) >= 40, 60, "more tasks acknowledged after")
        load.stop()
        tasks = final_check(rel, load.acked, 3)
        after = {p.name: p.stat().st_ino for p in claim.rglob("*") if p.is_file()}
        kept = [name for name, (ino, size) in before.items() if size and after.get(name) == ino]
        assert kept, f"the recreated pod did not find its data: before {before}, after {after}"
        st = rel.call("node_status", [rel.addr(lead)], rel.addr(lead), timeout_s=5)
        print(f"\n{victim} (leader) deleted; recreated as uid {new.metadata.uid} and ready "
              f"{back:.1f} s later; leader now {rel.pod_name(lead2)}; {len(kept)} data files kept "
              f"(journal among them: {'raft.journal' in kept}); {load.summary()}; "
              f"{len(tasks)} tasks succeeded; it is now a {st['role']}")
    except BaseException:
        if load is not None:
            load.stop()
            print(load.summary(), load.errors[-10:])
        print(rel.log())
        raise
    finally:
        rel.uninstall()


def test_upgrade_rolls_pods_from_the_highest_ordinal_with_no_task_lost(kube: Kube) -> None:
    rel = kube.release()
    load = None
    try:
        rel.install()
        rel.wait_ready(3)
        lead = wait_one_cluster(rel, 3)
        first_uids = {p.metadata.name: p.metadata.uid for p in rel.pods()}
        load = Load(rel, 3, sh_task, "roll").start()
        poll(lambda: len(load.acked) >= 20, 60, "20 tasks acknowledged before the upgrade")
        # As `kubectl rollout status` would: every pod available (ready for
        # minReadySeconds) first. Kubernetes 1.37's StatefulSet controller deletes every
        # old pod that is not available at once under podManagementPolicy Parallel
        # (docs/kubernetes.md, "Tested against a real control plane").
        poll(lambda: (kube.apps.read_namespaced_stateful_set(rel.fullname, rel.namespace)
                      .status.available_replicas or 0) == 3, 60, "3 pods available")
        old_revision = kube.apps.read_namespaced_stateful_set(
            rel.fullname, rel.namespace).status.current_revision
        t0 = time.monotonic()
        rel.upgrade("--set", "image.tag=0.1.1")

        def rolled() -> bool:
            sts = kube.apps.read_namespaced_stateful_set(rel.fullname, rel.namespace)
            s = sts.status
            # Right after the upgrade the status still describes the old revision
            # (all "updated", all ready) until the controller has seen the new spec.
            return bool((s.observed_generation or 0) >= sts.metadata.generation
                        and s.update_revision and s.update_revision != old_revision
                        and s.current_revision == s.update_revision
                        and s.updated_replicas == 3 and s.ready_replicas == 3
                        and (s.available_replicas or 0) == 3)

        poll(rolled, 300, "the StatefulSet rolled to the new revision", every_s=0.5)
        took = time.monotonic() - t0
        wait_one_cluster(rel, 3)
        poll(lambda: len(load.acked) >= 40, 60, "more tasks acknowledged after")
        load.stop()
        tasks = final_check(rel, load.acked, 3)
        order = deletions(kube, rel)
        assert order == [rel.pod_name(i) for i in (2, 1, 0)], order
        for p in rel.pods():
            assert p.metadata.uid != first_uids[p.metadata.name]
            assert p.spec.containers[0].image.endswith(":0.1.1")
        logs = {i: (kube.kubelet.root / f"pod_{rel.namespace}_{rel.pod_name(i)}.log")
                .read_text(errors="replace") for i in range(3)}
        handed = [i for i, text in logs.items() if "handed leadership over" in text]
        assert handed, "no pod handed its leadership over while draining"
        assert not any("handover did not complete" in t for t in logs.values())
        killed = [e for e in kube.kubelet.events if rel.namespace in e and "SIGKILL" in e]
        assert not killed, f"a pod outlived its grace period: {killed}"
        print(f"\nrolled 3 pods (order {order}) in {took:.1f} s; leader before "
              f"{rel.pod_name(lead)}, handed over by {[rel.pod_name(i) for i in handed]}; "
              f"{load.summary()}; {len(tasks)} tasks succeeded, 0 lost")
    except BaseException:
        if load is not None:
            load.stop()
            print(load.summary(), load.errors[-10:])
        print(rel.log())
        raise
    finally:
        rel.uninstall()
