"""CPU and memory of this node's own container, or of the host when it has none.

In a Kubernetes pod (or any container with limits) the numbers that matter are the
container's: how much of its CPU quota it uses and how close it is to its memory
limit (where the OOM killer strikes). psutil's host-wide figures say nothing about
either: a pod limited to half a CPU shows 97 % "CPU" because the host is busy.

:class:`ResourceMonitor` finds the node's cgroup from ``/proc/self/cgroup`` and the
cgroup mounts in ``/proc/self/mountinfo`` (cgroup v2, or v1's ``cpu``, ``cpuacct``,
``memory`` and ``cpuset`` hierarchies) and reports, with ``source="cgroup"``:

- ``cpu_limit_cores``: the tightest of the quota (``cpu.max`` / ``cpu.cfs_quota_us``
  over the period) of this cgroup and its ancestors, the cpuset and the host's CPUs;
- ``cpu_percent``: CPU time the cgroup used (``cpu.stat`` usage_usec /
  ``cpuacct.usage``) since the previous sample, as a percent of ``cpu_limit_cores``
  over that time (100 % = the whole allowance);
- ``memory_used``: the working set in bytes (``memory.current`` /
  ``memory.usage_in_bytes`` minus inactive file cache, as the kubelet counts it);
- ``memory_limit``: the tightest ``memory.max`` / ``memory.limit_in_bytes`` of the
  cgroup and its ancestors, at most the host's memory; ``memory_percent`` of it.

When the node is in no cgroup with a CPU or memory limit (a laptop, a plain VM),
the same fields describe the host (``source="host"``, from psutil): CPU use of all
host CPUs, memory in use (total - available) of the host's total.

Contract: :meth:`ResourceMonitor.sample` never raises (an unreadable file falls back
to the host's figures) and is safe from any thread; samples closer together than
``min_interval_s`` return the previous one, so heartbeats and status calls do not
shorten each other's CPU window to noise.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

#: cgroup files that say "no limit" with a value this large or larger (v1 writes
#: PAGE_COUNTER_MAX * page size, about 2**63).
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Resources:
    """One reading. Units are in the names: percent, bytes, cores."""

    #: "cgroup": the node's own container; "host": the whole machine.
    source: str
    #: CPU used since the previous sample, percent of ``cpu_limit_cores``.
    cpu_percent: float
    #: CPUs this node may use (a cgroup quota may be fractional).
    cpu_limit_cores: float
    #: Memory in use, bytes (cgroup: working set; host: total - available).
    memory_used: int
    #: Memory this node may use, bytes (cgroup limit, else the host's total).
    memory_limit: int
    #: ``memory_used`` as a percent of ``memory_limit``.
    memory_percent: float
    #: The cgroup read (its path in the hierarchy), "" for the host.
    cgroup: str = ""

    def as_status(self) -> dict[str, Any]:
        """The fields as NodeStatus names them (``resources_source`` for ``source``)."""
        d = asdict(self)
        d["resources_source"] = d.pop("source")
        return d


@dataclass(frozen=True)
class CgroupPaths:
    """Where this process's cgroup files are: v2 has one directory; v1 one per
    controller. ``ancestors`` lists, per controller, the directories from this
    cgroup up to the mount point (limits of each apply)."""

    version: int
    path: str
    cpu: tuple[Path, ...]      # cpu.max / cpu.cfs_quota_us, nearest first
    cpuacct: Path | None       # usage counter
    memory: tuple[Path, ...]   # memory limit files, nearest first
    cpuset: Path | None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def parse_cpuset(text: str) -> int:
    """Number of CPUs in a cpuset list such as ``0-3,6,8-9`` (0 when empty or bad)."""
    n = 0
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            n += (int(hi) - int(lo) + 1) if hi else 1
        except ValueError:
            return 0
    return n


def _stat_value(text: str | None, key: str) -> int | None:
    """``key``'s value in a flat-keyed cgroup file (cpu.stat, memory.stat)."""
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root, mount point, super options) of every cgroup mount."""
    out = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        # mountinfo escapes spaces and the like as octal (\040).
        point = fields[4].encode().decode("unicode_escape")
        out.append((tail[0], fields[3], point, set(tail[2].split(","))))
    return out


def _chain(point: str, root: str, path: str) -> tuple[Path, ...]:
    """Directories from the cgroup at ``path`` up to the mount point ``point`` whose
    root is ``root`` (with a cgroup namespace both are "/")."""
    rel = path
    if root not in ("", "/") and (path == root or path.startswith(root.rstrip("/") + "/")):
        rel = path[len(root.rstrip("/")):]
    top = Path(point)
    here = top / rel.lstrip("/")
    if not here.is_dir():
        here = top  # a path from outside this mount's view: the mount's own cgroup
    chain = [here]
    while chain[-1] != top and top in chain[-1].parents:
        chain.append(chain[-1].parent)
    return tuple(chain)


def find_cgroup(proc_self: Path = Path("/proc/self")) -> CgroupPaths | None:
    """This process's cgroup directories from ``proc_self``/cgroup and /mountinfo;
    None when there is no cgroup filesystem to read."""
    cg, mi = _read(proc_self / "cgroup"), _read(proc_self / "mountinfo")
    if not cg or not mi:
        return None
    mounts = _mounts(mi)
    by_ctrl: dict[str, str] = {}
    v2_path = None
    for line in cg.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            v2_path = path
        for c in ctrls.split(","):
            if c:
                by_ctrl[c] = path
    v1 = {c: m for m in mounts if m[0] == "cgroup" for c in m[3] if c in
          ("cpu", "cpuacct", "memory", "cpuset")}
    if "memory" in v1 or "cpu" in v1:
        def chain(ctrl: str) -> tuple[Path, ...]:
            if ctrl not in v1 or ctrl not in by_ctrl:
                return ()
            _, root, point, _ = v1[ctrl]
            return _chain(point, root, by_ctrl[ctrl])
        # The usage counter must be that of the cgroup whose quota applies: with cpu
        # and cpuacct mounted apart (rare) and the process in different groups of
        # each, it is not, and the node's own process tree is counted instead.
        acct = chain("cpuacct") if by_ctrl.get("cpuacct") == by_ctrl.get("cpu") else ()
        cpuset = chain("cpuset")
        return CgroupPaths(1, by_ctrl.get("memory") or by_ctrl.get("cpu") or "/",
                           chain("cpu"), acct[0] if acct else None, chain("memory"),
                           cpuset[0] if cpuset else None)
    v2 = [m for m in mounts if m[0] == "cgroup2"]
    if v2_path is None or not v2:
        return None
    _, root, point, _ = v2[0]
    dirs = _chain(point, root, v2_path)
    return CgroupPaths(2, v2_path, dirs, dirs[0], dirs, dirs[0])


@dataclass(frozen=True)
class _Limits:
    cpu_cores: float | None   # None: no quota anywhere up the chain
    cpuset_cores: int | None
    memory: int | None        # None: no limit anywhere up the chain


def read_limits(cg: CgroupPaths) -> _Limits:
    """The tightest CPU quota and memory limit over the cgroup and its ancestors."""
    quotas: list[float] = []
    for d in cg.cpu:
        if cg.version == 2:
            text = _read(d / "cpu.max")
            if text:
                q, _, p = text.partition(" ")
                if q != "max":
                    try:
                        quotas.append(int(q) / int(p or "100000"))
                    except (ValueError, ZeroDivisionError):
                        pass
        else:
            quota = _read_int(d / "cpu.cfs_quota_us")
            period = _read_int(d / "cpu.cfs_period_us")
            if quota is not None and quota > 0 and period:  # -1: no quota
                quotas.append(quota / period)
    mems: list[int] = []
    for d in cg.memory:
        text = _read(d / ("memory.max" if cg.version == 2 else "memory.limit_in_bytes"))
        if text and text != "max":
            try:
                v = int(text)
            except ValueError:
                continue
            if 0 < v < _UNLIMITED:
                mems.append(v)
    cpuset = None
    if cg.cpuset is not None:
        text = _read(cg.cpuset / ("cpuset.cpus.effective" if cg.version == 2
                                  else "cpuset.effective_cpus"))
        cpuset = parse_cpuset(text) if text else None
    return _Limits(min(quotas) if quotas else None, cpuset or None,
                   min(mems) if mems else None)


def read_cpu_usage_us(cg: CgroupPaths) -> int | None:
    """CPU time used by the cgroup, microseconds, or None when unreadable."""
    if cg.cpuacct is None:
        return None
    if cg.version == 2:
        return _stat_value(_read(cg.cpuacct / "cpu.stat"), "usage_usec")
    ns = _read_int(cg.cpuacct / "cpuacct.usage")
    return None if ns is None else ns // 1000


def read_memory_used(cg: CgroupPaths) -> int | None:
    """The cgroup's working set in bytes: usage minus inactive file cache (the page
    cache the kernel reclaims before any OOM kill, as the kubelet counts it)."""
    if not cg.memory:
        return None
    d = cg.memory[0]
    if cg.version == 2:
        usage = _read_int(d / "memory.current")
        inactive = _stat_value(_read(d / "memory.stat"), "inactive_file")
    else:
        usage = _read_int(d / "memory.usage_in_bytes")
        stat = _read(d / "memory.stat")
        inactive = _stat_value(stat, "total_inactive_file")
        if inactive is None:
            inactive = _stat_value(stat, "inactive_file")
    if usage is None:
        return None
    return max(0, usage - (inactive or 0))


def _process_tree_cpu_us() -> int:
    """CPU time of this process and its waited-for children, microseconds."""
    t = psutil.Process(os.getpid()).cpu_times()
    return int((t.user + t.system + t.children_user + t.children_system) * 1e6)


class ResourceMonitor:
    """This node's CPU and memory; see the module docstring for what each means.

    ``proc_self`` and the host readers are parameters so tests can point it at a
    fake ``/proc/self`` whose mountinfo names a directory tree of cgroup files.
    """

    def __init__(self, proc_self: Path | str = "/proc/self", *, min_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic,
                 host_cpus: Callable[[], int] | None = None,
                 host_memory_total: Callable[[], int] | None = None) -> None:
        self._proc_self = Path(proc_self)
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._host_cpus = host_cpus or (lambda: psutil.cpu_count() or 1)
        self._host_memory_total = host_memory_total or (lambda: psutil.virtual_memory().total)
        self._lock = threading.Lock()
        self._cg: CgroupPaths | None = None
        self._prev: tuple[float, int] | None = None  # (clock, cgroup cpu usage µs)
        self._last: Resources | None = None
        self._last_at = -1e18

    def cgroup(self) -> CgroupPaths | None:
        """The cgroup read, found again at every sample (two small files): a node
        moved to another cgroup reports that one's figures from its next sample."""
        try:
            cg = find_cgroup(self._proc_self)
        except (OSError, ValueError):
            cg = None
        if cg != self._cg:
            self._cg, self._prev = cg, None  # another counter: no delta across it
        return cg

    def sample(self) -> Resources:
        """The current reading (the previous one if taken under min_interval_s ago)."""
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last_at < self._min_interval_s:
                return self._last
            reading = self._cgroup_sample(now) or self._host_sample()
            self._last, self._last_at = reading, now
            return reading

    def _cgroup_sample(self, now: float) -> Resources | None:
        cg = self.cgroup()
        if cg is None:
            return None
        limits = read_limits(cg)
        if limits.cpu_cores is None and limits.memory is None:
            return None  # a cgroup without limits: the host's figures say more
        host_cpus = self._host_cpus()
        cores = min(c for c in (limits.cpu_cores, limits.cpuset_cores, host_cpus)
                    if c is not None)
        usage = read_cpu_usage_us(cg)
        if usage is None:
            usage = _process_tree_cpu_us()
        cpu = 0.0
        if usage is not None:
            if self._prev is not None and now > self._prev[0] and usage >= self._prev[1]:
                cpu = (usage - self._prev[1]) / 1e6 / (now - self._prev[0]) / cores * 100.0
            self._prev = (now, usage)
        host_mem = self._host_memory_total()
        mem_limit = min(limits.memory, host_mem) if limits.memory else host_mem
        used = read_memory_used(cg)
        if used is None:
            used = int(psutil.Process(os.getpid()).memory_info().rss)
        return Resources("cgroup", round(cpu, 2), round(cores, 3), used, mem_limit,
                         round(100.0 * used / mem_limit, 2) if mem_limit else 0.0, cg.path)

    def _host_sample(self) -> Resources:
        vm = psutil.virtual_memory()
        used = int(vm.total - vm.available)
        return Resources("host", float(psutil.cpu_percent(None)), float(self._host_cpus()),
                         used, int(vm.total), float(vm.percent))


__all__ = ["CgroupPaths", "ResourceMonitor", "Resources", "find_cgroup", "parse_cpuset",
           "read_cpu_usage_us", "read_limits", "read_memory_used"]
