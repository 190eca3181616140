"""The project's image, built for real with podman, run as StatefulSet "pods" (root only).

Helpers for ``tests/cluster/test_image.py``. Nothing here is pulled from a container
registry (there is none to pull from): the base image is a Debian bookworm rootfs
made with ``debootstrap`` and imported into podman once (cached under its name,
``localhost/tag-debian-python`` unless ``TASKANDGO_TEST_BASE`` names another), the
project's wheels are built on the host with ``pip wheel``, and the repository's
``Dockerfile`` is built with ``podman build --pull=never --network none``.

Podman runs with its own ``containers.conf`` (named by ``CONTAINERS_CONF``): runc,
low ulimits, no network by default. Podman's bridge network is never used (it
writes NAT rules into the host's namespace).

The "pods" are containers joined to network namespaces this module makes, all
named ``<prefix>-...`` with a prefix unique to the run:

* ``<prefix>-sw``: the switch, holding the bridge ``br0``;
* ``<prefix>-p0`` .. ``-p2``: one per pod, a veth ``eth0`` at ``10.9X.Y.(i+1)/24``
  whose peer sits on the bridge (X, Y picked per run, unused by any namespace);
* ``<prefix>-cl``: a client namespace on the same bridge (``10.9X.Y.100``).

Every link is created with ``ip -n`` inside those namespaces: the host's own
namespace gets no link, address, route or firewall rule. Each namespace also gets
an nft table that drops anything it sends outside loopback and the run's /24, so
no traffic can leave the namespaces the run made.

The pods get what the chart gives them: ``helm template`` of ``chart/`` (release
``taskandgo``, namespace ``default``) supplies the container's environment,
arguments, security context, mounts and the Secret's values; only when no helm is
available a static copy of the default rendering is used (and says so). A pod is
``podman run --network ns:/run/netns/<prefix>-pI --hostname <pod> --add-host
<pod>.<headless>.<namespace>.svc.cluster.local:<ip> ...``, its data dir a host
directory bind-mounted at ``/data`` (the "volume claim": a new container of the
same pod gets it back), the Secret a read-only bind mount, the root filesystem
read-only, the user the chart's non-root uid.

Clients run in the client namespace: ``ip netns exec <prefix>-cl python -m
taskandgo ...`` (with ``/etc/netns/<prefix>-cl/hosts`` giving the pods' DNS names),
or this file as a script (``call``), answering one :class:`taskandgo.Client` call
as JSON.

Run as a script: ``python image_pods.py call '<json request>'`` (see :func:`_call_main`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fnmatch
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_BASE = "localhost/tag-debian-python-bwrap"  # bubblewrap: the task sandbox
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
SUITE = "bookworm"
DEBOOTSTRAP_INCLUDE = "python3,python3-venv,python3-pip,ca-certificates,bubblewrap"
CLIENT_HOST = 100

#: executable -> Debian package (the tools the test needs).
TOOLS = {"podman": "podman", "buildah": "buildah", "runc": "runc",
         "debootstrap": "debootstrap", "nft": "nftables"}

CONTAINERS_CONF = """\
# Written by tests/support/image_pods.py for one test run.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
netns = "none"
[engine]
runtime = "runc"
"""

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(RuntimeError):
    pass


def run(argv: list[str], *, timeout_s: float = 60.0, check: bool = True,
        env: dict[str, str] | None = None, cwd: str | Path | None = None,
        input: str | None = None, stdin: Any = None) -> subprocess.CompletedProcess:
    """Run a command with a deadline; raise CommandError with its output on failure."""
    try:
        res = subprocess.run(argv, input=input, stdin=stdin, capture_output=True, text=True,
                             timeout=timeout_s, env=env, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stderr or b"")[-3000:]
        raise CommandError(f"{' '.join(argv[:6])} ...: no answer in {timeout_s} s; "
                           f"stderr: {out!r}") from None
    if check and res.returncode != 0:
        raise CommandError(f"{' '.join(argv)} failed ({res.returncode}):\n"
                           f"{(res.stderr or '')[-3000:]}{(res.stdout or '')[-2000:]}")
    return res


def which(exe: str) -> str | None:
    return shutil.which(exe, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)


class Phases:
    """Times named phases; prints each as it ends and a summary at the end."""

    def __init__(self, tag: str = "image") -> None:
        self.tag = tag
        self.times: list[tuple[str, float]] = []
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        print(f"[{self.tag}] {name} ...", flush=True)
        try:
            yield
        finally:
            self.add(name, time.monotonic() - start)

    def add(self, name: str, seconds: float) -> None:
        self.times.append((name, seconds))
        print(f"[{self.tag}] {name}: {seconds:.1f} s", flush=True)

    def summary(self) -> str:
        rows = [f"  {name:44} {s:6.1f} s" for name, s in self.times]
        rows.append(f"  {'total (wall clock)':44} {time.monotonic() - self.t0:6.1f} s")
        return "\n".join([f"[{self.tag}] phase timings:"] + rows)


# ----------------------------------------------------------------------------- tools


def ensure_tools() -> str | None:
    """Install the missing tools with apt-get; returns why not (a skip reason) or None."""
    missing = sorted({pkg for exe, pkg in TOOLS.items() if which(exe) is None})
    if not missing:
        return None
    apt = which("apt-get")
    if apt is None:
        return f"needs {', '.join(missing)} and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SBIN_PATH}
    cmd = [apt, "install", "-y", *missing]
    res = run(cmd, timeout_s=900, check=False, env=env)
    if res.returncode != 0:
        run([apt, "update"], timeout_s=600, check=False, env=env)
        res = run(cmd, timeout_s=900, check=False, env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return f"apt-get install -y {' '.join(missing)} failed: {' / '.join(tail)}"
    still = [exe for exe in TOOLS if which(exe) is None]
    if still:
        return f"apt-get installed {' '.join(missing)} but {', '.join(still)} is still missing"
    return None


def podman_env(conf_dir: Path) -> dict[str, str]:
    conf = conf_dir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf),
            "PATH": os.environ.get("PATH", "") + os.pathsep + SBIN_PATH}


def debian_mirror() -> str:
    """The bookworm mirror from apt's sources (deb822 first, then one-line style)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.is_file():
        for block in re.split(r"\n\s*\n", deb822.read_text()):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if SUITE in fields.get("suites", "").split() and "deb" in fields.get("types", "deb"):
                return fields["uris"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        if path.is_file():
            for line in path.read_text().splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                    return parts[1]
    raise CommandError(f"no {SUITE} mirror in /etc/apt/sources.list.d/debian.sources "
                       "or /etc/apt/sources.list")


# ----------------------------------------------------------------------------- safe rmtree


def _mounts_under(path: Path) -> list[str]:
    root = str(path.resolve())
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == root or mnt.startswith(root + "/"):
                out.append(mnt)
    return out


def remove_tree(path: Path) -> None:
    """rm -rf, after unmounting whatever a killed debootstrap may have left mounted
    under it (proc, sys, dev): never delete through a mount."""
    if not path.exists():
        return
    for mnt in sorted(_mounts_under(path), key=len, reverse=True):
        run(["umount", "-l", mnt], check=False, timeout_s=30)
    left = _mounts_under(path)
    if left:
        raise CommandError(f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path)


# ----------------------------------------------------------------------------- base image


@contextlib.contextmanager
def file_lock(name: str, timeout_s: float) -> Iterator[None]:
    """An flock shared by every run on this machine (two runs must not both build
    the same base); waits at most timeout_s."""
    import fcntl

    lock_dir = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
    path = lock_dir / f"taskandgo-test-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
    with open(path, "w") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise CommandError(f"{path} stayed locked for {timeout_s} s") from None
                time.sleep(0.5)  # another run holds the lock: poll, bounded by the deadline
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def image_exists(name: str, env: dict[str, str]) -> bool:
    return run(["podman", "image", "exists", name], env=env, check=False,
               timeout_s=60).returncode == 0


def base_python(name: str, env: dict[str, str]) -> tuple[int, int]:
    """The base's Python version; fails unless it has venv and pip (what the
    Dockerfile uses)."""
    res = run(["podman", "run", "--rm", "--network", "none", name, "python3", "-c",
               "import sys, venv, ensurepip, pip; print('%d %d' % sys.version_info[:2])"],
              env=env, timeout_s=120)
    major, minor = res.stdout.split()
    return int(major), int(minor)


def ensure_base(name: str, work: Path, env: dict[str, str],
                log: Callable[[str], None] = print) -> tuple[tuple[int, int], bool]:
    """Reuse the base image `name` if podman has it, else make it: debootstrap a
    minbase bookworm with python3/venv/pip into work/rootfs and ``podman import``
    it. Returns (its Python version, whether it was built now)."""
    with file_lock("base-" + name, timeout_s=900):
        built = False
        if not image_exists(name, env):
            mirror = debian_mirror()
            rootfs = work / "rootfs"
            try:
                t0 = time.monotonic()
                res = run(["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_INCLUDE}",
                           SUITE, str(rootfs), mirror], env=env, timeout_s=900, check=False)
                (work / "debootstrap.log").write_text(res.stdout + res.stderr)
                if res.returncode != 0:
                    raise CommandError(f"debootstrap failed ({res.returncode}):\n"
                                       f"{(res.stdout + res.stderr)[-3000:]}")
                log(f"[image]   debootstrap {SUITE} from {mirror}: {time.monotonic() - t0:.1f} s")
                # The .debs debootstrap downloaded are not part of the image.
                for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                    deb.unlink()
                t0 = time.monotonic()
                tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                                       stdout=subprocess.PIPE)
                try:
                    assert tar.stdout is not None
                    message = (f"debootstrap {SUITE} minbase + {DEBOOTSTRAP_INCLUDE} "
                               "(tests/support/image_pods.py)")
                    run(["podman", "import", "--message", message, "-", name],
                        env=env, timeout_s=600, stdin=tar.stdout)
                finally:
                    if tar.stdout is not None:
                        tar.stdout.close()
                    if tar.wait(timeout=60) != 0:
                        raise CommandError(f"tar of {rootfs} failed")
                log(f"[image]   podman import {name}: {time.monotonic() - t0:.1f} s")
                built = True
            finally:
                remove_tree(rootfs)
        return base_python(name, env), built


# ----------------------------------------------------------------------------- build


def make_context(ctx: Path) -> None:
    """A build context holding what the repository's .dockerignore lets in (its
    allow-list: the sources `pip wheel .` needs) plus the Dockerfile, so that
    neither `pip wheel` nor the build writes into the working tree."""
    ctx.mkdir(parents=True)
    shutil.copy2(REPO / "Dockerfile", ctx / "Dockerfile")
    ignore_file = REPO / ".dockerignore"
    skip = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info", "build", "dist")
    allowed: list[str] = []
    if ignore_file.is_file():
        shutil.copy2(ignore_file, ctx / ".dockerignore")
        allowed = [line[1:].strip().rstrip("/") for line in ignore_file.read_text().splitlines()
                   if line.startswith("!")]
    else:
        allowed = [p.name for p in REPO.iterdir()
                   if p.name not in (".git", "wheelhouse") and not p.name.startswith(".")]
    for pattern in allowed:
        for src in REPO.glob(pattern):
            if src.name == "wheelhouse" or fnmatch.fnmatch(src.name, "*.egg-info"):
                continue
            if src.is_dir():
                shutil.copytree(src, ctx / src.relative_to(REPO), ignore=skip)
            elif src.is_file():
                shutil.copy2(src, ctx / src.relative_to(REPO))


def build_wheels(ctx: Path) -> list[str]:
    """``pip wheel -w wheelhouse .`` in the context (the project and every
    dependency, as the Dockerfile's offline path expects)."""
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "-w", str(ctx / "wheelhouse"), "."], cwd=ctx, timeout_s=900)
    wheels = sorted(p.name for p in (ctx / "wheelhouse").glob("*.whl"))
    if not any(w.startswith("taskandgo-") for w in wheels):
        raise CommandError(f"pip wheel made no taskandgo wheel: {wheels}")
    return wheels


def build_image(ctx: Path, base: str, tag: str, env: dict[str, str]) -> dict[str, Any]:
    """podman build of the repository's Dockerfile, offline; returns the image's config
    (with its HEALTHCHECK, which podman keeps beside the config, under "Healthcheck")."""
    res = run(["podman", "build", "--format", "docker", "--pull=never", "--network", "none",
               "--layers=false", "--build-arg", f"BASE={base}", "-t", tag,
               "-f", str(ctx / "Dockerfile"), str(ctx)], env=env, timeout_s=900, check=False)
    (ctx.parent / "podman-build.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise CommandError(f"podman build failed ({res.returncode}):\n"
                           f"{(res.stdout + res.stderr)[-4000:]}")
    info = json.loads(run(["podman", "image", "inspect", tag], env=env).stdout)[0]
    config = dict(info.get("Config") or {})
    config["Healthcheck"] = info.get("Healthcheck") or config.get("Healthcheck") or {}
    return config


# ----------------------------------------------------------------------------- chart


def _static_pod_template() -> dict[str, Any]:
    """What `helm template taskandgo chart --namespace default` renders (defaults),
    for machines without helm."""
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    env += [{"name": k, "value": v} for k, v in [
        ("TASKANDGO_HEADLESS_SERVICE", "taskandgo-headless"), ("TASKANDGO_VOTER_COUNT", "3"),
        ("TASKANDGO_BIND", "0.0.0.0"), ("TASKANDGO_GRPC_PORT", "7000"),
        ("TASKANDGO_RAFT_PORT", "7100"), ("TASKANDGO_HTTP_PORT", "8080"),
        ("TASKANDGO_DATA_DIR", "/data"), ("TASKANDGO_SLOTS", "4"),
        ("SCHEDULER_STRATEGY", "split"), ("TASKANDGO_LEASE_S", "3"),
        ("TASKANDGO_GRACE_S", "50"),
        ("TASKANDGO_RAFT_PASSWORD_FILE", "/etc/taskandgo/secret/raft-password"),
        ("TASKANDGO_API_TOKEN_FILE", "/etc/taskandgo/secret/api-token")]]
    return {
        "source": "static copy of the chart's default rendering (no helm here)",
        "sts": "taskandgo", "headless": "taskandgo-headless", "namespace": "default",
        "voters": 3, "args": ["node"], "env": env,
        "ports": {"grpc": 7000, "raft": 7100, "http": 8080},
        "container_sc": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                         "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "pod_sc": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                   "runAsNonRoot": True},
        "mounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"},
                   {"name": "secret", "mountPath": "/etc/taskandgo/secret", "readOnly": True}],
        "secret_items": {"raft-password": "raft-password", "api-token": "api-token"},
        "secret": {"raft-password": secrets.token_urlsafe(30),
                   "api-token": secrets.token_urlsafe(30)},
        "grace_period_s": 60,
    }


def chart_pod_template(release: str = "taskandgo", namespace: str = "default") -> dict[str, Any]:
    """The StatefulSet's pod as the chart renders it (helm template), reduced to
    what a podman container needs."""
    try:
        import helm_tool
        import yaml

        helm = helm_tool.helm_path()
    except Exception as exc:  # noqa: BLE001 - any reason to have no helm: use the copy
        tmpl = _static_pod_template()
        tmpl["source"] += f" [{type(exc).__name__}: {exc}]"
        return tmpl
    out = run([helm, "template", release, str(REPO / "chart"), "--namespace", namespace],
              timeout_s=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    secret_doc = next(d for d in docs if d["kind"] == "Secret")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = c.get("env", [])
    voters = next((int(e["value"]) for e in env if e["name"] == "TASKANDGO_VOTER_COUNT"), 3)
    data = {k: base64.b64decode(v).decode() for k, v in (secret_doc.get("data") or {}).items()}
    data.update(secret_doc.get("stringData") or {})
    secret_vol = next(v for v in pod["volumes"] if v["name"] == "secret")
    items = {it["path"]: it["key"] for it in secret_vol["secret"].get("items", [])} \
        or {k: k for k in data}
    return {
        "source": f"helm template {release} chart --namespace {namespace} ({helm})",
        "sts": sts["metadata"]["name"], "headless": sts["spec"]["serviceName"],
        "namespace": namespace, "voters": voters, "args": c.get("args", []), "env": env,
        "ports": {p["name"]: p["containerPort"] for p in c.get("ports", [])},
        "container_sc": c.get("securityContext", {}), "pod_sc": pod.get("securityContext", {}),
        "mounts": c.get("volumeMounts", []), "secret_items": items, "secret": data,
        "grace_period_s": pod.get("terminationGracePeriodSeconds", 30),
    }


def pod_env(tmpl: dict[str, Any], pod: str) -> dict[str, str]:
    """The container's environment for one pod: fieldRefs filled in as the kubelet
    does, $(VAR) references expanded."""
    fields = {"metadata.name": pod, "metadata.namespace": tmpl["namespace"],
              "spec.nodeName": "image-test-host"}
    out: dict[str, str] = {}
    for e in tmpl["env"]:
        if "value" in e:
            value = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)),
                           str(e["value"]))
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            # A label the pod does not carry is "" (as the kubelet makes it).
            value = "" if path.startswith("metadata.labels[") else fields[path]
        else:
            raise ValueError(f"env {e['name']}: unsupported source {e.get('valueFrom')}")
        out[e["name"]] = value
    return out


# ----------------------------------------------------------------------------- network


def netns_list() -> set[str]:
    res = run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}


def used_subnets() -> set[str]:
    """/24s (as 'a.b.c') holding an IPv4 address in any network namespace or the host."""
    used = set()
    for ns in [None, *sorted(netns_list())]:
        argv = ["ip", "-o", "-4", "addr", "show"] if ns is None else \
            ["ip", "-n", ns, "-o", "-4", "addr", "show"]
        res = run(argv, check=False, timeout_s=10)
        for m in re.finditer(r"inet (\d+\.\d+\.\d+)\.\d+/", res.stdout):
            used.add(m.group(1))
    return used


class PodNet:
    """A switch namespace with a bridge, one namespace per pod and one for clients."""

    def __init__(self, prefix: str, n: int, names: list[str]) -> None:
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.pod_ns = [f"{prefix}-p{i}" for i in range(n)]
        self.client_ns = f"{prefix}-cl"
        used = used_subnets()
        free = [f"10.9{x}.{y}" for x in range(9) for y in range(256)
                if f"10.9{x}.{y}" not in used]
        self.net = random.choice(free)  # 10.90-98.*: 10.99.* is the other netns test's
        self.ips = [f"{self.net}.{i + 1}" for i in range(n)]
        self.client_ip = f"{self.net}.{CLIENT_HOST}"
        self.names = names  # the pods' DNS names, by index
        self.made: list[str] = []

    def all_ns(self) -> list[str]:
        return [self.switch, *self.pod_ns, self.client_ns]

    def hosts(self) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        for ip, name in zip(self.ips, self.names):
            short = name.split(".")
            lines.append(f"{ip}\t{name} {short[0]}.{short[1]} {short[0]}")
        return "\n".join(lines) + "\n"

    def create(self) -> None:
        ip = ["ip", "-n"]
        for ns in self.all_ns():
            run(["ip", "netns", "add", ns])
            self.made.append(ns)
            run(ip + [ns, "link", "set", "lo", "up"])
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self.hosts())
            # No resolver outside the namespace: names come from the hosts file.
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        run(ip + [self.switch, "link", "add", "br0", "type", "bridge"])
        run(ip + [self.switch, "link", "set", "br0", "up"])
        ends = list(zip(self.pod_ns, self.ips)) + [(self.client_ns, self.client_ip)]
        for i, (ns, addr) in enumerate(ends):
            run(ip + [ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                      "netns", self.switch])
            run(ip + [self.switch, "link", "set", f"p{i}", "master", "br0", "up"])
            run(ip + [ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
            run(ip + [ns, "link", "set", "eth0", "up"])
            self.guard(ns)

    def guard(self, ns: str) -> None:
        """Nothing leaves the namespace except to loopback or the run's /24."""
        rules = (f"table inet tgi_guard {{\n"
                 f"  chain out {{\n"
                 f"    type filter hook output priority 0; policy accept;\n"
                 f"    oifname \"lo\" accept\n"
                 f"    ip daddr {self.net}.0/24 accept\n"
                 f"    counter drop\n"
                 f"  }}\n"
                 f"}}\n")
        run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules)

    def isolate(self, i: int) -> None:
        """Cut pod i off the bridge (its loopback keeps working)."""
        rules = ("table inet tgi_cut {\n"
                 "  chain in { type filter hook input priority -10; policy accept; "
                 "iifname \"eth0\" drop; }\n"
                 "  chain out { type filter hook output priority -10; policy accept; "
                 "oifname \"eth0\" drop; }\n"
                 "}\n")
        run(["ip", "netns", "exec", self.pod_ns[i], "nft", "-f", "-"], input=rules)

    def rejoin(self, i: int) -> None:
        run(["ip", "netns", "exec", self.pod_ns[i], "nft", "delete", "table", "inet", "tgi_cut"])

    def teardown(self) -> list[str]:
        """Delete every namespace (their links, bridge and nft tables go with them) and
        /etc/netns entry; returns what could not be removed."""
        problems = []
        for ns in self.all_ns():
            if ns in netns_list():
                res = run(["ip", "netns", "del", ns], check=False)
                if res.returncode != 0:
                    problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
            etc = NETNS_ETC / ns
            if etc.exists():
                shutil.rmtree(etc, ignore_errors=True)
        if NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()
        left = [ns for ns in netns_list() if ns.startswith(self.prefix + "-")]
        left += [str(p) for p in NETNS_ETC.glob(self.prefix + "-*")] if NETNS_ETC.is_dir() else []
        return problems + [f"left behind: {x}" for x in left]


# ----------------------------------------------------------------------------- pods


class Pods:
    """The StatefulSet's pods as podman containers in the run's namespaces."""

    def __init__(self, prefix: str, image: str, net: PodNet, tmpl: dict[str, Any], root: Path,
                 env: dict[str, str], n: int = 3) -> None:
        self.prefix, self.image, self.net, self.tmpl = prefix, image, net, tmpl
        self.root, self.env, self.n = root, env, n
        self.created: set[str] = set()
        self.logs_dir = root / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        sc = {**tmpl["pod_sc"], **{k: v for k, v in tmpl["container_sc"].items()
                                    if k in ("runAsUser", "runAsGroup")}}
        self.uid = int(sc.get("runAsUser", 10001))
        self.gid = int(sc.get("runAsGroup", self.uid))
        self.fs_group = int(sc.get("fsGroup", self.gid))
        self.secret_dir = root / "secret"
        self._write_secret()
        for i in range(n):
            d = self.data_dir(i)
            d.mkdir(parents=True)
            os.chown(d, self.uid, self.fs_group)  # what fsGroup does to a fresh claim
            d.chmod(0o2770)

    # names
    def pod(self, i: int) -> str:
        return f"{self.tmpl['sts']}-{i}"

    def fqdn(self, i: int) -> str:
        return f"{self.pod(i)}.{self.tmpl['headless']}.{self.tmpl['namespace']}.svc.cluster.local"

    def addr(self, i: int) -> str:
        return f"{self.fqdn(i)}:{self.tmpl['ports'].get('grpc', 7000)}"

    def container(self, i: int) -> str:
        return f"{self.prefix}-{self.pod(i)}"

    def data_dir(self, i: int) -> Path:
        return self.root / "volumes" / f"data-{self.pod(i)}"

    def _write_secret(self) -> None:
        """The Secret's items as files, mode 0440, group fsGroup (defaultMode + fsGroup)."""
        self.secret_dir.mkdir(parents=True)
        for path, key in self.tmpl["secret_items"].items():
            f = self.secret_dir / path
            f.write_text(self.tmpl["secret"][key])
            os.chown(f, 0, self.fs_group)
            f.chmod(0o440)
        os.chown(self.secret_dir, 0, self.fs_group)
        self.secret_dir.chmod(0o750)

    @property
    def token(self) -> str:
        items = dict(self.tmpl["secret_items"])
        key = items.get("api-token", "api-token")
        return self.tmpl["secret"].get(key, "")

    def podman(self, *args: str, timeout_s: float = 60.0, check: bool = True
               ) -> subprocess.CompletedProcess:
        return run(["podman", *args], env=self.env, timeout_s=timeout_s, check=check)

    def run_argv(self, i: int) -> list[str]:
        csc, psc = self.tmpl["container_sc"], self.tmpl["pod_sc"]
        argv = ["podman", "run", "--detach", "--name", self.container(i),
                "--network", f"ns:{NETNS_RUN / self.net.pod_ns[i]}",
                "--hostname", self.pod(i), "--dns", "127.0.0.1",
                "--user", f"{self.uid}:{self.gid}", "--group-add", str(self.fs_group),
                # The kubelet runs no healthcheck timers (and there is no systemd here):
                # the test runs the image's HEALTHCHECK command itself.
                "--no-healthcheck",
                "--label", f"taskandgo-test={self.prefix}"]
        for j in range(self.n):
            argv += ["--add-host", f"{self.fqdn(j)}:{self.net.ips[j]}"]
        if csc.get("readOnlyRootFilesystem"):
            argv += ["--read-only", "--read-only-tmpfs=false"]
        if "ALL" in (csc.get("capabilities") or {}).get("drop", []):
            argv += ["--cap-drop", "ALL"]
        for cap in (csc.get("capabilities") or {}).get("add", []):
            argv += ["--cap-add", cap]
        if csc.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        if (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")) and self.uid == 0:
            raise ValueError("the chart asks for runAsNonRoot but gives uid 0")
        for m in self.tmpl["mounts"]:
            path = m["mountPath"]
            if m["name"] == "data":
                argv += ["-v", f"{self.data_dir(i)}:{path}"]
            elif m["name"] == "secret":
                argv += ["-v", f"{self.secret_dir}:{path}:ro"]
            elif m["name"] == "tmp":
                argv += ["--tmpfs", f"{path}:rw,mode=1777,size=1g"]
            else:
                raise ValueError(f"volume mount {m['name']} has no stand-in here")
        for k, v in pod_env(self.tmpl, self.pod(i)).items():
            argv += ["--env", f"{k}={v}"]
        return argv + [self.image, *self.tmpl["args"]]

    def start(self, i: int) -> None:
        self.created.add(self.container(i))
        run(self.run_argv(i), env=self.env, timeout_s=120)

    def state(self, i: int) -> dict[str, Any]:
        out = self.podman("inspect", "--type", "container", self.container(i)).stdout
        return json.loads(out)[0]["State"]

    def kill(self, i: int) -> None:
        """SIGKILL, like a node dying (podman kill's default signal)."""
        self.podman("kill", "--signal", "KILL", self.container(i))
        self.podman("wait", self.container(i), timeout_s=30)

    def stop(self, i: int, timeout_s: int) -> int:
        """SIGTERM, then SIGKILL after timeout_s (a pod deletion); returns the exit code."""
        self.podman("stop", "--time", str(timeout_s), self.container(i),
                    timeout_s=timeout_s + 30)
        return int(self.state(i)["ExitCode"])

    def remove(self, i: int) -> None:
        self.save_logs(i)
        self.podman("rm", "--force", "--time", "0", self.container(i))

    def exec(self, i: int, *argv: str, timeout_s: float = 30.0, check: bool = True
             ) -> subprocess.CompletedProcess:
        return self.podman("exec", "--env", "TASKANDGO_TOKEN_FILE=/etc/taskandgo/secret/"
                           + next((p for p, k in self.tmpl["secret_items"].items()
                                   if k == "api-token"), "api-token"),
                           self.container(i), *argv, timeout_s=timeout_s, check=check)

    def save_logs(self, i: int) -> None:
        res = self.podman("logs", self.container(i), check=False, timeout_s=30)
        if res.returncode == 0:
            with open(self.logs_dir / f"{self.pod(i)}.log", "a") as f:
                f.write(f"===== container {self.container(i)} =====\n{res.stdout}{res.stderr}")

    def logs(self) -> str:
        out = []
        for i in range(self.n):
            path = self.logs_dir / f"{self.pod(i)}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            res = self.podman("logs", self.container(i), check=False, timeout_s=30)
            if res.returncode == 0:
                text += (f"===== container {self.container(i)} (current) =====\n"
                         f"{res.stdout}{res.stderr}")
            out.append(f"----- {self.pod(i)} -----\n{text[-8000:]}")
        return "\n".join(out)

    def teardown(self) -> list[str]:
        """Remove every container this run made (by name and by label)."""
        names = set(self.created)
        res = self.podman("ps", "-a", "--filter", f"label=taskandgo-test={self.prefix}",
                          "--format", "{{.Names}}", check=False)
        names |= set(res.stdout.split())
        for i in range(self.n):
            if self.container(i) in names:
                self.save_logs(i)
        if names:
            # One command: podman stops them in parallel (SIGTERM, SIGKILL after 2 s).
            self.podman("rm", "--force", "--time", "2", "--ignore", *sorted(names),
                        check=False, timeout_s=120)
        res = self.podman("ps", "-a", "--filter", f"label=taskandgo-test={self.prefix}",
                          "--format", "{{.Names}}", check=False)
        return [f"container left behind: {n}" for n in res.stdout.split()]


# ----------------------------------------------------------------------------- clients


class TaskAndGoCallError(RuntimeError):
    pass


class ClientNS:
    """Runs clients inside the client namespace (the test process stays outside)."""

    def __init__(self, ns: str, token: str) -> None:
        self.ns = ns
        self.env = {**os.environ, "TASKANDGO_TOKEN": token,
                    "PATH": os.environ.get("PATH", "") + os.pathsep + SBIN_PATH}

    def cli(self, *args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
        """``python -m taskandgo ARGS`` in the client namespace (not checked)."""
        return run(["ip", "netns", "exec", self.ns, sys.executable, "-m", "taskandgo", *args],
                   env=self.env, timeout_s=timeout_s, check=False)

    def call(self, nodes: list[str], op: str, *args: Any, follow_leader: bool = True,
             timeout_s: float = 5.0, **kwargs: Any) -> Any:
        """One Client call through the given nodes; TaskAndGoError on an error answer."""
        from taskandgo.node.client import TaskAndGoError

        req = {"nodes": nodes, "op": op, "args": list(args), "kwargs": kwargs,
               "follow_leader": follow_leader, "timeout_s": timeout_s}
        res = run(["ip", "netns", "exec", self.ns, sys.executable, str(Path(__file__).resolve()),
                   "call", json.dumps(req)], env=self.env, timeout_s=timeout_s + 30)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        if "error" in out:
            raise TaskAndGoError(out["error"], out["message"])
        return out["result"]


CALL_OPS = {"submit_many", "get", "list", "wait", "node_status", "cluster_status", "get_many"}


def _call_main(request_json: str) -> int:
    """``{"nodes": [...], "op": ..., "args": [...], "kwargs": {...}, "follow_leader": bool,
    "timeout_s": s}`` -> prints ``{"result": ...}`` or ``{"error": code, "message": ...}``.
    ``submit_many`` takes task_spec keyword dicts; ``get_many`` gets each id in turn and
    answers None for an unknown one."""
    from taskandgo.node.client import Client, TaskAndGoError, task_spec

    req = json.loads(request_json)
    op = req["op"]
    if op not in CALL_OPS:
        raise SystemExit(f"unknown op {op!r}")
    args, kwargs = req.get("args", []), req.get("kwargs", {})
    try:
        with Client(req["nodes"], timeout_s=req.get("timeout_s", 5.0),
                    follow_leader=req.get("follow_leader", True)) as c:
            if op == "submit_many":
                result: Any = c.submit_many([task_spec(**kw) for kw in args[0]])
            elif op == "get_many":
                result = {}
                for tid in args[0]:
                    try:
                        result[tid] = c.get(tid)
                    except TaskAndGoError as exc:
                        if exc.code != "NOT_FOUND":
                            raise
                        result[tid] = None
            elif op == "node_status":
                result = c.node_status(*args, **kwargs)
            else:
                result = getattr(c, op)(*args, **kwargs)
        print(json.dumps({"result": result}))
    except TaskAndGoError as exc:
        print(json.dumps({"error": exc.code, "message": exc.message}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "call":
        raise SystemExit(_call_main(sys.argv[2]))
    raise SystemExit(f"usage: {sys.argv[0]} call '<json request>'")
