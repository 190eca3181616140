"""Optional Kubernetes API integration, through the official ``kubernetes`` client.

* :class:`PodWatcher` runs on every node of a release with
  ``TASKANDGO_KUBERNETES_API=true`` (the chart's ``kubernetesApi.enabled``) and acts
  while the node leads: a pod of the StatefulSet that is deleted, evicted or failed
  has its work requeued at once instead of at lease expiry.
* :func:`status_all_via_api` is ``taskandgo status --all --kube``: it lists the
  release's pods through the API and asks each one for its status through an API
  port-forward, for a user outside the cluster.

The pod name is the node id (``POD_NAME``), which is how a pod maps to a worker.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

log = logging.getLogger("taskandgo.kube")

GRPC_PORT = 7000


def pod_gone(event_type: str, pod: Any) -> str | None:
    """Why a pod's work should be requeued now, or None if it is still serving."""
    status = pod.status
    # A pod that is only terminating (deletion timestamp set) is draining: it
    # finishes or hands back its work itself within its grace period.
    if event_type == "DELETED":
        return "pod deleted"
    if status is not None:
        if status.reason == "Evicted":
            return "pod evicted"
        if status.phase in ("Failed", "Succeeded"):
            return f"pod {status.phase.lower()}"
    return None


class PodWatcher:
    """Watches the release's pods and tells the node when one is gone.

    ``on_gone(node_id, reason)`` is called from the watch thread; the node requeues
    that worker's units if it is the leader (and ignores the call otherwise).
    Reconnects with backoff after any API error; stops with :meth:`stop`.

    List, then watch from the list's resourceVersion, and resume every later watch
    from the last version seen (each watch request ends after 5 minutes, and the API
    may go away), so no deletion between two watch requests is missed. When the API
    server no longer has that version (410 Gone) it lists again: a pod seen before
    and missing from the new list was deleted while the watch was down."""

    def __init__(self, namespace: str, selector: str, on_gone: Callable[[str, str], object],
                 api: Any = None) -> None:
        self.namespace = namespace
        self.selector = selector
        self.on_gone = on_gone
        self._api = api
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)
        self._version: str | None = None     # resume the next watch from here
        self._known: set[str] = set()         # pods seen and not deleted since

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _client(self) -> Any:
        if self._api is None:
            self._api = api_client()
        return self._api

    def _relist(self) -> Iterator[tuple[str, Any]]:
        """List the pods; a pod known before and absent now comes out as DELETED."""
        pods = self._client().list_namespaced_pod(self.namespace,
                                                  label_selector=self.selector)
        names = {p.metadata.name for p in pods.items if p.metadata is not None}
        for name in sorted(self._known - names):
            self._known.discard(name)
            yield "DELETED", _named_pod(name)
        for pod in pods.items:
            if pod.metadata is not None:
                self._known.add(pod.metadata.name)
            yield "MODIFIED", pod
        self._version = pods.metadata.resource_version if pods.metadata else None

    def events(self) -> Iterator[tuple[str, Any]]:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        if self._version is None:
            yield from self._relist()
        w = watch.Watch()
        kwargs: dict[str, Any] = {"namespace": self.namespace, "label_selector": self.selector,
                                  "timeout_seconds": 300, "allow_watch_bookmarks": True}
        if self._version:
            kwargs["resource_version"] = self._version
        try:
            for ev in w.stream(self._client().list_namespaced_pod, **kwargs):
                kind, pod = ev["type"], ev["object"]
                if kind == "BOOKMARK":  # only a newer version to resume from
                    raw = ev.get("raw_object")
                    version = raw.get("metadata", {}).get("resourceVersion") \
                        if isinstance(raw, dict) else None
                    self._version = version or self._version
                    continue
                meta = getattr(pod, "metadata", None)
                if meta is None:
                    continue
                if meta.resource_version:
                    self._version = meta.resource_version
                if kind == "DELETED":
                    self._known.discard(meta.name)
                else:
                    self._known.add(meta.name)
                yield kind, pod
                if self._stop.is_set():
                    w.stop()
                    return
        except ApiException as exc:
            if exc.status == 410:  # our version is too old: list again
                self._version = None
                return
            raise

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                for kind, pod in self.events():
                    backoff = 0.5
                    reason = pod_gone(kind, pod)
                    if reason and pod.metadata is not None:
                        self.on_gone(pod.metadata.name, reason)
            except Exception as exc:  # noqa: BLE001 - the API may come and go
                log.warning("pod watch failed (%s); retrying in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(30.0, backoff * 2)


def _named_pod(name: str) -> Any:
    """A pod object carrying only its name (for a deletion found by listing)."""
    from kubernetes.client import V1ObjectMeta, V1Pod

    return V1Pod(metadata=V1ObjectMeta(name=name))


def api_client(in_cluster: bool = True) -> Any:
    """CoreV1Api from the pod's service account (or, outside, the kubeconfig).
    ``TASKANDGO_KUBERNETES_API_URL`` points it at another API endpoint instead."""
    import os

    from kubernetes import client, config

    url = os.environ.get("TASKANDGO_KUBERNETES_API_URL")
    if url:
        cfg = client.Configuration()
        cfg.host = url
        return client.CoreV1Api(client.ApiClient(cfg))
    if in_cluster:
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.CoreV1Api()


# ---------------------------------------------------------------- status --kube

def list_release_pods(api: Any, namespace: str, release: str) -> list[str]:
    """Names of the release's running pods, by the chart's instance label."""
    pods = api.list_namespaced_pod(namespace,
                                   label_selector=f"app.kubernetes.io/instance={release}")
    return sorted(p.metadata.name for p in pods.items
                  if p.status is not None and p.status.phase == "Running")


class PortForward:
    """A loopback listener that relays each connection to a pod's port through the
    API server (what ``kubectl port-forward`` does). ``address`` is 127.0.0.1:port."""

    def __init__(self, api: Any, namespace: str, pod: str, port: int = GRPC_PORT) -> None:
        self.api, self.namespace, self.pod, self.port = api, namespace, pod, port
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(8)
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"pf-{pod}").start()

    def _remote(self) -> socket.socket:
        from kubernetes.stream import portforward

        pf = portforward(self.api.connect_get_namespaced_pod_portforward, self.pod,
                         self.namespace, ports=str(self.port))
        return pf.socket(self.port)

    def _accept(self) -> None:
        while not self._closed:
            try:
                local, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(local,), daemon=True).start()

    def _relay(self, local: socket.socket) -> None:
        try:
            remote = self._remote()
        except Exception as exc:  # noqa: BLE001
            log.warning("port-forward to %s failed: %s", self.pod, exc)
            local.close()
            return
        socks = [local, remote]
        try:
            while not self._closed:
                ready, _, _ = select.select(socks, [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (remote if s is local else local).sendall(data)
        except OSError:
            return
        finally:
            local.close()
            remote.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()


def status_all_via_api(namespace: str, release: str, api: Any = None,
                       forward: Callable[[Any, str, str], Any] | None = None,
                       timeout_s: float = 10.0,
                       client_kw: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every pod's own status, found and reached through the Kubernetes API.
    ``client_kw``: the API token and TLS files for the nodes (Client's keywords)."""
    from taskandgo.node.client import Client, TaskAndGoError

    if api is None:
        api = api_client(in_cluster=False)
    forward = forward or (lambda a, ns, pod: PortForward(a, ns, pod))
    out = []
    for pod in list_release_pods(api, namespace, release):
        pf = forward(api, namespace, pod)
        try:
            with Client([pf.address], timeout_s=timeout_s, **dict(client_kw or {})) as c:
                out.append(c.node_status(pf.address))
        except TaskAndGoError as exc:
            out.append({"id": pod, "role": "unreachable", "grpc_address": pod,
                        "error": exc.message})
        finally:
            pf.close()
    return out
