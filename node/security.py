"""Who may call a node and what may run on it: API tokens, per-client rate limits,
and the execution policy. Shared by the gRPC and HTTP layers so both enforce the
same rules the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from taskandgo.node.callworker import CallRefused, check_shape, resolve_fresh
from taskandgo.node.tasks import InvalidTask


class Unauthenticated(Exception):
    """No or a wrong token (gRPC UNAUTHENTICATED / HTTP 401)."""


class PermissionDenied(Exception):
    """Authenticated, but not allowed to do this (gRPC PERMISSION_DENIED / HTTP 403)."""


class RateLimited(Exception):
    """Too many requests from this client (gRPC RESOURCE_EXHAUSTED / HTTP 429)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


class Overloaded(Exception):
    """The queue is at its bound (gRPC RESOURCE_EXHAUSTED / HTTP 429)."""

    retry_after_s = 1.0


@dataclass(frozen=True)
class TokenAuth:
    """Bearer tokens; an empty set means the API is open (loopback only)."""

    tokens: tuple[bytes, ...] = ()
    open_read_only: bool = True  # health and metrics need no token

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def check(self, presented: str | None) -> None:
        """Raise Unauthenticated unless presented is one of the tokens. Every token
        is compared (in constant time), so timing says nothing about which matched."""
        if not self.tokens:
            return
        if not presented:
            raise Unauthenticated("missing bearer token")
        value = presented.encode()
        ok = False
        for t in self.tokens:
            ok |= hmac.compare_digest(value, t)
        if not ok:
            raise Unauthenticated("invalid bearer token")

    @staticmethod
    def parse_header(value: str | None) -> str | None:
        if not value:
            return None
        scheme, _, token = value.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    @classmethod
    def from_text(cls, text: str | None, open_read_only: bool = True) -> TokenAuth:
        """Tokens one per line (or comma separated); blank lines and # comments skipped."""
        out = []
        for raw in (text or "").replace(",", "\n").splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                out.append(line.encode())
        return cls(tuple(out), open_read_only)


#: Metadata keys of the peer API (see :class:`PeerAuth`).
PEER_AUTH_KEY = "x-taskandgo-peer-auth"
PEER_ID_KEY = "x-taskandgo-peer-id"
PEER_GRPC_KEY = "x-taskandgo-peer-grpc"
#: Peer protocol of this release (HeartbeatRequest.peer_protocol).
PEER_PROTOCOL = 2
_PEER_LABEL = b"taskandgo peer credential v1"
_PEER_FIELD_RE = re.compile(r"[A-Za-z0-9_.:\[\]@-]{1,255}")


@dataclass(frozen=True)
class PeerIdentity:
    """Who a peer call says it comes from: a node id and its advertised gRPC address.
    Both are the caller's claim, vouched for by the peer credential (every holder of
    the cluster secret can claim any identity) and, under mTLS with peer names, by a
    certificate the operator issued to nodes."""

    node_id: str
    grpc_address: str


@dataclass(frozen=True)
class PeerAuth:
    """The peer credential: HMAC-SHA256 of the cluster's Raft password under a fixed
    label, so it is as secret as the password but never is the password, and no API
    token can stand in for it. Sent by every node on every peer call (metadata
    ``x-taskandgo-peer-auth``), compared in constant time.

    ``credential`` is None when the cluster has no Raft password (loopback
    development): the peer API is then open, as the Raft port is. ``cert_names``,
    when set (mTLS only), are the certificate names (exact, or ``*.domain`` for one
    label under domain) a peer's verified client certificate must carry, in its
    subject alternative names or common name, besides the credential."""

    credential: bytes | None = None
    cert_names: tuple[str, ...] = ()

    @classmethod
    def from_password(cls, password: str | None, cert_names: tuple[str, ...] = ()) -> PeerAuth:
        if not password:
            return cls(None, cert_names)
        digest = hmac.new(password.encode(), _PEER_LABEL, hashlib.sha256).hexdigest()
        return cls(digest.encode(), cert_names)

    @property
    def enabled(self) -> bool:
        return self.credential is not None

    def metadata(self, node_id: str, grpc_address: str) -> tuple[tuple[str, str], ...]:
        """What this node sends on its peer calls."""
        md: tuple[tuple[str, str], ...] = ((PEER_ID_KEY, node_id),
                                           (PEER_GRPC_KEY, grpc_address))
        if self.credential is not None:
            md += ((PEER_AUTH_KEY, self.credential.decode()),)
        return md

    def check(self, metadata: dict[str, str], has_api_token: bool = False) -> PeerIdentity:
        """The caller's identity if metadata carries the peer credential (or the peer
        API is open). Raises Unauthenticated (no or a wrong credential, no identity)
        or PermissionDenied (a valid API token but no peer credential: clients may
        not act as peers)."""
        if self.credential is not None:
            presented = (metadata.get(PEER_AUTH_KEY) or "").encode()
            if not hmac.compare_digest(presented, self.credential):
                if has_api_token and not presented:
                    raise PermissionDenied("the peer API takes the peer credential; "
                                           "API tokens do not authorise it")
                raise Unauthenticated("missing or invalid peer credential")
        node_id = metadata.get(PEER_ID_KEY) or ""
        grpc_address = metadata.get(PEER_GRPC_KEY) or ""
        if not _PEER_FIELD_RE.fullmatch(node_id) or not _PEER_FIELD_RE.fullmatch(grpc_address):
            raise Unauthenticated(f"peer calls must name the caller ({PEER_ID_KEY}, "
                                  f"{PEER_GRPC_KEY}: 1-255 of A-Za-z0-9_.:[]@-)")
        return PeerIdentity(node_id, grpc_address)

    def check_certificate(self, names: list[str]) -> None:
        """Raise PermissionDenied unless one of the verified certificate's names is a
        configured peer name (no-op without configured names)."""
        if not self.cert_names:
            return
        for presented in names:
            name = presented.lower().rstrip(".")
            for want in self.cert_names:
                if name == want or (want.startswith("*.") and "." in name
                                    and name.split(".", 1)[1] == want[2:]
                                    and not name.startswith("*")):
                    return
        raise PermissionDenied("the peer API needs a client certificate issued to a node "
                               "(--peer-cert-names)")


def parse_cert_names(text: str) -> tuple[str, ...]:
    """``--peer-cert-names``: comma separated DNS names or ``*.domain`` patterns."""
    out = []
    for item in (x.strip().lower().rstrip(".") for x in text.split(",")):
        if not item:
            continue
        name = item.removeprefix("*.")
        if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?", name) or ".." in name:
            raise ValueError(f"bad certificate name {item!r}: expected a DNS name or *.domain")
        out.append(item)
    return tuple(out)


@dataclass
class RateLimiter:
    """A token bucket per client (by IP): ``rate`` requests/s, bursts of ``burst``.
    rate <= 0 turns it off."""

    rate: float = 0.0
    burst: float = 0.0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, client: str, cost: float = 1.0) -> None:
        if self.rate <= 0:
            return
        burst = self.burst or max(1.0, self.rate)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (burst, now))
            tokens = min(burst, tokens + (now - last) * self.rate)
            if tokens < cost:
                self._buckets[client] = (tokens, now)
                raise RateLimited((cost - tokens) / self.rate)
            self._buckets[client] = (tokens - cost, now)
            if len(self._buckets) > 10_000:  # forget idle clients
                for k in [k for k, (_, t) in self._buckets.items() if now - t > 60][:5000]:
                    del self._buckets[k]


def client_ip(peer: str) -> str:
    """gRPC ``context.peer()`` ("ipv4:1.2.3.4:5", "ipv6:[::1]:5") or an HTTP address -> IP."""
    if peer.startswith(("ipv4:", "ipv6:")):
        peer = peer.split(":", 1)[1]
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 or peer.startswith("[") else peer
    return host.strip("[]")


@dataclass(frozen=True)
class ExecPolicy:
    """Which payload kinds a node runs: language prefixes, argv, and callables from
    allowed modules. ``None`` for a set means "any".

    A callable must be a plain public function defined in an allowed module or in a
    submodule of an allowed package (the rules are in
    :mod:`taskandgo.node.callworker`, which the warm workers apply again on every
    call). With an explicit module list, :meth:`check` imports the named module (it is
    allowed by then) and checks the function itself; with "any" it checks the shape
    only and imports nothing, so a submit never runs the import-time code of a module
    the operator did not name; the worker then refuses what is not a plain function."""

    prefixes: frozenset[str] | None = None
    argv: bool = True
    call_modules: tuple[str, ...] | None = None  # () = no callables at all

    @classmethod
    def parse(cls, kinds: str | None, call_modules: str | None) -> ExecPolicy:
        """kinds: comma list of prefixes plus ``argv`` and ``call`` ("" or "*": all).
        call_modules: comma list of modules (or packages, with their submodules)
        callables may come from ("" or "*": any)."""
        prefixes: frozenset[str] | None = None
        argv = True
        calls_allowed = True
        if kinds and kinds.strip() not in ("", "*"):
            names = {k.strip() for k in kinds.split(",") if k.strip()}
            argv = "argv" in names
            calls_allowed = "call" in names
            prefixes = frozenset(names - {"argv", "call"})
        mods: tuple[str, ...] | None = None
        if not calls_allowed:
            mods = ()
        elif call_modules and call_modules.strip() not in ("", "*"):
            mods = tuple(m.strip() for m in call_modules.split(",") if m.strip())
            from taskandgo.node.callworker import MODULE_RE

            bad = [m for m in mods if not MODULE_RE.fullmatch(m)]
            if bad:
                # Such an entry could never match a call: a typo would silently allow
                # nothing the operator meant to allow.
                raise ValueError(f"--allow-calls: {', '.join(map(repr, bad))} is not a module "
                                 "name (dotted parts of letters, digits and _, each starting "
                                 "with a letter)")
        return cls(prefixes, argv, mods)

    def check(self, spec: dict[str, Any], default_runner: str) -> None:
        """Raise InvalidTask (naming the field) if spec's payload may not run here."""
        from taskandgo.node.executor import split_prefix

        if "argv" in spec:
            if not self.argv:
                raise InvalidTask("argv", "argv payloads are not allowed on this cluster")
        elif "call" in spec:
            try:
                if self.call_modules is None:
                    check_shape(spec["call"], None)
                else:
                    resolve_fresh(spec["call"], self.call_modules)
            except CallRefused as exc:
                raise InvalidTask("call", str(exc)) from None
        elif "data" in spec:
            prefix, _ = split_prefix(spec["data"])
            prefix = prefix or (default_runner if default_runner != "echo" else "")
            if prefix and self.prefixes is not None and prefix not in self.prefixes:
                raise InvalidTask("data", f"'{prefix}:' payloads are not allowed on this cluster")
