"""The power-cut filesystem itself: what survives a cut and what does not.

Every test runs real writer processes on a real FUSE mount, kills them with SIGKILL while
their files (and maps) are still open, cuts power, and reads what the disk kept.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from powercut_fs import PowerCutFS, unavailable_reason

# Each writer script gets these helpers; ``ready()`` reports and then blocks, so the process
# is killed with its files and maps still open, as at a real crash.
_PRELUDE = textwrap.dedent("""
    import mmap, os, sys
    def ready(msg="ready"):
        print(msg, flush=True)
        sys.stdin.read()
""")
_LINE_TIMEOUT_S = 20.0


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts", encoding="utf-8") as f:
        return any(line.split()[1] == target for line in f)


@pytest.fixture(scope="module")
def fuse_ready() -> None:
    """Skip, saying why, where FUSE cannot run (installs Debian's fuse3 where it can)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def fs(fuse_ready: None, tmp_path: Path) -> Iterator[PowerCutFS]:
    """A fresh power-cut mount; afterwards no mount is left behind."""
    handle = PowerCutFS(tmp_path / "disk", tmp_path / "mnt")
    try:
        with handle:
            yield handle
    finally:
        assert not _mounted(tmp_path / "mnt"), "mount left behind"


class Writer:
    """A writer process running ``script`` (with the prelude) on the mount; killed with -9."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PRELUDE + textwrap.dedent(script), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def line(self) -> str:
        """The next line the writer prints, within a deadline (its stderr if it died)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], _LINE_TIMEOUT_S)
        text = self.proc.stdout.readline().strip() if ready else ""
        if not text:
            self.kill()
            assert self.proc.stderr is not None
            pytest.fail(f"writer gave no line: {self.proc.stderr.read()}")
        return text

    def kill(self) -> None:
        """SIGKILL and reap: after this the writer holds nothing on the mount."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def run_and_kill(script: str, *args: str) -> None:
    """Run a writer until it says ``ready``, then kill -9 it."""
    w = Writer(script, *args)
    try:
        assert w.line() == "ready"
    finally:
        w.kill()


# ----------------------------------------------------------------------------- plain writes


def test_write_without_fsync_is_lost(fs: PowerCutFS) -> None:
    # Given a file written but never fsync'd by a process that is then killed
    path = fs.mountpoint / "f"
    run_and_kill("""
        with open(sys.argv[1], "wb") as f:
            f.write(b"A" * 10000)
        ready()
    """, str(path))
    # Then it reads back before the cut, but the disk has only the empty file
    assert path.read_bytes() == b"A" * 10000
    assert (fs.backing / "f").stat().st_size == 0
    # When power is cut
    lost = fs.power_cut()
    # Then the file exists, empty, and the cut reports the loss
    assert path.read_bytes() == b""
    assert lost == {"dropped_bytes": 10000, "dropped_files": 1}


def test_fsynced_write_survives_and_later_write_is_lost(fs: PowerCutFS) -> None:
    path = fs.mountpoint / "f"
    run_and_kill("""
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"synced" * 1000)
        os.fsync(fd)
        os.write(fd, b"pending")
        ready()
    """, str(path))
    fs.power_cut()
    assert path.read_bytes() == b"synced" * 1000
    assert fs.stats()["dropped_bytes"] == len(b"pending")


def test_truncate_on_open_is_pending_until_fsync(fs: PowerCutFS) -> None:
    # Given a durable file, overwritten through open(..., "wb") without fsync
    path = fs.mountpoint / "f"
    run_and_kill("""
        with open(sys.argv[1], "wb") as f:
            f.write(b"old content")
            f.flush()
            os.fsync(f.fileno())
        with open(sys.argv[1], "wb") as f:
            f.write(b"new")
        ready()
    """, str(path))
    assert path.read_bytes() == b"new"
    fs.power_cut()
    # Then the truncate was lost with the data: the old content is back
    assert path.read_bytes() == b"old content"


# ----------------------------------------------------------------------------- mmap


_MMAP_WRITER = """
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 65536)
    mm = mmap.mmap(fd, 65536)
    mm[100:105] = b"hello"
    mm[60000:60005] = b"world"
    if sys.argv[2] == "flush":
        mm.flush()
    ready()
"""


def test_mmap_write_with_flush_survives(fs: PowerCutFS) -> None:
    path = fs.mountpoint / "m"
    run_and_kill(_MMAP_WRITER, str(path), "flush")
    fs.power_cut()
    data = path.read_bytes()
    assert len(data) == 65536
    assert data[100:105] == b"hello" and data[60000:60005] == b"world"


def test_mmap_write_without_flush_is_lost(fs: PowerCutFS) -> None:
    path = fs.mountpoint / "m"
    run_and_kill(_MMAP_WRITER, str(path), "no-flush")
    # The kernel wrote the dirty map back when the process died: visible, not durable
    assert path.read_bytes()[100:105] == b"hello"
    fs.power_cut()
    assert b"hello" not in path.read_bytes() and b"world" not in path.read_bytes()


# ----------------------------------------------------------------------------- renames


def test_fsynced_temp_file_replaced_over_old_survives(fs: PowerCutFS) -> None:
    target = fs.mountpoint / "state"
    run_and_kill("""
        target = sys.argv[1]
        for content in (b"version 1", b"version 2"):
            with open(target + ".tmp", "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(target + ".tmp", target)
        ready()
    """, str(target))
    fs.power_cut()
    assert target.read_bytes() == b"version 2"
    assert not (fs.mountpoint / "state.tmp").exists()


def test_unsynced_file_renamed_is_empty_after_cut(fs: PowerCutFS) -> None:
    target = fs.mountpoint / "state"
    run_and_kill("""
        target = sys.argv[1]
        with open(target + ".tmp", "wb") as f:
            f.write(b"never synced")
        os.replace(target + ".tmp", target)
        ready()
    """, str(target))
    # The pending data moved with the file
    assert target.read_bytes() == b"never synced"
    fs.power_cut()
    assert target.read_bytes() == b""


def test_unlinked_file_leaves_nothing_pending(fs: PowerCutFS) -> None:
    path = fs.mountpoint / "gone"
    path.write_bytes(b"x" * 5000)
    assert fs.stats()["pending_files"] == 1
    path.unlink()
    assert fs.stats()["pending_files"] == 0


# ----------------------------------------------------------------------------- processes


def test_forked_child_killed_after_fsync_keeps_synced_data(fs: PowerCutFS) -> None:
    # Given a forked child that fsyncs one file and leaves another unsynced
    synced, pending = fs.mountpoint / "synced", fs.mountpoint / "pending"
    w = Writer("""
        pid = os.fork()
        if pid == 0:
            with open(sys.argv[1], "wb") as f:
                f.write(b"kept")
                f.flush()
                os.fsync(f.fileno())
            with open(sys.argv[2], "wb") as f:
                f.write(b"lost")
            ready(f"child {os.getpid()}")
        _, status = os.waitpid(pid, 0)
        ready(f"reaped {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}")
    """, str(synced), str(pending))
    try:
        # When the child is killed with SIGKILL, then its parent
        word, pid = w.line().split()
        assert word == "child"
        os.kill(int(pid), signal.SIGKILL)
        assert w.line() == f"reaped {int(signal.SIGKILL)}"
    finally:
        w.kill()
    fs.power_cut()
    # Then only the fsync'd data is on disk
    assert synced.read_bytes() == b"kept"
    assert pending.read_bytes() == b""


def test_repeated_cuts_keep_exactly_the_synced_rounds(fs: PowerCutFS) -> None:
    path = fs.mountpoint / "log"
    for round_no in range(5):
        run_and_kill("""
            with open(sys.argv[1], "ab") as f:
                f.write(sys.argv[2].encode())
                f.flush()
                os.fsync(f.fileno())
                f.write(b"unsynced tail")
            ready()
        """, str(path), f"r{round_no};")
        assert fs.power_cut() == {"dropped_bytes": len(b"unsynced tail"), "dropped_files": 1}
        assert path.read_bytes() == b"".join(b"r%d;" % i for i in range(round_no + 1))
    assert fs.stats()["cuts"] == 5
    assert _mounted(fs.mountpoint)


def test_power_cut_refuses_while_a_process_uses_the_mount(fs: PowerCutFS) -> None:
    path = fs.mountpoint / "busy"
    w = Writer("""
        f = open(sys.argv[1], "wb")
        f.write(b"x")
        f.flush()  # to the mount (no fsync)
        ready()
    """, str(path))
    try:
        assert w.line() == "ready"
        with pytest.raises(RuntimeError, match=str(w.proc.pid)):
            fs.power_cut()
        # The refused cut changed nothing: the pending byte is still visible
        assert path.read_bytes() == b"x"
    finally:
        w.kill()
    assert fs.power_cut()["dropped_files"] == 1
    assert path.read_bytes() == b""


def test_stats_count_fsyncs_and_synced_bytes(fs: PowerCutFS) -> None:
    fd = os.open(fs.mountpoint / "s", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(20):
            os.write(fd, b"y" * 100)
            os.fdatasync(fd)
    finally:
        os.close(fd)
    stats = fs.stats()
    assert stats["fsyncs"] == 20 and stats["synced_bytes"] == 2000
    assert stats["pending_bytes"] == 0


# ----------------------------------------------------------------------------- PySyncObj


_JOURNAL_WRITER = """
    from pysyncobj.journal import FileJournal
    j = FileJournal(sys.argv[1])
    j.add(b"first", 1, 1)
    j.flush()
    for idx in range(2, 201):
        j.add(b"entry %d " % idx * 10, idx, 1)
    if sys.argv[2] == "flush":
        j.flush()
    ready()
"""


def _journal_entries(path: Path) -> list[int]:
    from pysyncobj.journal import FileJournal

    journal = FileJournal(str(path))
    try:
        return [journal[i][1] for i in range(len(journal))]
    finally:
        journal._destroy()


def test_pysyncobj_journal_flushed_survives(fs: PowerCutFS) -> None:
    path = fs.mountpoint / "journal"
    run_and_kill(_JOURNAL_WRITER, str(path), "flush")
    fs.power_cut()
    assert _journal_entries(path) == list(range(1, 201))


def test_pysyncobj_journal_unflushed_loses_entries(fs: PowerCutFS) -> None:
    path = fs.mountpoint / "journal"
    run_and_kill(_JOURNAL_WRITER, str(path), "no-flush")
    # (not read back here: FileJournal's close flushes, which would make it durable)
    assert fs.stats()["pending_bytes"] > 200 * 100
    fs.power_cut()
    assert _journal_entries(path) == [1]


def test_non_root_process_writes_as_itself(fuse_ready: None) -> None:
    if not Path("/usr/bin/setpriv").exists():
        pytest.skip("setpriv (util-linux) is missing")
    # Given a mount that nobody can reach (pytest's tmp_path is root-only) and a world-writable
    # directory on it, written by a process running as nobody
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        with PowerCutFS(Path(tmp) / "disk", Path(tmp) / "mnt") as fs:
            os.chmod(fs.mountpoint, 0o777)
            script = ("import os, sys\n"
                      "fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600)\n"
                      "os.write(fd, b'mine'); os.fsync(fd)\n")
            res = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                 "-c", script, str(fs.mountpoint / "n")],
                capture_output=True, text=True, timeout=30, check=False)
            assert res.returncode == 0, res.stderr
            fs.power_cut()
            # Then the file is the writer's, on the disk too, and its synced data survived
            st = (fs.backing / "n").stat()
            assert (st.st_uid, st.st_gid) == (65534, 65534)
            assert (fs.mountpoint / "n").read_bytes() == b"mine"


# ----------------------------------------------------------------------------- no mount left


def test_close_unmounts_after_the_serving_process_died(tmp_path: Path, fuse_ready: None) -> None:
    handle = PowerCutFS(tmp_path / "disk", tmp_path / "mnt")
    handle.mount()
    try:
        assert handle._proc is not None
        os.kill(handle._proc.pid, signal.SIGKILL)
        handle._proc.wait(timeout=10)
    finally:
        handle.close()
    assert not _mounted(tmp_path / "mnt")


def test_mount_goes_away_when_the_test_process_dies(tmp_path: Path, fuse_ready: None) -> None:
    # Given a test process that mounts and is then killed with SIGKILL (no teardown runs)
    mnt = tmp_path / "mnt"
    w = Writer("""
        sys.path.insert(0, sys.argv[1])
        from powercut_fs import PowerCutFS
        fs = PowerCutFS(sys.argv[2], sys.argv[3])
        fs.mount()
        ready(str(fs._proc.pid))
    """, str(Path(__file__).parents[1] / "support"), str(tmp_path / "disk"), str(mnt))
    try:
        server = int(w.line())
    finally:
        w.kill()
    # Then its serving process sees its control pipe close, unmounts and exits
    deadline = time.monotonic() + 20
    while (_mounted(mnt) or Path(f"/proc/{server}").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    mounted, alive = _mounted(mnt), Path(f"/proc/{server}").exists()
    if alive:
        os.kill(server, signal.SIGKILL)
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)
    assert not mounted and not alive
