"""The full output of the units this node ran, kept on its disk for a while.

A unit's result carries only the head of its stdout (``--output-limit``) and the
tail of its stderr. The worker that ran it also writes both streams whole (up to
``--keep-output-bytes`` per unit, stdout and stderr together) under
``DATA_DIR/outputs``; all kept outputs together stay under ``--keep-output-total``,
the oldest evicted first. Either set to 0 keeps nothing.

A user fetches it from any node (``taskandgo output``, ``GET
/api/v1/tasks/{id}/output``, gRPC ``GetTaskOutput``): :func:`fetch_output` finds
the node that ran the unit in the task's record and asks that node (its own store
only, ``local``), page by page.

Files: ``<key>.out`` / ``<key>.err`` / ``<key>.json`` (the metadata) where ``key``
is a hash of (task id, chunk): a later attempt of the same unit replaces an
earlier one. A unit's files are written under temporary names and renamed into
place when it ends, so a reader never sees a unit half written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("taskandgo.outputs")

#: Defaults of --keep-output-bytes (per unit) and --keep-output-total.
DEFAULT_KEEP_PER_UNIT = 16 * 1024 * 1024
DEFAULT_KEEP_TOTAL = 1024 * 1024 * 1024
#: The most bytes one fetch returns (a page); clients ask again from the next offset.
MAX_PAGE = 1024 * 1024
#: The largest offset a fetch takes (fits the API's int64).
MAX_OFFSET = 2**62
STREAMS = ("stdout", "stderr")
_SUFFIX = {"stdout": ".out", "stderr": ".err"}


def _key(task_id: str, chunk: int) -> str:
    return hashlib.sha256(f"{task_id}\0{chunk}".encode("utf-8", "surrogatepass")).hexdigest()[:40]


@dataclass
class Sink:
    """One running unit's output files, being written. Never raises on write: a
    full disk loses the kept copy, not the task."""

    root: str
    task_id: str
    chunk: int
    attempt: int
    budget: int
    files: dict[str, Any] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    broken: bool = False

    # Named on first use: most units (callables, echoed data) write no file at all.
    @functools.cached_property
    def key(self) -> str:
        return _key(self.task_id, self.chunk)

    @functools.cached_property
    def paths(self) -> dict[str, str]:
        """stream -> the unit's file while it is written (the temporary name carries
        the attempt: two attempts of one unit never share one), without ``.tmp``."""
        base = os.path.join(self.root, self.key)
        return {s: f"{base}.{self.attempt}.{os.getpid()}{_SUFFIX[s]}" for s in STREAMS}

    def write(self, stream: str, data: bytes) -> None:
        """Append to ``stream`` (stdout or stderr) while the unit's budget lasts."""
        self.written[stream] += len(data)
        room = self.budget - sum(self.kept.values())
        if self.broken or room <= 0 or not data:
            return
        part = data[:room]
        try:
            f = self.files.get(stream)
            if f is None:
                f = self.files[stream] = open(self.paths[stream] + ".tmp", "wb")  # noqa: SIM115
            f.write(part)
            self.kept[stream] += len(part)
        except OSError as exc:
            log.warning("cannot keep the output of %s#%d: %s", self.task_id, self.chunk, exc)
            self.broken = True

    def close(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):
                f.close()


class OutputStore:
    """Kept outputs of this node's units, bounded per unit and in total. Thread-safe."""

    def __init__(self, root: str, per_unit: int = DEFAULT_KEEP_PER_UNIT,
                 total: int = DEFAULT_KEEP_TOTAL) -> None:
        self.root = root
        self.per_unit = max(0, per_unit)
        self.total = max(0, total)
        self._lock = threading.Lock()
        #: key -> bytes on disk, oldest first (eviction order).
        self._index: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        if self.enabled:
            self._load()

    @classmethod
    def for_node(cls, cfg: Any) -> OutputStore:
        """The store of a node (a NodeConfig): DATA_DIR/outputs, its bounds."""
        return cls(os.path.join(cfg.data_dir, "outputs"), cfg.keep_output_bytes,
                   cfg.keep_output_total)

    @property
    def enabled(self) -> bool:
        return self.per_unit > 0 and self.total > 0

    def _load(self) -> None:
        """Index what an earlier run of this node kept (oldest first); drop files of
        units that were being written when it stopped."""
        try:
            os.makedirs(self.root, exist_ok=True)
            names = os.listdir(self.root)
        except OSError as exc:
            log.warning("output store %s unusable, keeping no output: %s", self.root, exc)
            self.per_unit = 0
            return
        metas = []
        for name in names:
            path = os.path.join(self.root, name)
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(path)
            elif name.endswith(".json"):
                with contextlib.suppress(OSError):
                    metas.append((os.stat(path).st_mtime, name[:-5]))
        for _, key in sorted(metas):
            size = sum(self._size(key, s) for s in STREAMS)
            self._index[key] = size
            self._used += size
        with self._lock:
            self._evict()

    def _size(self, key: str, stream: str) -> int:
        try:
            return os.stat(os.path.join(self.root, key + _SUFFIX[stream])).st_size
        except OSError:
            return 0

    def start(self, task_id: str, chunk: int, attempt: int) -> Sink | None:
        """A sink for a unit starting now (None: this node keeps no output)."""
        if not self.enabled:
            return None
        return Sink(self.root, task_id, chunk, attempt, self.per_unit)

    def discard(self, sink: Sink) -> None:
        """Keep nothing of this unit (its result holds all of it)."""
        sink.close()
        for s in sink.files:  # only what was opened: most units write no file at all
            with contextlib.suppress(OSError):
                os.remove(sink.paths[s] + ".tmp")

    def finish(self, sink: Sink) -> None:
        """The unit ended: put its files in place (replacing an earlier attempt's)
        and evict the oldest outputs beyond the total."""
        sink.close()
        base = os.path.join(self.root, sink.key)
        meta = {"task_id": sink.task_id, "chunk": sink.chunk, "attempt": sink.attempt,
                "written": sink.written, "kept": sink.kept, "finished_at": time.time(),
                "complete": not sink.broken and all(
                    sink.kept[s] == sink.written[s] for s in STREAMS)}
        try:
            with self._lock:
                for s in STREAMS:
                    tmp, final = sink.paths[s] + ".tmp", base + _SUFFIX[s]
                    if s in sink.files and not sink.broken:
                        os.replace(tmp, final)
                    else:
                        with contextlib.suppress(OSError):
                            os.remove(tmp)
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(final)
                with open(base + ".json.tmp", "w", encoding="utf-8") as f:
                    json.dump(meta, f)
                os.replace(base + ".json.tmp", base + ".json")
                self._used -= self._index.pop(sink.key, 0)
                size = 0 if sink.broken else sum(sink.kept.values())
                self._index[sink.key] = size
                self._used += size
                self._evict()
        except OSError as exc:
            log.warning("cannot keep the output of %s#%d: %s", sink.task_id, sink.chunk, exc)

    def _evict(self) -> None:
        """Under the lock: drop the oldest outputs until the rest fit the total."""
        while self._used > self.total and self._index:
            key, size = self._index.popitem(last=False)
            self._used -= size
            for suffix in (*_SUFFIX.values(), ".json"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.root, key + suffix))

    def used(self) -> int:
        with self._lock:
            return self._used

    def read(self, task_id: str, chunk: int, stream: str, offset: int,
             limit: int) -> dict[str, Any] | None:
        """A page of a kept output: ``data`` (bytes from ``offset``, at most
        ``limit``), ``kept`` (bytes on disk), ``written`` (bytes the unit wrote),
        ``complete`` (everything it wrote was kept) and ``attempt``. None: not kept
        here (never run here, evicted, or keeping is off)."""
        key = _key(task_id, chunk)
        base = os.path.join(self.root, key)
        with self._lock:
            if key not in self._index:
                return None
            try:
                with open(base + ".json", encoding="utf-8") as f:
                    meta = json.load(f)
                if meta.get("task_id") != task_id or meta.get("chunk") != chunk:
                    return None
                data = b""
                kept = int(meta["kept"][stream])
                if kept and offset < kept:
                    with open(base + _SUFFIX[stream], "rb") as f:
                        f.seek(offset)
                        data = f.read(min(limit, MAX_PAGE))
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return {"data": data, "kept": kept, "written": int(meta["written"][stream]),
                "complete": bool(meta.get("complete")), "attempt": int(meta.get("attempt", 0))}


def unit_node(task: dict[str, Any], chunk: int | None) -> tuple[int, str]:
    """(chunk, node that ran it) of a task's unit, from its API record. A whole
    task's unit is chunk -1; a split task needs ``chunk``. InvalidTask names the
    field when the chunk does not fit the task."""
    from taskandgo.node.tasks import InvalidTask

    chunks = task.get("chunks") or []
    if chunks:
        if chunk is None or chunk < 0:
            raise InvalidTask("chunk", f"task {task['id']} is split into {len(chunks)} "
                              f"chunks: say which (0..{len(chunks) - 1})")
        if chunk >= len(chunks):
            raise InvalidTask("chunk", f"task {task['id']} has chunks 0..{len(chunks) - 1}")
        return chunk, str(chunks[chunk].get("node", ""))
    if chunk is not None and chunk != -1:
        raise InvalidTask("chunk", f"task {task['id']} is not split")
    return -1, str(task.get("node", ""))


def fetch_output(app: Any, task_id: str, chunk: int | None, stream: str = "stdout",
                 offset: int = 0, limit: int = MAX_PAGE, local: bool = False) -> dict[str, Any]:
    """One page of a unit's kept output, from whichever node ran it.

    Returns ``task_id, chunk, node, stream, offset, data (bytes), kept, written,
    complete``. Raises InvalidTask (a bad field, named), NotFound (no such task, or
    its output is not kept: never run, evicted, or its node keeps none) or
    Unavailable (the node that ran it cannot be reached now). ``local``: answer
    from this node's store only (what a node asks the node that ran the unit)."""
    from taskandgo.node.client import TaskAndGoError
    from taskandgo.node.replica import NotFound, Unavailable
    from taskandgo.node.tasks import InvalidTask

    if not task_id:
        raise InvalidTask("task_id", "required")
    if stream not in STREAMS:
        raise InvalidTask("stream", "expected stdout or stderr")
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidTask("offset", f"expected 0..{MAX_OFFSET}")
    if limit < 0:
        raise InvalidTask("limit", f"expected 0..{MAX_PAGE} (0: {MAX_PAGE})")
    limit = min(limit or MAX_PAGE, MAX_PAGE)
    record: dict[str, Any] | None = None
    if local:
        unit = -1 if chunk is None else chunk
        node = app.node_id
    else:
        task = app.get(task_id)
        unit, node = unit_node(task, chunk)
        if not node:
            raise NotFound(f"task {task_id}: no output yet (it has not run)")
        record = task if unit < 0 else task["chunks"][unit]
    if node == app.node_id:
        page = app.outputs.read(task_id, unit, stream, offset, limit)
        if page is None and record is not None:
            page = _from_record(record, stream, offset, limit)
        if page is None:
            raise NotFound(f"task {task_id}: the output of {_unit_name(unit)} is not kept on "
                           f"node {node} (evicted, or that node keeps none: "
                           "--keep-output-bytes)")
        return {"task_id": task_id, "chunk": unit, "node": node, "stream": stream,
                "offset": offset, **page}
    address = next((n.get("grpc_address") for n in app.cluster_status().get("nodes", [])
                    if n.get("id") == node and n.get("role") not in ("unreachable", "unknown")),
                   None)
    if not address:
        raise Unavailable(f"node {node}, which ran {_unit_name(unit)} of task {task_id}, "
                          "is not reachable now")
    try:
        with app.client([address], 10.0) as c:
            return c.task_output_page(task_id, unit, stream, offset, limit, local=True)
    except TaskAndGoError as exc:
        if exc.code == "NOT_FOUND":
            page = _from_record(record or {}, stream, offset, limit)
            if page is not None:
                return {"task_id": task_id, "chunk": unit, "node": node, "stream": stream,
                        "offset": offset, **page}
            raise NotFound(exc.message) from None
        if exc.code == "INVALID_ARGUMENT":
            raise InvalidTask("task_id", exc.message) from None
        raise Unavailable(f"node {node}: {exc.message}") from None


def _from_record(record: dict[str, Any], stream: str, offset: int,
                 limit: int) -> dict[str, Any] | None:
    """A page served from the unit's committed record, when that holds all of the
    stream (a unit whose output was not kept because its result has all of it: a
    callable's or echoed result under the cap, or a node that keeps no output)."""
    if record.get("status") not in ("succeeded", "failed", "cancelled"):
        return None
    if stream == "stdout":
        if record.get("truncated"):
            return None
        raw = str(record.get("result", "")).encode("utf-8", "replace")
        # The result drops a trailing newline: count what the unit wrote.
        written = max(len(raw), int(record.get("output_bytes", 0) or 0))
    else:
        raw = str(record.get("stderr", "")).encode("utf-8", "replace")
        if len(raw) >= 4096:  # may be only the tail (executor.STDERR_TAIL)
            return None
        written = len(raw)
    return {"data": raw[offset:offset + limit], "kept": len(raw), "written": written,
            "complete": True, "attempt": int(record.get("attempts", 0) or 0)}


def _unit_name(chunk: int) -> str:
    return "the task" if chunk < 0 else f"chunk {chunk}"


__all__ = ["DEFAULT_KEEP_PER_UNIT", "DEFAULT_KEEP_TOTAL", "MAX_PAGE", "OutputStore", "Sink",
           "fetch_output", "unit_node"]
