"""``taskandgo top``: a live terminal view of the cluster, refreshed in place.

One frame is the leader's view of every node (role, health, CPU, memory, slots,
running units), the queue by priority, task counts, and the running tasks. It is
built on :class:`taskandgo.Client` alone, so it works against any node, and keeps
going through a leader change: a frame that cannot be fetched shows the error
and the next one tries again.

:func:`render` is pure (snapshot in, lines out); :func:`run_top` does the I/O.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from taskandgo.node.client import Client, TaskAndGoError

PRIORITIES = ("critical", "high", "medium", "low")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
#: Each call of a frame gives up after this long, so a stopped node cannot freeze
#: the view; the next frame tries again.
FRAME_TIMEOUT_S = 3.0

CLEAR = "\x1b[2J\x1b[H"
HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
CURSOR_OFF, CURSOR_ON = "\x1b[?25l", "\x1b[?25h"


@dataclass(frozen=True)
class Snapshot:
    """What one frame shows. Parts that could not be fetched are None, with the
    reason in ``errors``."""

    at: float
    cluster: dict[str, Any] | None
    node: dict[str, Any] | None
    queue: dict[str, int] | None
    running: list[dict[str, Any]] | None
    errors: tuple[str, ...] = field(default_factory=tuple)


def fetch(client: Client, max_running: int = 200) -> Snapshot:
    """Ask the cluster for one frame's worth of data (three or four calls)."""
    errors: list[str] = []

    def attempt(what: str, call: Any) -> Any:
        try:
            return call()
        except TaskAndGoError as exc:
            errors.append(f"{what}: {exc.code}: {exc.message}")
            return None

    cluster = attempt("cluster", client.cluster_status)
    node = attempt("node", client.node_status)
    queue = dict(node["queue_by_priority"]) if node else None
    if node and not node.get("voter"):
        # A worker holds no replica of the queue: count the queued tasks instead.
        queued = attempt("queue", lambda: client.list_tasks("queued", limit=10_000)) or []
        queue = {}
        for t in queued:
            name = str(t.get("priority_name") or t["priority"])
            queue[name] = queue.get(name, 0) + 1
    running = attempt("tasks", lambda: client.list_tasks("running", limit=max_running))
    return Snapshot(time.time(), cluster, node, queue, running, tuple(errors))


def _pct(x: float) -> str:
    return f"{x:.0f}%"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


def render(snap: Snapshot, width: int = 100, height: int = 40, interval_s: float = 1.0,
           names: dict[str, str] | None = None) -> list[str]:
    """The frame as lines, each at most ``width`` wide and at most ``height`` lines
    (running tasks are cut to fit). ``names`` maps gRPC addresses to node ids seen
    before, to name a voter the leader lists as unreachable; it is updated."""
    names = {} if names is None else names
    lines: list[str] = []
    cluster, node = snap.cluster, snap.node
    leader = cluster["leader_id"] if cluster else (node or {}).get("leader_id") or "?"
    term = (node or {}).get("raft_term", "-")
    clock = time.strftime("%H:%M:%S", time.localtime(snap.at))
    lines.append(f"TaskAndGo top   leader {leader or '-'}   term {term}   {clock}   "
                 f"every {interval_s:g} s (Ctrl-C quits)")
    if cluster:
        by_status = cluster.get("tasks_by_status", {})
        counts = "  ".join(f"{k} {by_status[k]}" for k in STATUSES if k in by_status)
        lines.append(f"tasks: {counts}   committed results {cluster.get('committed_results', 0)}"
                     f"   dropped {cluster.get('dropped_results', 0)}")
    lines.extend(f"! {err} (retrying)" for err in snap.errors)
    lines.append("")

    # CPU% and MEM% are of the node's own container's limits (its cgroup), or of the
    # host's when it has none (see `taskandgo status`: resources_source); RSS is the
    # node process's resident memory; SLOTS is free/total.
    lines.append(f"{'NODE':12} {'ROLE':11} {'HEALTH':11} {'CPU%':>5} {'MEM%':>5} {'RSS':>8} "
                 f"{'FREE/SLOTS':>10}  RUNNING UNITS")
    for n in sorted((cluster or {}).get("nodes", []), key=lambda n: str(n.get("id"))):
        if n.get("role") not in ("unreachable", "unknown"):
            names[n.get("grpc_address", "")] = n["id"]
        name = names.get(n.get("grpc_address", ""), n["id"])
        if n.get("role") in ("unreachable", "unknown"):
            lines.append(f"{name:12} {'unreachable':11} {'down':11} {'-':>5} {'-':>5} {'-':>8} "
                         f"{'-':>10}  -")
            continue
        running = n.get("running", [])
        health = "ready" if n.get("ready") else "not ready"
        lines.append(
            f"{name:12} {n.get('role', ''):11} {health:11} {_pct(n.get('cpu_percent', 0)):>5} "
            f"{_pct(n.get('memory_percent', 0)):>5} {_mib(n.get('memory_rss', 0)):>8} "
            f"{str(n.get('free_slots', 0)) + '/' + str(n.get('slots', 0)):>10}  "
            f"{len(running)}" + (f": {' '.join(running)}" if running else ""))
    lines.append("")

    queue = snap.queue or {}
    order = list(PRIORITIES) + sorted(set(queue) - set(PRIORITIES))
    lines.append("QUEUE  " + "  ".join(f"{p} {queue.get(p, 0)}" for p in order)
                 + f"   (total {sum(queue.values())})")
    lines.append("")

    tasks = snap.running or []
    lines.append(f"RUNNING ({len(tasks)})")
    lines.append(f"{'TASK':34} {'PRIO':8} {'STRATEGY':8} {'NODE':10} {'ATT':>3} {'ELAPSED':>8}  "
                 "CHUNKS")
    room = max(1, height - len(lines) - 1)
    for t in tasks[:room]:
        elapsed = f"{snap.at - t['started_at']:.1f}s" if t.get("started_at") else "-"
        chunks = ""
        if t.get("chunk_count"):
            n, done = t["chunk_count"], t["chunks_done"]
            chunks = f"[{'#' * (10 * done // n)}{'-' * (10 - 10 * done // n)}] {done}/{n}"
        node_name = t.get("node") or ",".join(sorted({c["node"] for c in t.get("chunks", [])
                                                       if c.get("node")}))
        lines.append(f"{t['id'][:34]:34} {t.get('priority_name') or t['priority']!s:8} "
                     f"{t['strategy']:8} {node_name[:10]:10} {t['attempts']:>3} {elapsed:>8}  "
                     f"{chunks}")
    if len(tasks) > room:
        lines.append(f"... and {len(tasks) - room} more")
    return [_cut(line, width) for line in lines[:height]]


def run_top(client: Client, interval_s: float = 1.0, once: bool = False,
            out: TextIO | None = None) -> int:
    """Draw frames every ``interval_s`` until interrupted (or one with ``once``).
    On a terminal, frames redraw in place on the alternate screen; otherwise
    each frame is printed plainly, followed by a blank line."""
    out = out or sys.stdout
    tty = out.isatty() and not once
    client.timeout_s = min(client.timeout_s, FRAME_TIMEOUT_S)
    names: dict[str, str] = {}
    if tty:
        out.write(ALT_SCREEN_ON + CURSOR_OFF + CLEAR)
    try:
        while True:
            started = time.monotonic()
            size = shutil.get_terminal_size((120, 40))
            lines = render(fetch(client), size.columns, size.lines if tty else 10_000,
                           interval_s, names)
            if tty:
                out.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines[:-1])
                          + lines[-1] + CLEAR_LINE + CLEAR_BELOW)
            else:
                out.write("\n".join(lines) + "\n" + ("" if once else "\n"))
            out.flush()
            if once:
                return 0
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))  # frame pacing
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            out.write(CURSOR_ON + ALT_SCREEN_OFF)
            out.flush()
