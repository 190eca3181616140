"""The task sandbox: how subprocess tasks are isolated from the node and from each
other (bubblewrap: own PID, IPC, mount and UTS namespaces; see docs/security.md,
"Task sandbox"), probed once at node start with a fallback that says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from taskandgo.node.processes import SAFE_ENV

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


__all__ = ["SANDBOX_WORKDIR", "Sandbox"]
