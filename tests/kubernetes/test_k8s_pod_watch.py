"""node/kube.py's PodWatcher against a real API server's watch, through a loopback
relay the test can cut: a pod deleted while the watch is down (an API server
restart, a network blip, or the 5-minute end of every watch request) must still be
reported once the watch is back."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from chart_release import Kube, poll
from kubernetes import client
from taskandgo.node.kube import PodWatcher

pytestmark = pytest.mark.cluster


class CuttableRelay:
    """127.0.0.1:port relayed to the API server; :meth:`cut` closes every live
    connection and refuses new ones until :meth:`mend`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.down = False
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.down:
                    conn.close()
                    continue
                self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            remote = socket.create_connection(self.target, timeout=5)
            remote.settimeout(None)
        except OSError:
            conn.close()
            return
        with self.lock:
            self.conns += [conn, remote]

        def pipe(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(65536):
                    b.sendall(data)
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_RDWR)

        t = threading.Thread(target=pipe, args=(remote, conn), daemon=True)
        t.start()
        pipe(conn, remote)
        t.join(timeout=30)

    def cut(self) -> None:
        with self.lock:
            self.down = True
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def mend(self) -> None:
        with self.lock:
            self.down = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def relay(kube: Kube) -> Iterator[CuttableRelay]:
    r = CuttableRelay(("127.0.0.1", kube.plane.api_port))
    yield r
    r.close()


def bare_pod(name: str) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app.kubernetes.io/instance": "w"}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="none")]))


def test_pod_deleted_while_the_watch_is_down_is_still_reported(
        kube: Kube, relay: CuttableRelay) -> None:
    ns = f"w-{relay.port}"
    kube.kubectl("create", "namespace", ns)
    kube.kubelet.hold(ns)  # the pods stay Pending: only their objects matter here
    cfg = kube.api.configuration
    c = client.Configuration()
    c.host = f"https://127.0.0.1:{relay.port}"
    c.ssl_ca_cert, c.cert_file, c.key_file = cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file
    api = client.CoreV1Api(client.ApiClient(c))
    gone: list[tuple[str, str]] = []
    watcher = PodWatcher(ns, "app.kubernetes.io/instance=w",
                         lambda name, reason: gone.append((name, reason)), api=api)
    try:
        for name in ("w-0", "w-1"):
            kube.core.create_namespaced_pod(ns, bare_pod(name))
        watcher.start()
        # Given a watch that is up (a deletion through it is reported) ...
        poll(lambda: relay.connections >= 1, 20, "the watch connected")
        kube.core.delete_namespaced_pod("w-0", ns, grace_period_seconds=0)
        # (A bound, not a speed target: a watch request the API server ends early is
        # retried with backoff, 0.5 s doubling; a busy machine saw 20 s pass once.)
        poll(lambda: ("w-0", "pod deleted") in gone, 60, "w-0 reported through the watch")
        # ... when the watch goes down and a pod is deleted meanwhile ...
        seen = relay.connections
        relay.cut()
        kube.core.delete_namespaced_pod("w-1", ns, grace_period_seconds=0)
        kube.core.create_namespaced_pod(ns, bare_pod("w-2"))  # newer events after it
        relay.mend()
        poll(lambda: relay.connections > seen, 30, "the watch reconnected")
        # ... then the deletion is reported once it is back.
        poll(lambda: any(n == "w-1" for n, _ in gone), 60,
             f"w-1 (deleted while the watch was down) reported; reported: {gone}")
        assert [n for n, _ in gone].count("w-1") == 1, gone
        assert not any(n == "w-2" for n, _ in gone), gone
    finally:
        watcher.stop()
        relay.cut()  # ends the watch's stream so its thread sees the stop
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
