"""Node configuration: command-line flags, ``TASKANDGO_*`` environment variables,
and discovery from a Kubernetes StatefulSet identity.

Precedence: flag > environment variable > StatefulSet discovery > default.
Secrets (the Raft password, API tokens) are read from the environment or from a
file, never from a flag, so they do not show in ``ps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from taskandgo.node.security import ExecPolicy, TokenAuth, parse_cert_names
from taskandgo.strategies import STRATEGIES

DEFAULT_GRPC_PORT = 7000
DEFAULT_RAFT_PORT = 7100
DEFAULT_HTTP_PORT = 8080


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names it."""


@dataclass(frozen=True)
class Voter:
    """A Raft member: where to reach its gRPC API and its Raft port."""

    host: str
    grpc_port: int
    raft_port: int

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def raft(self) -> str:
        return f"{self.host}:{self.raft_port}"


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    bind: str
    advertise: str
    grpc_port: int
    raft_port: int
    http_port: int
    voters: tuple[Voter, ...]
    data_dir: str
    slots: int
    strategy: str = "split"
    raft_password: str | None = None
    lease_s: float = 3.0
    heartbeat_s: float = 0.3
    default_timeout_s: float = 3600.0
    retention_s: float = 24 * 3600.0
    max_finished: int = 100_000
    output_limit: int = 64 * 1024
    #: Full output kept on disk per unit (stdout and stderr together) and for all
    #: units together, oldest evicted first; 0 keeps none (node/outputs.py).
    keep_output_bytes: int = 16 * 1024 * 1024
    keep_output_total: int = 1024 * 1024 * 1024
    default_runner: str = "echo"
    interpreters: dict[str, list[str]] = field(default_factory=dict)
    election_min_s: float = 0.3
    election_max_s: float = 0.6
    append_entries_s: float = 0.005
    snapshot_interval_s: float = 600.0
    #: "always": acknowledge only what is fsync'd; "never": PySyncObj's page cache only.
    fsync: str = "always"
    kube_api: bool = False
    namespace: str = "default"
    pod_selector: str = ""
    auth: TokenAuth = field(default_factory=TokenAuth)
    policy: ExecPolicy = field(default_factory=ExecPolicy)
    rate_limit: float = 0.0
    max_queued: int = 1_000_000
    prefetch: int = 128
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_client_auth: bool = False
    #: Extra names the HTTP server answers to besides its own (see
    #: :func:`parse_allowed_hosts`); ``("*",)`` answers any Host.
    http_allowed_hosts: tuple[str, ...] = ()
    #: Subprocess task sandbox: "auto" (bubblewrap when it works, else run as today
    #: and say so), "require" (refuse to start without it) or "off".
    sandbox: str = "auto"
    #: Whether sandboxed tasks keep the network (False: a private, empty one).
    sandbox_network: bool = True
    #: The bubblewrap program (a name looked up on PATH, or a path).
    bwrap: str = "bwrap"
    #: Files this node read secrets from (hidden from sandboxed tasks).
    secret_files: tuple[str, ...] = ()
    #: Peer calls per second each peer may make (token bucket, bursts of twice that;
    #: 0 = off) and the most worker entries the leader keeps (see docs/security.md,
    #: "Peer identity").
    peer_rate_limit: float = 1000.0
    max_workers: int = 1000
    #: What this node offers units, overriding what it reads (see node/placement.py):
    #: ``cpu`` cores and ``memory`` bytes (absent: the container's cgroup limits, else
    #: the machine's), named resources such as ``gpu`` (absent: none).
    offer: dict[str, float] = field(default_factory=dict)
    #: Node labels units may require or prefer (``zone``, ``node``, ...).
    node_labels: dict[str, str] = field(default_factory=dict)
    #: With mTLS: names a peer's client certificate must carry (empty: any
    #: certificate the CA signed, plus the peer credential).
    peer_cert_names: tuple[str, ...] = ()
    #: Long-lived streams (gRPC WatchTasks, the HTTP event stream) one client address
    #: may hold open, and all clients together, per protocol (see node/streams.py).
    max_streams_per_client: int = 8
    max_streams: int = 32
    #: gRPC server threads for unary and peer calls; the pool has max_streams more,
    #: so open streams can never take these.
    grpc_threads: int = 32
    #: Blocking waits (gRPC WaitTasks, HTTP /api/v1/wait) one client address may
    #: have open, and all clients together, per protocol (see node/streams.py).
    max_waits_per_client: int = 8
    max_waits: int = 16
    #: Seconds an HTTP client has to send a request's headers and body (408 after).
    http_request_timeout_s: float = 10.0

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def grpc_address(self) -> str:
        return f"{self.advertise}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"{self.advertise}:{self.http_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.advertise}:{self.raft_port}"

    @property
    def self_voter(self) -> Voter | None:
        for v in self.voters:
            if v.host == self.advertise and v.grpc_port == self.grpc_port:
                return v
        return None

    @property
    def is_voter(self) -> bool:
        return self.self_voter is not None


def parse_voters(text: str) -> tuple[Voter, ...]:
    """``host:grpc_port:raft_port`` entries, comma separated (``host:grpc`` implies
    the Raft port is grpc + 100)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.rsplit(":", 2)
        try:
            if len(parts) == 3:
                voter = Voter(parts[0], int(parts[1]), int(parts[2]))
            elif len(parts) == 2:
                voter = Voter(parts[0], int(parts[1]), int(parts[1]) + 100)
            else:
                raise ValueError(item)
            if not (voter.host and 0 < voter.grpc_port <= 65535
                    and 0 < voter.raft_port <= 65535):
                raise ValueError(item)
            out.append(voter)
        except ValueError:
            raise ConfigError(
                f"--voters / TASKANDGO_VOTERS: bad entry {item!r}; "
                "expected host:grpc_port:raft_port, ports 1..65535") from None
    return tuple(out)


def statefulset_voters(pod_name: str, service: str, namespace: str, count: int,
                       grpc_port: int, raft_port: int) -> tuple[Voter, ...]:
    """Voters of a StatefulSet: ordinals 0..count-1 at their stable DNS names."""
    m = re.fullmatch(r"(.+)-(\d+)", pod_name)
    if not m:
        raise ConfigError(f"POD_NAME {pod_name!r} has no StatefulSet ordinal")
    sts = m.group(1)
    return tuple(
        Voter(f"{sts}-{i}.{service}.{namespace}.svc.cluster.local", grpc_port, raft_port)
        for i in range(count))


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOSTNAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?")


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``--http-allowed-hosts``: comma-separated entries, each ``*`` (any Host), a
    name (``tasks.example.com``), ``.example.com`` (that name and every name under
    it), an IP address or an IP network (``10.96.0.0/12``). Returned normalised:
    lower case, no trailing dot, no IPv6 brackets. Ports are not part of an entry:
    the Host check is about names (DNS rebinding), whatever port a proxy uses."""
    out = []
    for item in (x.strip().lower() for x in text.split(",")):
        if not item:
            continue
        entry = item[1:-1] if item.startswith("[") and item.endswith("]") else item
        if entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                entry = entry.rstrip(".")
                name = entry.removeprefix(".")
                if not _HOSTNAME_RE.fullmatch(name) or ".." in name:
                    raise ConfigError(
                        f"--http-allowed-hosts / TASKANDGO_HTTP_ALLOWED_HOSTS: bad entry "
                        f"{item!r}; expected *, a host name, .domain, an IP address or "
                        "network (no port)") from None
        out.append(entry)
    return tuple(out)


#: Environment variables that hold secret values the node reads (or that a client
#: would use). :func:`scrub_secret_env` drops them once the configuration is built,
#: so nothing the node starts later inherits them. It cannot wipe them from
#: ``/proc/<pid>/environ`` (the kernel shows the environment the process was
#: started with): that is why the node also makes itself undumpable, and why
#: secrets belong in files (``*_FILE``), as the Helm chart passes them.
SECRET_ENV = ("TASKANDGO_RAFT_PASSWORD", "TASKANDGO_API_TOKEN", "TASKANDGO_API_TOKENS",
              "TASKANDGO_TOKEN")


def scrub_secret_env(environ: MutableMapping[str, str]) -> list[str]:
    """Remove the secret variables (:data:`SECRET_ENV`, and any other
    ``TASKANDGO_*_TOKEN``/``_TOKENS``/``_PASSWORD``) from ``environ``; returns the
    names removed. ``*_FILE`` variables (paths, not secrets) stay."""
    names = [k for k in list(environ) if k in SECRET_ENV or (
        k.startswith("TASKANDGO_") and k.endswith(("_TOKEN", "_TOKENS", "_PASSWORD")))]
    for k in names:
        del environ[k]
    return sorted(names)


SANDBOX_MODES = ("auto", "require", "off")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _read_secret(env: dict[str, str], name: str) -> str | None:
    value = env.get(name)
    path = env.get(name + "_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {exc}") from None
    return value or None


_T = TypeVar("_T")
_D = TypeVar("_D")


def _pick(flag: Any, env: dict[str, str], name: str, default: _D,
          cast: Callable[[str], _T]) -> _T | _D:
    """The command-line flag when given (argparse has already cast it), else the environment
    variable `name` through `cast`, else `default`. A variable `cast` refuses is a ConfigError."""
    if flag is not None:
        return flag
    if env.get(name, "") != "":
        try:
            return cast(env[name])
        except ValueError:
            kind = getattr(cast, "__name__", "value")
            raise ConfigError(f"{name}={env[name]!r} is not a valid {kind}") from None
    return default


_N = TypeVar("_N", int, float)


def check_range(value: _N, where: str, lo: float | None = None, hi: float | None = None,
                above: bool = False) -> _N:
    """``value`` if it is a finite number within ``lo``..``hi`` (``above``: strictly
    greater than ``lo``); else a ConfigError naming ``where`` (the flag and its
    variable) and the range expected."""
    want = " and ".join(filter(None, (
        "" if lo is None else f"{'>' if above else '>='} {lo:g}",
        "" if hi is None else f"<= {hi:g}")))
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number (expected {want})")
    if (lo is not None and (value <= lo if above else value < lo)) \
            or (hi is not None and value > hi):
        raise ConfigError(f"{where}: {value!r} is out of range (expected {want})")
    return value


def _num(flag_value: Any, env: dict[str, str], name: str, default: _N,
         cast: Callable[[str], _N], flag: str, lo: float | None = None,
         hi: float | None = None, above: bool = False) -> _N:
    """A numeric setting: the flag, else the variable ``name``, else the default
    (as :func:`_pick`), checked by :func:`check_range`; errors name both."""
    where = f"{flag} / {name}" if flag else name
    if flag_value is None and env.get(name, "") != "":
        try:
            flag_value = cast(env[name])
        except ValueError:
            raise ConfigError(f"{where}: {env[name]!r} is not a valid "
                              f"{getattr(cast, '__name__', 'number')}") from None
    value = cast(flag_value) if flag_value is not None else default
    return check_range(value, where, lo, hi, above)


#: For other commands' settings (``taskandgo node --grace``).
number_setting = _num

#: The largest number most count settings take: a bound against typos, not a tuning.
MAX_COUNT = 10**9
#: The longest duration a setting takes, in seconds (about 100 years).
MAX_SECONDS = 3.2e9


def config_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> NodeConfig:
    env = dict(os.environ if env is None else env)
    bind = str(_pick(args.bind, env, "TASKANDGO_BIND", "127.0.0.1", str))
    grpc_port = _num(args.grpc_port, env, "TASKANDGO_GRPC_PORT", DEFAULT_GRPC_PORT, int,
                     "--grpc-port", 1, 65535)
    raft_port = _num(args.raft_port, env, "TASKANDGO_RAFT_PORT", DEFAULT_RAFT_PORT, int,
                     "--raft-port", 1, 65535)
    http_port = _num(args.http_port, env, "TASKANDGO_HTTP_PORT", DEFAULT_HTTP_PORT, int,
                     "--http-port", 1, 65535)

    pod = env.get("POD_NAME", "")
    service = env.get("TASKANDGO_HEADLESS_SERVICE", "")
    namespace = env.get("POD_NAMESPACE", env.get("TASKANDGO_NAMESPACE", "default"))
    voters_text = _pick(args.voters, env, "TASKANDGO_VOTERS", "", str)
    advertise = _pick(args.advertise, env, "TASKANDGO_ADVERTISE", None, str)
    if pod and service and not advertise:
        advertise = f"{pod}.{service}.{namespace}.svc.cluster.local"
    if not advertise:
        advertise = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
    if voters_text:
        voters = parse_voters(str(voters_text))
    elif pod and service:
        count = _num(None, env, "TASKANDGO_VOTER_COUNT", 3, int, "", 1, 1000)
        voters = statefulset_voters(pod, service, namespace, count, grpc_port, raft_port)
    else:
        voters = (Voter(str(advertise), grpc_port, raft_port),)

    strategy = str(_pick(args.strategy, env, "SCHEDULER_STRATEGY",
                         env.get("TASKANDGO_STRATEGY") or "split", str)).strip().lower()
    if strategy not in STRATEGIES:
        raise ConfigError(f"SCHEDULER_STRATEGY={strategy!r}: expected split or batch")

    interpreters: dict[str, list[str]] = {}
    specs = list(args.interpreter or [])
    specs += [s for s in env.get("TASKANDGO_INTERPRETERS", "").split(";") if s.strip()]
    for item in specs:
        prefix, _, cmd = item.partition("=")
        if not prefix.strip() or not cmd.strip():
            raise ConfigError(f"--interpreter {item!r}: expected PREFIX=COMMAND")
        interpreters[prefix.strip()] = cmd.split()

    secret_files = tuple(str(env[k]) for k in (
        "TASKANDGO_RAFT_PASSWORD_FILE", "TASKANDGO_API_TOKENS_FILE", "TASKANDGO_API_TOKEN_FILE",
        "TASKANDGO_TLS_KEY") if env.get(k))
    password = _read_secret(env, "TASKANDGO_RAFT_PASSWORD")
    if not is_loopback(bind) and not password:
        raise ConfigError(
            f"--bind {bind} is not a loopback address and no Raft password is set: "
            "set TASKANDGO_RAFT_PASSWORD or TASKANDGO_RAFT_PASSWORD_FILE (peers exchange "
            "pickled data, so an open Raft port runs anyone's code)")

    slots = _num(args.slots, env, "TASKANDGO_SLOTS", 4, int, "--slots", 1, 100_000)
    cfg = NodeConfig(
        node_id=str(_pick(args.node_id, env, "TASKANDGO_NODE_ID", pod or socket.gethostname(),
                          str)),
        bind=bind,
        advertise=str(advertise),
        grpc_port=grpc_port,
        raft_port=raft_port,
        http_port=http_port,
        voters=voters,
        data_dir=str(_pick(args.data_dir, env, "TASKANDGO_DATA_DIR", "taskandgo-data", str)),
        slots=slots,
        strategy=strategy,
        raft_password=password,
        lease_s=_num(args.lease_s, env, "TASKANDGO_LEASE_S", 3.0, float, "--lease", 0,
                     MAX_SECONDS, above=True),
        default_runner=str(_pick(args.default_runner, env, "TASKANDGO_DEFAULT_RUNNER", "echo",
                                 str)),
        interpreters=interpreters,
        retention_s=_num(args.retention_s, env, "TASKANDGO_RETENTION_S", 86400.0, float,
                         "--retention", 0, MAX_SECONDS, above=True),
        max_finished=_num(args.max_finished, env, "TASKANDGO_MAX_FINISHED", 100_000, int,
                          "--max-finished", 1, MAX_COUNT),
        # The head of every result is in the replicated state: a bound well under a
        # Raft entry's and a gRPC message's size.
        output_limit=_num(getattr(args, "output_limit", None), env, "TASKANDGO_OUTPUT_LIMIT",
                          64 * 1024, int, "--output-limit", 1, 4 * 1024 * 1024),
        keep_output_bytes=_num(getattr(args, "keep_output_bytes", None), env,
                               "TASKANDGO_KEEP_OUTPUT_BYTES", 16 * 1024 * 1024, int,
                               "--keep-output-bytes", 0, 2**50),
        keep_output_total=_num(getattr(args, "keep_output_total", None), env,
                               "TASKANDGO_KEEP_OUTPUT_TOTAL", 1024 * 1024 * 1024, int,
                               "--keep-output-total", 0, 2**50),
    )
    election = str(_pick(getattr(args, "election_timeout", None), env,
                         "TASKANDGO_ELECTION_TIMEOUT", "0.3-0.6", str))
    try:
        lo, hi = (float(x) for x in election.split("-", 1))
    except ValueError:
        raise ConfigError(f"--election-timeout / TASKANDGO_ELECTION_TIMEOUT {election!r}: "
                          "expected MIN-MAX seconds") from None
    for bound in (lo, hi):
        check_range(bound, "--election-timeout / TASKANDGO_ELECTION_TIMEOUT", 0, 3600,
                    above=True)
    append_s = _num(getattr(args, "append_entries_s", None), env, "TASKANDGO_APPEND_ENTRIES_S",
                    0.005, float, "--append-entries-period", 0, 3600, above=True)
    if not 0 < append_s < lo <= hi:
        raise ConfigError("--election-timeout / --append-entries-period: need "
                          "0 < append-entries period < election MIN <= MAX")
    snapshot_s = _num(getattr(args, "snapshot_interval_s", None), env,
                      "TASKANDGO_SNAPSHOT_INTERVAL_S", 600.0, float, "--snapshot-interval", 1.0,
                      MAX_SECONDS)
    fsync = str(_pick(getattr(args, "fsync", None), env, "TASKANDGO_FSYNC", "always",
                      str)).strip().lower()
    if fsync not in ("always", "never"):
        raise ConfigError(f"--fsync / TASKANDGO_FSYNC={fsync!r}: expected always or never")
    kube_api = _truthy(env.get("TASKANDGO_KUBERNETES_API"))
    tokens = "\n".join(filter(None, [env.get("TASKANDGO_API_TOKEN"),
                                     _read_secret(env, "TASKANDGO_API_TOKENS")]))
    token_file = env.get("TASKANDGO_API_TOKEN_FILE")
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                tokens += "\n" + f.read()
        except OSError as exc:
            raise ConfigError(
                f"TASKANDGO_API_TOKEN_FILE: cannot read {token_file}: {exc}") from None
    auth = TokenAuth.from_text(tokens, open_read_only=env.get(
        "TASKANDGO_AUTH_READ_ONLY", "open").strip().lower() != "token")
    try:
        policy = ExecPolicy.parse(
            _pick(getattr(args, "allow", None), env, "TASKANDGO_ALLOW", "", str),
            _pick(getattr(args, "allow_calls", None), env, "TASKANDGO_ALLOW_CALLS", "", str))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    tls = {k: _pick(getattr(args, f"tls_{k}", None), env, f"TASKANDGO_TLS_{k.upper()}", None, str)
           for k in ("cert", "key", "ca")}
    for k, path in tls.items():
        if path and not os.path.isfile(str(path)):
            raise ConfigError(f"--tls-{k} / TASKANDGO_TLS_{k.upper()}: no such file {path}")
    if bool(tls["cert"]) != bool(tls["key"]):
        raise ConfigError("--tls-cert and --tls-key go together")
    client_auth = getattr(args, "tls_client_auth", None) or _truthy(
        env.get("TASKANDGO_TLS_CLIENT_AUTH"))
    if client_auth and not (tls["ca"] and tls["cert"]):
        raise ConfigError("--tls-client-auth needs --tls-cert, --tls-key and --tls-ca")
    cfg = dataclasses.replace(
        cfg, election_min_s=lo, election_max_s=hi, append_entries_s=append_s,
        snapshot_interval_s=snapshot_s, fsync=fsync, kube_api=kube_api, namespace=namespace,
        pod_selector=env.get("TASKANDGO_POD_SELECTOR", ""),
        auth=auth, policy=policy,
        rate_limit=_num(getattr(args, "rate_limit", None), env, "TASKANDGO_RATE_LIMIT", 0.0,
                        float, "--rate-limit", 0, 1e9),
        max_queued=_num(getattr(args, "max_queued", None), env, "TASKANDGO_MAX_QUEUED",
                        1_000_000, int, "--max-queued", 1, MAX_COUNT),
        prefetch=_num(getattr(args, "prefetch", None), env, "TASKANDGO_PREFETCH", 128, int,
                      "--prefetch", 0, 1_000_000),
        tls_cert=tls["cert"], tls_key=tls["key"], tls_ca=tls["ca"],
        tls_client_auth=bool(client_auth),
        http_allowed_hosts=parse_allowed_hosts(str(_pick(
            getattr(args, "http_allowed_hosts", None), env, "TASKANDGO_HTTP_ALLOWED_HOSTS",
            "", str))))
    # Each is a thread or an open connection at most: bounded so a typo cannot
    # ask for a million threads.
    streams = {name: _num(getattr(args, name, None), env, f"TASKANDGO_{name.upper()}",
                          default, int, "--" + name.replace("_", "-"), 1, 10_000)
               for name, default in (("max_streams", 32), ("max_streams_per_client", 8),
                                     ("grpc_threads", 32), ("max_waits", 16),
                                     ("max_waits_per_client", 8))}
    cfg = dataclasses.replace(
        cfg, max_streams=streams["max_streams"],
        max_streams_per_client=streams["max_streams_per_client"],
        grpc_threads=streams["grpc_threads"], max_waits=streams["max_waits"],
        max_waits_per_client=streams["max_waits_per_client"])
    request_timeout_s = _num(getattr(args, "http_request_timeout_s", None), env,
                             "TASKANDGO_HTTP_REQUEST_TIMEOUT_S", 10.0, float,
                             "--http-request-timeout", 0, 3600, above=True)
    cfg = dataclasses.replace(cfg, http_request_timeout_s=request_timeout_s)
    try:
        peer_cert_names = parse_cert_names(str(_pick(
            getattr(args, "peer_cert_names", None), env, "TASKANDGO_PEER_CERT_NAMES", "", str)))
    except ValueError as exc:
        raise ConfigError(f"--peer-cert-names / TASKANDGO_PEER_CERT_NAMES: {exc}") from None
    if peer_cert_names and not cfg.tls_client_auth:
        raise ConfigError("--peer-cert-names needs --tls-client-auth (peers' certificates are "
                          "verified only under mTLS)")
    cfg = dataclasses.replace(
        cfg, peer_cert_names=peer_cert_names,
        peer_rate_limit=_num(getattr(args, "peer_rate_limit", None), env,
                             "TASKANDGO_PEER_RATE_LIMIT", 1000.0, float, "--peer-rate-limit", 0,
                             1e9),
        max_workers=_num(getattr(args, "max_workers", None), env, "TASKANDGO_MAX_WORKERS",
                         1000, int, "--max-workers", 1, 1_000_000))
    sandbox = str(_pick(getattr(args, "sandbox", None), env, "TASKANDGO_SANDBOX", "auto",
                        str)).strip().lower()
    if sandbox not in SANDBOX_MODES:
        raise ConfigError(f"--sandbox / TASKANDGO_SANDBOX={sandbox!r}: expected auto, require "
                          "or off")
    net = str(_pick(getattr(args, "sandbox_network", None), env, "TASKANDGO_SANDBOX_NETWORK",
                    "on", str)).strip().lower()
    if net not in ("on", "off"):
        raise ConfigError(f"--sandbox-network / TASKANDGO_SANDBOX_NETWORK={net!r}: expected "
                          "on or off")
    tls_key = (str(cfg.tls_key),) if cfg.tls_key else ()
    cfg = dataclasses.replace(
        cfg, sandbox=sandbox, sandbox_network=net == "on",
        bwrap=str(_pick(None, env, "TASKANDGO_BWRAP", "bwrap", str)),
        secret_files=tuple(dict.fromkeys(secret_files + tls_key)))
    cfg = dataclasses.replace(cfg, **_placement(args, env))
    if cfg.lease_s <= 3 * cfg.heartbeat_s:
        raise ConfigError("--lease / TASKANDGO_LEASE_S must exceed 3 heartbeats (0.9 s)")
    return cfg


def _placement(args: argparse.Namespace, env: MutableMapping[str, str]) -> dict[str, Any]:
    """``offer`` and ``node_labels`` from --cpu, --memory, --resource NAME=N (each
    repeatable), --node-label K=V, or TASKANDGO_CPU, TASKANDGO_MEMORY,
    TASKANDGO_RESOURCES (``gpu=1,fpga=2``), TASKANDGO_NODE_LABELS (``zone=a,...``;
    in Kubernetes the chart fills it from the pod's node through the downward API).
    A flag replaces its variable. A label with an empty value is no label (a
    downward API field the pod does not have comes through empty)."""
    from taskandgo.node.placement import check_labels, check_resources, parse_quantity
    from taskandgo.node.tasks import InvalidTask

    def pick(flag: Any, name: str) -> Any:
        if flag not in (None, [], ""):
            return ",".join(flag) if isinstance(flag, list) else flag
        return env.get(name) or None

    try:
        offer = check_resources(pick(getattr(args, "resources", None), "TASKANDGO_RESOURCES"),
                                "--resource / TASKANDGO_RESOURCES")
        for name, flag in (("cpu", "--cpu"), ("memory", "--memory")):
            raw = pick(getattr(args, f"offer_{name}", None), f"TASKANDGO_{name.upper()}")
            if raw is not None:
                offer[name] = parse_quantity(raw, f"{flag} / TASKANDGO_{name.upper()}")
        labels = check_labels(pick(getattr(args, "node_labels", None),
                                   "TASKANDGO_NODE_LABELS"),
                              "--node-label / TASKANDGO_NODE_LABELS")
    except InvalidTask as exc:
        raise ConfigError(f"{exc.field}: {exc.message}") from None
    return {"offer": offer, "node_labels": {k: v for k, v in labels.items() if v}}
