"""The usage policy in the pure state machine: concurrency limits set by the
write_usage_policy command and enforced when an assignment is applied (whoever
proposed it), released as units end in every way, and kept by snapshots."""

from __future__ import annotations

from taskandgo.consensus.commands import (
    COMMAND_IDS,
    Assign,
    AssignEntry,
    Cancel,
    Complete,
    Requeue,
    Submit,
    WritePolicy,
    from_args,
)
from taskandgo.consensus.snapshot import from_snapshot, needs_version, to_snapshot
from taskandgo.consensus.state import SchedulerState


def _state(n: int = 4, keys: tuple[str, ...] = ("api",)) -> SchedulerState:
    s = SchedulerState()
    Submit(tuple({"id": f"t{i}", "priority": 10, "strategy": "batch", "data": "x",
                  "concurrency_keys": list(keys)} for i in range(n))
           + ({"id": "free", "priority": 10, "strategy": "batch", "data": "y"},), 1.0).apply(s)
    return s


def _assign(s: SchedulerState, *tids: str, now: float = 2.0) -> list:
    entries = tuple(AssignEntry(t, -1, 0, "w0", 100 + i) for i, t in enumerate(tids))
    out, _ = Assign(entries, now, 30.0).apply(s)
    return [o[0] for o in out]


def test_policy_ops_are_applied_and_bad_ones_skipped() -> None:
    s = SchedulerState()
    out, _ = WritePolicy((("limit", "api", 2), ("weight", "team-a", 3), ("tenant_label", "team"),
                          ("limit", "bad key!", 1), ("limit", "x", -1), ("limit", "x", True),
                          ("weight", "b", 0), ("weight", "b", float("inf")), ("nonsense",),
                          ()), 1.0).apply(s)
    assert out == {"limits": {"api": 2}, "weights": {"team-a": 3.0}, "tenant_label": "team"}
    assert s.rejected_commands == 7
    out, _ = WritePolicy((("limit", "api", None), ("weight", "team-a", None),
                          ("tenant_label", "")), 2.0).apply(s)
    assert out == {"limits": {}, "weights": {}, "tenant_label": ""}


def test_the_command_sorts_last_and_round_trips() -> None:
    assert list(COMMAND_IDS) == sorted(COMMAND_IDS) and COMMAND_IDS[-1] == "write_usage_policy"
    cmd = WritePolicy((("limit", "api", 2),), 3.0)
    assert from_args(cmd.NAME, cmd.args()) == cmd
    assert from_args("write_usage_policy", ["junk", 1.0]) == WritePolicy((), 1.0)


def test_an_assignment_over_the_limit_is_skipped_whoever_proposed_it() -> None:
    s = _state()
    WritePolicy((("limit", "api", 2),), 1.5).apply(s)
    assert _assign(s, "t0", "t1", "t2", "free") == ["t0", "t1", "free"]
    assert s.key_held == {"api": 2} and s.over_limit == 1
    assert s.tasks["t2"].status == "queued"
    # A limit of 0 holds everything with the key back; no limit: unlimited.
    WritePolicy((("limit", "api", 0),), 2.5).apply(s)
    assert _assign(s, "t2", now=3.0) == []
    WritePolicy((("limit", "api", None),), 3.5).apply(s)
    assert _assign(s, "t2", "t3", now=4.0) == ["t2", "t3"] and s.key_held == {"api": 4}


def test_every_way_a_unit_ends_releases_its_keys() -> None:
    s = _state(4, ("api", "db"))
    WritePolicy((("limit", "api", 4),), 1.5).apply(s)
    assert _assign(s, "t0", "t1", "t2", "t3") == ["t0", "t1", "t2", "t3"]
    u = {t: s.tasks[t].unit for t in ("t0", "t1", "t2", "t3")}
    Complete(({"task_id": "t0", "chunk": -1, "attempt": 1, "token": u["t0"].token,
               "ok": True},), 3.0).apply(s)
    assert s.key_held == {"api": 3, "db": 3}
    Complete(({"task_id": "t1", "chunk": -1, "attempt": 1, "token": u["t1"].token,
               "ok": False, "requeue": True, "held": True},), 3.1).apply(s)
    Requeue((("t2", -1, 1, u["t2"].token),), 3.2, "lease").apply(s)
    Cancel(("t3",), 3.3).apply(s)
    assert s.key_held == {} and not s.running
    # The units handed back can be assigned again, up to the limit.
    assert _assign(s, "t1", "t2", now=4.0) == ["t1", "t2"] and s.key_held == {"api": 2, "db": 2}


def test_a_snapshot_keeps_the_policy_and_rebuilds_what_is_held() -> None:
    s = _state()
    assert needs_version(to_snapshot(s)) == 1
    WritePolicy((("limit", "api", 1), ("weight", "a", 2.5), ("tenant_label", "team")),
                1.5).apply(s)
    _assign(s, "t0")
    data = to_snapshot(s)
    assert needs_version(data) == 3
    r = from_snapshot(data)
    assert r.policy() == s.policy() and r.key_held == {"api": 1}
    assert r.fingerprint() == s.fingerprint()
    assert _assign(r, "t1", now=3.0) == []
