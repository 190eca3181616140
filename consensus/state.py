"""The replicated scheduler state: tasks, the priority queue, assignments, results
(the records themselves, Task and Unit, are in consensus/model.py).

This module is pure: no clock, no randomness, no I/O, no pysyncobj. Every mutation
is an ``apply_*`` method that the Raft layer calls in log order on every replica.
Contract of every ``apply_*`` method:

* deterministic: the same state and arguments give the same new state and return
  value on every replica (time, jitter and ids come in as arguments; no set is ever
  iterated, because string hashing differs between processes);
* total: it never raises on any argument; bad entries are skipped and reported in
  the return value (a raising replicated method wedges the whole Raft cluster);
* batched: each call carries many tasks, so one Raft entry moves many tasks.

Each ``apply_*`` returns ``(result, events)``; events are
``(kind, task_id, status, chunk, node, at)`` tuples for watchers.
"""

from __future__ import annotations

import heapq
import json
import sys
from collections.abc import Iterable
from typing import Any

from taskandgo.consensus import policy
from taskandgo.consensus.fairshare import FairQueue
from taskandgo.consensus.model import (
    CANCELLED,
    FAILED,
    FINAL,
    MAX_LOST_ATTEMPTS,
    MAX_TOKEN,
    POISON_AFTER_NODE_LOSSES,
    PRIORITY_LEVELS,
    QUEUED,
    RUNNING,
    SCHEDULED,
    STATUSES,
    SUCCEEDED,
    UPSTREAM_FAILED,
    WAITING,
    WHOLE,
    Event,
    Task,
    Unit,
    priority_name,
)

#: Cluster-wide settings (WriteSettings) and the values each may take.
SETTINGS: dict[str, tuple[str, ...]] = {"default_strategy": ("split", "batch")}

#: A schedule's overlap policy (what a fire does while its previous task has not
#: ended) and missed-slot policy (see node/timing.py due_fires), as Kubernetes
#: CronJob's concurrencyPolicy: allow runs both, forbid skips the new slot, replace
#: cancels the previous task.
OVERLAP_POLICIES = ("allow", "forbid", "replace")
MISSED_POLICIES = ("latest", "skip")
#: The most recent fires a schedule keeps (shown by get and the dashboard).
KEEP_FIRES = 20
#: Fire outcomes (apply_fire): a task was created; the slot was skipped because the
#: previous task still ran (forbid) or because it was missed (skip policy).
FIRED, SKIPPED_OVERLAP, SKIPPED_MISSED = "fired", "skipped_overlap", "skipped_missed"


def slot_task_id(schedule_id: str, slot: float) -> str:
    """The id of the task schedule ``schedule_id`` creates for ``slot``: derived from
    the two, so every replica and every leader names the same one."""
    return f"{schedule_id}@{int(slot)}"


class SchedulerState:
    """Everything that must survive the loss of a node. See the module docstring."""

    def __init__(self, aging_per_s: float = 1.0 / 60.0) -> None:
        self.tasks: dict[str, Task] = {}
        self.heap: list[tuple[float, int, str, int]] = []  # (key, qseq, task_id, chunk)
        self.delayed: dict[tuple[str, int], float] = {}  # unit -> not-before time
        self.running: dict[tuple[str, int], str] = {}  # unit -> worker id
        self.finished: dict[str, float] = {}  # task id -> finished_at, in finish order
        self.queued_by_priority: dict[int, int] = {}
        self.seq = 0
        self.next_token = 0
        self.aging_per_s = aging_per_s
        self.dropped_results = 0
        self.committed_results = 0
        self.rejected_commands = 0
        self.now = 0.0
        #: Cluster-wide settings (see SETTINGS); a key absent is not set yet.
        self.settings: dict[str, str] = {}
        #: Delayed tasks not yet runnable: task id -> run_at (apply_start_due releases
        #: them; nothing here reads a clock).
        self.scheduled: dict[str, float] = {}
        #: Periodic schedules by id (plain dicts: see apply_schedules); the leader
        #: fires their slots (apply_fire).
        self.schedules: dict[str, dict[str, Any]] = {}
        #: Counts changes to schedules on this replica (not replicated state: a reader
        #: sees whether to look again; it restarts at 0 with the process).
        self.schedule_rev = 0
        #: Dependencies: a waiting task -> the parents it still waits for, and a
        #: parent -> the tasks that named it (kept until the parent is forgotten).
        self.waiting: dict[str, list[str]] = {}
        self.children: dict[str, list[str]] = {}
        #: The usage policy (consensus/policy.py, apply_policy): concurrency key ->
        #: limit, tenant -> fair-share weight, the spec label naming a task's tenant.
        self.limits: dict[str, int] = {}
        self.weights: dict[str, float] = {}
        self.tenant_label = ""
        #: Derived (rebuilt from ``running`` by a snapshot load, not replicated by
        #: itself): concurrency key -> how many assigned units hold it.
        self.key_held: dict[str, int] = {}
        #: Assignments skipped because a concurrency key was at its limit.
        self.over_limit = 0
        #: Fair share between tenants (consensus/fairshare.py): None while no tenant
        #: label is set, and then the queue orders exactly as without it.
        self.fair: FairQueue | None = None

    # ------------------------------------------------------------------ helpers

    def _enqueue(self, task: Task, chunk: int, unit: Unit) -> None:
        self.seq += 1
        unit.status = QUEUED
        unit.qseq = self.seq
        heapq.heappush(self.heap, entry := (task.key, self.seq, task.id, chunk))
        if self.fair is not None:
            self.fair.pushed(task.priority, task.spec, entry)
        self.queued_by_priority[task.priority] = self.queued_by_priority.get(task.priority, 0) + 1

    def _dequeued(self, task: Task, unit: Unit) -> None:
        unit.qseq = 0
        if self.fair is not None:
            self.fair.left(task.priority, task.spec)
        n = self.queued_by_priority.get(task.priority, 0) - 1
        if n > 0:
            self.queued_by_priority[task.priority] = n
        else:
            self.queued_by_priority.pop(task.priority, None)

    def _advance(self, now: float) -> list[Event]:
        """Move the clock (never backwards) and release delayed retries that are due."""
        if now > self.now:
            self.now = now
        events: list[Event] = []
        if self.delayed:
            due = [k for k, t in self.delayed.items() if t <= self.now]
            for key in due:
                del self.delayed[key]
                task = self.tasks.get(key[0])
                unit = task.unit_at(key[1]) if task else None
                if task is not None and unit is not None and unit.status == QUEUED \
                        and task.status not in FINAL:
                    self._enqueue(task, key[1], unit)
        return events

    def _finish(self, task: Task, status: str, now: float) -> list[Event]:
        """End a task; then its dependents: each released once every parent it waits
        for has succeeded (with ``after_any``: ended), or ended upstream_failed naming
        this one, and so on down (iteratively: a chain of any length). Returns the
        dependents' events."""
        task.status = status
        task.finished_at = now
        self.finished[task.id] = now
        if task.id not in self.children:
            return []
        events: list[Event] = []
        ended = [task]
        while ended:
            parent = ended.pop()
            for cid in self.children.get(parent.id, ()):
                child = self.tasks.get(cid)
                pending = self.waiting.get(cid)
                if child is None or pending is None or child.status != WAITING \
                        or parent.id not in pending:
                    continue
                if parent.status == SUCCEEDED or child.spec.get("after_any"):
                    pending.remove(parent.id)
                    if not pending:
                        del self.waiting[cid]
                        self._release_child(child)
                        events.append(("task", cid, QUEUED, WHOLE, "", now))
                    continue
                del self.waiting[cid]
                child.error = (f"upstream task {parent.id} ended {parent.status}"
                               + (f" ({parent.error[:200]})" if parent.error else ""))[:500]
                child.status = UPSTREAM_FAILED
                child.finished_at = now
                self.finished[cid] = now
                events.append(("task", cid, UPSTREAM_FAILED, WHOLE, "", now))
                if cid in self.children:
                    ended.append(child)
        return events

    def _release_child(self, task: Task) -> None:
        """Queue a task whose parents are done, their results in its spec (``parents``:
        id -> result, for the worker to hand to it)."""
        task.spec["parents"] = {p: self.tasks[p].result if p in self.tasks else ""
                                for p in task.spec.get("after") or ()}
        self._release(task)

    def _unrun(self, task: Task, tid: str, chunk: int) -> None:
        """A unit stops being assigned: out of ``running``, and its concurrency keys
        released."""
        if self.running.pop((tid, chunk), None) is not None and "concurrency_keys" in task.spec:
            held = self.key_held
            for k in policy.spec_keys(task.spec):
                n = held.get(k, 0) - 1
                if n > 0:
                    held[k] = n
                else:
                    held.pop(k, None)

    def at_limit(self, keys: Iterable[str]) -> str:
        """The first of ``keys`` whose limit its assigned units already reach ("":
        none)."""
        for k in keys:
            limit = self.limits.get(k)
            if limit is not None and self.key_held.get(k, 0) >= limit:
                return k
        return ""

    def rebuild_key_held(self) -> None:
        """``key_held`` from ``running`` (after a snapshot load)."""
        self.key_held = {}
        for tid, _chunk in self.running:
            t = self.tasks.get(tid)
            if t is not None and "concurrency_keys" in t.spec:
                for k in policy.spec_keys(t.spec):
                    self.key_held[k] = self.key_held.get(k, 0) + 1

    def rebuild_fair(self) -> None:
        """The fair-share index for the tenant label (None without one), every
        tenant's virtual time at 0 (a label just set, or a snapshot load)."""
        self.fair = FairQueue.build(self.tenant_label, self.heap, self.tasks,
                                    self._is_live_entry) if self.tenant_label else None

    def _is_live_entry(self, entry: tuple) -> bool:
        _, qseq, tid, chunk = entry
        task = self.tasks.get(tid)
        if task is None or task.status in FINAL:
            return False
        if chunk == WHOLE:
            return task.chunks is None and task.live_qseq() == qseq
        unit = task.unit_at(chunk)
        return unit is not None and unit.status == QUEUED and unit.qseq == qseq

    # ------------------------------------------------------------------ commands

    def apply_submit(self, specs: list, now: float) -> tuple[list, list[Event]]:
        """Add tasks. ``specs`` are validated dicts with id, priority, strategy.

        Returns one ``(task_id, created, status)`` per spec; an id already known
        returns ``created=False`` and leaves the task unchanged (idempotency)."""
        events = self._advance(now)
        out = []
        keys: dict[int, float] = {}
        for spec in specs if isinstance(specs, list) else []:
            try:
                tid = str(spec["id"])
                prio = int(spec["priority"])
                strategy = str(spec.get("strategy") or "batch")
            except Exception:  # noqa: BLE001 - totality: a bad entry is skipped
                self.rejected_commands += 1
                out.append(("", False, "rejected"))
                continue
            existing = self.tasks.get(tid)
            if existing is not None:
                out.append((tid, False, existing.status))
                continue
            call = spec.get("call") if isinstance(spec, dict) else None
            if type(call) is str and len(call) <= 200:
                # One copy of each callable path, however many tasks name it.
                spec["call"] = sys.intern(call)
            task = Task(tid, spec, prio, sys.intern(strategy), now)
            key = keys.get(prio)
            if key is None:
                # One float per priority per command, shared by its tasks (24 B each).
                key = keys[prio] = now * self.aging_per_s - prio
            task.key = key
            self.tasks[tid] = task
            after = spec.get("after") if isinstance(spec, dict) else None
            if isinstance(after, list) and after:
                out.append((tid, True, self._wait_for(task, [str(p) for p in after], now)))
                events.append(("task", tid, task.status, WHOLE, "", now))
                continue
            run_at = spec.get("run_at") if isinstance(spec, dict) else None
            if isinstance(run_at, (int, float)) and not isinstance(run_at, bool) \
                    and run_at > now:
                # Delayed: accepted (and durable) now, out of the queue until a
                # start_due command at or after run_at releases it.
                task.status = SCHEDULED
                self.scheduled[tid] = float(run_at)
                out.append((tid, True, SCHEDULED))
                events.append(("task", tid, SCHEDULED, WHOLE, "", now))
                continue
            self.seq += 1
            task._u = self.seq  # a queued unit at its defaults (see Task)
            heapq.heappush(self.heap, entry := (task.key, self.seq, task.id, WHOLE))
            if self.fair is not None:
                self.fair.pushed(prio, spec, entry)
            self.queued_by_priority[prio] = self.queued_by_priority.get(prio, 0) + 1
            out.append((tid, True, QUEUED))
            events.append(("task", tid, QUEUED, WHOLE, "", now))
        return out, events

    def _wait_for(self, task: Task, parents: list[str], now: float) -> str:
        """A new task with parents: queued at once when they are all done as it
        needs, upstream_failed when one is not (or unknown: the node refuses unknown
        ids, so only one forgotten since), else waiting. Returns its status."""
        pending: list[str] = []
        for pid in dict.fromkeys(parents):  # once each, in order
            parent = self.tasks.get(pid)
            if parent is None:
                task.error = f"upstream task {pid} is unknown"
                self._finish(task, UPSTREAM_FAILED, now)
                return UPSTREAM_FAILED
            self.children.setdefault(pid, []).append(task.id)
            if parent.status == SUCCEEDED or (parent.status in FINAL
                                              and task.spec.get("after_any")):
                continue
            if parent.status in FINAL:
                task.error = (f"upstream task {pid} ended {parent.status}"
                              + (f" ({parent.error[:200]})" if parent.error else ""))[:500]
                self._finish(task, UPSTREAM_FAILED, now)
                return UPSTREAM_FAILED
            pending.append(pid)
        if not pending:
            self._release_child(task)
            return QUEUED
        task.status = WAITING
        self.waiting[task.id] = pending
        return WAITING

    def _release(self, task: Task) -> None:
        """Queue a task that was kept out of the queue (a delayed task now due), as a
        fresh submit would: its queue key from the replicated clock now, so its wait
        before run_at earns it no aging."""
        task.status = QUEUED
        task.key = self.now * self.aging_per_s - task.priority
        self.seq += 1
        task._u = self.seq
        heapq.heappush(self.heap, entry := (task.key, self.seq, task.id, WHOLE))
        if self.fair is not None:
            self.fair.pushed(task.priority, task.spec, entry)
        self.queued_by_priority[task.priority] = \
            self.queued_by_priority.get(task.priority, 0) + 1

    def apply_start_due(self, task_ids: list, now: float) -> tuple[list, list[Event]]:
        """Release delayed tasks whose run_at is at or before the replicated clock
        (after moving it to ``now``): each named task still scheduled and due is
        queued. A task not scheduled (already released, cancelled, unknown) or not
        due yet is left as it is, so a repeated or early command is harmless.
        Returns the ids released."""
        events = self._advance(now)
        out: list[str] = []
        for raw in task_ids if isinstance(task_ids, list) else []:
            tid = str(raw)
            at = self.scheduled.get(tid)
            task = self.tasks.get(tid)
            if at is None or at > self.now or task is None:
                continue
            del self.scheduled[tid]
            if task.status != SCHEDULED:
                continue
            self._release(task)
            out.append(tid)
            events.append(("task", tid, QUEUED, WHOLE, "", self.now))
        return out, events

    def apply_schedules(self, ops: list, now: float) -> tuple[list, list[Event]]:
        """Create, pause, resume or delete schedules. Each op is a dict with ``op``
        and ``id``; ``create`` carries ``cron``, ``tz``, ``template`` (a stored spec
        without id, checked by the proposer), ``overlap``, ``missed`` and
        ``catchup_s``. Creating an id that exists leaves it unchanged (idempotent: a
        client retries with the same id). A new schedule's first slot is the first
        after ``now``; a resumed one skips the slots of its pause. Returns
        ``(id, outcome)`` per op: created, exists, paused, resumed, deleted,
        not_found or rejected."""
        events = self._advance(now)
        out: list[tuple[str, str]] = []
        for op in ops if isinstance(ops, list) else []:
            try:
                kind, sid = str(op["op"]), str(op["id"])
            except Exception:  # noqa: BLE001 - totality: a bad entry is skipped
                self.rejected_commands += 1
                out.append(("", "rejected"))
                continue
            sc = self.schedules.get(sid)
            if kind == "create":
                if sc is not None:
                    out.append((sid, "exists"))
                    continue
                try:
                    record = {
                        "id": sid, "cron": str(op["cron"]), "tz": str(op["tz"]),
                        "template": dict(op["template"]),
                        "overlap": str(op.get("overlap") or "allow"),
                        "missed": str(op.get("missed") or "latest"),
                        "catchup_s": float(op.get("catchup_s", 0.0) or 0.0),
                        "paused": False, "created_at": self.now, "last_slot": self.now,
                        "last_task": "", "fires": [], "fired": 0, "skipped": 0,
                    }
                except Exception:  # noqa: BLE001
                    self.rejected_commands += 1
                    out.append((sid, "rejected"))
                    continue
                if record["overlap"] not in OVERLAP_POLICIES \
                        or record["missed"] not in MISSED_POLICIES:
                    self.rejected_commands += 1
                    out.append((sid, "rejected"))
                    continue
                self.schedules[sid] = record
                self.schedule_rev += 1
                out.append((sid, "created"))
                events.append(("schedule", sid, "created", WHOLE, "", self.now))
            elif sc is None:
                out.append((sid, "not_found"))
            elif kind == "pause":
                self.schedule_rev += 1
                sc["paused"] = True
                out.append((sid, "paused"))
                events.append(("schedule", sid, "paused", WHOLE, "", self.now))
            elif kind == "resume":
                self.schedule_rev += 1
                if sc["paused"]:
                    # The slots of the pause are not missed: they were not wanted.
                    sc["paused"] = False
                    sc["last_slot"] = max(sc["last_slot"], self.now)
                out.append((sid, "resumed"))
                events.append(("schedule", sid, "resumed", WHOLE, "", self.now))
            elif kind == "delete":
                self.schedule_rev += 1
                del self.schedules[sid]
                out.append((sid, "deleted"))
                events.append(("schedule", sid, "deleted", WHOLE, "", self.now))
            else:
                self.rejected_commands += 1
                out.append((sid, "rejected"))
        return out, events

    def apply_fire(self, fires: list, now: float) -> tuple[list, list[Event]]:
        """Fire schedule slots: each fire is ``(schedule_id, slot, run)``. A slot at
        or before the schedule's last fired slot (fired already, by this leader or an
        earlier one), or of a paused or deleted schedule, is a no-op: so each slot
        of a schedule creates at most one task, whoever leads and however often a
        fire is proposed. Otherwise the slot becomes the last one and, with ``run``
        (False: a missed slot skipped by the missed-slot policy), the overlap policy
        decides: allow creates the slot's task (id from slot_task_id, its spec the
        template plus ``schedule`` and ``slot``), forbid skips the slot while the
        previous task has not ended, replace cancels that task first. Returns
        ``(schedule_id, slot, outcome, task_id)`` per fire that took effect."""
        events = self._advance(now)
        out: list[tuple[str, float, str, str]] = []
        for f in fires if isinstance(fires, list) else []:
            try:
                sid, slot, run = str(f[0]), float(f[1]), bool(f[2])
            except Exception:  # noqa: BLE001
                self.rejected_commands += 1
                continue
            sc = self.schedules.get(sid)
            if sc is None or sc["paused"] or not slot > sc["last_slot"]:
                continue
            self.schedule_rev += 1
            sc["last_slot"] = slot
            prev = self.tasks.get(sc["last_task"]) if sc["last_task"] else None
            running = prev is not None and prev.status not in FINAL
            tid = slot_task_id(sid, slot)
            if not run:
                outcome = SKIPPED_MISSED
            elif running and sc["overlap"] == "forbid":
                outcome = SKIPPED_OVERLAP
            elif tid in self.tasks:
                # Taken by a task a client submitted under that id: not ours to reuse.
                outcome = "skipped_id_taken"
            else:
                if running and sc["overlap"] == "replace":
                    _, cancelled = self.apply_cancel([sc["last_task"]], self.now)
                    events.extend(cancelled)
                spec = dict(sc["template"], id=tid, schedule=sid, slot=slot)
                _, submitted = self.apply_submit([spec], self.now)
                events.extend(submitted)
                sc["last_task"] = tid
                outcome = FIRED
            if outcome == FIRED:
                sc["fired"] += 1
            else:
                sc["skipped"] += 1
            sc["fires"] = [*sc["fires"][-(KEEP_FIRES - 1):],
                           [slot, tid if outcome == FIRED else "", outcome]]
            out.append((sid, slot, outcome, tid if outcome == FIRED else ""))
            events.append(("schedule", sid, outcome, WHOLE, tid if outcome == FIRED else "",
                           self.now))
        return out, events

    def apply_assign(self, assignments: list, now: float,
                     lease_s: float) -> tuple[list, list[Event]]:
        """Hand queued units to workers.

        Each assignment is ``(task_id, chunk, chunk_count, worker[, token])``.
        ``chunk`` is -1 for a whole task; a split task that has not been cut yet is
        cut into ``chunk_count`` chunks by its first assignment (the chunks not named
        stay queued). Stale assignments (unit no longer queued) are skipped.

        ``token`` is the unit's new fencing token, chosen by the proposer (the leader
        draws a random 63-bit value, so a token cannot be guessed from the ones seen
        before); it travels in the command, so every replica records the same one.
        Without it (commands of earlier releases, in old journals) the token is the
        next value of a counter, as before. A token that is not an int in
        1..2**63-1 rejects that assignment. Returns
        ``(task_id, chunk, chunk_count, attempt, token, worker)`` for each unit that
        was assigned."""
        events = self._advance(now)
        out = []
        for a in assignments if isinstance(assignments, list) else []:
            try:
                tid, chunk, count, worker = str(a[0]), int(a[1]), int(a[2]), str(a[3])
                given = a[4] if len(a) > 4 else None
            except Exception:  # noqa: BLE001
                self.rejected_commands += 1
                continue
            if given is not None and (type(given) is not int or not 0 < given < MAX_TOKEN):
                self.rejected_commands += 1
                continue
            task = self.tasks.get(tid)
            if task is None or task.status in FINAL or task.status in (SCHEDULED, WAITING):
                continue
            if chunk != WHOLE and task.chunks is None:
                # First dispatch of a split task: cut it now.
                if task.unit.status != QUEUED or not 1 <= count <= 100_000:
                    continue
                self._dequeued(task, task.unit)
                task.unit.status = RUNNING
                task.chunks = [Unit() for _ in range(count)]
                task.chunk_count = count
                for i, c in enumerate(task.chunks):
                    self._enqueue(task, i, c)
                task.status = RUNNING
                events.append(("task", tid, RUNNING, WHOLE, "", now))
            unit = task.unit_at(chunk)
            if unit is None or unit.status != QUEUED or unit.qseq == 0:
                continue
            keys = policy.spec_keys(task.spec) if "concurrency_keys" in task.spec else ()
            if keys and self.at_limit(keys):
                # Enforced here, whoever proposed it: the key stays at its limit.
                self.over_limit += 1
                continue
            for k in keys:
                self.key_held[k] = self.key_held.get(k, 0) + 1
            if self.fair is not None:
                self.fair.served(task.priority, task.spec, self.weights)
            self._dequeued(task, unit)
            self.delayed.pop((tid, chunk), None)
            self.next_token += 1
            unit.status = RUNNING
            unit.attempt += 1
            unit.token = self.next_token if given is None else given
            unit.node = worker
            unit.started_at = now
            unit.deadline = now + lease_s
            unit.error = ""
            self.running[(tid, chunk)] = worker
            if task.status == QUEUED:
                task.status = RUNNING
            task.node = worker if task.chunks is None else ""
            events.append(("task", tid, RUNNING, chunk, worker, now))
            out.append((tid, chunk, task.chunk_count, unit.attempt, unit.token, worker))
        return out, events

    def apply_complete(self, results: list, now: float) -> tuple[dict, list[Event]]:
        """Record results. Each result is a dict with task_id, chunk, attempt, token,
        ok, exit_code, result, error, node, started_at, finished_at and ``backoff_s``
        (the proposer's jittered retry delay, used if the attempt failed and the task
        has retries left). A result with ``requeue`` set hands the unit back unrun
        (its node is shutting down): it is queued again without using a retry.

        A result is applied only if it carries the unit's current attempt and token
        and the unit is running; anything else (late, duplicate, fenced off) is
        dropped and counted. Returns ``{"committed": n, "dropped": n}``."""
        events = self._advance(now)
        committed = dropped = 0
        for r in results if isinstance(results, list) else []:
            try:
                tid = str(r["task_id"])
                chunk = int(r["chunk"])
                attempt = int(r["attempt"])
                token = int(r["token"])
                ok = bool(r["ok"])
            except Exception:  # noqa: BLE001
                self.rejected_commands += 1
                continue
            task = self.tasks.get(tid)
            unit = task.unit_at(chunk) if task is not None else None
            if task is None or unit is None or task.status in FINAL or unit.status != RUNNING \
                    or unit.attempt != attempt or unit.token != token:
                dropped += 1
                continue
            if r.get("requeue"):
                # Handed back unfinished by a node shutting down: not the task's
                # failure; run it again elsewhere (as for a lost lease). Held back
                # unstarted (a higher-priority task arrived): as if never assigned.
                self._unrun(task, tid, chunk)
                if r.get("held"):
                    unit.attempt = max(0, unit.attempt - 1)
                    unit.started_at = 0.0
                    if task.chunks is None:
                        task.status = QUEUED
                    self._enqueue(task, chunk, unit)
                    events.append(("task", tid, QUEUED, chunk, "", now))
                    continue
                unit.lost += 1
                unit.error = str(r.get("error", "") or "handed back")[:500]
                self._enqueue(task, chunk, unit)
                events.append(("task", tid, "requeued", chunk, unit.node, now))
                continue
            committed += 1
            self._unrun(task, tid, chunk)
            try:
                # When the worker really started it (a unit may wait in a prefetch
                # window after its assignment).
                started = float(r.get("started_at", 0.0) or 0.0)
            except (TypeError, ValueError):
                started = 0.0
            if unit.started_at < started < float("inf"):
                unit.started_at = started
            unit.exit_code = int(r.get("exit_code", 0) or 0)
            unit.result = str(r.get("result", "") or "")
            unit.error = str(r.get("error", "") or "")
            unit.node = str(r.get("node", "") or unit.node)
            # Read by key with defaults: a result from an earlier release has none.
            unit.stderr = str(r.get("stderr", "") or "")
            unit.truncated = r.get("truncated") is True
            try:
                unit.output_bytes = max(0, int(r.get("output_bytes", 0) or 0))
            except (TypeError, ValueError, OverflowError):
                unit.output_bytes = 0
            unit.finished_at = now
            if ok:
                unit.status = SUCCEEDED
            elif unit.attempt - unit.lost <= task.retries:
                unit.status = QUEUED
                backoff = float(r.get("backoff_s", 0.0) or 0.0)
                if backoff > 0:
                    self.delayed[(tid, chunk)] = now + backoff
                else:
                    self._enqueue(task, chunk, unit)
                events.append(("task", tid, "retrying", chunk, unit.node, now))
                continue
            else:
                unit.status = FAILED
            events.extend(self._settle(task, chunk, unit, now))
        self.committed_results += committed
        self.dropped_results += dropped
        return {"committed": committed, "dropped": dropped}, events

    def _settle(self, task: Task, chunk: int, unit: Unit, now: float) -> list[Event]:
        """A unit reached a final state; finish the task if that decides it."""
        if chunk == WHOLE:
            task.exit_code = unit.exit_code
            task.result = unit.result
            task.error = unit.error
            task.node = unit.node
            after = self._finish(task, unit.status, now)
            return [("task", task.id, unit.status, WHOLE, unit.node, now), *after]
        events: list[Event] = [("task", task.id, "chunk_" + unit.status, chunk, unit.node, now)]
        chunks = task.chunks or []
        if unit.status == FAILED:
            task.error = f"chunk {chunk} failed: {unit.error}"[:4000]
            task.exit_code = unit.exit_code
            self._cancel_units(task, now, events, "sibling chunk failed")
            after = self._finish(task, FAILED, now)
            events.append(("task", task.id, FAILED, WHOLE, "", now))
            events.extend(after)
            return events
        task.chunks_done += 1
        if task.chunks_done == len(chunks):
            gathered = []
            for c in chunks:
                try:
                    gathered.append(json.loads(c.result))
                except ValueError:
                    gathered.append(c.result)
            task.result = json.dumps(gathered)
            task.unit.status = SUCCEEDED
            after = self._finish(task, SUCCEEDED, now)
            events.append(("task", task.id, SUCCEEDED, WHOLE, "", now))
            events.extend(after)
        return events

    def _cancel_units(self, task: Task, now: float, events: list[Event], why: str) -> list:
        """Mark every unfinished unit of task cancelled; return the running ones."""
        killed = []
        units = [(WHOLE, task.unit)] if task.chunks is None else list(enumerate(task.chunks))
        for chunk, unit in units:
            if unit.status == RUNNING:
                killed.append((task.id, chunk, unit.attempt, unit.token, unit.node))
                self._unrun(task, task.id, chunk)
            if unit.status == QUEUED and unit.qseq:
                self._dequeued(task, unit)
            if unit.status in (QUEUED, RUNNING):
                unit.status = CANCELLED
                unit.error = why
                unit.finished_at = now
            self.delayed.pop((task.id, chunk), None)
        self.scheduled.pop(task.id, None)
        if task.chunks is not None and task.unit.status in (QUEUED, RUNNING):
            task.unit.status = CANCELLED
        return killed

    def apply_cancel(self, task_ids: list, now: float) -> tuple[list, list[Event]]:
        """Cancel tasks. Returns ``(task_id, status, running_units)`` per id, where
        running_units are ``(task_id, chunk, attempt, token, worker)`` to kill."""
        events = self._advance(now)
        out: list[tuple[str, str, list[Any]]] = []
        for tid in task_ids if isinstance(task_ids, list) else []:
            task = self.tasks.get(str(tid))
            if task is None:
                out.append((str(tid), "not_found", []))
                continue
            if task.status in FINAL:
                out.append((task.id, task.status, []))
                continue
            killed = self._cancel_units(task, now, events, "cancelled")
            task.error = "cancelled"
            self.waiting.pop(task.id, None)
            after = self._finish(task, CANCELLED, now)
            events.append(("task", task.id, CANCELLED, WHOLE, "", now))
            events.extend(after)
            out.append((task.id, CANCELLED, killed))
        return out, events

    def apply_requeue(self, units: list, now: float, reason: str) -> tuple[int, list[Event]]:
        """Take units back from a worker presumed gone, and record node deaths.

        An entry ``(task_id, chunk, attempt, token[, since])`` requeues the unit's
        current assignment (attempt + 1 at its next assignment); it never counts as a
        node death by itself: a paused, slow or partitioned node misses its lease too.
        ``since`` (the requeuing leader's start time, unused here) is accepted for
        journals of the release before.

        An entry ``(task_id, chunk, attempt, token, since, worker_started_at,
        unit_started_at)`` confirms that the node which ran that attempt died while
        running it: its process restarted after the attempt started
        (``unit_started_at < worker_started_at``), and the proposing leader was running
        before it started (``since < unit_started_at``: after a whole-cluster restart
        no node died of a task). After :data:`POISON_AFTER_NODE_LOSSES` confirmed
        deaths a unit ends failed, wherever it is now. :data:`MAX_LOST_ATTEMPTS`
        requeues of any kind end it too."""
        events = self._advance(now)
        n = 0
        for u in units if isinstance(units, list) else []:
            try:
                tid, chunk, attempt, token = str(u[0]), int(u[1]), int(u[2]), int(u[3])
                confirm = len(u) >= 7
                if confirm:
                    since, worker_started, unit_started = float(u[4]), float(u[5]), float(u[6])
            except Exception:  # noqa: BLE001
                self.rejected_commands += 1
                continue
            task = self.tasks.get(tid)
            unit = task.unit_at(chunk) if task is not None else None
            if task is None or unit is None or task.status in FINAL or unit.status in FINAL:
                continue
            if confirm:
                if not since < unit_started < worker_started or attempt > unit.attempt:
                    continue
                unit.deaths += 1
                if unit.deaths < POISON_AFTER_NODE_LOSSES:
                    continue
                if unit.status == RUNNING:
                    self._unrun(task, tid, chunk)
                elif unit.status == QUEUED and unit.qseq:
                    self._dequeued(task, unit)
                self.delayed.pop((tid, chunk), None)
                unit.status = FAILED
                unit.error = (f"not run again: the node running it died {unit.deaths} times "
                              f"(a task that kills or exhausts its node would take down one "
                              f"node after another); last: {reason}")[:500]
                unit.finished_at = now
                events.extend(self._settle(task, chunk, unit, now))
                continue
            if unit.status != RUNNING or unit.attempt != attempt or unit.token != token:
                continue
            self._unrun(task, tid, chunk)
            unit.lost += 1
            unit.error = str(reason)[:500]
            n += 1
            if unit.lost >= MAX_LOST_ATTEMPTS:
                unit.status = FAILED
                unit.error = f"lost {unit.lost} times: {reason}"[:500]
                unit.finished_at = now
                events.extend(self._settle(task, chunk, unit, now))
                continue
            self._enqueue(task, chunk, unit)
            events.append(("task", tid, "requeued", chunk, unit.node, now))
        return n, events

    def apply_settings(self, values: Iterable[tuple[str, str]], now: float,
                       only_if_unset: bool) -> tuple[dict[str, str], list[Event]]:
        """Set cluster-wide settings: each (key, value) of SETTINGS with a value it may
        take (anything else is skipped); with ``only_if_unset`` a key already set keeps
        its value. Returns the settings after."""
        events = self._advance(now)
        for key, value in values:
            if value in SETTINGS.get(key, ()) and not (only_if_unset and key in self.settings):
                self.settings[key] = value
        return dict(self.settings), events

    def apply_policy(self, ops: list, now: float) -> tuple[dict[str, Any], list[Event]]:
        """Change the usage policy (consensus/policy.py apply_ops: concurrency
        limits, fair-share weights, the tenant label). Returns the policy after."""
        events = self._advance(now)
        label = self.tenant_label
        self.tenant_label, skipped = policy.apply_ops(self.limits, self.weights,
                                                      self.tenant_label, ops)
        self.rejected_commands += skipped
        if self.tenant_label != label:
            self.rebuild_fair()
        return self.policy(), events

    def policy(self) -> dict[str, Any]:
        """The usage policy as plain data."""
        return {"limits": dict(sorted(self.limits.items())),
                "weights": dict(sorted(self.weights.items())),
                "tenant_label": self.tenant_label}

    def apply_compact(self, now: float, retention_s: float,
                      max_finished: int) -> tuple[int, list[Event]]:
        """Forget finished tasks older than retention_s or beyond the newest max_finished."""
        events = self._advance(now)
        removed = 0
        excess = len(self.finished) - max(0, int(max_finished))
        # finished is in finish order: walk only the head that goes (copying all of
        # it, up to --max-finished entries, stalled every replica's tick thread).
        doomed: list[str] = []
        for tid, at in self.finished.items():
            if excess - len(doomed) <= 0 and at > now - retention_s:
                break
            doomed.append(tid)
        for tid in doomed:
            del self.finished[tid]
            self.tasks.pop(tid, None)
            self.children.pop(tid, None)
            removed += 1
        if len(self.heap) > 64 and len(self.heap) > 2 * self.queued_count():
            self.heap = [e for e in self.heap if self._is_live_entry(e)]
            heapq.heapify(self.heap)
        if self.fair is not None:
            self.fair.compact(self._is_live_entry)
        return removed, events

    # ------------------------------------------------------------------ reads

    def running_below(self, priority: int) -> bool:
        """Is any unit running (or waiting in a worker's prefetch window) with a
        priority below this one? (Bounded by the cluster's capacity.)"""
        for tid, _ in self.running:
            t = self.tasks.get(tid)
            if t is not None and t.priority < priority:
                return True
        return False

    def queued_count(self) -> int:
        return sum(self.queued_by_priority.values())

    def peek_queued(self, limit: int) -> list[tuple[Task, int]]:
        """The first ``limit`` queued units in priority order, without removing them.

        Drops dead heap entries it meets on the way (the only read that mutates, and
        only in ways invisible to every other read)."""
        out: list[tuple[Task, int]] = []
        if limit <= 0:
            return out
        heap = self.heap
        while heap and not self._is_live_entry(heap[0]):
            heapq.heappop(heap)
        if not heap:
            return out
        if self.fair is not None:
            # Fair share between tenants within a level (consensus/fairshare.py).
            tasks = self.tasks
            for e in self.fair.order(self._is_live_entry, self.weights):
                out.append((tasks[e[2]], e[3]))
                if len(out) >= limit:
                    break
            return out
        # Walk the heap in order with a side heap of candidate indices.
        frontier = [(heap[0], 0)]
        while frontier and len(out) < limit:
            entry, i = heapq.heappop(frontier)
            if self._is_live_entry(entry):
                out.append((self.tasks[entry[2]], entry[3]))
            for j in (2 * i + 1, 2 * i + 2):
                if j < len(heap):
                    heapq.heappush(frontier, (heap[j], j))
        return out

    def running_on(self, worker: str) -> list[tuple[str, int, int, int]]:
        out = []
        for (tid, chunk), w in self.running.items():
            if w == worker:
                unit = self.tasks[tid].unit_at(chunk)
                if unit is not None:
                    out.append((tid, chunk, unit.attempt, unit.token))
        return out

    def running_units(self) -> list[tuple[str, int, int, int, str, float]]:
        """(task_id, chunk, attempt, token, worker, started_at) for every running unit."""
        out = []
        for (tid, chunk), w in self.running.items():
            unit = self.tasks[tid].unit_at(chunk)
            if unit is not None:
                out.append((tid, chunk, unit.attempt, unit.token, w, unit.started_at))
        return out

    def counts_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for t in self.tasks.values():
            counts[t.status] = counts.get(t.status, 0) + 1
        return counts

    def list_tasks(self, status: str = "", labels: Iterable[tuple[str, str]] = ()) -> list[Task]:
        want = list(labels)
        out = []
        for t in self.tasks.values():
            if status and t.status != status:
                continue
            if want:
                have = t.spec.get("labels") or {}
                if any(have.get(k) != v for k, v in want):
                    continue
            out.append(t)
        return out

    # ------------------------------------------------------------------ snapshots

    def to_snapshot(self) -> dict[str, Any]:
        """The state as plain data (see consensus/snapshot.py)."""
        from taskandgo.consensus.snapshot import to_snapshot

        return to_snapshot(self)

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> SchedulerState:
        """Rebuild a state from :meth:`to_snapshot`'s plain data."""
        from taskandgo.consensus.snapshot import from_snapshot

        return from_snapshot(data)

    def fingerprint(self) -> tuple:
        """A value equal on two replicas exactly when their states are equal."""
        return (
            tuple(json.dumps(t.as_dict(), sort_keys=True) + repr(t.unit_state())
                  for t in self.tasks.values()),
            tuple(sorted(e for e in self.heap if self._is_live_entry(e))),
            tuple(self.delayed.items()), tuple(self.running.items()),
            tuple(self.finished.items()), self.next_token, self.dropped_results,
            self.committed_results, self.now, tuple(sorted(self.settings.items())),
            tuple(self.scheduled.items()),
            json.dumps(self.schedules, sort_keys=True),
            tuple((k, tuple(v)) for k, v in self.waiting.items()),
            tuple((k, tuple(v)) for k, v in self.children.items()),
            # Only when set, so states of earlier releases compare as before.
            *((tuple(sorted(self.limits.items())), tuple(sorted(self.weights.items())),
               self.tenant_label) if self.limits or self.weights or self.tenant_label else ()),
            *((self.fair.fingerprint(),) if self.fair is not None else ()),
        )


__all__ = [
    "CANCELLED",
    "FAILED",
    "FINAL",
    "FIRED",
    "MAX_LOST_ATTEMPTS",
    "MAX_TOKEN",
    "MISSED_POLICIES",
    "OVERLAP_POLICIES",
    "POISON_AFTER_NODE_LOSSES",
    "PRIORITY_LEVELS",
    "QUEUED",
    "RUNNING",
    "SCHEDULED",
    "SETTINGS",
    "SKIPPED_MISSED",
    "SKIPPED_OVERLAP",
    "STATUSES",
    "SUCCEEDED",
    "UPSTREAM_FAILED",
    "WAITING",
    "WHOLE",
    "Event",
    "SchedulerState",
    "Task",
    "Unit",
    "priority_name",
    "slot_task_id",
]
