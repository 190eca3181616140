"""The Raft port survives unauthenticated abuse (consensus.transport.BoundedTCPTransport).

Three real PySyncObj node processes (this file run as a script: a replicated counter,
the node's own ``make_conf`` settings, a password) talk over real loopback sockets;
a line-based control port per node lets the test commit increments and read status.
Attackers are real sockets from other loopback addresses (127.0.0.2, ...), so the
nodes' own connections (from 127.0.0.1) are not in their per-IP bucket.

Given a healthy cluster, when a stranger announces a 2 GiB frame and trickles bytes
to both followers, or leaves 200 connections idle, or sends an oversized frame, then
the connection is closed within its deadline and commits go on.

``TASKANDGO_RAFT_BASELINE=1`` also runs the PySyncObj-level tests against plain
``TCPTransport``, marked as expected to fail (strict): that shows each test catches
the weakness it is about.

``test_node_survives_slow_giant_frame`` runs against a real ``taskandgo node`` cluster
and turns on once ``consensus.raft`` passes ``BoundedTCPTransport`` to SyncObj.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import Cluster, free_ports, stop_processes, wait_for
from taskandgo.consensus import raft as raft_module
from taskandgo.consensus.transport import BoundedTCPTransport, TransportLimits

PASSWORD = "raft-transport-test"
LIMITS = TransportLimits()
#: The nodes' own connections come from 127.0.0.1; attackers from these.
ATTACKER_IPS = [f"127.0.0.{i}" for i in range(10, 30)]

TRANSPORTS = [pytest.param("bounded", id="bounded")]
if os.environ.get("TASKANDGO_RAFT_BASELINE") == "1":
    TRANSPORTS.append(pytest.param("plain", id="plain", marks=pytest.mark.xfail(
        strict=True, reason="plain PySyncObj TCPTransport has no bounds")))

#: consensus.raft wires the class in (imports it, or names it in its source).
RAFT_USES_BOUNDED = any(v is BoundedTCPTransport for v in vars(raft_module).values()) \
    or "BoundedTCPTransport" in inspect.getsource(raft_module)

pytestmark = pytest.mark.cluster


# ---------------------------------------------------------------- node processes


def _node_main(transport: str, self_addr: str, partners: str, control_port: str,
               data_dir: str) -> None:
    """One Raft node: a replicated counter behind a line-based control port.

    Control commands (one line in, one JSON line out): ``inc`` commits an increment
    (1 s timeout), ``status`` gives the leader and the local value."""
    import socketserver

    from pysyncobj import SyncObj
    from pysyncobj.batteries import ReplCounter
    from pysyncobj.transport import TCPTransport
    from taskandgo.consensus.raft import RaftTimers, make_conf

    counter = ReplCounter()
    cls = BoundedTCPTransport if transport == "bounded" else TCPTransport
    so = SyncObj(self_addr, partners.split(","), consumers=[counter], transportClass=cls,
                 conf=make_conf(self_addr, data_dir, PASSWORD, RaftTimers()))

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                cmd = line.decode().strip()
                if cmd == "inc":
                    try:
                        out: dict[str, Any] = {"ok": True,
                                               "value": counter.inc(sync=True, timeout=1.0)}
                    except Exception as exc:  # noqa: BLE001 - reported to the test
                        out = {"ok": False, "error": type(exc).__name__}
                else:
                    leader = so.getStatus().get("leader")
                    out = {"leader": getattr(leader, "address", None), "self": self_addr,
                           "value": counter.get()}
                self.wfile.write(json.dumps(out).encode() + b"\n")

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    Server(("127.0.0.1", int(control_port)), Handler).serve_forever()


def control(port: int, cmd: str, timeout_s: float = 3.0) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(cmd.encode() + b"\n")
        return json.loads(s.makefile().readline())


@dataclass
class RaftNodes:
    """Three node processes; index i has Raft port ``raft[i]``, control ``ctl[i]``."""

    raft: list[int]
    ctl: list[int]
    procs: list[subprocess.Popen | None] = field(default_factory=list)

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self.raft[i]}"

    def leader(self) -> int | None:
        """The index every node names as leader, if they agree."""
        named = {control(p, "status", 1.0)["leader"] for p in self.ctl}
        if len(named) != 1 or None in named:
            return None
        return [self.addr(i) for i in range(3)].index(named.pop())

    def inc(self, i: int) -> int | None:
        try:
            out = control(self.ctl[i], "inc")
        except OSError:
            return None
        return out["value"] if out.get("ok") else None

    def fds(self, i: int) -> int:
        proc = self.procs[i]
        assert proc is not None
        return len(os.listdir(f"/proc/{proc.pid}/fd"))


@pytest.fixture
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RaftNodes]:
    transport = request.param
    ports = free_ports(6)
    n = RaftNodes(raft=ports[:3], ctl=ports[3:], procs=[None] * 3)
    addrs = [n.addr(i) for i in range(3)]
    print(f"raft {n.raft} control {n.ctl} transport {transport}")
    for i in range(3):
        partners = ",".join(a for a in addrs if a != addrs[i])
        n.procs[i] = subprocess.Popen(
            [sys.executable, __file__, "node", transport, addrs[i], partners, str(n.ctl[i]),
             str(tmp_path / f"node-{i}")], stdin=subprocess.DEVNULL,
            # Run as a script, this file still imports harness from tests/support.
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[1] / "support"),
                 os.environ.get("PYTHONPATH", "")])})
    try:
        wait_for(lambda: n.leader() is not None and n.inc(n.leader() or 0) is not None,
                 30, "a leader known to all three nodes that commits")
        yield n
    except BaseException:
        for i in range(3):
            log = Path(tmp_path / f"node-{i}", "node.log")
            if log.exists():
                print(f"----- node-{i} -----\n" + log.read_text(errors="replace")[-4000:])
        raise
    finally:
        stop_processes(n.procs)


# ---------------------------------------------------------------- attackers


class SlowGiantFrame(threading.Thread):
    """Announces a 0x7fffffff-byte frame, then trickles random bytes until the peer
    closes the connection, ``stop()`` is called or ``max_s`` passes."""

    def __init__(self, port: int, src_ip: str, chunk: int = 16 * 1024,
                 every_s: float = 0.001, max_s: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.port, self.src_ip, self.every_s, self.max_s = port, src_ip, every_s, max_s
        self.block = os.urandom(chunk)
        self.halt = threading.Event()
        self.connected_at: float | None = None
        self.closed_at: float | None = None
        self.sent = 0

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2,
                                      source_address=(self.src_ip, 0)) as s:
            self.connected_at = time.monotonic()
            end = self.connected_at + self.max_s
            try:
                s.sendall(struct.pack("i", 0x7FFFFFFF))
                while not self.halt.is_set() and time.monotonic() < end:
                    s.sendall(self.block)
                    self.sent += len(self.block)
                    self.halt.wait(self.every_s)  # pacing, not waiting for an outcome
            except OSError:  # reset / broken pipe: the node closed it
                self.closed_at = time.monotonic()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)

    def open_for(self) -> float | None:
        """Seconds the node kept the connection open (None: still open)."""
        if self.closed_at is None or self.connected_at is None:
            return None
        return self.closed_at - self.connected_at


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer has closed (EOF or reset); never blocks."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""  # readable: does not block
    except (ConnectionResetError, BrokenPipeError):
        return True


def commits_during(nodes: RaftNodes, leader: int, window_s: float) -> tuple[int, float]:
    """Commit increments at the leader for window_s; returns (commits, longest gap in
    seconds without a commit, counting from the start and to the end of the window)."""
    start = time.monotonic()
    last, gap, count = start, 0.0, 0
    while time.monotonic() - start < window_s:
        if nodes.inc(leader) is not None:
            now = time.monotonic()
            gap, last, count = max(gap, now - last), now, count + 1
    return count, max(gap, time.monotonic() - last)


# ---------------------------------------------------------------- PySyncObj framing


class RawPeer:
    """A client speaking PySyncObj's framing and handshake over a real socket."""

    def __init__(self, port: int, src_ip: str, password: str | None = PASSWORD) -> None:
        from pysyncobj.encryptor import getEncryptor

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2,
                                             source_address=(src_ip, 0))
        self.fernet = getEncryptor(password) if password else None
        self.buf = b""
        self.send_key: bytes | None = None

    def send(self, message: Any) -> None:
        if self.send_key is not None:
            message = (self.send_key, message)
        data = zlib.compress(pickle.dumps(message), 3)
        if self.fernet is not None:
            data = self.fernet.encrypt_at_time(data, int(time.monotonic()))
        self.sock.sendall(struct.pack("i", len(data)) + data)

    def recv(self, timeout_s: float) -> Any:
        """The next message (None on EOF or timeout)."""
        deadline = time.monotonic() + timeout_s
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack_from("i", self.buf)[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                more = self.sock.recv(1 << 16)
            except (TimeoutError, OSError):
                return None
            if not more:
                return None
            self.buf += more
        size = struct.unpack_from("i", self.buf)[0]
        data, self.buf = self.buf[4:4 + size], self.buf[4 + size:]
        if self.fernet is not None:
            data = self.fernet.decrypt(data)
        return pickle.loads(zlib.decompress(data))

    def handshake_readonly(self) -> None:
        """PySyncObj's key exchange, then present this connection as a read-only node
        (the leader then streams append-entries to it)."""
        mine = os.urandom(32)
        self.send(mine)
        reply = self.recv(3.0)
        assert isinstance(reply, tuple) and reply[0] == mine, f"handshake reply {reply!r}"
        self.send_key = reply[1]
        self.send("readonly")

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("nodes", TRANSPORTS, indirect=True)
def test_slow_giant_frames_to_both_followers_do_not_stop_commits(nodes: RaftNodes) -> None:
    leader = nodes.leader()
    assert leader is not None
    followers = [i for i in range(3) if i != leader]
    before = nodes.inc(leader)
    assert before is not None

    attacks = [SlowGiantFrame(nodes.raft[f], ATTACKER_IPS[k]) for k, f in enumerate(followers)]
    for a in attacks:
        a.start()
    try:
        count, gap = commits_during(nodes, leader, window_s=5.0)
    finally:
        for a in attacks:
            a.stop()

    assert count >= 10 and gap < 2.0, \
        f"commits under attack: {count} in 5 s, longest gap {gap:.1f} s"
    for a in attacks:
        assert a.open_for() is not None and a.open_for() < 1.0, \
            f"attack connection open for {a.open_for()} s after {a.sent} bytes"


@pytest.mark.parametrize("nodes", TRANSPORTS, indirect=True)
def test_idle_connections_are_closed_and_fds_return(nodes: RaftNodes) -> None:
    leader = nodes.leader()
    assert leader is not None
    baseline = nodes.fds(leader)
    socks: list[socket.socket] = []

    def connect(src_ip: str) -> None:
        socks.append(socket.create_connection(("127.0.0.1", nodes.raft[leader]), timeout=5,
                                              source_address=(src_ip, 0)))

    def closed() -> int:
        return sum(closed_by_peer(s) for s in socks)

    try:
        # One address: beyond max_unauthenticated_per_ip, refused at accept.
        for _ in range(20):
            connect(ATTACKER_IPS[0])
        wait_for(lambda: closed() >= 20 - LIMITS.max_unauthenticated_per_ip, 1.0,
                 "the node to refuse connections beyond the per-IP bound")
        # 200 more from 19 addresses: beyond max_unauthenticated in all, refused at once.
        for k in range(200):
            connect(ATTACKER_IPS[1 + k % (len(ATTACKER_IPS) - 1)])
        opened = time.monotonic()
        wait_for(lambda: closed() >= len(socks) - LIMITS.max_unauthenticated, 1.5,
                 "the node to refuse connections beyond the total bound")
        assert nodes.fds(leader) <= baseline + LIMITS.max_unauthenticated + 3
        # The rest: closed at the handshake deadline.
        deadline_s = LIMITS.handshake_timeout_s + 2.5
        wait_for(lambda: closed() == len(socks), deadline_s,
                 f"the node to close all {len(socks)} idle connections", every_s=0.1)
        assert time.monotonic() - opened < deadline_s
        wait_for(lambda: nodes.fds(leader) <= baseline + 3, 2.0,
                 f"open files of the leader back near {baseline}")
        assert nodes.inc(leader) is not None, "the leader stopped committing"
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("nodes", TRANSPORTS, indirect=True)
def test_oversized_frames_are_refused_and_node_keeps_serving(nodes: RaftNodes) -> None:
    leader = nodes.leader()
    assert leader is not None
    follower = (leader + 1) % 3

    # Before the handshake: anything above the handshake limit closes the connection.
    stranger = RawPeer(nodes.raft[follower], ATTACKER_IPS[0])
    try:
        stranger.sock.sendall(struct.pack("i", LIMITS.max_handshake_frame_bytes + 1)
                              + os.urandom(1024))
        wait_for(lambda: closed_by_peer(stranger.sock), 1.0,
                 "the follower to refuse an oversized handshake frame")
    finally:
        stranger.close()

    # After the handshake: a frame larger than the handshake limit is fine, one over
    # max_frame_bytes is refused as soon as its header arrives.
    peer = RawPeer(nodes.raft[leader], ATTACKER_IPS[1])
    try:
        peer.handshake_readonly()
        peer.send({"type": "noop", "pad": os.urandom(LIMITS.max_handshake_frame_bytes * 2)})
        quiet_until = time.monotonic() + 0.5
        while time.monotonic() < quiet_until:  # the leader keeps streaming to us
            assert peer.recv(1.0) is not None, "a legitimate large frame closed the connection"
        peer.sock.sendall(struct.pack("i", LIMITS.max_frame_bytes + 1) + os.urandom(1024))
        wait_for(lambda: peer.recv(0.05) is None and closed_by_peer(peer.sock), 1.0,
                 "the leader to refuse a frame over max_frame_bytes")
    finally:
        peer.close()

    assert nodes.leader() == leader, "the leader changed"
    value = nodes.inc(leader)
    assert value is not None, "the leader stopped committing"
    wait_for(lambda: control(nodes.ctl[follower], "status")["value"] >= value, 2.0,
             "the attacked follower to apply the new commit")


# ---------------------------------------------------------------- whole node


@pytest.mark.skipif(not RAFT_USES_BOUNDED,
                    reason="consensus.raft does not pass BoundedTCPTransport to SyncObj yet")
def test_node_survives_slow_giant_frame(tmp_path: Path) -> None:
    """A real taskandgo cluster with a Raft password: slow giant frames to both
    followers neither stop submits nor stay open."""
    from taskandgo.node.client import TaskAndGoError

    cluster = Cluster(tmp_path, n=3, env={"TASKANDGO_RAFT_PASSWORD": PASSWORD})
    cluster.start()
    try:
        leader = cluster.wait_ready()
        followers = [i for i in range(3) if i != leader]
        attacks = [SlowGiantFrame(cluster.raft_ports[f], ATTACKER_IPS[k])
                   for k, f in enumerate(followers)]
        for a in attacks:
            a.start()
        accepted, failures = [], []
        try:
            with cluster.client(leader, timeout_s=3.0) as c:
                end = time.monotonic() + 5.0
                while time.monotonic() < end:
                    try:
                        accepted.append(c.submit("task details"))
                    except TaskAndGoError as exc:
                        failures.append(str(exc))
        finally:
            for a in attacks:
                a.stop()
        assert not failures and len(accepted) >= 10, \
            f"{len(accepted)} submits accepted under attack; failures: {failures[:3]}"
        for a in attacks:
            assert a.open_for() is not None and a.open_for() < 1.0, \
                f"attack connection open for {a.open_for()} s after {a.sent} bytes"
        cluster.check_invariants(accepted)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "node":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.makedirs(sys.argv[6], exist_ok=True)
    with open(os.path.join(sys.argv[6], "node.log"), "ab") as out:
        # Logs and tracebacks of the node go to its data dir, shown when a test fails.
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    logging.basicConfig(level=logging.INFO)
    _node_main(*sys.argv[2:])
