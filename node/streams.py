"""Bounds on long-lived calls: gRPC ``WatchTasks`` streams and the HTTP event stream.

A stream holds a thread for as long as it is open (a gRPC server thread, or the
HTTP server's thread for that connection). Without a bound, 40 open watch streams
took every gRPC server thread and every unary call to the node, peer calls
included, timed out. :class:`StreamLimiter` counts open streams per client address
and in total; a stream beyond either bound is refused at once (gRPC
RESOURCE_EXHAUSTED, HTTP 429), so the threads unary and peer calls need stay free.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
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
