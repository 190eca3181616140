"""The leader's scheduling wiring (node/scheduling.py) on a real, unstarted node."""

from __future__ import annotations

from pathlib import Path

from taskandgo.node.app import NodeApp
from taskandgo.node.config import NodeConfig, parse_voters


def test_requeue_entries_while_a_voter_runs_an_earlier_release(tmp_path: Path) -> None:
    """Given voters that have not reported RAFT_PROTOCOL 3 (a rolling upgrade), when the
    lease check requeues an attempt, its entries carry no start time and no
    confirm-death entry is added: the requeue command is still one tuple of entries
    (an empty list here made the lease check raise TypeError)."""
    cfg = NodeConfig(node_id="n0", bind="127.0.0.1", advertise="127.0.0.1", grpc_port=1,
                     raft_port=2, http_port=3, data_dir=str(tmp_path), slots=1,
                     voters=parse_voters("127.0.0.1:1:2,127.0.0.2:1:2,127.0.0.3:1:2"))
    app = NodeApp(cfg)
    try:
        assert app.replica.requeue_tail() == []
        key = ("task-1", 0, 1, 7)
        entries = (key,) + app.scheduler._deaths([(key, "worker-1", 1.0)])
        assert entries == (key,)
    finally:
        app.stop()


def test_building_a_node_starts_no_thread_and_no_process(tmp_path: Path) -> None:
    """Given a node's configuration, when NodeApp is built (and not started), then no
    thread and no child process exists that did not before: every part starts its
    threads and processes in start() (the executor's runners, warm call processes
    and lifeline watcher used to start in the constructor)."""
    import threading

    import psutil

    cfg = NodeConfig(node_id="n0", bind="127.0.0.1", advertise="127.0.0.1", grpc_port=1,
                     raft_port=2, http_port=3, data_dir=str(tmp_path), slots=2,
                     voters=parse_voters("127.0.0.1:1:2"))
    threads = {t.ident for t in threading.enumerate()}
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    app = NodeApp(cfg)
    try:
        new_threads = [t.name for t in threading.enumerate() if t.ident not in threads]
        new_children = [p.cmdline() for p in psutil.Process().children(recursive=True)
                        if p.pid not in children]
        assert new_threads == [] and new_children == []
    finally:
        app.stop()
