"""A process-level kubelet for the chart tests (root only): it turns the pods that a
real API server holds into real ``taskandgo node`` processes, each in the pod's own
network namespace.

Not the Kubernetes kubelet, and no container runtime: it is what the tests need of
one, named as what it is everywhere (``ProcessKubelet``).

* **Nodes.** It registers ``nodes`` Node objects (Ready, capacity, addresses) and
  renews a Lease per node in ``kube-node-lease`` every :data:`LEASE_RENEW_S`.
* **Scheduling.** There is no kube-scheduler: a Pending pod with no ``nodeName`` is
  bound (``pods/binding``) to the node running the fewest pods, except in namespaces
  the test holds (:meth:`ProcessKubelet.hold`), whose pods stay Pending.
* **Pods.** A pod bound to one of its nodes gets a network namespace (``<prefix>-pK``)
  with a veth ``eth0`` on the run's bridge; the IP is the pod name's (a pod recreated
  under the same name gets the same one, which stands in for the DNS record moving to
  the new pod). Its container runs as ``ip netns exec <ns> unshare --uts python
  process_kubelet.py exec SPEC``: this file, which in the pod's own mount and UTS
  namespaces bind-mounts the pod's volumes at their ``mountPath`` (Secret volumes
  as files with their ``items`` and ``defaultMode``, ``emptyDir``, projected
  service-account tokens from the TokenRequest API, and a directory per
  PersistentVolumeClaim kept under the run's root, so a pod recreated under the same
  claim finds its data again), sets the hostname, and execs the container's
  ``command``/``args`` with its ``env`` (``fieldRef``, ``secretKeyRef``, ``$(VAR)``
  expanded, ``KUBERNETES_SERVICE_HOST``/``PORT`` added). The image is not run: its
  entrypoint ``taskandgo`` is this machine's ``python -m taskandgo`` and its ``ENV``
  (:data:`IMAGE_ENV`) is applied first. The process runs as root (the machine's
  Python lives under /root); the chart's securityContext is checked by the API server
  here and by tests/cluster/test_image.py, which runs the image as uid 10001.
* **DNS.** Every pod namespace's ``/etc/netns/<ns>/hosts`` (which ``ip netns exec``
  mounts over ``/etc/hosts``) carries ``<hostname>.<subdomain>.<namespace>.svc.<domain>``
  for every pod known, rewritten in place when one is added: the headless Service's
  names, which the chart publishes for pods that are not ready too.
* **The kubernetes Service.** 10.0.0.1 (its ClusterIP) is an address on each pod
  namespace's loopback; a relay listening there on 443 connects to the API server on
  the host's loopback (what kube-proxy would do).
* **Probes.** startup and readiness probes, gRPC (``grpc.health.v1``, the probe's
  ``service``) or HTTP, with their periods, timeouts and thresholds, through a relay
  into the pod's namespace. Readiness goes to the pod's ``Ready`` condition.
* **Stopping.** A pod with a deletion timestamp gets SIGTERM; after its grace period
  every process left in its namespace gets SIGKILL; then the pod is deleted for good
  (grace 0, with the pod's uid as precondition). A container that exits on its own
  is started again (``restartPolicy: Always``) and its ``restartCount`` goes up.

Tests reach pods through :meth:`ProcessKubelet.forward` (a loopback listener relayed
into the pod's namespace: a port-forward without the API server's streaming, which
this kubelet does not serve) or through a client namespace on the same bridge
(``client_ns``: tests/support/chart_release.py runs the netns.py agent there; the pods'
DNS names resolve in it).
Not done: liveness probes, resource limits, image pulls, container logs through the
API, exec/attach/port-forward streaming, NetworkPolicy.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import netns

HERE = Path(__file__).resolve().parent
NETNS_ETC = Path("/etc/netns")
LEASE_RENEW_S = 10.0
STATUS_EVERY_S = 20.0
LOOP_PERIOD_S = 0.3
API_SERVICE_IP = "10.0.0.1"
CLUSTER_DOMAIN = "cluster.local"
#: The image's ENV (Dockerfile), applied before the pod's own env.
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp",
             "TASKANDGO_BIND": "0.0.0.0", "TASKANDGO_DATA_DIR": "/data"}
#: The image's ENTRYPOINT ``taskandgo`` on this machine.
ENTRYPOINT = [sys.executable, "-m", "taskandgo"]
WORKDIR = "/data"
CLONE_NEWNET = 0x40000000
#: Patches are strategic merges (conditions merge by type, containers by name); the
#: generated client would otherwise send a dict as a JSON patch.
SMP = "application/strategic-merge-patch+json"

_libc = ctypes.CDLL(None, use_errno=True)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def in_netns(ns: str) -> Any:
    """Run the block's socket calls in network namespace ``ns`` (this thread only:
    setns(2) moves the calling thread; sockets keep the namespace they were made in)."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                # A thread stuck in the pod's namespace must not go on serving.
                os._exit(70)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy a -> b until EOF, then half-close b."""
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)


def _relay(local: socket.socket, remote: socket.socket) -> None:
    t = threading.Thread(target=_pipe, args=(remote, local), daemon=True)
    t.start()
    _pipe(local, remote)
    t.join(timeout=600)
    local.close()
    remote.close()


class Relay:
    """Accepts on ``listener`` and connects each connection with ``connect()``;
    ``log(message)``, when given, hears of each connection's end and length."""

    def __init__(self, listener: socket.socket, connect: Any, name: str,
                 log: Any = None) -> None:
        self.listener = listener
        self.connect = connect
        self.name = name
        self.log = log
        self.closed = False
        self.open = 0  # connections relayed right now
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        t0 = time.monotonic()
        try:
            remote = self.connect()
        except OSError as exc:
            conn.close()
            if self.log:
                self.log(f"{self.name}: connect failed: {exc}")
            return
        # Blocking: a watch may stay idle for minutes.
        remote.settimeout(None)
        self.open += 1
        try:
            _relay(conn, remote)
        finally:
            self.open -= 1
        if self.log:
            self.log(f"{self.name}: connection closed after {time.monotonic() - t0:.1f} s")

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


# ------------------------------------------------------------------------ pod spec


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names replaced, ``$$`` escapes."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


class PodRuntime:
    """One pod's container, from start to the pod's final deletion. A thread per pod:
    starts the process, runs the probes, reports status, stops on deletion."""

    def __init__(self, kubelet: ProcessKubelet, pod: Any) -> None:
        self.k = kubelet
        self.pod = pod
        self.name = pod.metadata.name
        self.namespace = pod.metadata.namespace
        self.uid = pod.metadata.uid
        self.key = f"{self.namespace}/{self.name}"
        self.ns, self.ip = kubelet.pod_net(self.key)
        self.dir = kubelet.root / "pods" / self.uid
        self.log_path = kubelet.root / f"pod_{self.namespace}_{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.ready = False
        self.started = False
        self.stop_grace: float | None = None
        self.gone = threading.Event()   # the pod object was deleted for good
        self.done = threading.Event()
        self._log: Any = None
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    # -------------------------------------------------------------- setup

    def _container(self) -> Any:
        return self.pod.spec.containers[0]

    def _secret(self, name: str) -> dict[str, bytes]:
        s = self.k.core.read_namespaced_secret(name, self.namespace)
        return {k: base64.b64decode(v) for k, v in (s.data or {}).items()}

    def _field(self, path: str) -> str:
        m = self.pod.metadata
        values = {"metadata.name": m.name, "metadata.namespace": m.namespace,
                  "metadata.uid": m.uid, "spec.nodeName": self.pod.spec.node_name or "",
                  "spec.serviceAccountName": self.pod.spec.service_account_name or "",
                  "status.podIP": self.ip, "status.hostIP": "127.0.0.1"}
        if path in values:
            return values[path]
        lm = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if lm:
            return ((getattr(m, lm.group(1)) or {}).get(lm.group(2))) or ""
        raise ValueError(f"fieldRef {path} not supported by the process kubelet")

    def env(self) -> dict[str, str]:
        c = self._container()
        env = {k: v for k, v in os.environ.items()
               if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "PYENV_ROOT")}
        env.update(IMAGE_ENV)
        env["HOSTNAME"] = self.pod.spec.hostname or self.name
        env["KUBERNETES_SERVICE_HOST"] = API_SERVICE_IP
        env["KUBERNETES_SERVICE_PORT"] = "443"
        for e in c.env or []:
            if e.value_from is None:
                env[e.name] = expand(e.value or "", env)
            elif e.value_from.field_ref is not None:
                env[e.name] = self._field(e.value_from.field_ref.field_path)
            elif e.value_from.secret_key_ref is not None:
                ref = e.value_from.secret_key_ref
                env[e.name] = self._secret(ref.name)[ref.key].decode()
            else:
                raise ValueError(f"env {e.name}: valueFrom kind not supported")
        return env

    def argv(self, env: dict[str, str]) -> list[str]:
        c = self._container()
        command = [expand(a, env) for a in (c.command or [])]
        args = [expand(a, env) for a in (c.args or [])]
        if command:
            if command[0] != "taskandgo":
                raise ValueError(f"command {command} is not the image's taskandgo")
            return ENTRYPOINT + command[1:] + args
        return ENTRYPOINT + args

    def _write_volume(self, vol: Any) -> Path:
        d = self.dir / "volumes" / vol.name
        if vol.persistent_volume_claim is not None:
            return self.k.claim_dir(self.namespace, vol.persistent_volume_claim.claim_name)
        d.mkdir(parents=True, exist_ok=True)
        if vol.empty_dir is not None:
            return d
        if vol.secret is not None:
            data = self._secret(vol.secret.secret_name)
            mode = vol.secret.default_mode if vol.secret.default_mode is not None else 0o644
            items = vol.secret.items or [type("I", (), {"key": k, "path": k, "mode": None})()
                                         for k in data]
            for it in items:
                p = d / it.path
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data[it.key])
                p.chmod(it.mode if it.mode is not None else mode)
            return d
        if vol.projected is not None:
            for src in vol.projected.sources or []:
                if src.service_account_token is not None:
                    (d / src.service_account_token.path).write_text(self._token(
                        src.service_account_token.expiration_seconds or 3600))
                elif src.config_map is not None:
                    cm = self.k.core.read_namespaced_config_map(src.config_map.name,
                                                                self.namespace)
                    for it in src.config_map.items or []:
                        (d / it.path).write_text((cm.data or {})[it.key])
                elif src.downward_api is not None:
                    for it in src.downward_api.items or []:
                        (d / it.path).write_text(self._field(it.field_ref.field_path))
            return d
        raise ValueError(f"volume {vol.name}: kind not supported by the process kubelet")

    def _token(self, seconds: int) -> str:
        from kubernetes import client

        req = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=max(600, seconds),
            bound_object_ref=client.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=self.name, uid=self.uid)))
        sa = self.pod.spec.service_account_name or "default"
        res = self.k.core.create_namespaced_service_account_token(sa, self.namespace, req)
        return str(res.status.token)

    def spec_file(self) -> Path:
        """The exec spec: mounts, hostname, argv, env, working dir."""
        vols = {v.name: self._write_volume(v) for v in self.pod.spec.volumes or []}
        mounts = []
        for m in self._container().volume_mounts or []:
            src = vols[m.name]
            if m.sub_path:
                src = src / m.sub_path
            mounts.append({"source": str(src), "target": m.mount_path,
                           "read_only": bool(m.read_only)})
        env = self.env()
        spec = {"mounts": mounts, "hostname": self.pod.spec.hostname or self.name,
                "argv": self.argv(env), "env": env, "cwd": WORKDIR,
                "mountpoints": str(self.k.root / "mountpoints.json")}
        path = self.dir / "exec.json"
        path.write_text(json.dumps(spec, indent=1))
        return path

    # -------------------------------------------------------------- lifecycle

    def start_container(self, spec: Path) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed when it stops
        self._log.write(f"----- {now_iso()} container start (pod uid {self.uid}, "
                        f"restart {self.restarts}) -----\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--mount",
             "--propagation", "private", sys.executable, str(Path(__file__).resolve()),
             "exec", str(spec)],
            stdout=self._log, stderr=self._log, start_new_session=True)
        self.started = False
        self.ready = False
        self.container_started_at = now_iso()

    def _kill_all(self) -> None:
        """SIGKILL every process left in the pod's namespace (the node's warm pool and
        task children too), by pid, with a bounded wait."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = [p for p in netns.netns_pids(self.ns) if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)  # waiting for the kernel to reap, bounded by the deadline
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def terminate(self, grace_s: float) -> float:
        """SIGTERM, up to ``grace_s`` for it to exit, then SIGKILL. Returns how long
        the process took to exit after SIGTERM."""
        t0 = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=max(0.0, grace_s))
            except subprocess.TimeoutExpired:
                self.k.event(f"{self.key}: grace period {grace_s:g} s over; SIGKILL")
        took = time.monotonic() - t0
        self._kill_all()
        if self._log is not None:
            self._log.write(f"----- {now_iso()} container stopped after {took:.1f} s "
                            f"(exit {self.proc.returncode if self.proc else None}) -----\n"
                            .encode())
            self._log.close()
            self._log = None
        return took

    def probe(self, p: Any) -> bool:
        """One probe attempt (gRPC health or HTTP GET), True on success."""
        port_of = {pp.name: pp.container_port for pp in self._container().ports or []}
        timeout = float(p.timeout_seconds or 1)
        if p.grpc is not None:
            port = p.grpc.port
            addr = self.k.forward(self.key, port)
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with grpc.insecure_channel(addr) as ch:
                try:
                    res = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=p.grpc.service or ""),
                        timeout=timeout)
                except grpc.RpcError:
                    return False
                return bool(res.status == health_pb2.HealthCheckResponse.SERVING)
        if p.http_get is not None:
            port = p.http_get.port
            port = port_of.get(port, port) if isinstance(port, str) else port
            addr = self.k.forward(self.key, int(port))
            import http.client

            conn = http.client.HTTPConnection(addr, timeout=timeout)
            try:
                conn.request("GET", p.http_get.path or "/",
                             headers={"Host": f"{self.ip}:{port}",
                                      "User-Agent": "kube-probe/1.37"})
                return 200 <= conn.getresponse().status < 400
            except OSError:
                return False
            finally:
                conn.close()
        raise ValueError("probe kind not supported by the process kubelet")

    def report(self, phase: str = "Running", message: str | None = None) -> None:
        t = now_iso()
        running = self.proc is not None and self.proc.poll() is None
        cond = {"type": "Ready", "status": "True" if self.ready else "False"}
        ready_changed = getattr(self, "_reported_ready", None) != self.ready
        if ready_changed:
            cond["lastTransitionTime"] = t
        cstatus: dict[str, Any] = {
            "name": self._container().name, "image": self._container().image,
            "imageID": "", "ready": self.ready, "started": self.started,
            "restartCount": self.restarts,
            "state": ({"running": {"startedAt": self.container_started_at}} if running
                      else {"waiting": {"reason": "ContainerCreating"}})}
        body = {"status": {
            "phase": phase, "podIP": self.ip, "podIPs": [{"ip": self.ip}],
            "hostIP": "127.0.0.1", "startTime": self.start_time,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {**cond, "type": "ContainersReady"},
                cond],
            "containerStatuses": [cstatus]}}
        if message:
            body["status"]["message"] = message
        try:
            self.k.core.patch_namespaced_pod_status(self.name, self.namespace, body,
                                                    _content_type=SMP)
            self._reported_ready = self.ready
        except Exception as exc:  # noqa: BLE001 - the pod may be gone already
            self.k.event(f"{self.key}: status update failed: {exc}")

    def _run(self) -> None:
        try:
            self._lifecycle()
        except Exception as exc:  # noqa: BLE001 - report and stop this pod only
            self.k.event(f"{self.key}: pod runtime failed: {type(exc).__name__}: {exc}")
            self.terminate(0)
        finally:
            self.done.set()

    def _lifecycle(self) -> None:
        self.start_time = now_iso()
        self.k._uncut(self.key)
        spec = self.spec_file()
        self.k.refresh_hosts()
        self.start_container(spec)
        self.report()
        c = self._container()
        startup, readiness = c.startup_probe, c.readiness_probe
        next_probe = time.monotonic()
        fails = 0
        successes = 0
        backoff = 1.0
        while True:
            if self.gone.is_set() and self.stop_grace is None:
                self.stop_grace = 0.0
            if self.stop_grace is not None:
                took = self.terminate(self.stop_grace)
                self.k.event(f"{self.key}: stopped {took:.1f} s after SIGTERM "
                             f"(grace {self.stop_grace:g} s)")
                if not self.gone.is_set():
                    self.k.finish_delete(self)
                return
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                self.terminate(0)
                self.k.event(f"{self.key}: container exited ({code}); restarting in "
                             f"{backoff:g} s")
                self.ready = False
                self.report()
                if self.k.stopping.wait(backoff):
                    return
                backoff = min(10.0, backoff * 2)
                self.restarts += 1
                self.start_container(spec)
                self.report()
                fails = successes = 0
            now = time.monotonic()
            if now >= next_probe and self.proc is not None and self.proc.poll() is None:
                p = startup if (startup is not None and not self.started) else readiness
                if p is None:
                    self.started = True
                    if not self.ready:
                        self.ready = True
                        self.report()
                    next_probe = now + 1
                else:
                    ok = self.probe(p)
                    if p is startup:
                        if ok:
                            self.started = True
                            next_probe = now  # readiness probes start at once
                            self.report()
                            continue
                        next_probe = now + float(p.period_seconds or 10)
                    else:
                        fails = 0 if ok else fails + 1
                        successes = successes + 1 if ok else 0
                        was = self.ready
                        if ok and successes >= (p.success_threshold or 1):
                            self.ready = True
                        elif fails >= (p.failure_threshold or 3):
                            self.ready = False
                        if was != self.ready:
                            self.report()
                        # While not ready, look again sooner than the period: the
                        # kubelet probes on its period too, but tests should not
                        # pay for that; ready pods are probed on the pod's period.
                        period = float(p.period_seconds or 10)
                        next_probe = now + (period if self.ready else min(period, 1.0))
            self.k.stopping.wait(0.2)


# ------------------------------------------------------------------------ kubelet


class ProcessKubelet:
    """Runs the pods bound to its nodes as processes in network namespaces (see the
    module docstring). ``api_client`` is an admin ``kubernetes.client.ApiClient``;
    ``api_address`` (host, port) the API server on the host's loopback."""

    def __init__(self, root: Path, api_client: Any, api_address: tuple[str, int],
                 nodes: int = 3) -> None:
        from kubernetes import client

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.coord = client.CoordinationV1Api(api_client)
        self.api_address = api_address
        pid = os.getpid()
        existing = netns._netns_list()
        self.prefix = f"pk{pid}"
        if any(ns.startswith(self.prefix + "-") for ns in existing):
            self.prefix = f"pk{pid}{secrets.token_hex(2)}"
        self.subnet = f"10.97.{pid % 254 + 1}"
        self.switch = f"{self.prefix}-sw"
        self.client_ns = f"{self.prefix}-cl"
        self.client_ip = f"{self.subnet}.250"
        self.node_names = [f"{self.prefix}-node-{i}" for i in range(nodes)]
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.pods: dict[str, PodRuntime] = {}           # by uid
        self.nets: dict[str, tuple[str, str]] = {}      # pod key -> (netns, ip)
        self.hostnames: dict[str, str] = {}             # pod key -> FQDN
        self.forwards: dict[tuple[str, int], Relay] = {}
        self.api_relays: dict[str, Relay] = {}           # pod key -> its API relay
        self.events: list[str] = []
        self.held: set[str] = set()                     # namespaces whose pods stay Pending
        self.cut_links: set[str] = set()                # pod keys whose link is down
        self._made_ns: list[str] = []
        self._made_etc: list[Path] = []
        self._made_dirs: list[Path] = []
        self._threads: list[threading.Thread] = []
        print(f"process kubelet {self.prefix}: pods in 10.97.{pid % 254 + 1}.0/24, "
              f"nodes {self.node_names}, dir {self.root}")

    def event(self, msg: str) -> None:
        line = f"{now_iso()} {msg}"
        with self.lock:
            self.events.append(line)
        with open(self.root / "kubelet.log", "a") as f:
            f.write(line + "\n")

    # -------------------------------------------------------------- network

    def _add_ns(self, ns: str) -> None:
        netns.run(["ip", "netns", "add", ns])
        self._made_ns.append(ns)
        netns.run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _etc(self, ns: str) -> None:
        NETNS_ETC.mkdir(parents=True, exist_ok=True)
        d = NETNS_ETC / ns
        d.mkdir(exist_ok=False)
        self._made_etc.append(d)
        (d / "hosts").write_text(self._hosts())
        # Anything not in hosts is looked up at the namespace's own loopback, where
        # nothing answers: no lookup leaves the namespace.
        (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _plug(self, ns: str, port: str, ip: str) -> None:
        netns.run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer",
                   "name", "eth0", "netns", ns])
        netns.run(["ip", "-n", self.switch, "link", "set", port, "master", "br0"])
        netns.run(["ip", "-n", self.switch, "link", "set", port, "up"])
        netns.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        netns.run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def _hosts(self) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        with self.lock:
            for key, (_, ip) in sorted(self.nets.items()):
                fqdn = self.hostnames.get(key)
                short = key.split("/", 1)[1]
                lines.append(f"{ip}\t{fqdn} {short}" if fqdn else f"{ip}\t{short}")
        return "\n".join(lines) + "\n"

    def refresh_hosts(self) -> None:
        """Rewrite every namespace's hosts file in place (same inode: the running
        processes' bind-mounted /etc/hosts sees the new names)."""
        text = self._hosts()
        for d in list(self._made_etc):
            with open(d / "hosts", "r+") as f:
                f.truncate(0)
                f.write(text)

    def pod_net(self, key: str) -> tuple[str, str]:
        """The pod's network namespace and IP, made on first use and kept for the
        pod name (a pod recreated under the same name gets them again)."""
        with self.lock:
            if key in self.nets:
                return self.nets[key]
            k = len(self.nets) + 1
            if k > 200:
                raise RuntimeError("more than 200 pod names in one run")
            ns, ip = f"{self.prefix}-p{k}", f"{self.subnet}.{k}"
            self._add_ns(ns)
            self._etc(ns)
            self._plug(ns, f"v{k}", ip)
            # The kubernetes Service's ClusterIP, relayed to the API server.
            netns.run(["ip", "-n", ns, "addr", "add", f"{API_SERVICE_IP}/32", "dev", "lo"])
            with in_netns(ns):
                lsock = socket.socket()
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind((API_SERVICE_IP, 443))
                lsock.listen(16)
            self.api_relays[key] = Relay(lsock, lambda: socket.create_connection(
                self.api_address, timeout=10), f"{key} -> kubernetes API", self.event)
            self.nets[key] = (ns, ip)
            return ns, ip

    def cut(self, key: str) -> None:
        """Take the pod's link to the bridge down, as if its node dropped off the network:
        its peers see silence, not closed connections. A new pod of that name gets the
        link back."""
        with self.lock:
            ns, _ = self.nets[key]
            self.cut_links.add(key)
        netns.run(["ip", "-n", self.switch, "link", "set", f"v{ns.rsplit('-p', 1)[1]}", "down"])

    def _uncut(self, key: str) -> None:
        with self.lock:
            if key not in self.cut_links:
                return
            self.cut_links.discard(key)
            ns, _ = self.nets[key]
        netns.run(["ip", "-n", self.switch, "link", "set", f"v{ns.rsplit('-p', 1)[1]}", "up"])

    def forward(self, key: str, port: int) -> str:
        """``127.0.0.1:N`` on the host, relayed to the pod's ``port`` (made once per
        pod name and port; it follows the pod across restarts)."""
        with self.lock:
            relay = self.forwards.get((key, port))
            if relay is None:
                ns, ip = self.pod_net(key)

                def connect() -> socket.socket:
                    with in_netns(ns):
                        sock = socket.create_connection((ip, port), timeout=5)
                    sock.settimeout(None)  # a gRPC stream may stay idle
                    return sock

                lsock = socket.socket()
                lsock.bind(("127.0.0.1", 0))
                lsock.listen(32)
                relay = Relay(lsock, connect, f"fwd-{key}-{port}")
                self.forwards[(key, port)] = relay
            return f"127.0.0.1:{relay.listener.getsockname()[1]}"

    def api_connections(self, key: str) -> int:
        """How many connections the pod has open to the API server right now (a
        watch is one)."""
        with self.lock:
            relay = self.api_relays.get(key)
        return relay.open if relay is not None else 0

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The PersistentVolumeClaim's data: a directory kept for the whole run."""
        d = self.root / "claims" / namespace / claim
        d.mkdir(parents=True, exist_ok=True)
        return d

    def client_cli(self, env: dict[str, str], *args: str,
                   timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """``taskandgo ARGS`` (the real CLI) inside the client namespace."""
        return subprocess.run(["ip", "netns", "exec", self.client_ns, sys.executable, "-m",
                               "taskandgo", *args], capture_output=True, text=True,
                              timeout=timeout_s, env=env, start_new_session=True, check=False)

    # -------------------------------------------------------------- nodes

    def _node_body(self, name: str) -> dict[str, Any]:
        t = now_iso()
        return {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                     "topology.kubernetes.io/zone": f"zone-{name[-1]}"}},
            "status": {
                "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110",
                             "ephemeral-storage": "100Gi"},
                "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110",
                                "ephemeral-storage": "100Gi"},
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                              {"type": "Hostname", "address": name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "process kubelet is posting ready status",
                                "lastHeartbeatTime": t, "lastTransitionTime": t}],
                "nodeInfo": {"kubeletVersion": "v1.37.2-process-kubelet",
                             "kubeProxyVersion": "", "operatingSystem": "linux",
                             "architecture": "amd64", "containerRuntimeVersion": "process://1",
                             "kernelVersion": os.uname().release, "osImage": "process kubelet",
                             "machineID": "", "systemUUID": "", "bootID": ""}}}

    def register_nodes(self) -> None:
        for name in self.node_names:
            body = self._node_body(name)
            self.core.create_node(body)
            self.core.patch_node_status(name, {"status": body["status"]}, _content_type=SMP)
        self._renew_leases()

    def _renew_leases(self) -> None:
        from kubernetes.client.exceptions import ApiException

        t = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for name in self.node_names:
            body = {"metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                             "renewTime": t}}
            try:
                self.coord.patch_namespaced_lease(name, "kube-node-lease", body,
                                                  _content_type="application/merge-patch+json")
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.coord.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(LEASE_RENEW_S):
            try:
                self._renew_leases()
                if time.monotonic() - last_status > STATUS_EVERY_S:
                    for name in self.node_names:
                        self.core.patch_node_status(
                            name, {"status": {"conditions": self._node_body(name)["status"]
                                              ["conditions"]}}, _content_type=SMP)
                    last_status = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - keep beating
                self.event(f"node heartbeat failed: {exc}")

    # -------------------------------------------------------------- pods

    def _bind(self, pod: Any, load: dict[str, int]) -> None:
        """Bind ``pod`` to the node running the fewest pods (``load``, updated)."""
        from kubernetes import client

        node = min(self.node_names, key=lambda n: (load[n], n))
        load[node] += 1
        body = client.V1Binding(metadata=client.V1ObjectMeta(name=pod.metadata.name),
                                target=client.V1ObjectReference(kind="Node", name=node))
        from kubernetes.client.exceptions import ApiException

        try:
            # The generated client fails to read the Binding it gets back: skip that.
            self.core.create_namespaced_pod_binding(pod.metadata.name, pod.metadata.namespace,
                                                    body, _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:  # bound already, or deleted meanwhile
                return
            raise
        self.event(f"{pod.metadata.namespace}/{pod.metadata.name}: bound to {node}")

    def finish_delete(self, rt: PodRuntime) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_pod(
                rt.name, rt.namespace, grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0,
                                            preconditions=client.V1Preconditions(uid=rt.uid)))
        except ApiException as exc:
            if exc.status not in (404, 409):
                self.event(f"{rt.key}: final delete failed: {exc.status} {exc.reason}")

    def _sync(self) -> None:
        pods = self.core.list_pod_for_all_namespaces().items
        seen = set()
        load = dict.fromkeys(self.node_names, 0)
        for pod in pods:
            if pod.spec.node_name in load:
                load[pod.spec.node_name] += 1
        for pod in pods:
            uid = pod.metadata.uid
            seen.add(uid)
            node = pod.spec.node_name
            if not node:
                if pod.metadata.namespace in self.held:
                    continue
                if pod.metadata.deletion_timestamp is None and \
                        (pod.spec.scheduler_name or "default-scheduler") == "default-scheduler":
                    self._bind(pod, load)
                continue
            if node not in self.node_names:
                continue
            with self.lock:
                rt = self.pods.get(uid)
            if rt is None:
                if pod.metadata.deletion_timestamp is not None:
                    self._delete_unstarted(pod)
                    continue
                key = f"{pod.metadata.namespace}/{pod.metadata.name}"
                # One container per pod name at a time: the old one must be gone.
                with self.lock:
                    older = [r for r in self.pods.values() if r.key == key]
                if any(not r.done.is_set() for r in older):
                    continue
                with self.lock:
                    for r in older:
                        self.pods.pop(r.uid, None)
                    if pod.spec.hostname and pod.spec.subdomain:
                        self.hostnames[key] = (f"{pod.spec.hostname}.{pod.spec.subdomain}."
                                               f"{pod.metadata.namespace}.svc.{CLUSTER_DOMAIN}")
                rt = PodRuntime(self, pod)
                with self.lock:
                    self.pods[uid] = rt
                rt.thread.start()
                self.event(f"{key}: starting on {node} in {rt.ns} ({rt.ip}), uid {uid}")
            elif pod.metadata.deletion_timestamp is not None and rt.stop_grace is None:
                rt.stop_grace = float(pod.metadata.deletion_grace_period_seconds or 0)
                self.event(f"{rt.key}: deletion requested, SIGTERM with grace "
                           f"{rt.stop_grace:g} s")
        with self.lock:
            for uid, rt in list(self.pods.items()):
                if uid not in seen and not rt.gone.is_set():
                    rt.gone.set()
                    self.event(f"{rt.key}: pod object gone; stopping its container")

    def _delete_unstarted(self, pod: Any) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.
                                            V1Preconditions(uid=pod.metadata.uid)))

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._sync()
            except Exception as exc:  # noqa: BLE001 - the API may be briefly away
                self.event(f"sync failed: {type(exc).__name__}: {exc}")
            self.stopping.wait(LOOP_PERIOD_S)

    # -------------------------------------------------------------- run / stop

    def start(self) -> ProcessKubelet:
        self._add_ns(self.switch)
        netns.run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        netns.run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        self._add_ns(self.client_ns)
        self._etc(self.client_ns)
        self._plug(self.client_ns, "vcl", self.client_ip)
        self.register_nodes()
        for target, name in ((self._heartbeat, "kubelet-heartbeat"), (self._loop, "kubelet")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def hold(self, namespace: str) -> None:
        """Leave the pods of ``namespace`` unbound (Pending), as a cluster with no node
        that fits them would: for tests that check what the API server accepts and the
        controllers create, without running the pods."""
        with self.lock:
            self.held.add(namespace)

    def release_hold(self, namespace: str) -> None:
        """Bind and run the pods of ``namespace`` again."""
        with self.lock:
            self.held.discard(namespace)

    def running(self) -> dict[str, PodRuntime]:
        """Live pod runtimes by pod key (namespace/name)."""
        with self.lock:
            return {rt.key: rt for rt in self.pods.values() if not rt.done.is_set()}

    def logs(self, tail: int = 6000) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.root.glob("*.log")))

    def stop(self) -> list[str]:
        """Stop every pod's processes (SIGKILL: the plane is going away), the relays,
        and remove the namespaces and /etc/netns entries. Returns problems."""
        problems: list[str] = []
        self.stopping.set()
        for t in self._threads:
            t.join(timeout=15)
        with self.lock:
            runtimes = list(self.pods.values())
        for rt in runtimes:
            rt.gone.set()
        for rt in runtimes:
            rt.done.wait(timeout=20)
            if not rt.done.is_set():
                problems.append(f"{rt.key}: runtime did not stop")
        for ns in list(self._made_ns):
            left = [p for p in netns.netns_pids(ns) if p != os.getpid()]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for relay in [*self.forwards.values(), *self.api_relays.values()]:
            relay.close()
        for ns in reversed(self._made_ns):
            try:
                netns.run(["ip", "netns", "del", ns])
                self._made_ns.remove(ns)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"ip netns del {ns}: {exc}")
        for d in self._made_etc:
            shutil.rmtree(d, ignore_errors=True)
        mp = self.root / "mountpoints.json"
        if mp.exists():
            for p in sorted(json.loads(mp.read_text()), key=len, reverse=True):
                with contextlib.suppress(OSError):
                    Path(p).rmdir()  # only the empty mount points made for the pods
        still = sorted(ns for ns in netns._netns_list() if ns.startswith(self.prefix + "-"))
        if still:
            problems.append(f"namespaces still present: {still}")
        return problems


# ------------------------------------------------------------------------ exec


def exec_main(spec_path: str) -> int:
    """Inside the pod's network, mount and UTS namespaces: mount the volumes, set the
    hostname, exec the container's process (replacing this one: same pid)."""
    import fcntl

    spec = json.loads(Path(spec_path).read_text())
    made = []
    # Open every source (and the kubelet's record of mount points) first: a later
    # mount (an emptyDir over /tmp) may hide the path of an earlier one's source.
    fds = [os.open(m["source"], os.O_PATH) for m in spec["mounts"]]
    record = open(spec["mountpoints"], "a+")  # noqa: SIM115 - closed below
    for m, fd in zip(spec["mounts"], fds):
        target = Path(m["target"])
        if not target.exists():
            # The mount point must exist in the host's tree (the mount itself stays in
            # this namespace); it and each parent made for it are recorded so the
            # kubelet removes them when empty.
            missing = [p for p in [target, *target.parents] if not p.exists()]
            target.mkdir(parents=True, exist_ok=True)
            made += [str(p) for p in missing]
        subprocess.run(["mount", "--bind", f"/proc/self/fd/{fd}", str(target)], check=True,
                       timeout=10, pass_fds=(fd,))
        if m["read_only"]:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True,
                           timeout=10)
    for fd in fds:
        os.close(fd)
    with record:
        if made:
            fcntl.flock(record, fcntl.LOCK_EX)
            record.seek(0)
            old = json.loads(record.read() or "[]")
            record.seek(0)
            record.truncate()
            record.write(json.dumps(sorted(set(old) | set(made))))
    socket.sethostname(spec["hostname"])
    os.chdir(spec["cwd"] if Path(spec["cwd"]).is_dir() else "/")
    os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    return 127


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "exec":
        raise SystemExit(exec_main(sys.argv[2]))
    raise SystemExit("usage: process_kubelet.py exec SPEC.json (run by the process kubelet)")
