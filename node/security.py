"""Who may call a node and what may run on it: API tokens, per-client rate limits,
and the execution policy. Shared by the gRPC and HTTP layers so both enforce the
same rules the same way.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from taskandgo.node.callworker import CallRefused, check_shape, resolve_fresh
from taskandgo.node.tasks import InvalidTask


class Unauthenticated(Exception):
    """No or a wrong token (gRPC UNAUTHENTICATED / HTTP 401)."""


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
        for line in (text or "").replace(",", "\n").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line.encode())
        return cls(tuple(out), open_read_only)


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
