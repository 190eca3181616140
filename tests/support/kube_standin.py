"""A stand-in for the few Kubernetes API calls TaskAndGo makes (list and watch pods).

Not a Kubernetes API server: no real one can run on these machines. It answers
``GET /api/v1/namespaces/{ns}/pods`` (a PodList) and the same with ``watch=true``
(a stream of JSON watch events) from pods the test defines, so the official
``kubernetes`` client and TaskAndGo's use of it run for real against it.
"""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


def pod(name: str, namespace: str = "default", phase: str = "Running",
        labels: dict[str, str] | None = None, reason: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                         "labels": labels or {"app.kubernetes.io/instance": "taskandgo"}},
            "status": {"phase": phase, **({"reason": reason} if reason else {})}}


class KubeStandIn:
    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.watchers: list[queue.Queue] = []
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                q = parse_qs(url.query)
                parts = url.path.strip("/").split("/")
                if parts[:3] != ["api", "v1", "namespaces"] or parts[4:] != ["pods"]:
                    self.send_error(404)
                    return
                if q.get("watch", ["false"])[0] == "true":
                    self._watch()
                    return
                with standin.lock:
                    items = list(standin.pods.values())
                body = json.dumps({"apiVersion": "v1", "kind": "PodList",
                                   "metadata": {"resourceVersion": "1"},
                                   "items": items}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _watch(self) -> None:
                q: queue.Queue = queue.Queue()
                with standin.lock:
                    standin.watchers.append(q)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    while True:
                        try:
                            ev = q.get(timeout=1.0)
                        except queue.Empty:
                            continue
                        if ev is None:
                            break
                        line = (json.dumps(ev) + "\n").encode()
                        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                finally:
                    with standin.lock:
                        if q in standin.watchers:
                            standin.watchers.remove(q)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def watcher_count(self) -> int:
        with self.lock:
            return len(self.watchers)

    def emit(self, kind: str, p: dict[str, Any]) -> None:
        with self.lock:
            if kind == "DELETED":
                self.pods.pop(p["metadata"]["name"], None)
            else:
                self.pods[p["metadata"]["name"]] = p
            for q in self.watchers:
                q.put({"type": kind, "object": p})

    def close(self) -> None:
        with self.lock:
            for q in self.watchers:
                q.put(None)
        self.server.shutdown()
        self.server.server_close()
