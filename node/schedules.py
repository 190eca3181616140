"""Schedules: the client side of periodic schedules (create, list, get, pause,
resume, delete), shared by gRPC, HTTP, the CLI and the client.

A schedule request is checked here (:func:`check_schedule`: the cron expression and
time zone with croniter and zoneinfo, the task template with the task checks,
errors :class:`InvalidTask` naming the field) into a ``create`` op of the replicated
``write_timetable_change`` command; :class:`ScheduleBook` proposes it and answers with the
schedule's view (:func:`schedule_to_api`). The leader fires the slots
(node/timing.py). Writes are proposed by the leader only: it alone knows that every
voter runs a release that can apply them (RAFT_PROTOCOL 6); a follower hands a write
to the leader, a non-voter to a voter.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from taskandgo.consensus.commands import WriteSchedules
from taskandgo.consensus.state import MISSED_POLICIES, OVERLAP_POLICIES, SchedulerState
from taskandgo.node.replica import NotFound, Replica, Unavailable
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.timing import (
    DEFAULT_CATCHUP_S,
    SCHEDULES_PROTOCOL,
    BadCron,
    check_cron,
    next_slot,
)
from taskandgo.node.vocabulary import TaskSpec, request_from_json, request_from_proto, spec_to_api

#: A schedule id: like a task id without ``@`` (a slot's task is ``<id>@<slot>``), at
#: most 100 characters so that task id stays within a task id's 128.
SCHEDULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
#: At most this many schedules in a cluster (each is checked by the leader often).
MAX_SCHEDULES = 100_000
MAX_CATCHUP_S = 24 * 3600.0
#: Fields of a schedule's HTTP body.
SCHEDULE_FIELDS = ("id", "cron", "time_zone", "task", "overlap", "missed", "catchup_s")


def check_schedule(raw: Mapping[str, Any], default_strategy: str,
                   task_from: str = "json") -> dict[str, Any]:
    """A schedule request (``SCHEDULE_FIELDS``; ``task`` an HTTP task body, or a
    request mapping with ``task_from="mapping"``) -> the ``create`` op of
    write_timetable_change; InvalidTask naming the field (``task.data``...) otherwise."""
    if not isinstance(raw, Mapping):
        raise InvalidTask("schedule", "expected an object")
    unknown = set(raw) - set(SCHEDULE_FIELDS)
    if unknown:
        raise InvalidTask(min(unknown), "unknown field")
    sid = raw.get("id")
    if not isinstance(sid, str) or not SCHEDULE_ID_RE.fullmatch(sid):
        raise InvalidTask("id", "1-100 characters of letters, digits and ._:- starting "
                          "with a letter or digit")
    cron, tz = raw.get("cron"), raw.get("time_zone") or "UTC"
    if not isinstance(cron, str) or not cron.strip():
        raise InvalidTask("cron", "required: a cron expression such as '*/5 * * * *'")
    if not isinstance(tz, str):
        raise InvalidTask("time_zone", "expected an IANA name such as Europe/Berlin")
    try:
        from taskandgo.node.timing import zone_of

        zone_of(tz)
    except BadCron as exc:
        raise InvalidTask("time_zone", str(exc)) from None
    try:
        check_cron(cron.strip(), tz)
    except BadCron as exc:
        raise InvalidTask("cron", str(exc)) from None
    overlap = raw.get("overlap") or "allow"
    if overlap not in OVERLAP_POLICIES:
        raise InvalidTask("overlap", f"{overlap!r}: expected {', '.join(OVERLAP_POLICIES)}")
    missed = raw.get("missed") or "latest"
    if missed not in MISSED_POLICIES:
        raise InvalidTask("missed", f"{missed!r}: expected {', '.join(MISSED_POLICIES)}")
    catchup = raw.get("catchup_s") or DEFAULT_CATCHUP_S
    if isinstance(catchup, bool) or not isinstance(catchup, (int, float)) \
            or not 0 < catchup <= MAX_CATCHUP_S:
        raise InvalidTask("catchup_s", f"expected seconds 0..{MAX_CATCHUP_S:g}")
    task = raw.get("task")
    if task is None:
        raise InvalidTask("task", "required: the task each slot runs")
    req = request_from_json(task, "task.") if task_from == "json" else dict(task)
    if req.get("id"):
        raise InvalidTask("task.id", "each slot's task gets its own id (<schedule>@<slot>)")
    if req.get("run_at") or req.get("delay_s"):
        raise InvalidTask("task.run_at", "a schedule's slots say when its tasks run")
    if req.get("after"):
        raise InvalidTask("task.after", "a schedule's task cannot wait for other tasks")
    spec = TaskSpec.check(req, default_strategy, "task.")
    template = spec.to_stored()
    del template["id"]
    return {"op": "create", "id": sid, "cron": cron.strip(), "tz": tz, "template": template,
            "overlap": overlap, "missed": missed, "catchup_s": float(catchup)}


def schedule_from_proto(msg: Any) -> dict[str, Any]:
    """A taskandgo.v1.Schedule message -> the request :func:`check_schedule` reads
    (``task_from="mapping"``)."""
    out: dict[str, Any] = {"id": msg.id, "cron": msg.cron, "time_zone": msg.time_zone,
                           "overlap": msg.overlap, "missed": msg.missed,
                           "catchup_s": msg.catchup_s}
    if msg.HasField("task"):
        out["task"] = request_from_proto(msg.task)
    return out


def schedule_to_api(sc: Mapping[str, Any], status_of: Callable[[str], str]) -> dict[str, Any]:
    """A schedule record of the replicated state -> the API's Schedule shape.
    ``status_of(task_id)`` is a task's status now ("" when gone)."""
    nxt = 0.0 if sc["paused"] else next_slot(sc["cron"], sc["tz"], sc["last_slot"]) or 0.0
    task = spec_to_api({"id": "", **sc["template"]})
    task.pop("id", None)
    return {
        "id": sc["id"], "cron": sc["cron"], "time_zone": sc["tz"], "task": task,
        "overlap": sc["overlap"], "missed": sc["missed"], "catchup_s": sc["catchup_s"],
        "paused": sc["paused"], "created_at": sc["created_at"], "last_slot": sc["last_slot"],
        "next_fire": nxt, "fires_total": sc["fired"], "skipped_total": sc["skipped"],
        "recent": [{"slot": slot, "task_id": tid, "outcome": outcome,
                    "task_status": status_of(tid) if tid else ""}
                   for slot, tid, outcome in sc["fires"]],
        "last_task": sc["last_task"],
    }


class ScheduleBook:
    """Schedules through this node. ``forward()`` gives a Client to a voter (a
    non-voter's calls), ``to_leader()`` a Client to the leader (a follower's
    writes). Thread-safe."""

    def __init__(self, replica: Replica, *, forward: Callable[[], Any],
                 to_leader: Callable[[], Any]) -> None:
        self.replica = replica
        self._forward = forward
        self._to_leader = to_leader

    # ------------------------------------------------------------------ reads

    def _views(self, ids: list[str] | None) -> list[dict[str, Any]]:
        def read(s: SchedulerState) -> list[tuple[dict[str, Any], dict[str, str]]]:
            chosen = [s.schedules[i] for i in ids if i in s.schedules] if ids is not None \
                else list(s.schedules.values())
            out = []
            for sc in chosen:
                statuses = {t: s.tasks[t].status for _slot, t, _o in sc["fires"]
                            if t and t in s.tasks}
                out.append((_copy(sc), statuses))
            return out

        return [schedule_to_api(sc, lambda t, st=st: st.get(t, ""))  # type: ignore[misc]
                for sc, st in self.replica.read(read)]

    def list_all(self) -> list[dict[str, Any]]:
        if self.replica.replicated is None:
            with self._forward() as c:
                return list(c.list_schedules())
        return sorted(self._views(None), key=lambda v: v["id"])

    def get(self, schedule_id: str) -> dict[str, Any]:
        if self.replica.replicated is None:
            with self._forward() as c:
                return dict(c.get_schedule(schedule_id))
        found = self._views([schedule_id])
        if not found:
            raise NotFound(f"schedule {schedule_id} not found")
        return found[0]

    # ------------------------------------------------------------------ writes

    def create(self, op: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        """Create a schedule from :func:`check_schedule`'s op (an id that exists is
        answered with the schedule as it is: a retried create is harmless)."""
        if self.replica.replicated is None or not self.replica.is_leader():
            with self._remote() as c:
                return dict(c.create_schedule(_request_of(op)))
        n = self.replica.read(lambda s: len(s.schedules))
        if n >= MAX_SCHEDULES:
            raise InvalidTask("id", f"the cluster holds {n} schedules, the most it keeps")
        self._write(op, timeout_s)
        return self.get(op["id"])

    def change(self, schedule_id: str, kind: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Pause, resume or delete (NotFound when there is no such schedule); returns
        the schedule after (a deleted one as it was)."""
        if self.replica.replicated is None or not self.replica.is_leader():
            with self._remote() as c:
                return dict(getattr(c, f"{kind}_schedule")(schedule_id))
        before = self.get(schedule_id)
        self._write({"op": kind, "id": schedule_id}, timeout_s)
        if kind == "delete":
            return dict(before, paused=True, next_fire=0.0)
        return self.get(schedule_id)

    def _remote(self) -> Any:
        return self._forward() if self.replica.replicated is None else self._to_leader()

    def _write(self, op: dict[str, Any], timeout_s: float) -> str:
        if not self.replica.voters_at(SCHEDULES_PROTOCOL):
            raise Unavailable("a voter runs an earlier release that cannot keep schedules; "
                              "upgrade every voter first")
        fut: Future = Future()

        def done(result: Any, err: int) -> None:
            if err == 0 and isinstance(result, list) and result:
                fut.set_result(result[0][1])
            elif not fut.done():
                fut.set_exception(Unavailable("schedule change not committed (no leader?)"))

        self.replica.propose(WriteSchedules((op,), time.time()), callback=done,
                             timeout_s=timeout_s)
        try:
            outcome = str(fut.result(timeout=timeout_s + 1.0))
        except FutureTimeout:
            raise Unavailable("schedule change not committed in time") from None
        if outcome == "not_found":
            raise NotFound(f"schedule {op['id']} not found")
        if outcome == "rejected":
            raise InvalidTask("schedule", "refused by the state machine")
        return outcome


def _copy(sc: Mapping[str, Any]) -> dict[str, Any]:
    """A schedule record copied under the replica's lock (its lists change in place)."""
    return {**sc, "fires": [list(f) for f in sc["fires"]], "template": dict(sc["template"])}


def _request_of(op: Mapping[str, Any]) -> dict[str, Any]:
    """A create op -> the Client's create_schedule arguments (for a forwarded call)."""
    task = spec_to_api({"id": "", **op["template"]})
    task.pop("id", None)
    return {"id": op["id"], "cron": op["cron"], "time_zone": op["tz"],
            "task": task, "overlap": op["overlap"],
            "missed": op["missed"], "catchup_s": op["catchup_s"]}


__all__ = ["MAX_SCHEDULES", "SCHEDULE_FIELDS", "SCHEDULE_ID_RE", "ScheduleBook",
           "check_schedule", "schedule_from_proto", "schedule_to_api"]
