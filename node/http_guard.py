"""What the HTTP server checks before a request reaches a route: the Host header
(DNS rebinding: :class:`HostPolicy`), a deadline for the request line, headers and
body (:class:`_DeadlineReader`), the refusals a request can end with, the server's
TLS context, and the parsing of query numbers.

Used by :mod:`taskandgo.node.http`; see docs/security.md, "Browsers and the HTTP
port".
"""

from __future__ import annotations

import io
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psutil
from taskandgo.node.tasks import InvalidTask

#: How often (at most) a Host that is an unknown IP literal makes a wildcard-bound
#: node list its interface addresses again (an address added after the start).
ADDRESS_REFRESH_S = 10.0
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

def _host_name(netloc: str) -> str | None:
    """The host name of a ``Host`` header or an origin's ``host[:port]``: lower case,
    no IPv6 brackets, no trailing dot, IP addresses in canonical form; None when
    it does not parse."""
    try:
        parts = urlsplit("//" + netloc)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    if parts.netloc != netloc or parts.username is not None or parts.path or parts.query:
        return None  # "a/b", "user@host", "a b?c": not a host
    host = _canonical(parts.hostname or "")
    return host or None


def _canonical(name: str) -> str:
    """A host name or IP address as compared here: lower case, no brackets, no
    trailing dot, IP addresses in canonical form (``::0001`` is ``::1``)."""
    name = name.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _local_addresses() -> frozenset[str]:
    """Every IP address of this machine's (or pod's) interfaces, canonical form."""
    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    out.add(str(ipaddress.ip_address(a.address.split("%", 1)[0])))
                except ValueError:
                    pass
    return frozenset(out)


@dataclass
class HostPolicy:
    """Which ``Host`` headers and which ``Origin`` headers this node's HTTP server
    accepts. Thread-safe: handler threads share one.

    A Host is accepted when its name (the port is not compared: a Service or proxy
    may map ports) is one of the node's own: its bind and advertised addresses, its
    host name; ``localhost``, ``127.0.0.1`` and ``::1`` when it is bound to loopback
    or to every address; when bound to every address (``0.0.0.0``, ``::``), every
    address of its interfaces (so the kubelet's probes, which send the pod IP,
    pass). Or when it matches a configured entry (``--http-allowed-hosts``: names,
    ``.domain`` suffixes, IP addresses or networks; ``*`` accepts any Host).

    An Origin is accepted when its ``host[:port]`` is the request's Host (the same
    origin, whatever the scheme: a TLS-terminating proxy in front of plain HTTP), or
    when its name matches a configured entry other than ``*``: ``*`` opens the Host
    check, never cross-origin writes."""

    own: frozenset[str]
    configured: tuple[str, ...] = ()
    wildcard_bind: bool = False
    _interfaces: frozenset[str] = field(default_factory=frozenset)
    _interfaces_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def for_node(cls, cfg: Any, bind: str) -> HostPolicy:
        """The policy of a node with config ``cfg`` whose HTTP server binds ``bind``."""
        own = {getattr(cfg, "advertise", bind), socket.gethostname()}
        bind = bind.strip("[]")
        wildcard = bind in ("", "0.0.0.0", "::")
        if wildcard or _is_loopback(bind):
            own |= LOOPBACK_NAMES
        if not wildcard:
            own.add(bind)
        names = frozenset(n for n in map(_canonical, own) if n)
        return cls(own=names, configured=tuple(getattr(cfg, "http_allowed_hosts", ())),
                   wildcard_bind=wildcard)

    def host_ok(self, host_header: str) -> bool:
        """True when this node answers to ``host_header`` (a ``Host`` value)."""
        if "*" in self.configured:
            return True
        name = _host_name(host_header.strip())
        if name is None:
            return False
        if name in self.own or self._configured_match(name):
            return True
        return self.wildcard_bind and self._is_interface_address(name)

    def origin_ok(self, origin: str, host_header: str) -> bool:
        """True when a write may come from a page of ``origin`` (an ``Origin`` value)."""
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (a sandboxed frame, a file:// page) or garbage
        if parts.netloc.lower() == host_header.strip().lower():
            return True
        name = _host_name(parts.netloc)
        return name is not None and self._configured_match(name)

    def _configured_match(self, name: str) -> bool:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        for entry in self.configured:
            if entry == "*":
                continue
            if ip is not None:
                try:
                    if ip in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    pass  # a name entry: an IP literal never matches it
            elif entry.startswith("."):
                if name == entry[1:] or name.endswith(entry):
                    return True
            elif name == entry:
                return True
        return False

    def _is_interface_address(self, name: str) -> bool:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        with self._lock:
            if name in self._interfaces:
                return True
            now = time.monotonic()
            if now - self._interfaces_at < ADDRESS_REFRESH_S:
                return False
            self._interfaces, self._interfaces_at = _local_addresses(), now
            return name in self._interfaces


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Refused(Exception):
    """A request refused before its route runs: (status, message, header named)."""

    def __init__(self, code: int, message: str, field: str) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


class _TooLarge(Exception):
    pass


class _LengthRequired(Exception):
    pass


class _NoRoute(Exception):
    pass


class _BadMethod(Exception):
    def __init__(self, allowed: list[str]) -> None:
        super().__init__(", ".join(allowed))
        self.allowed = allowed


class _RequestTimeout(Exception):
    """The client did not send its request (line, headers, body) within the
    request deadline. Not a TimeoutError: the standard library would swallow that."""


class _DeadlineReader(io.RawIOBase):
    """The connection's read side with a deadline over a whole request: each read
    waits at most until the deadline (:meth:`arm`), so a client sending one byte a
    second cannot stretch a request past it, as it could with a per-read socket
    timeout. Without a deadline (between :meth:`disarm` and the next :meth:`arm`)
    reads wait up to ``idle_s``. Counts the bytes read since :meth:`arm`."""

    def __init__(self, sock: socket.socket, idle_s: float) -> None:
        super().__init__()
        self.sock = sock
        self.idle_s = idle_s
        self.deadline: float | None = None
        self.received = 0

    def arm(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.received = 0

    def disarm(self) -> None:
        self.deadline = None

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        wait_s = self.idle_s
        if self.deadline is not None:
            wait_s = min(wait_s, self.deadline - time.monotonic())
            if wait_s <= 0:
                raise _RequestTimeout()
        self.sock.settimeout(wait_s)
        try:
            n = self.sock.recv_into(buf)
        except TimeoutError:
            if self.expired:
                raise _RequestTimeout() from None
            raise
        finally:
            # Writes (responses, event streams) keep the connection's own timeout.
            self.sock.settimeout(self.idle_s)
        self.received += n
        return n


def tls_context(cfg: Any) -> ssl.SSLContext | None:
    """Server-side TLS from the node's certificate files (mTLS with tls_client_auth)."""
    if not cfg.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_ca:
        ctx.load_verify_locations(cfg.tls_ca)
    if cfg.tls_client_auth:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _int(value: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidTask(field, "expected an integer") from None


def _float(value: str, field: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidTask(field, "expected a number") from None
