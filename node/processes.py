"""The node's helper processes: the lifeline that ends everything the node started
once the node is gone, and the warm pool of Python processes that run callables.

Used by :class:`taskandgo.node.executor.Executor`. Every process started here holds
the node's :class:`Lifeline`, so none outlives the node, even a node killed with
SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from taskandgo.node.callworker import format_allow

log = logging.getLogger("taskandgo.executor")

#: The only variables of the node's environment a task or helper process sees.
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "PYTHONPATH", "VIRTUAL_ENV")


class Cancelled(Exception):
    """A call was cancelled (the unit was killed) before it finished."""


def _python_env() -> dict[str, str]:
    """The environment of a Python helper process (call worker, lifeline watcher): the
    safe variables, and the node's working directory on its import path."""
    env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
    return env


_WATCHER_MAIN = ("import sys; from taskandgo.node.processes import watch_lifeline; "
                 "watch_lifeline(int(sys.argv[1]), int(sys.argv[2]))")


class Lifeline:
    """Ends every process this node started once the node is gone, however it ends
    (SIGKILL and the OOM killer included), within a few hundred milliseconds: a unit of
    a dead node is requeued elsewhere, so a process still running it would be a second
    run, and a warm worker left behind a leak.

    The node holds the only write end of a pipe and never writes to it. Every process
    started here inherits the read end (``pass_fds=(lifeline.fd,)``), and so do its
    children unless they close it. A watcher process (:func:`watch_lifeline`, in its
    own session so that a signal to the node's process group spares it) blocks reading
    the pipe; when the node exits, the kernel closes the write end, the watcher reads
    EOF and SIGKILLs every process still holding the pipe together with its process
    group, rescanning until none is left. Units run in process groups of their own, so
    a grandchild that closed the fd still ends with its group; one that left its group
    *and* closed every inherited fd (a daemon) is beyond reach, as under any supervisor
    without cgroups. A sandboxed unit also ends with bwrap (``--die-with-parent`` and
    its own PID namespace). A process the node forks without exec (the Raft snapshot
    writer) holds the write end too, which delays the watcher until it exits.

    Why not ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked exits, not the
    process (units and replacement workers are started from runner threads), it
    reaches only the direct child (not what ``sh -c "a & b"`` starts), and setting it
    needs ``preexec_fn``, unsafe in a threaded process. Why not a registry of process
    groups: a node killed between fork and registration would leave that group
    behind; the fd is inherited at fork, so there is no such window.

    Thread-safe. Linux only (the watcher reads /proc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read, self._write = os.pipe()  # non-inheritable: only pass_fds hands it on
        self._closed = False
        self._watcher: subprocess.Popen | None = None  # started by start() or fd

    def start(self) -> None:
        """Start the watcher (the constructor starts nothing)."""
        self.fd  # noqa: B018 (the property starts it)

    @property
    def fd(self) -> int:
        """The read end, for ``pass_fds``. Restarts the watcher if it died (so a
        watcher killed by hand or by the OOM killer is back before the next start).
        OSError once closed."""
        with self._lock:
            if self._closed:
                raise OSError("the node's lifeline is closed (shutting down)")
            if self._watcher is None:
                self._watcher = self._start_watcher()
            elif self._watcher.poll() is not None:
                log.warning("lifeline watcher %d exited (%s); restarting it",
                            self._watcher.pid, self._watcher.returncode)
                self._watcher = self._start_watcher()
            return self._read

    def _start_watcher(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHER_MAIN, str(os.getpid()), str(os.getpgrp())],
            stdin=self._read, stdout=subprocess.DEVNULL, start_new_session=True,
            env=_python_env())

    def close(self, timeout_s: float = 10.0) -> None:
        """Let the watcher end whatever still holds the pipe (the caller has stopped
        its own processes by then), and wait for it. Idempotent; call it only once no
        thread starts processes any more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._read)  # first: this process must not be a holder
            os.close(self._write)
        if self._watcher is None:
            return
        try:
            self._watcher.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._watcher.kill()
            self._watcher.wait()


def watch_lifeline(node_pid: int, node_pgid: int, budget_s: float = 10.0) -> None:
    """The lifeline watcher (stdin: the lifeline's read end). Blocks until the node's
    write end is closed, then SIGKILLs every process holding the pipe and its process
    group (never the node's own group, which it shares with whatever started the
    node), until none is left or ``budget_s`` has passed."""
    marker = os.readlink("/proc/self/fd/0")  # "pipe:[inode]"
    while os.read(0, 4096):  # the node never writes: b"" is its end closing
        pass
    me = os.getpid()
    spare_groups = {node_pgid, os.getpgrp()}
    deadline = time.monotonic() + budget_s
    for _ in range(1000):
        holders = _lifeline_holders(marker, {me, node_pid})
        if not holders or time.monotonic() > deadline:
            return
        for pid in holders:
            try:
                pgid = os.getpgid(pid)
                if pgid not in spare_groups:
                    os.killpg(pgid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone meanwhile
                pass
        # A killed process drops its fds a moment later; rescan for it and for
        # children forked between the scan and the kill.
        time.sleep(0.01)


def _lifeline_holders(marker: str, skip: set[int]) -> list[int]:
    """Pids (from /proc) with an fd open on the pipe ``marker`` names; zombies hold none."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") == marker:
                    out.append(int(name))
                    break
            except OSError:
                continue
    return out


class CallPool:
    """Warm Python processes that run callables by import path, one call each.

    ``allowed`` is the node's call allow-list (None: any module, (): none); each
    worker is started with it and enforces it on every call itself, whatever the
    node checked before. A worker whose call changed a module it had pinned says
    so (``retire``) and is replaced before it runs anything else. Workers hold
    ``lifeline`` (one of the pool's own, closed with it, when none is given)."""

    def __init__(self, size: int, allowed: tuple[str, ...] | None = None,
                 lifeline: Lifeline | None = None) -> None:
        self._allowed = allowed
        self._size = size
        self._own_lifeline = lifeline is None
        self._lifeline = lifeline if lifeline is not None else Lifeline()
        self._idle: queue.LifoQueue[subprocess.Popen] = queue.LifoQueue()
        self._all: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the warm processes (the constructor starts nothing)."""
        for _ in range(self._size):
            self._idle.put(self._spawn())

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskandgo.node.callworker",
             "--allow-calls", format_allow(self._allowed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, env=_python_env(), pass_fds=(self._lifeline.fd,),
        )
        proc._buf = b""  # type: ignore[attr-defined]
        with self._lock:
            self._all.append(proc)
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen, deadline: float, cancel: threading.Event) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf: bytes = proc._buf  # type: ignore[attr-defined]
        while b"\n" not in buf:
            if cancel.is_set():
                raise Cancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            ready, _, _ = select.select([fd], [], [], min(left, 0.1))
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise EOFError("call worker exited")
                buf += data
        line, _, rest = buf.partition(b"\n")
        proc._buf = rest  # type: ignore[attr-defined]
        return line

    def call(self, request: dict[str, Any], timeout_s: float,
             cancel: threading.Event) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        reply = self._call_once(request, timeout_s, deadline, cancel)
        if reply.pop("fresh", False):
            # The worker had run other calls before this module was first asked for,
            # so it could not pin it as imported; its replacement (next out of the
            # LIFO idle queue) has run nothing and can.
            reply = self._call_once(request, timeout_s, deadline, cancel)
            reply.pop("fresh", None)
        return reply

    def _call_once(self, request: dict[str, Any], timeout_s: float, deadline: float,
                   cancel: threading.Event) -> dict[str, Any]:
        proc = self._idle.get()
        healthy = False
        try:
            if not getattr(proc, "_ready", False):
                first = json.loads(self._readline(proc, time.monotonic() + 30, cancel))
                proc._ready = bool(first.get("ready"))  # type: ignore[attr-defined]
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            reply = json.loads(self._readline(proc, deadline, cancel))
            healthy = not reply.pop("retire", False)
            if not healthy and not reply.get("fresh"):
                log.warning("call %s changed a module its worker had pinned; worker %d "
                            "replaced", request.get("call"), proc.pid)
            return reply
        except TimeoutError:
            return {"ok": False, "result": "", "error": f"timed out after {timeout_s:g} s",
                    "exit_code": -9}
        except Cancelled:
            return {"ok": False, "result": "", "error": "cancelled", "exit_code": -9}
        except (OSError, EOFError, ValueError) as exc:
            return {"ok": False, "result": "", "error": f"call worker failed: {exc}",
                    "exit_code": -1}
        finally:
            if healthy:
                self._idle.put(proc)
            else:
                self._kill(proc)
                if not self._closed:
                    self._idle.put(self._spawn())

    def _kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with self._lock:
            if proc in self._all:
                self._all.remove(proc)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            procs = list(self._all)
        for p in procs:
            self._kill(p)
        if self._own_lifeline:
            self._lifeline.close()


__all__ = ["SAFE_ENV", "CallPool", "Cancelled", "Lifeline", "watch_lifeline"]
