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
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskandgo.node.outputs import OutputStore, Sink
from taskandgo.node.processes import SAFE_ENV, CallPool, Lifeline
from taskandgo.node.sandbox import SANDBOX_WORKDIR, Sandbox

log = logging.getLogger("taskandgo.executor")

UnitKey = tuple  # (task_id, chunk, attempt, token)

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
        outputs: OutputStore | None = None,
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
        #: Where each unit's full output is kept (None or disabled: nowhere).
        self.outputs = outputs
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
        sink = self.outputs.start(w.task_id, w.chunk, w.attempt) if self.outputs else None
        try:
            if cancel.is_set():  # killed before it started
                out = {"ok": False, "result": "", "error": "cancelled", "exit_code": -9}
            else:
                out = self._execute(w, cancel, sink)
        except Exception as exc:  # a task must never take the node down
            log.exception("node %s: unit %s failed to run", self.node_id, w.key)
            out = {"ok": False, "result": "", "error": f"could not run: {exc}", "exit_code": -1}
        if sink is not None and self.outputs is not None:
            if any(sink.written.values()):
                self.outputs.finish(sink)
            else:
                # Not a subprocess (a callable, or data echoed): its result is its
                # output, kept only if the result cannot hold it all.
                raw = str(out.get("result", "")).encode("utf-8", "replace")
                if len(raw) > self.output_limit:
                    sink.write("stdout", raw)
                    self.outputs.finish(sink)
                else:
                    self.outputs.discard(sink)
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

    def _execute(self, w: Work, cancel: threading.Event,
                 sink: Sink | None = None) -> dict[str, Any]:
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
            if "parents" in p:
                # A dependent task: its parents' results (task id -> result text).
                kwargs["parents"] = p["parents"]
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
        return self._subprocess(w, argv, timeout_s, cancel, sink)

    def _subprocess(self, w: Work, argv: list[str], timeout_s: float,
                    cancel: threading.Event, sink: Sink | None = None) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
        env.update({
            "TASKANDGO_TASK_ID": w.task_id,
            "TASKANDGO_ATTEMPT": str(w.attempt),
            "TASKANDGO_NODE_ID": self.node_id,
            "PYTHONUNBUFFERED": "1",
        })
        if "parents" in w.payload:
            env.update(parents_env(w.payload["parents"]))
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
            got = self._collect(proc, timeout_s, cancel, sink)
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
                 cancel: threading.Event, sink: Sink | None = None) -> Collected:
        """Read stdout and stderr until the process exits: the head of stdout up to
        the output cap, the last STDERR_TAIL bytes of stderr, and how many bytes
        each stream carried in all (the rest is drained and dropped; with a
        ``sink``, kept there within its bounds). Kill the process group on timeout
        or cancel."""
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
                if sink is not None:
                    sink.write("stdout" if fd == out_fd else "stderr", data)
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


#: An environment variable may hold at most 128 KiB on Linux (MAX_ARG_STRLEN): the
#: parents' results go in whole up to about that, else their ids alone.
MAX_PARENTS_ENV = 120 * 1024


def parents_env(parents: Any) -> dict[str, str]:
    """The environment a dependent task's process gets: ``TASKANDGO_PARENTS``, a JSON
    object of parent task id -> result text; when that is too long for one variable,
    the ids with null results and ``TASKANDGO_PARENTS_TRUNCATED=1`` (the results are
    then read through the API: ``taskandgo get``)."""
    text = json.dumps(parents if isinstance(parents, dict) else {})
    if len(text.encode()) <= MAX_PARENTS_ENV:
        return {"TASKANDGO_PARENTS": text}
    ids = dict.fromkeys(parents if isinstance(parents, dict) else {})
    return {"TASKANDGO_PARENTS": json.dumps(ids), "TASKANDGO_PARENTS_TRUNCATED": "1"}
