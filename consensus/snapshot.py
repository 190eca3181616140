"""The replicated state as plain data: the versioned snapshot format (docs/
architecture.md, "Snapshot format"), written and read by
:meth:`SchedulerState.to_snapshot` / :meth:`SchedulerState.from_snapshot`.

Unlike a pickle of the classes it does not change when their layout does; it reads
every version ever written.
"""

from __future__ import annotations

import heapq
from typing import Any

from taskandgo.consensus.model import Task, Unit
from taskandgo.consensus.state import SchedulerState


def to_snapshot(state: SchedulerState) -> dict[str, Any]:
    """The state as plain data (dicts, lists, str, int, float, bool, None): the
    versioned snapshot format documented in docs/architecture.md ("Snapshot
    format"). Unlike a pickle of these classes it does not change when their
    layout does; :meth:`from_snapshot` reads every version ever written."""
    def unit(u: Unit) -> dict[str, Any]:
        return {s: getattr(u, s) for s in Unit.__slots__}

    tasks = []
    for t in state.tasks.values():
        u = t.unit_state()
        tasks.append({
            "id": t.id, "spec": t.spec, "priority": t.priority, "strategy": t.strategy,
            "status": t.status, "created_at": t.created_at,
            "finished_at": t.finished_at, "retries": t.retries,
            # an int while the whole-task unit is untouched (its queue seq), else a unit
            "unit": u if isinstance(u, int) else unit(t.unit),
            "chunks": None if t.chunks is None else [unit(c) for c in t.chunks],
            "chunk_count": t.chunk_count, "chunks_done": t.chunks_done, "key": t.key,
            "result": t.result, "error": t.error, "exit_code": t.exit_code,
            "node": t.node,
        })
    return {
        "tasks": tasks,
        "heap": [list(e) for e in state.heap],
        "delayed": [[k[0], k[1], v] for k, v in state.delayed.items()],
        "running": [[k[0], k[1], v] for k, v in state.running.items()],
        "finished": [[k, v] for k, v in state.finished.items()],
        "queued_by_priority": [[k, v] for k, v in state.queued_by_priority.items()],
        "seq": state.seq, "next_token": state.next_token, "aging_per_s": state.aging_per_s,
        "dropped_results": state.dropped_results,
        "committed_results": state.committed_results,
        "rejected_commands": state.rejected_commands, "now": state.now,
        "settings": dict(state.settings),
        # Version 2 (written only when set; see replicated.py snapshot_version):
        "scheduled": [[k, v] for k, v in state.scheduled.items()],
        "schedules": list(state.schedules.values()),
        "waiting": [[k, list(v)] for k, v in state.waiting.items()],
        "children": [[k, list(v)] for k, v in state.children.items()],
        # Version 3 (written only when set): the usage policy (consensus/policy.py).
        "policy": state.policy() if state.limits or state.weights or state.tenant_label
        else {},
        # Fair share's virtual times (consensus/fairshare.py), only with a tenant label
        # (version 3: the policy holds it then); its queues are rebuilt from the heap.
        **({"fair": state.fair.to_data()} if state.fair is not None else {}),
    }


def from_snapshot(data: dict[str, Any]) -> SchedulerState:
    """Rebuild a state from :meth:`to_snapshot`'s plain data."""
    def unit(d: dict[str, Any]) -> Unit:
        u = Unit()
        for s in Unit.__slots__:
            if s in d:
                setattr(u, s, d[s])
        return u

    st = SchedulerState(aging_per_s=float(data.get("aging_per_s", 1.0 / 60.0)))
    for d in data.get("tasks", []):
        t = Task(d["id"], d["spec"], d["priority"], d["strategy"], d["created_at"])
        t.status = d["status"]
        t.finished_at = d["finished_at"]
        t.retries = d["retries"]
        t._u = d["unit"] if isinstance(d["unit"], int) else unit(d["unit"])
        t.chunks = None if d["chunks"] is None else [unit(c) for c in d["chunks"]]
        for name in ("chunk_count", "chunks_done", "key", "result", "error",
                     "exit_code", "node"):
            setattr(t, name, d[name])
        st.tasks[t.id] = t
    st.heap = [tuple(e) for e in data.get("heap", [])]
    heapq.heapify(st.heap)
    st.delayed = {(k0, k1): v for k0, k1, v in data.get("delayed", [])}
    st.running = {(k0, k1): v for k0, k1, v in data.get("running", [])}
    st.finished = dict(data.get("finished", []))
    st.queued_by_priority = dict(data.get("queued_by_priority", []))
    for name in ("seq", "next_token", "dropped_results", "committed_results",
                 "rejected_commands", "now"):
        setattr(st, name, data.get(name, getattr(st, name)))
    st.settings = {str(k): str(v) for k, v in dict(data.get("settings", {})).items()}
    st.scheduled = {str(k): float(v) for k, v in data.get("scheduled", [])}
    st.schedules = {str(r["id"]): dict(r) for r in data.get("schedules", [])}
    st.waiting = {str(k): [str(p) for p in v] for k, v in data.get("waiting", [])}
    st.children = {str(k): [str(c) for c in v] for k, v in data.get("children", [])}
    pol = data.get("policy") or {}
    st.limits = {str(k): int(v) for k, v in dict(pol.get("limits") or {}).items()}
    st.weights = {str(k): float(v) for k, v in dict(pol.get("weights") or {}).items()}
    st.tenant_label = str(pol.get("tenant_label") or "")
    st.rebuild_key_held()
    st.rebuild_fair()
    if st.fair is not None:
        st.fair.restore(data.get("fair"))
    return st


def needs_version(data: dict[str, Any]) -> int:
    """The lowest snapshot version that holds ``data`` (a :func:`to_snapshot`):
    1 unless it carries what only version 2 has (delayed tasks, schedules,
    dependencies) or version 3 (a usage policy), so a release that
    reads version 1 only refuses (fail-stop) a snapshot it would read wrong, and
    reads every other one as before."""
    if data.get("policy"):
        return 3
    newer = ("scheduled", "schedules", "waiting", "children")
    return 2 if any(data.get(k) for k in newer) else 1
