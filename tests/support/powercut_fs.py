"""A FUSE filesystem for power-cut tests: unsynced file data lives in memory and a cut drops it.

What it models
--------------
A disk whose durable state is a backing directory, seen through a mount point. Programs under
the mount point behave as on a normal filesystem, but a file's *data* (``write()``, writeback of a
shared writable ``mmap``, truncate/extend) goes into an in-memory overlay for that file (pages
keyed by index, plus a pending size and the lowest size the file was cut to). Reads merge the
backing file with the overlay, so a program sees its own writes. ``fsync``/``fdatasync`` on a file
(``msync(MS_SYNC)``, i.e. Python's ``mmap.flush()``, arrives as one) applies that file's overlay
to the backing file and ``os.fsync``-s it. :meth:`PowerCutFS.power_cut` unmounts (the kernel
hands its dirty page cache to the overlay as writes), lets the serving process die with every
overlay in it (the lost writes), and mounts again, so no page cache can hide the loss.

What it does not model (simplifications)
----------------------------------------
* Metadata is applied to the backing directory at once: create, mkdir, rename, unlink, rmdir,
  link, symlink, chmod, chown, utimens. That is stricter than nothing and looser than ext4
  without a directory fsync (there a rename or a new name may also be lost). A file created
  but never fsync'd is still there after a cut, with size 0: its data was pending.
  Renames and unlinks carry the overlay with the file: it is keyed by the backing inode.
* No torn or reordered writes within one file: a cut keeps a file exactly as of its last
  fsync, never half of a later write. No lying disk: fsync always means durable.
* One cut for the whole mount, only between runs: the caller kills every process using it
  first. Nothing is lost while the mount stays up.
* ``fsyncdir`` fsyncs the backing directory; the model needs nothing from it (see above).
* No xattrs, no fallocate (``posix_fallocate`` falls back to writing zeros); file locks are
  the kernel's own, local to this machine.

Cost: every ``write()`` is a round trip to the serving process (no FUSE writeback cache), and
each fsync is a real ``os.fsync`` of the backing file, so the backing disk sets the fsync rate.
A backing directory on tmpfs (``/dev/shm``) leaves only the FUSE cost (see ``bench``).

Layout: :class:`OverlayOps` is the filesystem (plain Python, the FUSE callbacks mfusepy expects);
running this file as a script serves it (``serve BACKING MOUNTPOINT``) in its own process, so a
FUSE request never waits on the test process's GIL; :class:`PowerCutFS` is the test-side handle
that starts that process, talks to it over its stdin/stdout (one JSON line per request), cuts
power and always unmounts. ``python tests/support/powercut_fs.py bench [DIR]`` prints fsyncs/s
and MB/s.

Needs Linux, root, ``/dev/fuse``, libfuse3 (Debian ``fuse3``) and the ``mfusepy`` package;
:func:`unavailable_reason` says which is missing (and installs ``fuse3`` with apt-get when it
can).
"""

from __future__ import annotations

import ctypes.util
import errno
import importlib.util
import json
import os
import select
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

PAGE = 4096
_MOUNT_TIMEOUT_S = 15.0
_REPLY_TIMEOUT_S = 10.0
_IOV_MAX = 1024
_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2  # from <sys/stat.h>


# ----------------------------------------------------------------------------- the filesystem


@dataclass
class _Overlay:
    """Unsynced state of one file: what the page cache of a real disk would hold.

    ``size`` is the file's current size; ``cut_to`` the lowest size it was truncated to since
    its last sync (backing bytes at or past it read as zeros); ``pages`` full pages of current
    content, copied from the backing file on first write; ``pending_bytes`` counts bytes
    written since the last sync (what a cut loses, for the test log).
    """

    size: int
    cut_to: int | None = None
    pages: dict[int, bytearray] = field(default_factory=dict)
    pending_bytes: int = 0


class OverlayOps:
    """Passthrough over ``root`` with per-file data overlays; callbacks in mfusepy's shape.

    Thread-safe: libfuse calls in from several threads; one lock guards the overlays and the
    open-handle table (the backing ``os.fsync`` runs outside it). File handles are backing fds
    opened read-write, so any handle can apply an overlay.
    """

    use_ns = True  # mfusepy: times in integer nanoseconds

    def __init__(self, root: str,
                 caller: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)) -> None:
        """``caller`` returns the (uid, gid, pid) of the request being served."""
        self.root = os.path.realpath(root)
        self._caller = caller
        self._lock = threading.Lock()
        self._overlays: dict[tuple[int, int], _Overlay] = {}
        self._keys: dict[int, tuple[int, int]] = {}  # open fd -> backing (dev, ino)
        self.fsyncs = 0
        self.synced_bytes = 0

    # -- helpers

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _own(self, full: str) -> None:
        """Give a new node to the caller, as a kernel filesystem would (we serve as root)."""
        uid, gid, _ = self._caller()
        if (uid, gid) != (0, 0):
            os.lchown(full, uid, gid)

    def _base_page(self, fd: int, ov: _Overlay, index: int) -> bytearray:
        """Page ``index`` as the backing file shows it under ``ov`` (zeros past a cut/EOF)."""
        start = index * PAGE
        data = os.pread(fd, PAGE, start) if ov.cut_to is None or start < ov.cut_to else b""
        if ov.cut_to is not None:
            data = data[:max(0, ov.cut_to - start)]
        return bytearray(data.ljust(PAGE, b"\0"))

    def _overlay(self, fd: int, key: tuple[int, int]) -> _Overlay:
        ov = self._overlays.get(key)
        if ov is None:
            ov = self._overlays[key] = _Overlay(size=os.fstat(fd).st_size)
        return ov

    def _truncate(self, fd: int, key: tuple[int, int], length: int) -> None:
        ov = self._overlay(fd, key)
        if length < ov.size:
            ov.cut_to = length if ov.cut_to is None else min(ov.cut_to, length)
            for index in [i for i in ov.pages if i * PAGE >= length]:
                del ov.pages[index]
            tail = ov.pages.get(length // PAGE)
            if tail is not None:  # bytes past the new end must read as zeros if re-extended
                tail[length % PAGE:] = bytes(PAGE - length % PAGE)
        ov.size = length

    def _forget(self, st: os.stat_result) -> None:
        """Drop the overlay of a file whose last name is going away."""
        if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            self._overlays.pop((st.st_dev, st.st_ino), None)

    def pending(self) -> dict[str, int]:
        """What a cut now would lose: files with an overlay and bytes written to them."""
        with self._lock:
            return {"pending_files": len(self._overlays),
                    "pending_bytes": sum(o.pending_bytes for o in self._overlays.values())}

    def stats(self) -> dict[str, int]:
        return {"fsyncs": self.fsyncs, "synced_bytes": self.synced_bytes, **self.pending()}

    # -- metadata: straight to the backing directory

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self._lock:
            fd = fh if fh is not None and fh in self._keys else None
        st = os.fstat(fd) if fd is not None else os.lstat(self._path(path))
        attrs: dict[str, Any] = {k: getattr(st, k) for k in (
            "st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
            "st_rdev", "st_blksize")}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        with self._lock:
            ov = self._overlays.get((st.st_dev, st.st_ino))
            if ov is not None:
                attrs["st_size"] = ov.size
                attrs["st_blocks"] = (ov.size + 511) // 512
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._path(path))
        return {k: getattr(sv, k) for k in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_flag", "f_namemax")}

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._path(path), mode)
        self._own(self._path(path))
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._path(path))
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        os.mknod(self._path(path), mode, dev)
        self._own(self._path(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._path(target))
        self._own(self._path(target))
        return 0

    def link(self, target: str, source: str) -> int:
        os.link(self._path(source), self._path(target))
        return 0

    def unlink(self, path: str) -> int:
        full = self._path(path)
        with self._lock:
            st = os.lstat(full)
            os.unlink(full)
            self._forget(st)
        return 0

    def rename(self, old: str, new: str) -> int:
        src, dst = self._path(old), self._path(new)
        with self._lock:
            try:
                replaced: os.stat_result | None = os.lstat(dst)
            except FileNotFoundError:
                replaced = None
            moved = os.lstat(src)
            os.rename(src, dst)  # the overlay is keyed by inode: it moves with the file
            if replaced is not None and (replaced.st_ino, replaced.st_dev) != (
                    moved.st_ino, moved.st_dev):
                self._forget(replaced)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.lchown(self._path(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        full = self._path(path)
        st, now = os.lstat(full), time.time_ns()
        old = (st.st_atime_ns, st.st_mtime_ns)
        # mfusepy folds a timespec into sec * 1e9 + nsec, so UTIME_NOW/UTIME_OMIT (nsec values
        # past 1e9) show up as these remainders.
        ns = tuple(now if t is None or t % 10**9 == _UTIME_NOW % 10**9
                   else o if t % 10**9 == _UTIME_OMIT % 10**9 else t
                   for t, o in zip(times or (None, None), old, strict=True))
        os.utime(full, ns=(ns[0], ns[1]), follow_symlinks=False)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        fd = os.open(self._path(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0

    # -- file data: through the overlay

    def _open(self, full: str, flags: int, mode: int | None) -> int:
        extra = os.O_CREAT | (flags & os.O_EXCL) if mode is not None else 0
        try:
            fd = os.open(full, os.O_RDWR | extra, 0o644 if mode is None else mode)
        except OSError as e:  # e.g. a running executable: reads still work
            if e.errno not in (errno.ETXTBSY, errno.EROFS, errno.EACCES):
                raise
            fd = os.open(full, os.O_RDONLY)
        st = os.fstat(fd)
        with self._lock:
            self._keys[fd] = (st.st_dev, st.st_ino)
            if flags & os.O_TRUNC:  # a pending truncate, like any other data change
                self._truncate(fd, self._keys[fd], 0)
        return fd

    def open(self, path: str, flags: int) -> int:
        return self._open(self._path(path), flags, None)

    def create(self, path: str, mode: int, flags: int) -> int:
        fd = self._open(self._path(path), flags, mode)
        self._own(self._path(path))
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            ov = self._overlays.get(self._keys[fh])
            if ov is None:
                return os.pread(fh, size, offset)
            end = min(offset + size, ov.size)
            out = bytearray()
            pos = offset
            while pos < end:
                index, start = divmod(pos, PAGE)
                page = ov.pages.get(index) or self._base_page(fh, ov, index)
                chunk = page[start:min(PAGE, start + end - pos)]
                out += chunk
                pos += len(chunk)
            return bytes(out)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._lock:
            key = self._keys[fh]
            ov = self._overlay(fh, key)
            pos, done = offset, 0
            while done < len(data):
                index, start = divmod(pos, PAGE)
                page = ov.pages.get(index)
                if page is None:
                    page = ov.pages[index] = self._base_page(fh, ov, index)
                n = min(PAGE - start, len(data) - done)
                page[start:start + n] = data[done:done + n]
                pos += n
                done += n
            ov.size = max(ov.size, offset + len(data))
            ov.pending_bytes += len(data)
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self._lock:
            fd = fh if fh is not None and fh in self._keys else None
        if fd is None:  # truncate(2) by name: borrow a handle for the duration
            assert path is not None
            fd = self._open(self._path(path), 0, None)
            try:
                return self.truncate(path, length, fd)
            finally:
                self.release(path, fd)
        with self._lock:
            self._truncate(fd, self._keys[fd], length)
        return 0

    @staticmethod
    def _write_pages(fd: int, ov: _Overlay) -> None:
        """Write the overlay's pages (up to its size) to the backing file, runs in one call."""
        runs: list[tuple[int, list[memoryview]]] = []
        end = -1
        for index, page in sorted(ov.pages.items()):
            offset, n = index * PAGE, min(PAGE, ov.size - index * PAGE)
            if n <= 0:
                continue
            if offset != end or len(runs[-1][1]) >= _IOV_MAX:
                runs.append((offset, []))
            runs[-1][1].append(memoryview(page)[:n])
            end = offset + n
        for offset, bufs in runs:
            want = sum(len(b) for b in bufs)
            if os.pwritev(fd, bufs, offset) != want:
                raise OSError(errno.EIO, "short write to the backing file")

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        """Apply the file's overlay to the backing file, then make that durable."""
        with self._lock:
            ov = self._overlays.pop(self._keys[fh], None)
            if ov is not None:
                if ov.cut_to is not None:
                    os.ftruncate(fh, ov.cut_to)
                self._write_pages(fh, ov)
                if os.fstat(fh).st_size != ov.size:
                    os.ftruncate(fh, ov.size)
                self.synced_bytes += ov.pending_bytes
            self.fsyncs += 1
        # Outside the lock: other files' requests go on while the disk works.
        (os.fdatasync if datasync else os.fsync)(fh)
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0  # close(2) is no sync point

    def release(self, path: str | None, fh: int) -> int:
        with self._lock:
            self._keys.pop(fh, None)  # the overlay stays: it belongs to the file, not the fd
        os.close(fh)
        return 0


# ----------------------------------------------------------------------------- serving process


def _serve(backing: str, mountpoint: str) -> int:
    """Mount and serve until unmounted; answer ``stats`` lines on stdin; last line: ``exit``.

    If stdin closes (the test process died), unmount lazily so no mount outlives the test.
    """
    import mfusepy  # only the serving process needs it

    ops = OverlayOps(backing, mfusepy.fuse_get_context)
    out_lock = threading.Lock()

    def reply(obj: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    unmounted = threading.Event()

    def control() -> None:
        for line in sys.stdin:
            if line.strip() == "stats":
                reply({"stats": ops.stats()})
        # EOF before our "exit" line: the test process is gone. (After it, the mount point
        # may already hold the next mount, which is not ours to touch.)
        if not unmounted.is_set():
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)

    threading.Thread(target=control, daemon=True, name="control").start()
    mfusepy.FUSE(ops, mountpoint, foreground=True, allow_other=True,
                 default_permissions=True, fsname="powercutfs")
    unmounted.set()
    reply({"exit": ops.stats()})
    return 0


# ----------------------------------------------------------------------------- test-side handle


def _mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/mounts", encoding="utf-8") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def _users(mountpoint: Path) -> list[int]:
    """Pids with a cwd, root, open file or mapping under ``mountpoint`` (for error messages)."""
    prefix = os.path.realpath(mountpoint) + "/"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            links = [os.readlink(f"/proc/{entry}/{n}") for n in ("cwd", "root")]
            links += [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(
                f"/proc/{entry}/fd")]
            with open(f"/proc/{entry}/maps", encoding="utf-8", errors="replace") as f:
                links += [ln.split(maxsplit=5)[-1].strip() for ln in f]
        except OSError:
            continue
        if any((p + "/").startswith(prefix) for p in links):
            pids.append(int(entry))
    return pids


class PowerCutFS:
    """Mount :class:`OverlayOps` over ``backing`` at ``mountpoint`` in a child process.

    Use as a context manager; leaving it always unmounts (lazily if it must) and ends the
    serving process. Not thread-safe: one test drives it.
    """

    def __init__(self, backing: Path | str, mountpoint: Path | str) -> None:
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self._proc: subprocess.Popen[bytes] | None = None
        self._out = b""  # bytes read from the serving process, not yet a whole line
        self._log: IO[bytes] | None = None  # its stderr (a pipe nobody drains could block it)
        self.cuts = 0
        self.dropped_bytes = 0
        self.dropped_files = 0

    def __enter__(self) -> Self:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mount(self) -> None:
        """Start the serving process and wait (bounded) until the mount is live."""
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if _mounted(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is already a mount point")
        env = {**os.environ, "FUSE_LIBRARY_NAME": "fuse3", "PYTHONUNBUFFERED": "1"}
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the mount
        self._out = b""
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "serve", str(self.backing),
             str(self.mountpoint)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, bufsize=0,
            env=env)
        deadline = time.monotonic() + _MOUNT_TIMEOUT_S
        while not _mounted(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._stop_process()
                raise RuntimeError(f"powercutfs did not mount {self.mountpoint}: {err}")
            time.sleep(0.01)

    def _line(self, timeout_s: float) -> dict[str, Any]:
        """The serving process's next JSON line, within ``timeout_s``."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            chunk = os.read(fd, 65536) if left > 0 and select.select([fd], [], [], left)[0] \
                else b""
            if not chunk:
                raise RuntimeError("powercutfs serving process did not answer")
            self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        return json.loads(line)

    def _send(self, command: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None, "not mounted"
        self._proc.stdin.write(command.encode() + b"\n")

    def stats(self) -> dict[str, int]:
        """fsyncs and synced bytes of the current mount, what is pending, and totals of cuts."""
        self._send("stats")
        return {**self._line(_REPLY_TIMEOUT_S)["stats"], "cuts": self.cuts,
                "dropped_bytes": self.dropped_bytes, "dropped_files": self.dropped_files}

    def _unmount(self) -> dict[str, int]:
        """Unmount cleanly; return the serving process's last stats. Raises if busy."""
        res = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True,
                             timeout=60, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"cannot unmount {self.mountpoint} ({res.stderr.strip()}); processes still "
                f"using it: {_users(self.mountpoint)} - kill them before a power cut")
        final = self._line(_REPLY_TIMEOUT_S)
        while "exit" not in final:  # a late answer to a stats request
            final = self._line(_REPLY_TIMEOUT_S)
        self._stop_process()
        return final["exit"]

    def power_cut(self) -> dict[str, int]:
        """Lose every unsynced write, then mount the surviving disk again.

        The caller must have killed (and reaped) every process using the mount first; a busy
        mount raises RuntimeError naming the pids and changes nothing. Returns what was lost:
        ``dropped_bytes`` (bytes written and never fsync'd) and ``dropped_files``.
        """
        final = self._unmount()
        lost = {"dropped_bytes": final["pending_bytes"], "dropped_files": final["pending_files"]}
        self.cuts += 1
        self.dropped_bytes += lost["dropped_bytes"]
        self.dropped_files += lost["dropped_files"]
        self.mount()
        return lost

    def _stop_process(self) -> str:
        """End the serving process (by its pid) and return its stderr."""
        proc, self._proc = self._proc, None
        if proc is None:
            return ""
        if proc.stdin is not None:
            proc.stdin.close()  # it unmounts lazily on EOF
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        log, self._log = self._log, None
        if log is None:
            return ""
        log.seek(0)
        err = log.read().decode(errors="replace")
        log.close()
        return err

    def close(self) -> None:
        """Unmount (lazily if busy or dead), end the process; raise if a mount is left."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._unmount()
            except (RuntimeError, subprocess.TimeoutExpired, ValueError):
                pass
        if _mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True,
                           timeout=60, check=False)
        self._stop_process()
        if _mounted(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is still mounted")


# ----------------------------------------------------------------------------- availability


def unavailable_reason(install: bool = True) -> str | None:
    """Why power-cut tests cannot run here, or None. Installs Debian's fuse3 if allowed."""
    if not sys.platform.startswith("linux"):
        return "FUSE power-cut tests need Linux"
    if os.geteuid() != 0:
        return "FUSE power-cut tests need root (mount, allow_other)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if importlib.util.find_spec("mfusepy") is None:
        return "the mfusepy package is not installed (pip install mfusepy)"
    if install:
        from system_deps import ensure_debian_package

        ensure_debian_package("fuse3", lambda: ctypes.util.find_library("fuse3") is not None)
    if ctypes.util.find_library("fuse3") is None:
        return "libfuse3 is missing (apt-get install fuse3)"
    return None


# ----------------------------------------------------------------------------- benchmark


def _rate(seconds: float, step: Callable[[int], None]) -> float:
    """Calls of ``step()`` per second over about ``seconds`` (bounded count, too)."""
    n, start = 0, time.monotonic()
    while time.monotonic() - start < seconds and n < 1_000_000:
        step(n)
        n += 1
    return n / (time.monotonic() - start)


def bench(directory: str | None = None, seconds: float = 2.0) -> dict[str, Any]:
    """Rates on a fresh mount whose backing dir sits under ``directory`` (default: /tmp).

    ``write_fdatasync_per_s``: 4 KiB write + fdatasync; ``mmap_msync_per_s``: 256 B stored into
    a shared map + ``mmap.flush()`` (PySyncObj's journal, made durable); ``mb_per_s``: 1 MiB
    writes, one fsync at the end included.
    """
    import mmap

    with tempfile.TemporaryDirectory(dir=directory) as tmp, \
            PowerCutFS(Path(tmp) / "disk", Path(tmp) / "mnt") as fs:
        fd = os.open(fs.mountpoint / "bench", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            block, big = os.urandom(4096), os.urandom(1 << 20)
            def append(n: int) -> None:
                os.write(fd, block)
                os.fdatasync(fd)
            fsyncs = _rate(seconds, append)
            os.ftruncate(fd, 64 << 20)
            with mmap.mmap(fd, 64 << 20) as mm:
                def store(n: int) -> None:
                    offset = n * 256 % (64 << 20)
                    mm[offset:offset + 256] = block[:256]
                    mm.flush()
                msyncs = _rate(seconds, store)
            mb, start = 0, time.monotonic()
            while time.monotonic() - start < seconds and mb < 100_000:
                os.pwrite(fd, big, mb << 20)
                mb += 1
            os.fsync(fd)
            mb_s = mb / (time.monotonic() - start)
        finally:
            os.close(fd)
        return {"write_fdatasync_per_s": round(fsyncs), "mmap_msync_per_s": round(msyncs),
                "mb_per_s": round(mb_s, 1), "stats": fs.stats()}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        sys.exit(_serve(sys.argv[2], sys.argv[3]))
    if len(sys.argv) >= 2 and sys.argv[1] == "bench":
        reason = unavailable_reason()
        if reason:
            sys.exit(reason)
        print(json.dumps(bench(sys.argv[2] if len(sys.argv) > 2 else None), indent=1))
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} serve BACKING MOUNTPOINT | bench [DIRECTORY]")
