"""Durable Raft storage on top of PySyncObj's journal: fsync before acknowledging.

PySyncObj 0.3.17 writes its journal through an mmap it never flushes and stores the
term and vote without fsync (upstream #84), and its snapshot writer renames an
unsynced temporary file over the last good snapshot. A process crash loses nothing
(the page cache survives it); a power cut, kernel panic or VM loss on a majority can
lose acknowledged entries, and a voter that forgets its vote can vote twice in a term.

:class:`DurableJournal` wraps the journal PySyncObj opened and adds what Raft needs:

* **entries**: every append or truncation marks the journal dirty; :meth:`sync`
  flushes the mapping (msync(MS_SYNC), i.e. fdatasync of the written range) when it is
  dirty. The caller (``consensus.raft.SafeSyncObj``) syncs before a follower
  acknowledges an append and before the leader counts its own log towards a commit:
  one sync covers every entry appended since the last one (group commit).
* **term and vote**: written to a temporary file, fsync'd, renamed over the old one,
  and the directory fsync'd, before PySyncObj sends anything that reflects them.
* **snapshots**: :func:`install_durable_replace` makes PySyncObj's snapshot writer
  fsync the new snapshot before renaming it and the directory after; the journal is
  cut (after a snapshot, or replaced by an installed one) only after that.

With ``mode="never"`` nothing is synced (the behaviour of PySyncObj itself): faster,
and a power cut on a majority may lose acknowledged tasks. The metadata file keeps
PySyncObj's format (a pickled dict), so data dirs move freely between the two modes
and from earlier releases.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pysyncobj import serializer as _pso_serializer
from pysyncobj.journal import Journal
from pysyncobj.pickle import dumps as _pso_dumps
from pysyncobj.pickle import loads as _pso_loads

FSYNC_MODES = ("always", "never")


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename or a new file in it survives a power cut."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes) -> None:
    """Replace path with data: temp file, fsync, rename, fsync of the directory."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


# --------------------------------------------------------------- snapshot writer

_durable_replace_on = False
_orig_replace = _pso_serializer.atomicReplace


def _durable_atomic_replace(old_path: str, new_path: str) -> Any:
    # Runs in PySyncObj's forked snapshot writer, or on the tick thread when a
    # follower receives a snapshot: the new file's data must be on disk before the
    # rename makes it the only snapshot, and the rename before the journal is cut.
    if _durable_replace_on:
        fsync_file(old_path)
    result = _orig_replace(old_path, new_path)
    if _durable_replace_on:
        fsync_dir(os.path.dirname(new_path))
    return result


def install_durable_replace(on: bool) -> None:
    """Make PySyncObj's snapshot writer durable (process-wide: one node per process)."""
    global _durable_replace_on  # noqa: PLW0603 - PySyncObj's serializer is module state too
    _durable_replace_on = on
    _pso_serializer.atomicReplace = _durable_atomic_replace


# --------------------------------------------------------------------- journal


class DurableJournal(Journal):
    """PySyncObj's FileJournal with fsync'd entries, term and vote (see module doc).

    Thread: used by PySyncObj's tick thread only, like the journal it wraps; the
    counters are read by other threads for status and metrics."""

    def __init__(self, inner: Any, journal_path: str, dump_path: str, mode: str = "always") -> None:
        if mode not in FSYNC_MODES:
            raise ValueError(f"fsync mode {mode!r}: expected one of {FSYNC_MODES}")
        self._inner = inner
        self._meta_path = journal_path + ".meta"
        self._dump_path = dump_path
        self._dir = os.path.dirname(journal_path)
        self.mode = mode
        self._meta: dict[str, Any] = self._read_meta()
        self._meta_dirty = False
        # Entries may have been appended between PySyncObj opening the journal and
        # this wrapper replacing it: start dirty so the first sync covers them.
        self._dirty = True
        self._lock = threading.Lock()
        self.syncs = 0
        self.sync_seconds = 0.0

    # ---- sync

    @property
    def durable(self) -> bool:
        return self.mode == "always"

    def sync(self) -> None:
        """Make every entry appended so far durable (no-op when nothing changed)."""
        if not self._dirty or not self.durable:
            return
        t0 = time.perf_counter()
        self._inner.flush()  # msync(MS_SYNC) of the journal mapping
        self._dirty = False
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - t0

    def _before_cut(self) -> None:
        # The journal is about to lose entries that only the snapshot now holds:
        # the snapshot must be durable first (PySyncObj's writer does not fsync).
        if self.durable and os.path.exists(self._dump_path):
            fsync_file(self._dump_path)
            fsync_dir(self._dir)

    # ---- entries (delegated)

    def add(self, command: Any, idx: int, term: int) -> None:
        self._inner.add(command, idx, term)
        self._dirty = True

    def clear(self) -> None:
        self._before_cut()
        self._inner.clear()
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        self._inner.deleteEntriesFrom(entryFrom)
        self._dirty = True

    def deleteEntriesTo(self, entryTo: int) -> None:
        self._before_cut()
        self._inner.deleteEntriesTo(entryTo)
        self._dirty = True
        self.sync()

    def __getitem__(self, item: Any) -> Any:
        return self._inner[item]

    def __len__(self) -> int:
        return len(self._inner)

    def flush(self) -> None:
        self._inner.flush()

    def _destroy(self) -> None:
        self.sync()
        self._inner._destroy()

    # ---- term, vote, commit index

    def _read_meta(self) -> dict[str, Any]:
        try:
            with open(self._meta_path, "rb") as f:
                meta = _pso_loads(f.read())
            return dict(meta) if isinstance(meta, dict) else {}
        except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError):
            return {}
        except Exception:  # noqa: BLE001 - a torn file reads as "no metadata", as upstream
            return {}

    def _store_meta(self) -> None:
        data = _pso_dumps(self._meta)
        if self.durable:
            write_durably(self._meta_path, data)
        else:
            tmp = self._meta_path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._meta_path)
        self._meta_dirty = False

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        # Raft: the term and vote must be on stable storage before any message
        # reflecting them (a vote grant, a vote request) is sent.
        self._meta["currentTerm"] = term
        self._meta["votedForNodeId"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return int(self._meta.get("currentTerm", 0))

    def getVotedForNodeId(self) -> Any:
        return self._meta.get("votedForNodeId")

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        # Not needed for safety (a restarted node learns it from the leader); stored
        # once a second, like PySyncObj does.
        if self._meta.get("raftCommitIndex") != raftCommitIndex:
            self._meta["raftCommitIndex"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return int(self._meta.get("raftCommitIndex", 1))

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            self._store_meta()
