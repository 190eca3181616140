"""The floor a Dispatch carries (node/dispatching.py, decisions.dispatch_floor):
the highest priority of anything the state holds or will queue by itself. A worker
takes a unit below it into its prefetch window only where a slot is free, so a
lower unit cannot wait there and start after a more urgent task the state queues
with no submit (and so no hold) before it."""

from __future__ import annotations

from taskandgo.consensus.commands import Submit
from taskandgo.consensus.state import SchedulerState
from taskandgo.node import decisions as d
from taskandgo.node.dispatching import _priorities


def _state() -> SchedulerState:
    s = SchedulerState()
    Submit(({"id": "parent", "priority": 0, "strategy": "batch", "data": "x"},
            {"id": "low", "priority": 0, "strategy": "batch", "data": "y"},
            {"id": "urgent", "priority": 30, "strategy": "batch", "data": "z",
             "after": ["parent"]}), 1.0).apply(s)
    return s


def test_a_task_waiting_for_its_parents_raises_the_floor() -> None:
    # Given only priority-0 work queued and an urgent task waiting for its parent
    # (simulator seed 988: the floor was 0, and a lower unit dispatched as the parent
    # ended waited in a window and started after the urgent task was queued)...
    s = _state()
    assert s.tasks["urgent"].status == "waiting"
    # ...then the floor is the urgent task's priority.
    assert d.dispatch_floor(_priorities(s)) == 30

