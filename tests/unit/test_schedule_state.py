"""Periodic schedules in the pure state machine: each (schedule, slot) fires at most
once whoever proposes it, the overlap and missed-slot policies, pause/resume/delete,
snapshots and the commands' log form."""

from __future__ import annotations

from typing import Any

from taskandgo.consensus.commands import (
    COMMAND_IDS,
    FireSchedules,
    WriteSchedules,
    from_args,
)
from taskandgo.consensus.snapshot import needs_version
from taskandgo.consensus.state import SchedulerState

TEMPLATE = {"priority": 10, "strategy": "batch", "data": "tick"}


def _with(overlap: str = "allow", **extra: Any) -> SchedulerState:
    s = SchedulerState()
    op = {"op": "create", "id": "s", "cron": "* * * * * *", "tz": "UTC", "template": TEMPLATE,
          "overlap": overlap, "missed": "latest", "catchup_s": 10.0, **extra}
    assert WriteSchedules((op,), 100.0).apply(s)[0] == [("s", "created")]
    return s


def _fire(s: SchedulerState, *slots: float, run: bool = True) -> list:
    """Fire these slots, proposed just after the last of them (the leader's clock)."""
    return FireSchedules(tuple(("s", t, run) for t in slots), max(slots) + 0.5).apply(s)[0]


def test_a_slot_fires_once_whoever_proposes_it_again() -> None:
    s = _with()
    assert _fire(s, 101.0) == [("s", 101.0, "fired", "s@101")]
    # A new leader (or a retried command) proposing the same or an earlier slot: no-op.
    assert _fire(s, 101.0, 100.5, 99.0) == []
    assert _fire(s, 102.0, 102.0) == [("s", 102.0, "fired", "s@102")]
    assert sorted(s.tasks) == ["s@101", "s@102"]
    t = s.tasks["s@101"]
    assert t.spec["schedule"] == "s" and t.spec["slot"] == 101.0 and t.status == "queued"
    assert t.as_dict()["schedule_id"] == "s" and t.as_dict()["slot"] == 101.0
    sc = s.schedules["s"]
    assert sc["fired"] == 2 and sc["last_slot"] == 102.0 and sc["last_task"] == "s@102"
    assert [f[2] for f in sc["fires"]] == ["fired", "fired"]


def test_a_slot_before_the_schedule_was_created_never_fires() -> None:
    s = _with()
    assert _fire(s, 100.0, 50.0) == []  # created at 100: its first slot is after


def test_forbid_skips_while_the_previous_task_runs_and_replace_cancels_it() -> None:
    s = _with("forbid")
    _fire(s, 101.0)
    assert _fire(s, 102.0) == [("s", 102.0, "skipped_overlap", "")]
    s.apply_cancel(["s@101"], 150.0)  # ended: the next slot fires again
    assert _fire(s, 103.0)[0][2] == "fired"

    r = _with("replace")
    _fire(r, 101.0)
    assert _fire(r, 102.0) == [("s", 102.0, "fired", "s@102")]
    assert r.tasks["s@101"].status == "cancelled" and r.tasks["s@102"].status == "queued"

    a = _with("allow")
    _fire(a, 101.0, 102.0)
    assert [a.tasks[t].status for t in ("s@101", "s@102")] == ["queued", "queued"]


def test_a_missed_slot_skipped_by_policy_moves_the_schedule_without_a_task() -> None:
    s = _with()
    assert _fire(s, 150.0, run=False) == [("s", 150.0, "skipped_missed", "")]
    assert not s.tasks and s.schedules["s"]["last_slot"] == 150.0
    assert s.schedules["s"]["skipped"] == 1


def test_an_id_taken_by_a_client_task_is_not_reused() -> None:
    s = _with()
    s.apply_submit([{"id": "s@101", "priority": 0, "strategy": "batch", "data": "mine"}], 100.0)
    assert _fire(s, 101.0) == [("s", 101.0, "skipped_id_taken", "")]
    assert s.tasks["s@101"].spec["data"] == "mine"


def test_pause_resume_delete_and_idempotent_create() -> None:
    s = _with()
    again = {"op": "create", "id": "s", "cron": "@daily", "tz": "UTC", "template": TEMPLATE}
    ops = (again, {"op": "pause", "id": "s"}, {"op": "pause", "id": "nope"})
    assert WriteSchedules(ops, 110.0).apply(s)[0] == [
        ("s", "exists"), ("s", "paused"), ("nope", "not_found")]
    assert s.schedules["s"]["cron"] == "* * * * * *"
    assert _fire(s, 111.0) == []  # paused
    WriteSchedules(({"op": "resume", "id": "s"},), 120.0).apply(s)
    assert _fire(s, 115.0) == []  # a slot of the pause: not wanted
    assert _fire(s, 121.0)[0][2] == "fired"
    assert WriteSchedules(({"op": "delete", "id": "s"},), 130.0).apply(s)[0] == [
        ("s", "deleted")]
    assert _fire(s, 131.0) == [] and "s@121" in s.tasks  # its tasks stay


def test_bad_ops_are_rejected_never_raised() -> None:
    s = SchedulerState()
    ops = ({"op": "create", "id": "x", "cron": "* * * * *", "tz": "UTC", "template": TEMPLATE,
            "overlap": "sometimes"}, {"op": "create", "id": "y"}, {"nothing": 1}, "junk",
           {"op": "explode", "id": "x"})
    out, _ = WriteSchedules(ops, 1.0).apply(s)
    assert [o for _, o in out] == ["rejected"] * 4 + ["not_found"]
    assert not s.schedules and s.rejected_commands == 4
    assert FireSchedules((("x", "soon", True),), 1.0).apply(s)[0] == []
    assert from_args("write_timetable_fire", ["junk", 1.0]) == FireSchedules((), 1.0)


def test_snapshots_keep_schedules() -> None:
    s = _with("forbid")
    _fire(s, 101.0, 102.0)
    data = s.to_snapshot()
    assert needs_version(data) == 2
    back = SchedulerState.from_snapshot(data)
    assert back.fingerprint() == s.fingerprint() and back.schedules == s.schedules
    assert SchedulerState.from_snapshot({}).schedules == {}


def test_the_commands_sort_after_every_earlier_one_and_round_trip() -> None:
    assert list(COMMAND_IDS) == sorted(COMMAND_IDS)
    i = COMMAND_IDS.index("write_start_due")
    assert COMMAND_IDS[i:i + 3] == ("write_start_due", "write_timetable_change",
                                    "write_timetable_fire")
    for cmd in (WriteSchedules(({"op": "pause", "id": "a"},), 2.0),
                FireSchedules((("a", 10.0, True), ("b", 11.0, False)), 3.0)):
        assert from_args(cmd.NAME, cmd.args()) == cmd
