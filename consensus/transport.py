"""PySyncObj's TCP transport with bounded frames and a handshake deadline.

PySyncObj 0.3.17 frames every message as a 4-byte length followed by the (encrypted)
payload, and buffers a whole frame before it decrypts anything, with no upper bound, on
the one tick thread that also runs elections and replication. Anyone who can reach a
Raft port, without the password, could announce a 2 GiB frame and trickle bytes: the
buffer is rebuilt on every read (quadratic copying), the tick thread falls behind and
followers stop answering the leader. Idle connections that never say who they are were
never closed, and the listen backlog was 5.

:class:`BoundedTCPTransport` is a drop-in ``transportClass`` for ``SyncObj`` that:

* refuses a frame whose header announces more than
  :attr:`TransportLimits.max_handshake_frame_bytes` before the peer has completed
  PySyncObj's handshake, and more than :attr:`TransportLimits.max_frame_bytes` after;
  the connection is closed as soon as the header arrives (or is negative);
* closes an incoming connection that has not completed the handshake (with a password:
  the encrypted key exchange and the node's address; without: the node's address)
  within :attr:`TransportLimits.handshake_timeout_s`;
* refuses, at accept, a connection that would exceed
  :attr:`TransportLimits.max_unauthenticated_per_ip` or
  :attr:`TransportLimits.max_unauthenticated` connections still in their handshake;
* listens with a backlog of :attr:`TransportLimits.listen_backlog`, accepts several
  connections per poll event, and keeps listening when ``accept`` fails for lack of
  file descriptors (PySyncObj stopped listening for good on any accept error).

PySyncObj's admin connections (``syncobj_admin``) never complete the handshake: they
must finish their command within the deadline, as its one-shot commands do.

Threading: everything here runs on PySyncObj's tick thread, like the code it wraps.
Cost: one extra header unpack per ``recv`` and one emptiness test per tick; messages
of authenticated peers are parsed by PySyncObj's own code, unchanged.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport

__all__ = ["BoundedTCPTransport", "BoundedTcpConnection", "TransportLimits"]

log = logging.getLogger("taskandgo.raft.transport")

#: PySyncObj's frame header: a native signed 32-bit length (struct format "i").
_HEADER = struct.Struct("i")
_MAX_HEADER = 2**31 - 1
_read_once = TcpConnection._TcpConnection__processRead
#: accept() errors that say nothing about the listening socket: keep listening.
_TRANSIENT_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                     errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
_ACCEPTS_PER_EVENT = 32
_SWEEP_EVERY_S = 0.1
_WARN_EVERY_S = 1.0


@dataclass(frozen=True)
class TransportLimits:
    """Bounds for a node's Raft port.

    ``max_frame_bytes`` must stay well above the largest frame a peer legitimately
    sends, or that frame could never be delivered and replication would stall behind
    it. With the settings of ``consensus.raft.make_conf`` (PySyncObj's defaults
    ``appendEntriesBatchSizeBytes`` = ``logCompactionBatchSize`` = 64 KiB) a frame is
    one of:

    * an append-entries batch: entries are added until their sizes reach 64 KiB, so a
      batch is under 64 KiB plus its last entry, i.e. plus one command;
    * a lone entry of 64 KiB or more, cut by PySyncObj into pieces of 64 KiB;
    * a snapshot chunk of 64 KiB;
    * votes, replies and the handshake: under 1 KiB.

    Each is pickled, zlib'd and, with a password, Fernet-encrypted (base64: 4/3 of
    the size plus ~100 bytes). The largest frame is therefore about
    4/3 x (64 KiB + the largest command after zlib). A command is one batch of
    submits (or assignments, results); one client call makes at most ~28 MB of frame
    (a minimal task is ~28 bytes, the queue holds 1,000,000) or ~22 MiB (16 MiB of
    large payloads), so 256 MiB is about ten times the largest single call. Commands
    must stay below the limit: a frame over it can never be delivered.

    ``max_handshake_frame_bytes`` bounds frames before the handshake completes; the
    handshake's own frames (a 32-byte key, a node address) are under 1 KiB, and
    PySyncObj's admin commands (``syncobj_admin``) are a few hundred bytes.
    """

    #: Largest frame accepted from a peer that completed the handshake.
    max_frame_bytes: int = 256 * 1024 * 1024
    #: Largest frame accepted before the handshake completes.
    max_handshake_frame_bytes: int = 64 * 1024
    #: An incoming connection must complete the handshake within this time.
    handshake_timeout_s: float = 2.5
    #: Incoming connections still in their handshake, in total ...
    max_unauthenticated: int = 64
    #: ... and from one IP address; more are closed at accept.
    max_unauthenticated_per_ip: int = 8
    #: listen() backlog of the Raft port (PySyncObj used 5).
    listen_backlog: int = 128

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"TransportLimits.{f.name} must be positive")
        if self.max_frame_bytes > _MAX_HEADER:
            raise ValueError(f"TransportLimits.max_frame_bytes must be at most {_MAX_HEADER}")
        if self.max_handshake_frame_bytes > self.max_frame_bytes:
            raise ValueError("TransportLimits.max_handshake_frame_bytes must not exceed "
                             "max_frame_bytes")


class BoundedTcpConnection(TcpConnection):
    """A PySyncObj connection that refuses frames larger than ``max_frame_bytes``.

    The header of the frame at the front of the read buffer is checked after every
    ``recv``: a negative or too large length closes the connection at once. Reading
    also pauses (until the next poll event) once the buffer holds a complete frame
    and ``max_frame_bytes`` more, so the buffer of one connection stays under about
    twice the limit. ``max_frame_bytes`` is raised by the transport when the peer
    completes the handshake and reset to ``initial_max_frame_bytes`` on reconnect.
    """

    def __init__(self, *args: Any, max_frame_bytes: int, peer_ip: str = "",
                 on_frame_refused: Callable[[BoundedTcpConnection, int], None] | None = None,
                 **kwargs: Any) -> None:
        # Set before TcpConnection.__init__, which may subscribe to the poller.
        self.max_frame_bytes = max_frame_bytes
        self.initial_max_frame_bytes = max_frame_bytes
        self.peer_ip = peer_ip
        self.handshake_deadline = float("inf")
        self.on_frame_refused = on_frame_refused
        super().__init__(*args, **kwargs)

    def connect(self, host: str, port: int) -> bool:
        # A reused outgoing connection starts a new handshake.
        self.max_frame_bytes = self.initial_max_frame_bytes
        return bool(super().connect(host, port))

    def _TcpConnection__processRead(self) -> bool:
        if not _read_once(self):
            return False
        buf = self._TcpConnection__readBuffer
        if len(buf) < 4:
            return True
        size = _HEADER.unpack_from(buf)[0]
        if size < 0 or size > self.max_frame_bytes:
            self.disconnect()
            if self.on_frame_refused is not None:
                self.on_frame_refused(self, size)
            return False
        # False = stop reading for now; PySyncObj then parses what is buffered.
        return len(buf) <= 4 + size + self.max_frame_bytes


class BoundedTcpServer(TcpServer):
    """PySyncObj's listener with a larger backlog, several accepts per event, an
    admission check per peer IP, and :class:`BoundedTcpConnection` connections."""

    def __init__(self, poller: Any, host: str, port: int | str,
                 onNewConnection: Callable[[BoundedTcpConnection], None], *,
                 limits: TransportLimits, admit: Callable[[str], bool],
                 on_accept_error: Callable[[OSError], None],
                 sendBufferSize: int, recvBufferSize: int, connectionTimeout: float,
                 keepalive: Any = None) -> None:
        super().__init__(poller, host, port, onNewConnection, sendBufferSize=sendBufferSize,
                         recvBufferSize=recvBufferSize, connectionTimeout=connectionTimeout,
                         keepalive=keepalive)
        self._limits = limits
        self._admit = admit
        self._on_accept_error = on_accept_error

    def bind(self) -> None:
        super().bind()
        # listen() on a listening socket only updates its backlog (Linux, BSD).
        self._TcpServer__socket.listen(self._limits.listen_backlog)

    def _TcpServer__onNewConnection(self, descr: int, event: int) -> None:
        if event & POLL_EVENT_TYPE.READ:
            for _ in range(_ACCEPTS_PER_EVENT):
                try:
                    sock, addr = self._TcpServer__socket.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _TRANSIENT_ACCEPT:
                        self._on_accept_error(exc)
                        break
                    self.unbind()
                    return
                self._on_accepted(sock, str(addr[0]))
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()

    def _on_accepted(self, sock: socket.socket, ip: str) -> None:
        if not self._admit(ip):
            sock.close()
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._TcpServer__sendBufferSize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._TcpServer__recvBufferSize)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except OSError:
            sock.close()  # the peer is already gone
            return
        conn = BoundedTcpConnection(
            poller=self._TcpServer__poller, socket=sock,
            timeout=self._TcpServer__connectionTimeout,
            sendBufferSize=self._TcpServer__sendBufferSize,
            recvBufferSize=self._TcpServer__recvBufferSize,
            keepalive=self._TcpServer__keepalive,
            max_frame_bytes=self._limits.max_handshake_frame_bytes, peer_ip=ip)
        self._TcpServer__onNewConnectionCallback(conn)


class BoundedTCPTransport(TCPTransport):
    """``TCPTransport`` whose Raft port bounds frames and handshakes (module docstring).

    Use as ``SyncObj(..., transportClass=BoundedTCPTransport)``, or with other limits
    ``transportClass=BoundedTCPTransport.with_limits(TransportLimits(...))``.
    Counters of what was refused are in :meth:`stats`.
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any,
                 limits: TransportLimits = TransportLimits()) -> None:
        # Set before TCPTransport.__init__, which calls addNode and _createServer.
        self.limits = limits
        self._counts = {"frames_refused": 0, "handshake_timeouts": 0,
                        "connections_refused": 0, "accept_errors": 0}
        self._next_sweep = 0.0
        self._warned_at: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        super().__init__(syncObj, selfNode, otherNodes)

    @classmethod
    def with_limits(cls, limits: TransportLimits) -> Callable[..., BoundedTCPTransport]:
        """A ``transportClass`` for SyncObj that uses these limits."""
        return functools.partial(cls, limits=limits)

    def stats(self) -> dict[str, int]:
        """Refusals so far (read from any thread; values may be a tick old)."""
        return {**self._counts, "unauthenticated": len(self._unknownConnections)}

    # ------------------------------------------------------------ construction

    def _createServer(self) -> None:
        # TCPTransport._createServer with BoundedTcpServer in place of TcpServer.
        conf = self._syncObj.conf
        self_addr = self._selfNode.address
        if conf.bindAddress is not None:
            host, port = conf.bindAddress.rsplit(":", 1)
        elif self_addr is not None:
            host, port = self_addr.rsplit(":", 1)
            host = "::" if ":" in host else "0.0.0.0"
        else:
            raise RuntimeError("Unable to determine bind address")
        if host != "0.0.0.0":
            host = globalDnsResolver().resolve(host)
        self._server = BoundedTcpServer(
            self._syncObj._poller, host, port, self._onNewIncomingConnection,
            limits=self.limits, admit=self._admit, on_accept_error=self._on_accept_error,
            sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
            connectionTimeout=conf.connectionTimeout)

    def addNode(self, node: Any) -> None:
        # TCPTransport.addNode with BoundedTcpConnection for the outgoing connection.
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conf = self._syncObj.conf
            encryptor = self._syncObj.encryptor
            # Without a password the peer sends no handshake: Raft messages come at once.
            first = (self.limits.max_handshake_frame_bytes if encryptor
                     else self.limits.max_frame_bytes)
            conn = BoundedTcpConnection(
                poller=self._syncObj._poller, timeout=conf.connectionTimeout,
                sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
                keepalive=conf.tcp_keepalive, max_frame_bytes=first,
                on_frame_refused=self._on_frame_refused)
            conn.encryptor = encryptor
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    # ------------------------------------------------------------ handshake

    def _admit(self, ip: str) -> bool:
        unknown = self._unknownConnections
        if len(unknown) < self.limits.max_unauthenticated:
            same_ip = sum(1 for c in unknown if getattr(c, "peer_ip", None) == ip)
            if same_ip < self.limits.max_unauthenticated_per_ip:
                return True
        self._counts["connections_refused"] += 1
        self._warn("refused", f"refused a Raft connection from {ip}: "
                   f"{len(unknown)} connections still in their handshake")
        return False

    def _onNewIncomingConnection(self, conn: Any) -> None:
        conn.handshake_deadline = time.monotonic() + self.limits.handshake_timeout_s
        conn.on_frame_refused = self._on_frame_refused
        super()._onNewIncomingConnection(conn)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        super()._onIncomingMessageReceived(conn, message)
        if conn.state == CONNECTION_STATE.CONNECTED and conn not in self._unknownConnections:
            conn.max_frame_bytes = self.limits.max_frame_bytes  # the peer said who it is

    def _onOutgoingMessageReceived(self, conn: Any, message: Any) -> None:
        super()._onOutgoingMessageReceived(conn, message)
        conn.max_frame_bytes = self.limits.max_frame_bytes  # the peer proved the password

    def _onTick(self) -> None:
        super()._onTick()
        if self._unknownConnections:
            self._close_late_handshakes()

    def _close_late_handshakes(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_S
        late = [c for c in self._unknownConnections
                if getattr(c, "handshake_deadline", now) <= now]
        for conn in late:
            ip = getattr(conn, "peer_ip", "?")
            conn.disconnect()
            self._unknownConnections.discard(conn)
            self._counts["handshake_timeouts"] += 1
            self._warn("handshake", f"closed a Raft connection from {ip}: no handshake "
                       f"within {self.limits.handshake_timeout_s} s")

    # ------------------------------------------------------------ reporting

    def _on_frame_refused(self, conn: BoundedTcpConnection, size: int) -> None:
        self._counts["frames_refused"] += 1
        self._unknownConnections.discard(conn)
        self._warn("frame", f"closed a Raft connection from {conn.peer_ip or 'a peer'}: "
                   f"frame of {size} bytes announced, limit {conn.max_frame_bytes}")

    def _on_accept_error(self, exc: OSError) -> None:
        self._counts["accept_errors"] += 1
        self._warn("accept", f"accept on the Raft port failed ({exc}); still listening")

    def _warn(self, kind: str, message: str) -> None:
        # At most one line per kind per second: a flood must not flood the log too.
        now = time.monotonic()
        if now - self._warned_at.get(kind, -_WARN_EVERY_S) < _WARN_EVERY_S:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._warned_at[kind] = now
        more = self._suppressed.pop(kind, 0)
        node = getattr(self._selfNode, "address", "readonly")
        log.warning("node %s: %s%s", node, message,
                    f" (and {more} more like it)" if more else "")
