"""Bounds on long-lived calls: gRPC ``WatchTasks`` streams and the HTTP event stream,
blocking waits (``WaitTasks``, ``/api/v1/wait``); and the tickets that let a browser
open the HTTP event stream without putting its API token in the URL.

A stream holds a thread for as long as it is open (a gRPC server thread, or the
HTTP server's thread for that connection). Without a bound, 40 open watch streams
took every gRPC server thread and every unary call to the node, peer calls
included, timed out. :class:`StreamLimiter` counts open streams per client address
and in total; a stream beyond either bound is refused at once (gRPC
RESOURCE_EXHAUSTED, HTTP 429), so the threads unary and peer calls need stay free.
Waits are bounded the same way (:func:`wait_limiter`): a wait holds a unary thread
for up to 600 s. :class:`StreamTickets` are described there.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: Defaults: streams one client address may hold open, and all clients together.
DEFAULT_PER_CLIENT = 8
DEFAULT_TOTAL = 32
#: When a refused client should try again (it is a hint: a slot frees when a stream ends).
RETRY_AFTER_S = 1.0
#: Initial metadata WatchTasks sends once a stream is accepted (and, on a worker, once
#: the voter it relays accepted it): a relay learns at once whether its stream is
#: open or refused, without waiting for the first event.
STREAM_ACCEPTED = ("x-taskandgo-stream", "accepted")


class TooManyStreams(Exception):
    """A stream was refused: the client or the node already holds the most allowed.
    Maps to gRPC RESOURCE_EXHAUSTED / HTTP 429 (``retry_after_s`` for the hint)."""

    def __init__(self, message: str, retry_after_s: float = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StreamLimiter:
    """Open streams per client address (at most ``per_client``) and in total (at most
    ``total``). Thread-safe; :meth:`hold` is the only way in, and releases on exit
    whatever ends the stream. A bound of 0 or less means "no bound"."""

    def __init__(self, per_client: int = DEFAULT_PER_CLIENT, total: int = DEFAULT_TOTAL,
                 what: str = "streams") -> None:
        self.per_client = per_client
        self.total = total
        self.what = what
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._count = 0

    @property
    def open_count(self) -> int:
        """Streams open now (all clients)."""
        return self._count

    def _acquire(self, client: str) -> None:
        with self._lock:
            mine = self._open.get(client, 0)
            if 0 < self.per_client <= mine:
                raise TooManyStreams(
                    f"too many open {self.what} from {client}: {mine} of {self.per_client} "
                    "allowed per client address; close one or retry later")
            if 0 < self.total <= self._count:
                raise TooManyStreams(
                    f"too many open {self.what} on this node: {self._count} of {self.total} "
                    "allowed; retry later")
            self._open[client] = mine + 1
            self._count += 1

    def _release(self, client: str) -> None:
        with self._lock:
            left = self._open.get(client, 0) - 1
            if left > 0:
                self._open[client] = left
            else:
                self._open.pop(client, None)  # no entry kept for a client that left
            self._count -= 1

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """Hold one stream slot for ``client`` for the duration of the block; raises
        :class:`TooManyStreams` (before entering) when a bound is reached."""
        self._acquire(client)
        try:
            yield
        finally:
            self._release(client)


def upstream_refused(call: Any) -> tuple[Any, str] | None:
    """For a WatchTasks call this node made to another (a worker relaying a voter's
    stream): block until the other node has answered with headers; its
    ``(grpc.StatusCode, details)`` if it refused the stream or could not be reached,
    else None. A node that sends no :data:`STREAM_ACCEPTED` (an older version)
    answers with its first event: taken as open unless the call has already ended."""
    if STREAM_ACCEPTED in tuple(call.initial_metadata() or ()):
        return None
    if call.done():
        return call.code(), call.details() or ""
    return None


# ---------------------------------------------------------------------- stream tickets

#: How long a stream ticket may be redeemed after it was issued.
TICKET_TTL_S = 30.0
#: Clock difference between nodes tolerated when a ticket issued by one node is
#: redeemed at another (a Service or proxy may send the two requests to different pods).
TICKET_SKEW_S = 5.0
#: Tickets redeemed at this node remembered (for their remaining life) to refuse a
#: second use. Beyond it the oldest are forgotten: only token holders can mint
#: tickets, so filling the table takes a token, whose holder can mint fresh ones anyway.
MAX_REDEEMED_TICKETS = 4096
_TICKET_VERSION = 1
_TICKET_LABEL = b"taskandgo stream ticket v1"
_TICKET_STRUCT = struct.Struct(">BQ16s")  # version, expiry (unix ms), nonce
_TAG_BYTES = 16


class BadTicket(Exception):
    """A stream ticket that is malformed, expired, already used, or signed under no
    token this node holds. Maps to HTTP 401."""


class StreamTickets:
    """Short-lived, single-use tickets for the HTTP event stream, whose browser
    client (EventSource) cannot send an ``Authorization`` header.

    A ticket is ``version | expiry | random nonce`` authenticated with HMAC-SHA256
    under a key derived from the API token that asked for it: it is bound to that
    token (it stops working with it), reveals nothing about it, and any node holding
    the same tokens can check it, so a Service or proxy that sends the ticket request
    and the stream to different nodes still works. It is good for
    :data:`TICKET_TTL_S` seconds and one stream per node: each node remembers the
    tickets redeemed at it (at most :data:`MAX_REDEEMED_TICKETS`) until they expire.

    Thread-safe. ``clock`` is wall-clock seconds (tickets cross nodes)."""

    def __init__(self, tokens: tuple[bytes, ...], ttl_s: float = TICKET_TTL_S,
                 max_redeemed: int = MAX_REDEEMED_TICKETS,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.max_redeemed = max_redeemed
        self._clock = clock
        self._keys = tuple(_ticket_key(t) for t in tokens)
        self._lock = threading.Lock()
        self._redeemed: OrderedDict[bytes, float] = OrderedDict()

    @property
    def redeemed_count(self) -> int:
        """Tickets remembered as used (their life not yet over)."""
        return len(self._redeemed)

    def issue(self, token: str | None) -> tuple[str, float]:
        """A ticket for the caller holding ``token`` (already checked; None or "" on a
        node without tokens, where the stream needs no ticket) and its life in seconds."""
        expiry_ms = int((self._clock() + self.ttl_s) * 1000)
        body = _TICKET_STRUCT.pack(_TICKET_VERSION, expiry_ms, secrets.token_bytes(16))
        key = _ticket_key((token or "").encode())
        return _b64(body + _tag(key, body)), self.ttl_s

    def redeem(self, ticket: str) -> None:
        """Accept ``ticket`` for one stream, or raise :class:`BadTicket` saying why."""
        try:
            raw = base64.urlsafe_b64decode(ticket + "=" * (-len(ticket) % 4))
        except (ValueError, TypeError):
            raise BadTicket("stream ticket is not valid base64url") from None
        if len(raw) != _TICKET_STRUCT.size + _TAG_BYTES:
            raise BadTicket("stream ticket has the wrong length")
        body, tag = raw[:_TICKET_STRUCT.size], raw[_TICKET_STRUCT.size:]
        version, expiry_ms, _nonce = _TICKET_STRUCT.unpack(body)
        if version != _TICKET_VERSION:
            raise BadTicket(f"stream ticket version {version} is not understood here")
        ok = False
        for key in self._keys:  # every key, so timing says nothing about which matched
            ok |= hmac.compare_digest(_tag(key, body), tag)
        if not ok:
            raise BadTicket("stream ticket was not issued for a token this node accepts")
        now = self._clock()
        expiry = expiry_ms / 1000
        if now > expiry + TICKET_SKEW_S:
            raise BadTicket("stream ticket expired: ask for a new one just before "
                            "opening the stream")
        if expiry > now + self.ttl_s + TICKET_SKEW_S:
            raise BadTicket("stream ticket lives longer than this node allows")
        with self._lock:
            while self._redeemed:
                first, until = next(iter(self._redeemed.items()))
                if until >= now and len(self._redeemed) < self.max_redeemed:
                    break
                del self._redeemed[first]
            if tag in self._redeemed:
                raise BadTicket("stream ticket already used: ask for a new one")
            self._redeemed[tag] = expiry + TICKET_SKEW_S


def _ticket_key(token: bytes) -> bytes:
    # A key per token, not the token itself: a ticket's tag is never a MAC under a
    # secret used elsewhere.
    return hmac.new(token, _TICKET_LABEL, hashlib.sha256).digest()


def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:_TAG_BYTES]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# ---------------------------------------------------------------------- waits

#: Defaults: blocking waits (gRPC WaitTasks, HTTP /api/v1/wait) one client address
#: may have open on a node, and all clients together, per protocol. A gRPC wait
#: holds one of the --grpc-threads (32) unary threads for up to 600 s: the total
#: leaves at least half of them to other calls.
DEFAULT_WAITS_PER_CLIENT = 8
DEFAULT_WAITS_TOTAL = 16
_wait_limiters: weakref.WeakKeyDictionary[Any, dict[str, StreamLimiter]] = \
    weakref.WeakKeyDictionary()
_wait_limiters_lock = threading.Lock()


def wait_limiter(app: Any, protocol: str) -> StreamLimiter:
    """The node's bound on concurrent waits over ``protocol`` ("grpc" or "http"),
    made on first use from ``app.cfg`` (``max_waits``, ``max_waits_per_client``)
    and the same object for every later call. Thread-safe."""
    with _wait_limiters_lock:
        per_app = _wait_limiters.setdefault(app, {})
        limiter = per_app.get(protocol)
        if limiter is None:
            cfg = getattr(app, "cfg", None)
            limiter = per_app[protocol] = StreamLimiter(
                getattr(cfg, "max_waits_per_client", DEFAULT_WAITS_PER_CLIENT),
                getattr(cfg, "max_waits", DEFAULT_WAITS_TOTAL), "waits")
        return limiter
