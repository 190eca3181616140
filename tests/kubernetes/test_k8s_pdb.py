"""The chart's PodDisruptionBudget enforced by a real API server's eviction API: with
the default budget (maxUnavailable 1 over 3 ready pods) the first eviction is
granted and the second, while the first pod is away, is refused with 429."""

from __future__ import annotations

import pytest
from chart_release import Kube, poll
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.cluster


def evict(kube: Kube, namespace: str, pod: str) -> None:
    body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=namespace))
    kube.core.create_namespaced_pod_eviction(pod, namespace, body)


def test_second_eviction_is_refused_by_the_default_budget(kube: Kube) -> None:
    rel = kube.release()
    try:
        rel.install()
        rel.wait_ready(3)

        def budget_ready() -> bool:
            pdb = kube.policy.read_namespaced_pod_disruption_budget(rel.fullname,
                                                                    rel.namespace)
            s = pdb.status
            return bool(s and s.current_healthy == 3 and s.disruptions_allowed == 1)

        poll(budget_ready, 60, "the disruption controller counting 3 healthy pods")
        evict(kube, rel.namespace, rel.pod_name(1))
        with pytest.raises(ApiException) as refused:
            evict(kube, rel.namespace, rel.pod_name(2))
        assert refused.value.status == 429, refused.value
        assert "disruption budget" in str(refused.value.body)
        pod2 = kube.core.read_namespaced_pod(rel.pod_name(2), rel.namespace)
        assert pod2.metadata.deletion_timestamp is None
        print(f"\nfirst eviction granted; second refused: {refused.value.status} "
              f"{refused.value.reason}")
    except BaseException:
        print(rel.log())
        raise
    finally:
        rel.uninstall()
