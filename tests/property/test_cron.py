"""Properties of schedule arithmetic and the leader's fire decision (node/timing.py),
with hypothesis, against croniter itself as the reference: time zones with daylight
saving changes (both directions), the end of months (day 31, February 29), names
like @hourly and 6-field expressions with seconds."""

from __future__ import annotations

import datetime
import zoneinfo

from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st
from taskandgo.node import timing

EXPRESSIONS = ["* * * * *", "*/5 * * * *", "30 2 * * *", "0 0 31 * *", "0 12 29 2 *",
               "15 1 * * 0", "@hourly", "@daily", "@monthly", "* * * * * */10",
               "0 3 1-7 * 1", "59 23 L * *"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
# 2026-2029: several DST changes each way in every zone above.
times = st.floats(1_767_225_600.0, 1_893_456_000.0, allow_nan=False)


def _reference_next(expr: str, tz: str, after: float) -> float:
    zone = zoneinfo.ZoneInfo(tz)
    return float(croniter(expr, datetime.datetime.fromtimestamp(after, zone)).get_next(float))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXPRESSIONS), st.sampled_from(ZONES), times)
def test_next_slot_is_croniters_next(expr: str, tz: str, after: float) -> None:
    got = timing.next_slot(expr, tz, after)
    assert got == _reference_next(expr, tz, after)
    assert got is not None and got > after


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXPRESSIONS), st.sampled_from(ZONES), times)
def test_the_last_slot_at_a_time_is_the_latest_one(expr: str, tz: str, at: float) -> None:
    last = timing.last_slot_at(expr, tz, at)
    assert last is not None and last <= at
    # No slot lies between it and ``at``.
    nxt = timing.next_slot(expr, tz, last)
    assert nxt is not None and nxt > at


def test_a_daily_slot_follows_daylight_saving_changes() -> None:
    """02:30 does not exist on 2027-03-28 in Berlin: croniter moves that day's slot (to
    03:00, its rule); every other day it is 02:30 local, 23 or 24 hours apart."""
    zone = zoneinfo.ZoneInfo("Europe/Berlin")
    t = datetime.datetime(2027, 3, 26, 12, tzinfo=zone).timestamp()
    slots = []
    for _ in range(5):
        t = timing.next_slot("30 2 * * *", "Europe/Berlin", t)  # type: ignore[assignment]
        slots.append(datetime.datetime.fromtimestamp(t, zone))
    assert [s.day for s in slots] == [27, 28, 29, 30, 31]
    assert [(s.hour, s.minute) for s in slots] == [(2, 30), (3, 0), (2, 30), (2, 30), (2, 30)]


@st.composite
def views(draw: st.DrawFn) -> list[timing.ScheduleView]:
    ids = draw(st.lists(st.sampled_from([f"s{i}" for i in range(8)]), unique=True,
                        max_size=8))
    return [timing.ScheduleView(i, draw(st.sampled_from(EXPRESSIONS[:3] + EXPRESSIONS[-4:])),
                                draw(st.sampled_from(ZONES)), draw(times),
                                draw(st.booleans()), draw(st.sampled_from(["latest", "skip"])),
                                draw(st.sampled_from([1.0, 10.0, 600.0])))
            for i in ids]


@settings(max_examples=200, deadline=None)
@given(views(), st.floats(0, 3 * 86400), st.frozensets(st.sampled_from(["s0", "s1", "s2"])))
def test_due_fires_fires_each_due_schedule_once_by_its_policy(
        schedules: list[timing.ScheduleView], ahead: float, busy: frozenset[str]) -> None:
    now = max((v.last_slot for v in schedules), default=1_800_000_000.0) + ahead
    fires = timing.due_fires(schedules, now, busy)
    by_id = {v.id: v for v in schedules}
    assert len({f.schedule_id for f in fires}) == len(fires)  # one per schedule
    assert [f.schedule_id for f in fires] == sorted(f.schedule_id for f in fires)
    for v in schedules:
        nxt = timing.next_slot(v.cron, v.tz, v.last_slot)
        due = not v.paused and v.id not in busy and nxt is not None and nxt <= now
        assert due == any(f.schedule_id == v.id for f in fires), v
    for f in fires:
        v = by_id[f.schedule_id]
        nxt = timing.next_slot(v.cron, v.tz, v.last_slot)
        assert nxt is not None and v.last_slot < f.slot <= now
        if now - nxt <= v.catchup_s:
            assert f.slot == nxt and f.run  # late by a failover at most: fired
        else:
            # A backlog: the latest slot, once (latest) or skipped (skip).
            assert f.slot == timing.last_slot_at(v.cron, v.tz, now)
            assert f.run == (v.missed == "latest")
