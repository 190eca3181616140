"""The single-task fast path (issue 14): the leader's decision (decisions.fast_path)
and the submit command that carries its assignments (commands.Submit ``assign``)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

from harness import free_ports
from taskandgo.consensus.commands import (
    FAST_PATH_PROTOCOL,
    AssignEntry,
    Submit,
    assign_entries,
    from_args,
)
from taskandgo.consensus.raft import RAFT_PROTOCOL
from taskandgo.consensus.state import SchedulerState
from taskandgo.node import decisions as d
from taskandgo.node.app import NodeApp
from taskandgo.node.config import NodeConfig, parse_voters
from taskandgo.node.views import Floor, InFlight, PlanView, WorkerView
from taskandgo.node.worker_table import WorkerInfo
from taskandgo.strategies import QueuedUnit


def _view(**kw: object) -> PlanView:
    workers = (WorkerView("w1", 2, 2, last_seen=10.0), WorkerView("w2", 1, 1, last_seen=10.0))
    return PlanView(10.0, workers, **kw)  # type: ignore[arg-type]


def _unit(tid: str, prio: int = 0) -> QueuedUnit:
    return QueuedUnit(tid, -1, prio, "batch")


def test_a_new_task_with_a_free_slot_and_nothing_queued_is_assigned() -> None:
    out = d.fast_path(_view(), [_unit("t")])
    assert [(a.task_id, a.chunk) for a in out.assignments] == [("t", -1)]


def test_nothing_at_or_above_its_priority_may_be_queued() -> None:
    """Given a unit queued (or waiting to retry, or arriving) at or above the new
    task's priority, the new task is not assigned in its submit: the queue goes
    first. Lower queued work does not stop it (the planner would take it first)."""
    for queued in ({5}, {3}, {1, 9}):
        assert d.fast_path(_view(queued_priorities=frozenset(queued)),
                           [_unit("t", 3)]).assignments == ()
    assert len(d.fast_path(_view(queued_priorities=frozenset({1, 2})),
                           [_unit("t", 3)]).assignments) == 1
    # In a batch, the lowest of its tasks decides.
    assert d.fast_path(_view(queued_priorities=frozenset({2})),
                       [_unit("a", 5), _unit("b", 2)]).assignments == ()


def test_a_floor_or_a_more_urgent_unit_in_flight_or_undelivered_stops_it() -> None:
    floor = Floor(7, 100.0, frozenset({"urgent"}))
    assert d.fast_path(_view(floor=floor), [_unit("t", 3)]).assignments == ()
    assert len(d.fast_path(_view(floor=floor), [_unit("t", 7)]).assignments) == 1
    flying = (InFlight("u", -1, "w1", 9),)
    assert d.fast_path(_view(in_flight=flying), [_unit("t", 3)]).assignments == ()
    assert d.fast_path(_view(undelivered=frozenset({4})), [_unit("t", 3)]).assignments == ()


def test_never_more_than_the_free_slots_counting_in_flight_and_held_units() -> None:
    """Three slots in all: one in flight and one held by an ended attempt leave one."""
    units = [_unit(f"t{i}") for i in range(5)]
    assert len(d.fast_path(_view(), units).assignments) == 3
    busy = _view(in_flight=(InFlight("x", -1, "w1", 0),), held={"w2": 1})
    out = d.fast_path(busy, units)
    assert [(a.task_id, a.worker) for a in out.assignments] == [("t0", "w1")]


def test_higher_units_of_a_batch_go_first() -> None:
    out = d.fast_path(_view(), [_unit("low", 1), _unit("high", 5)])
    assert [a.task_id for a in out.assignments] == ["high"]  # one priority per round


def _spec(tid: str, prio: int = 0) -> dict:
    return {"id": tid, "priority": prio, "strategy": "batch", "call": "m:f"}


def test_submit_with_assign_accepts_and_assigns_in_one_step() -> None:
    """The submit's tasks are queued and the named ones assigned with the leader's
    tokens in the same command; the result carries both parts."""
    s = SchedulerState()
    cmd = Submit((_spec("a"), _spec("b")), 5.0, (AssignEntry("a", -1, 0, "w1", 77),), 3.0)
    (out, assigned), events = cmd.apply(s)
    assert [r[:3] for r in out] == [("a", True, "queued"), ("b", True, "queued")]
    assert assigned == [("a", -1, 0, 1, 77, "w1")]
    assert s.tasks["a"].status == "running" and s.tasks["a"].unit.token == 77
    assert s.tasks["a"].unit.deadline == 8.0 and s.running == {("a", -1): "w1"}
    assert s.tasks["b"].status == "queued" and s.queued_count() == 1
    assert [(e[1], e[2]) for e in events] == [("a", "queued"), ("b", "queued"),
                                                ("a", "running")]


def test_a_repeated_submit_assigns_nothing() -> None:
    """A submit retried with the same ids (its first try may have committed) leaves
    the known task as it is: its assignment is not applied to it."""
    s = SchedulerState()
    Submit((_spec("a"),), 1.0).apply(s)
    (out, assigned), _ = Submit((_spec("a"),), 2.0, (AssignEntry("a", -1, 0, "w1", 5),),
                                3.0).apply(s)
    assert out == [("a", False, "queued")] and assigned == []
    assert s.tasks["a"].status == "queued" and not s.running


def test_the_log_form_round_trips_and_the_old_form_is_unchanged() -> None:
    plain = Submit((_spec("a"),), 1.0)
    assert plain.args() == ([_spec("a")], 1.0)  # what earlier releases read
    fast = Submit((_spec("a"),), 1.0, (AssignEntry("a", -1, 0, "w1", 9),), 3.0)
    args = pickle.loads(pickle.dumps(fast.args()))
    assert len(args) == 4 and from_args("submit", args) == fast
    assert from_args("submit", plain.args()) == plain
    # A malformed entry is left out, never raised on (a replicated method is total).
    assert assign_entries([["a", -1, 0, "w1", 9], "junk", [1]]) == (
        AssignEntry("a", -1, 0, "w1", 9),)
    s = SchedulerState()
    (_out, assigned), _ = Submit((_spec("a"),), 1.0, (AssignEntry("a", -1, 0, "w1", 9),),
                                 "x").apply(s)  # type: ignore[arg-type]
    assert assigned == [] and s.tasks["a"].status == "queued"


def test_replicas_applying_the_same_commands_agree() -> None:
    cmds = [Submit((_spec("a"), _spec("b", 2)), 1.0, (AssignEntry("b", -1, 0, "w1", 3),), 3.0),
            Submit((_spec("c"),), 2.0, (AssignEntry("c", -1, 0, "w2", 4),), 3.0)]
    states = [SchedulerState(), SchedulerState()]
    for st in states:
        for c in cmds:
            from_args(c.NAME, pickle.loads(pickle.dumps(c.args()))).apply(st)  # type: ignore[union-attr]
    assert states[0].fingerprint() == states[1].fingerprint()


def test_the_fast_path_needs_every_voter_at_its_protocol() -> None:
    assert RAFT_PROTOCOL >= FAST_PATH_PROTOCOL


def test_the_leader_takes_the_fast_path_only_once_every_voter_runs_it(tmp_path: Path) -> None:
    """Given a leader (its replica running; the other voters never answer) with a
    live worker and nothing queued, a submit's tasks get assignments only once every
    other voter has reported RAFT_PROTOCOL 10 (an earlier release's submit takes two
    arguments and would wedge on the fast path's four); then they are counted in
    flight, so the next plan (and a hold) sees them, until the command's outcome."""
    grpc, raft, http = free_ports(3)
    cfg = NodeConfig(node_id="n0", bind="127.0.0.1", advertise="127.0.0.1", grpc_port=grpc,
                     raft_port=raft, http_port=http, data_dir=str(tmp_path), slots=2,
                     voters=parse_voters(f"127.0.0.1:{grpc}:{raft},127.0.0.2:1:2,"
                                         "127.0.0.3:1:2"))
    app = NodeApp(cfg)
    app.replica.start()
    try:
        sched = app.scheduler
        sched.ready = True
        app.replica.is_leader = lambda: True  # type: ignore[method-assign]
        sched.workers["w1"] = WorkerInfo("w1", slots=2, capacity=2, last_seen=time.monotonic())
        for v in cfg.voters[1:]:
            app.replica.note_voter_level(v.raft, FAST_PATH_PROTOCOL - 1)
        assert sched.fast_path([_spec("a")]) is None
        for v in cfg.voters[1:]:
            app.replica.note_voter_level(v.raft, FAST_PATH_PROTOCOL)
        fast = sched.fast_path([_spec("a")])
        assert fast is not None and [(e.task_id, e.worker) for e in fast.entries] == [("a", "w1")]
        assert fast.entries[0].token and fast.lease_s == cfg.lease_s
        assert [f.task_id for fs in sched._assigning.values() for f in fs] == ["a"]
        # One slot left: of two more, one is assigned; a task waiting for a parent never.
        assert len(sched.fast_path([_spec("b"), _spec("c")]).entries) == 1  # type: ignore[union-attr]
        assert sched.fast_path([dict(_spec("d"), after=["a"])]) is None
        fast.done(None, 5)  # not committed (LEADER_CHANGED): no longer in flight
        assert [f.task_id for fs in sched._assigning.values() for f in fs] == ["b"]
    finally:
        app.stop()
