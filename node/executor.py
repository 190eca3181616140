"""Runs the units a leader hands this node: subprocesses and warm-pool callables.

Every unit runs on its own thread from a pool sized to the node's slots. A
subprocess gets its own process group (killed whole on cancel or timeout), its
own temporary working directory (removed afterwards), a sanitised environment
plus the chunk variables, and a cap on the output kept. Where bubblewrap works, it
also runs inside a :class:`Sandbox` (its own PID, IPC, mount and UTS namespaces;
see docs/security.md, "Task sandbox"). A callable runs in a warm :class:`CallPool`
process, which is killed and replaced if the call is cancelled or times out; the
pool is not sandboxed (the call allow-list is what bounds it). Every process started
here holds the node's :class:`Lifeline`, so none outlives the node, even a node
killed with SIGKILL.

Results go to ``on_result`` (the node's reporter) exactly once per dispatched unit.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from taskandgo.node.callworker import format_allow

log = logging.getLogger("taskandgo.executor")

UnitKey = tuple  # (task_id, chunk, attempt, token)

SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "PYTHONPATH", "VIRTUAL_ENV")


@dataclass
class Work:
    task_id: str
    chunk: int
    chunk_count: int
    attempt: int
    token: int
    payload: dict[str, Any]
    priority: int = 0

    @property
    def key(self) -> UnitKey:
        return (self.task_id, self.chunk, self.attempt, self.token)


#: How much of the end of a unit's stderr its result keeps (bytes), on success too.
STDERR_TAIL = 4096


@dataclass(frozen=True)
class Collected:
    """What a subprocess wrote: the head of stdout (up to the output cap), the tail
    of stderr (STDERR_TAIL bytes) and the byte counts of both streams in all."""

    out: bytes
    err: bytes
    out_bytes: int
    err_bytes: int
    timed_out: bool


class Cancelled(Exception):
    pass


def split_prefix(data: str) -> tuple[str, str]:
    """``"python: print(1)"`` -> ``("python", "print(1)")``; no prefix -> ``("", data)``."""
    head, sep, rest = data.partition(":")
    if sep and head.strip().isidentifier() and " " not in head.strip():
        return head.strip(), rest.lstrip()
    return "", data


def default_interpreters() -> dict[str, list[str]]:
    return {
        "python": [sys.executable, "-c"],
        "python3": [sys.executable, "-c"],
        "sh": ["/bin/sh", "-c"],
        "bash": ["bash", "-c"],
    }


#: Host directories every sandbox sees read-only (when they exist here). /bin,
#: /sbin and /lib* are recreated as symlinks where the host has them as symlinks
#: (merged /usr), else bound too.
SYSTEM_DIRS = ("/usr", "/etc", "/opt")
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Where the task's private directories are inside the sandbox.
SANDBOX_TMP = "/tmp"
#: A path no host directory the sandbox shows lives under: "/work" hid every
#: virtualenv or checkout under /work (the interpreter itself: no sandbox at all).
SANDBOX_WORKDIR = "/taskandgo-task"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class Sandbox:
    """How subprocess tasks are isolated from the node and from each other.

    ``kind`` is ``"bwrap"`` (tasks run under bubblewrap) or ``"none"`` (they run
    as the node's user, as before; ``reason`` says why). Build one with
    :meth:`probe`, which starts bubblewrap once with the real settings and falls
    back to ``none`` if it cannot start (missing, or user namespaces refused).
    Immutable, so every runner thread may use it."""

    kind: str = "none"
    reason: str = "not configured"
    bwrap: str = ""
    network: bool = True
    #: Read-only binds beyond the system dirs (the Python installation, PATH and
    #: PYTHONPATH directories, interpreters): (host path, sandbox path).
    binds: tuple[str, ...] = ()
    #: Paths the sandbox must not show: the node's data dir, its secret files.
    hide: tuple[str, ...] = ()
    _static: tuple[str, ...] = field(default=(), repr=False)

    @property
    def enabled(self) -> bool:
        return self.kind == "bwrap"

    def describe(self) -> str:
        """For node status and logs: ``bwrap``, ``bwrap (no network)`` or
        ``none: <reason>``."""
        if not self.enabled:
            return f"none: {self.reason}"
        return "bwrap" if self.network else "bwrap (no network)"

    @classmethod
    def off(cls, reason: str) -> Sandbox:
        return cls(kind="none", reason=reason)

    @classmethod
    def build(cls, bwrap: str, network: bool = True, hide: Iterable[str] = (),
              extra_binds: Iterable[str] = ()) -> Sandbox:
        """A bwrap sandbox (not yet probed). ``hide``: paths tasks must not see
        even where they lie under a bound directory; ``extra_binds``: more
        directories to show read-only (e.g. interpreters outside /usr)."""
        hidden = tuple(dict.fromkeys(os.path.abspath(h) for h in hide if h))
        binds: list[str] = []
        roots = [d for d in SYSTEM_DIRS if os.path.isdir(d)]
        candidates = [sys.prefix, sys.base_prefix,
                      os.path.dirname(os.path.realpath(sys.executable))]
        for var in ("PATH", "PYTHONPATH", "VIRTUAL_ENV"):
            candidates += os.environ.get(var, "").split(os.pathsep)
        candidates += list(extra_binds)
        for candidate in candidates:
            # Only absolute, existing directories; never one that holds (or is
            # inside) a hidden path's directory tree such as the data dir, the
            # node's working directory or /tmp (tasks get their own).
            if not candidate or not os.path.isabs(candidate) or not os.path.isdir(candidate):
                continue
            c = os.path.realpath(candidate)
            if c == "/" or _under(c, "/tmp") or _under(c, "/proc") or _under(c, "/dev") \
                    or any(_under(h, c) or _under(c, h) for h in hidden) \
                    or any(_under(c, r) for r in roots + binds):
                continue
            binds = [b for b in binds if not _under(b, c)] + [c]
        static: list[str] = []
        for d in roots + binds:
            static += ["--ro-bind", d, d]
        for link in SYSTEM_LINKS:
            if os.path.islink(link):
                static += ["--symlink", os.readlink(link), link]
            elif os.path.isdir(link):
                static += ["--ro-bind", link, link]
        for h in hidden:
            static += cls._hide(h, roots + binds)
        return cls(kind="bwrap", reason="", bwrap=bwrap, network=network,
                   binds=tuple(binds), hide=hidden, _static=tuple(static))

    @staticmethod
    def _hide(path: str, bound: list[str]) -> list[str]:
        """bwrap arguments that cover ``path`` (and what it points to) where it lies
        under a bound directory: its own directory gets an empty tmpfs when that is
        not a bound root itself (a secrets volume, the data dir), else the file
        alone is covered with /dev/null."""
        out: list[str] = []
        for p in dict.fromkeys([path, os.path.realpath(path)]):
            # What does not exist cannot be shown (and a read-only bind cannot
            # hold a new mount point).
            if not os.path.lexists(p) or not any(_under(p, b) for b in bound):
                continue
            if os.path.isdir(p):
                out += ["--tmpfs", p]
                continue
            parent = os.path.dirname(p)
            if parent not in bound and any(_under(parent, b) for b in bound):
                out += ["--tmpfs", parent]
            else:
                out += ["--ro-bind", "/dev/null", p]
        return out

    def wrap(self, argv: list[str], rundir: str) -> list[str]:
        """``argv`` to run inside the sandbox; ``rundir`` is a fresh host directory
        holding ``tmp`` and ``work``, shown to the task as /tmp and /taskandgo-task (its
        working directory)."""
        if not self.enabled:
            return argv
        out = [self.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--hostname", "taskandgo-task",
               "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        if not self.network:
            out.append("--unshare-net")
        out += list(self._static)
        out += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm",
                "--bind", os.path.join(rundir, "tmp"), SANDBOX_TMP,
                "--bind", os.path.join(rundir, "work"), SANDBOX_WORKDIR,
                "--chdir", SANDBOX_WORKDIR, "--"]
        return out + argv

    @classmethod
    def probe(cls, mode: str, bwrap: str = "bwrap", network: bool = True,
              hide: Iterable[str] = (), extra_binds: Iterable[str] = (),
              timeout_s: float = 20.0) -> Sandbox:
        """The sandbox this node can give its tasks, found by starting bubblewrap
        once with the real settings (``mode``: auto, require or off). Never raises:
        whatever fails comes back as ``none: <reason>``; the caller decides what
        ``require`` does with that."""
        if mode == "off":
            return cls.off("turned off (--sandbox off)")
        path = shutil.which(bwrap)
        if path is None:
            return cls.off(f"bubblewrap not found ({bwrap!r}; apt-get install bubblewrap)")
        sb = cls.build(path, network, hide, extra_binds)
        rundir = tempfile.mkdtemp(prefix="taskandgo-probe-")
        try:
            os.mkdir(os.path.join(rundir, "tmp"))
            os.mkdir(os.path.join(rundir, "work"))
            # The real interpreter, so a missing bind shows here, not in a task.
            argv = sb.wrap([sys.executable, "-c", "import os; print(os.getpid())"], rundir)
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                      check=False, timeout=timeout_s, start_new_session=True,
                                      env={k: v for k, v in os.environ.items() if k in SAFE_ENV})
            except (OSError, subprocess.TimeoutExpired) as exc:
                return cls.off(f"bubblewrap could not start: {exc}")
            if proc.returncode != 0 or proc.stdout.strip() != b"2":
                err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
                why = err[-1] if err else f"exit code {proc.returncode}"
                return cls.off(f"bubblewrap could not start: {why}"[:300])
            return sb
        finally:
            shutil.rmtree(rundir, ignore_errors=True)


def _python_env() -> dict[str, str]:
    """The environment of a Python helper process (call worker, lifeline watcher): the
    safe variables, and the node's working directory on its import path."""
    env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
    return env


_WATCHER_MAIN = ("import sys; from taskandgo.node.executor import watch_lifeline; "
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


class Executor:
    """Runs dispatched units; thread-safe."""

    def __init__(
        self,
        node_id: str,
        slots: int,
        on_result: Callable[[dict[str, Any]], None],
        interpreters: dict[str, list[str]] | None = None,
        default_runner: str = "echo",
        output_limit: int = 64 * 1024,
        default_timeout_s: float = 3600.0,
        policy: Any = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.node_id = node_id
        self.policy = policy
        #: Where subprocess tasks run; the node sets the probed one before it
        #: takes work (see node/main.py). Read once per task, never changed while
        #: tasks run.
        self.sandbox = sandbox or Sandbox.off("not configured")
        self.slots = slots
        self.on_result = on_result
        self.interpreters = default_interpreters()
        self.interpreters.update(interpreters or {})
        self.default_runner = default_runner
        self.output_limit = output_limit
        self.default_timeout_s = default_timeout_s
        self._lifeline = Lifeline()
        self._calls = CallPool(slots, policy.call_modules if policy is not None else None,
                               self._lifeline)
        self._lock = threading.Lock()
        self._ready_cv = threading.Condition(self._lock)
        # Units dispatched but not started (a leader may send more than `slots`):
        # started highest priority first, FIFO within a priority.
        self._ready: list[tuple[int, int, Work]] = []
        self._seq = 0
        self._active: dict[UnitKey, threading.Event] = {}
        self._procs: dict[UnitKey, subprocess.Popen] = {}
        self._closed = False
        self._runners: list[threading.Thread] = []

    def start(self) -> None:
        """Start the lifeline watcher, the warm call pool and one runner thread per
        slot (the constructor starts nothing)."""
        self._lifeline.start()
        self._calls.start()
        self._runners = [threading.Thread(target=self._runner, name=f"unit-{i}", daemon=True)
                         for i in range(self.slots)]
        for t in self._runners:
            t.start()

    # -------------------------------------------------------------- public API

    def dispatch(self, works: list[Work]) -> int:
        """Start units; a unit already active here is ignored (duplicate dispatch)."""
        n = 0
        with self._lock:
            if self._closed:
                return 0
            for w in works:
                if w.key in self._active:
                    continue
                self._active[w.key] = threading.Event()
                self._seq += 1
                heapq.heappush(self._ready, (-w.priority, self._seq, w))
                n += 1
            self._ready_cv.notify(n)
        return n

    def _runner(self) -> None:
        while True:
            with self._ready_cv:
                while not self._ready and not self._closed:
                    self._ready_cv.wait()
                if not self._ready:
                    return
                w = heapq.heappop(self._ready)[2]
            self._run(w)

    def hold(self, min_priority: int) -> list[Work]:
        """Take back every unit still waiting to start whose priority is below
        min_priority (a higher-priority task arrived); the caller hands them back."""
        with self._lock:
            keep: list[tuple[int, int, Work]] = []
            out: list[tuple[int, int, Work]] = []
            for entry in self._ready:
                (out if entry[2].priority < min_priority else keep).append(entry)
            if not out:
                return []
            heapq.heapify(keep)
            self._ready = keep
            for _, _, w in out:
                self._active.pop(w.key, None)
        return [w for _, _, w in sorted(out)]

    def active(self) -> list[UnitKey]:
        with self._lock:
            return list(self._active)

    def free_slots(self) -> int:
        with self._lock:
            return max(0, self.slots - len(self._active))

    def kill(self, keys: list[UnitKey]) -> int:
        """Cancel units (their whole process group is killed)."""
        n = 0
        with self._lock:
            for key in keys:
                ev = self._active.get(tuple(key))
                if ev is not None:
                    ev.set()
                    n += 1
                proc = self._procs.get(tuple(key))
                if proc is not None:
                    _killpg(proc)
        return n

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for ev in self._active.values():
                ev.set()
            for proc in self._procs.values():
                _killpg(proc)
            self._ready_cv.notify_all()
        for t in self._runners:
            t.join(timeout=10)
        self._calls.close()
        self._lifeline.close()

    # -------------------------------------------------------------- running

    def _run(self, w: Work) -> None:
        cancel = self._active.get(w.key) or threading.Event()
        started = time.time()
        out: dict[str, Any]
        try:
            if cancel.is_set():  # killed before it started
                out = {"ok": False, "result": "", "error": "cancelled", "exit_code": -9}
            else:
                out = self._execute(w, cancel)
        except Exception as exc:  # a task must never take the node down
            log.exception("node %s: unit %s failed to run", self.node_id, w.key)
            out = {"ok": False, "result": "", "error": f"could not run: {exc}", "exit_code": -1}
        finished = time.time()
        with self._lock:
            self._active.pop(w.key, None)
            self._procs.pop(w.key, None)
            killed = cancel.is_set()
        if killed and out.get("ok"):
            out = {"ok": False, "result": "", "error": "cancelled", "exit_code": -9}
        result, cut, total = _bounded(str(out.get("result", "")), self.output_limit)
        # output_bytes is what the task wrote to stdout in all (a callable: its JSON
        # result), whether or not it was all kept; truncated says the result is cut.
        total = int(out.get("output_bytes", total) or 0)
        self.on_result({
            "task_id": w.task_id, "chunk": w.chunk, "attempt": w.attempt, "token": w.token,
            "ok": bool(out.get("ok")), "exit_code": int(out.get("exit_code", 0) or 0),
            "result": result,
            "error": str(out.get("error", ""))[-4000:], "node": self.node_id,
            "started_at": started, "finished_at": finished,
            "stderr": str(out.get("stderr", ""))[-STDERR_TAIL:],
            "truncated": bool(cut or out.get("truncated")), "output_bytes": total,
        })

    def _execute(self, w: Work, cancel: threading.Event) -> dict[str, Any]:
        p = w.payload
        if self.policy is not None:
            try:
                self.policy.check(p, self.default_runner)  # again here: defence in depth
            except ValueError as exc:
                return {"ok": False, "result": "", "error": f"refused by policy: {exc}",
                        "exit_code": -1}
        timeout_s = float(p.get("timeout_s") or self.default_timeout_s)
        if p.get("call"):
            kwargs: dict[str, Any] = {}
            if w.chunk >= 0:
                kwargs = {"chunk_index": w.chunk, "chunk_count": w.chunk_count,
                          "items": p.get("items")}
            return self._calls.call({"call": p["call"], "args": p.get("args"), "kwargs": kwargs},
                                    timeout_s, cancel)
        if p.get("argv"):
            argv = [str(a) for a in p["argv"]]
        else:
            prefix, code = split_prefix(str(p.get("data", "")))
            if not prefix:
                if self.default_runner == "echo":
                    return {"ok": True, "result": str(p.get("data", "")), "exit_code": 0}
                prefix, code = self.default_runner, str(p.get("data", ""))
            interp = self.interpreters.get(prefix)
            if interp is None:
                return {"ok": False, "result": "", "exit_code": -1,
                        "error": f"no interpreter configured for prefix {prefix!r}"}
            argv = list(interp) + [code]
        return self._subprocess(w, argv, timeout_s, cancel)

    def _subprocess(self, w: Work, argv: list[str], timeout_s: float,
                    cancel: threading.Event) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
        env.update({
            "TASKANDGO_TASK_ID": w.task_id,
            "TASKANDGO_ATTEMPT": str(w.attempt),
            "TASKANDGO_NODE_ID": self.node_id,
            "PYTHONUNBUFFERED": "1",
        })
        if w.chunk >= 0:
            env.update({
                "TASKANDGO_CHUNK_INDEX": str(w.chunk),
                "TASKANDGO_CHUNK_COUNT": str(w.chunk_count),
                "TASKANDGO_CHUNK_ITEMS": json.dumps(w.payload.get("items")),
            })
        sandbox = self.sandbox
        rundir = tempfile.mkdtemp(prefix="taskandgo-run-")
        try:
            if sandbox.enabled:
                # Its own /tmp and working dir, on the node's disk (not the
                # sandbox's memory), removed with rundir.
                os.mkdir(os.path.join(rundir, "tmp"))
                os.mkdir(os.path.join(rundir, "work"))
                env["HOME"] = SANDBOX_WORKDIR
                argv, cwd = sandbox.wrap(argv, rundir), rundir
            else:
                cwd = rundir
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, cwd=cwd, env=env,
                                        start_new_session=True,
                                        pass_fds=(self._lifeline.fd,))
            except OSError as exc:
                return {"ok": False, "result": "", "error": f"cannot start {argv[0]}: {exc}",
                        "exit_code": 127}
            with self._lock:
                self._procs[w.key] = proc
                if cancel.is_set():
                    _killpg(proc)
            # Killing the group kills bwrap; --die-with-parent takes down the
            # sandbox's PID 1 with it, and with that every process in its namespace.
            got = self._collect(proc, timeout_s, cancel)
            code = proc.returncode
            cut = got.out_bytes > len(got.out)
            # A cut result may end inside a UTF-8 sequence: drop the partial character.
            text = got.out.decode("utf-8", "ignore" if cut else "replace")
            if not cut:
                text = text.rstrip("\n")
            err = _decode_tail(got.err)
            # Kept on success too: a warning from a passing task is not lost.
            common = {"result": text, "exit_code": code, "stderr": err,
                      "truncated": cut, "output_bytes": got.out_bytes}
            if got.timed_out:
                return {"ok": False, **common, "error": f"timed out after {timeout_s:g} s"}
            if cancel.is_set():
                return {"ok": False, **common, "error": "cancelled"}
            if code != 0:
                return {"ok": False, **common,
                        "error": f"exit code {code}: {err[-2000:]}".strip()}
            return {"ok": True, **common, "exit_code": 0}
        finally:
            shutil.rmtree(rundir, ignore_errors=True)

    def _collect(self, proc: subprocess.Popen, timeout_s: float,
                 cancel: threading.Event) -> Collected:
        """Read stdout and stderr until the process exits: the head of stdout up to
        the output cap, the last STDERR_TAIL bytes of stderr, and how many bytes
        each stream carried in all (the rest is drained and dropped). Kill the
        process group on timeout or cancel."""
        assert proc.stdout is not None and proc.stderr is not None
        limit = self.output_limit
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        out, err = bytearray(), bytearray()
        totals = {out_fd: 0, err_fd: 0}
        open_fds = [out_fd, err_fd]
        deadline = time.monotonic() + timeout_s
        timed_out = False
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0 and not timed_out:
                timed_out = True
                _killpg(proc)
            if cancel.is_set() or proc.poll() is not None:
                # Cancelled, or the task's main process is done: end its whole group
                # so a leftover grandchild cannot hold the pipes open.
                _killpg(proc)
            wait_s = max(0.0, min(left, 0.1)) if left > 0 else 0.1
            ready, _, _ = select.select(open_fds, [], [], wait_s)
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    open_fds.remove(fd)
                    continue
                totals[fd] += len(data)
                if fd == out_fd:
                    if len(out) < limit:
                        out += data[: limit - len(out)]
                else:
                    err += data
                    if len(err) > 2 * STDERR_TAIL:  # trim now and then, not per read
                        del err[: len(err) - STDERR_TAIL]
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _killpg(proc)
            proc.wait()
        # A process that exited while its group lives on (a leftover grandchild)
        # has its group killed too.
        _killpg(proc)
        proc.stdout.close()
        proc.stderr.close()
        return Collected(bytes(out), bytes(err[-STDERR_TAIL:]), totals[out_fd],
                         totals[err_fd], timed_out)


def _bounded(text: str, limit: int) -> tuple[str, bool, int]:
    """(text cut to at most ``limit`` UTF-8 bytes on a character boundary, whether
    it was cut, its length in bytes)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text, False, len(raw)
    return raw[:limit].decode("utf-8", "ignore"), True, len(raw)


def _decode_tail(raw: bytes) -> str:
    """The tail of a stream as text; a tail may start inside a UTF-8 sequence."""
    text = raw.decode("utf-8", "replace")
    return text.lstrip("\ufffd") if raw and (raw[0] & 0xC0) == 0x80 else text


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass
