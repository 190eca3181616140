"""Delayed tasks in the pure state machine and the API's vocabulary: a task with a
``run_at`` waits outside the queue until a ``write_start_due`` command at or after
that time releases it; cancel works before then; snapshots keep it."""

from __future__ import annotations

import pytest
from taskandgo.consensus.commands import COMMAND_IDS, Cancel, StartDue, Submit, from_args
from taskandgo.consensus.snapshot import needs_version
from taskandgo.consensus.state import SchedulerState
from taskandgo.node.cli import _duration
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.vocabulary import (
    TaskSpec,
    parse_time,
    request_from_json,
    spec_to_api,
    start_time,
)


def _state_with_delayed(run_at: float = 100.0) -> SchedulerState:
    s = SchedulerState()
    Submit(({"id": "later", "priority": 10, "strategy": "batch", "data": "x", "run_at": run_at},
            {"id": "now", "priority": 10, "strategy": "batch", "data": "y"}), 50.0).apply(s)
    return s


def test_a_delayed_task_waits_outside_the_queue_until_released_when_due() -> None:
    s = _state_with_delayed()
    assert s.tasks["later"].status == "scheduled" and s.scheduled == {"later": 100.0}
    assert [t.id for t, _ in s.peek_queued(10)] == ["now"]
    # Given an early release (a leader whose clock runs ahead), nothing moves.
    assert StartDue(("later",), 99.0).apply(s)[0] == []
    assert s.tasks["later"].status == "scheduled"
    # When the replicated clock reaches run_at, the release queues it, once.
    released, events = StartDue(("later", "now", "unknown"), 100.0).apply(s)
    assert released == ["later"] and ("task", "later", "queued", -1, "", 100.0) in events
    assert s.tasks["later"].status == "queued" and not s.scheduled
    assert StartDue(("later",), 101.0).apply(s)[0] == []  # a repeat is a no-op
    assert sorted(t.id for t, _ in s.peek_queued(10)) == ["later", "now"]


def test_an_assignment_of_a_scheduled_task_is_refused() -> None:
    s = _state_with_delayed()
    out, _ = s.apply_assign([("later", -1, 0, "w", 7), ("later", 0, 2, "w", 8)], 60.0, 5.0)
    assert out == [] and s.tasks["later"].status == "scheduled" and not s.running


def test_cancel_before_it_runs_ends_it_and_a_later_release_does_nothing() -> None:
    s = _state_with_delayed()
    out, _ = Cancel(("later",), 60.0).apply(s)
    assert out == [("later", "cancelled", [])] and not s.scheduled
    assert StartDue(("later",), 200.0).apply(s)[0] == []
    assert s.tasks["later"].status == "cancelled" and s.queued_count() == 1


def test_a_run_at_in_the_past_is_queued_at_once() -> None:
    s = _state_with_delayed(run_at=10.0)
    assert s.tasks["later"].status == "queued" and not s.scheduled


def test_snapshots_keep_delayed_tasks_and_stay_version_1_without_them() -> None:
    s = _state_with_delayed()
    data = s.to_snapshot()
    assert needs_version(data) == 2
    back = SchedulerState.from_snapshot(data)
    assert back.scheduled == {"later": 100.0} and back.fingerprint() == s.fingerprint()
    StartDue(("later",), 100.0).apply(s)
    assert needs_version(s.to_snapshot()) == 1  # an earlier release still reads it
    assert SchedulerState.from_snapshot({}).scheduled == {}


def test_the_command_sorts_after_every_earlier_one_and_round_trips() -> None:
    assert list(COMMAND_IDS) == sorted(COMMAND_IDS)
    assert COMMAND_IDS.index("write_start_due") == COMMAND_IDS.index("write_settings") + 1
    cmd = StartDue(("a", "b"), 3.0)
    assert from_args(cmd.NAME, cmd.args()) == cmd
    assert from_args("write_start_due", ["junk", 1.0]) == StartDue((), 1.0)  # total


def test_the_spec_takes_rfc3339_or_a_delay_and_names_a_bad_field() -> None:
    spec = TaskSpec.check({"data": "x", "run_at": "2027-06-02T03:04:05+01:00"}, "batch")
    assert spec.run_at == parse_time("run_at", "2027-06-02T02:04:05Z")
    stored = spec.to_stored()
    assert stored["run_at"] == spec.run_at
    assert spec_to_api(stored)["run_at"] == "2027-06-02T02:04:05Z"
    assert TaskSpec.from_json(spec.to_json(), "batch") == spec
    assert start_time(None, 90, now=1000.0) == 1090.0
    assert "run_at" not in TaskSpec.check({"data": "x"}, "batch").to_stored()
    for raw, field in (({"run_at": "2027-06-02T03:04:05"}, "run_at"),  # no offset
                       ({"run_at": "tomorrow"}, "run_at"),
                       ({"run_at": "2999-01-01T00:00:00Z"}, "run_at"),  # too far ahead
                       ({"delay_s": -1}, "delay_s"),
                       ({"delay_s": float("nan")}, "delay_s"),
                       ({"run_at": "2027-06-02T03:04:05Z", "delay_s": 5}, "delay_s")):
        with pytest.raises(InvalidTask) as err:
            TaskSpec.check({"data": "x", **raw}, "batch")
        assert err.value.field == field, raw
    with pytest.raises(InvalidTask) as err:
        request_from_json({"data": "x", "run_at": True})
    assert err.value.field == "run_at"


def test_the_cli_reads_durations() -> None:
    assert [_duration(t) for t in ("90", "90s", "5m", "1h30m", "2d", "1.5h")] == \
        [90.0, 90.0, 300.0, 5400.0, 172800.0, 5400.0]
    for bad in ("", "5x", "m5", "1h-3m"):
        with pytest.raises(Exception, match="duration"):
            _duration(bad)
