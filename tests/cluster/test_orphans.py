"""Nothing a node started outlives it: after ``kill -9`` of a node, its warm call
workers, the processes of its subprocess tasks (grandchildren included) and its
sandboxed tasks all end within a couple of seconds.

A task of a dead node is requeued elsewhere by the leader, so a process still running
it would be a second run of the same attempt; a warm worker left behind is a leak that
grows with every crash. Given a real node running a long call (which itself started a
child), a long shell task with a background grandchild and a long argv task, when the
node is SIGKILLed by its pid, then every process it had started is gone. Also: a
lifeline watcher killed by hand is replaced before the next task starts, and a node
stopped with SIGTERM leaves nothing behind either (its watcher included).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import Cluster, serve, wait_for

pytestmark = pytest.mark.cluster

#: How long a dead node's processes may linger (measured: about 0.1 s).
GONE_WITHIN_S = 2.0

#: A callable for the warm pool: starts a child of its own (in the worker's group),
#: says it is running, then holds the worker.
CALL_MODULE = '''
import os, subprocess, time

def hold(flag: str, seconds: float) -> None:
    subprocess.Popen(["sleep", str(seconds + 4)])
    with open(flag, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
'''


def _bwrap_works() -> bool:
    from taskandgo.node.executor import Sandbox

    return shutil.which("bwrap") is not None and Sandbox.probe("auto").enabled


@pytest.fixture(params=["off", "require"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """One node, sandbox off or required (skipped where bubblewrap cannot start)."""
    if request.param == "require" and not _bwrap_works():
        pytest.skip("bubblewrap cannot start here (apt-get install bubblewrap)")
    # The node's working directory is on its call workers' PYTHONPATH.
    (tmp_path / "orphanlib.py").write_text(CALL_MODULE)
    c = Cluster(tmp_path, n=1, slots=4, extra=["--sandbox", request.param])
    yield from serve(request, c)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a killed orphan waits as a zombie for its new parent)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return "?"


def _expect_all_end(node_proc: object, procs: list[psutil.Process], sig: int) -> None:
    """Send ``sig`` to the node by its pid, then poll until every one of ``procs`` has
    ended; fail naming the survivors (and end them, each by its pid)."""
    assert isinstance(node_proc, subprocess.Popen)
    try:
        os.kill(node_proc.pid, sig)
        node_proc.wait(timeout=30)
        ended_at = time.monotonic()
        deadline = ended_at + GONE_WITHIN_S
        while time.monotonic() < deadline and any(_running(p) for p in procs):
            time.sleep(0.05)
        survivors = [f"{p.pid} ({_cmd(p)})" for p in procs if _running(p)]
        assert not survivors, (f"{len(survivors)} of {len(procs)} processes the node started "
                               f"still run {GONE_WITHIN_S:g} s after it ended: "
                               + "; ".join(survivors))
        print(f"all {len(procs)} gone {time.monotonic() - ended_at:.2f} s after the node")
    finally:
        for p in procs:  # on failure: end the survivors, each by its pid
            try:
                p.kill()
            except psutil.Error:
                pass


def _running_units(node_pid: int, flag: Path | None, cmds: tuple[str, ...]
                   ) -> list[psutil.Process] | None:
    procs = _descendants(node_pid)
    text = " | ".join(_cmd(p) for p in procs)
    if (flag is None or flag.exists()) and all(c in text for c in cmds):
        return procs
    return None


def test_every_process_of_a_killed_node_ends(node: Cluster, tmp_path: Path) -> None:
    proc = node.procs[0]
    assert proc is not None
    flag = tmp_path / "call-running"
    with node.client() as c:
        c.submit(call="orphanlib:hold", args={"flag": str(flag), "seconds": 600},
                 strategy="batch")
        c.submit("sh: sleep 601 & sleep 602; wait", strategy="batch")
        c.submit(argv=["sleep", "603"], strategy="batch")
    # Every unit is running (the call wrote its flag after starting "sleep 604"): the
    # node's children and theirs are what must end with it.
    procs = wait_for(lambda: _running_units(proc.pid, flag, ("sleep 601", "sleep 602",
                                                              "sleep 603", "sleep 604")),
                     60.0, "the call, shell and argv tasks to be running")
    print("node", proc.pid, "started:", [(p.pid, _cmd(p)) for p in procs])
    _expect_all_end(proc, procs, signal.SIGKILL)


def _watcher(node_pid: int) -> psutil.Process | None:
    found = [p for p in _descendants(node_pid) if "watch_lifeline" in _cmd(p)]
    return found[0] if len(found) == 1 else None


@pytest.mark.parametrize("node", ["off"], indirect=True)
def test_a_killed_watcher_is_replaced_before_the_next_task(node: Cluster) -> None:
    proc = node.procs[0]
    assert proc is not None
    old = wait_for(lambda: _watcher(proc.pid), 10.0, "the node's lifeline watcher")
    old.kill()
    wait_for(lambda: not _running(old), 10.0, f"watcher {old.pid} to end")
    with node.client() as c:
        c.submit("sh: sleep 605", strategy="batch")
    procs = wait_for(lambda: _running_units(proc.pid, None, ("sleep 605",)), 60.0,
                     "the shell task to be running")
    new = _watcher(proc.pid)
    assert new is not None and new.pid != old.pid, "no new lifeline watcher"
    _expect_all_end(proc, procs, signal.SIGKILL)


@pytest.mark.parametrize("node", ["off"], indirect=True)
def test_a_stopped_node_leaves_nothing_behind(node: Cluster) -> None:
    """SIGTERM: the node ends its units and workers itself; the watcher then exits."""
    proc = node.procs[0]
    assert proc is not None
    with node.client() as c:
        c.submit("sh: sleep 606", strategy="batch")
    procs = wait_for(lambda: _running_units(proc.pid, None, ("sleep 606",
                                                             "watch_lifeline")),
                     60.0, "the shell task to be running")
    _expect_all_end(proc, procs, signal.SIGTERM)
    assert proc.returncode == 0, f"the node exited {proc.returncode} on SIGTERM"
