"""The leader's clock-driven work in a simulated node: node/timing.py without threads.

A mixin of :class:`~.node.SimNode`. The decision is the node's own
(``node/timing.py`` ``due_starts``, ``due_fires``); what is modelled here is how
``Timekeeper`` carries them out: the views it reads from its replica, the releases and
fires it has in flight (forgotten by a new leader), the ``StartDue`` and
``FireSchedules`` commands it proposes.
"""

from __future__ import annotations

from typing import Any

from taskandgo.consensus.commands import FireSchedules, StartDue
from taskandgo.node import timing

START_RETRY_S = timing.START_RETRY_S
FIRE_RETRY_S = timing.FIRE_RETRY_S


class TimingSide:
    """Timekeeper.step of :class:`~.node.SimNode`, one pass per leader tick."""

    world: Any
    id: str
    replica: Any
    leader_ready: bool
    leading_term: int | None
    #: Timekeeper.arriving (read by the leader's planning) and the schedules' near slots.
    arriving: frozenset[int] = frozenset()
    near_fires: list[tuple[float, int]] = []  # noqa: RUF012 (replaced, never mutated)

    def timing_tick(self) -> None:
        """Timekeeper.step (and Timekeeper.reset when this node leads a new term)."""
        if not self.leader_ready or self.replica is None:
            return
        if getattr(self, "timing_term", None) != self.leading_term:
            self.timing_term = self.leading_term
            self.starting: dict[str, float] = {}
            self.firing: dict[str, float] = {}
            self.timing_anchor: timing.ClockAnchor | None = None
        now = self.world.now
        s = self.replica
        wall, self.timing_anchor = timing.cluster_clock(
            self.wall(), now, s.now, self.timing_anchor)  # type: ignore[attr-defined]
        self.fire_tick(wall)
        self.starting = {t: at for t, at in self.starting.items() if now - at <= START_RETRY_S}
        view = list(s.scheduled.items())
        # Timekeeper.arriving: the priorities of delayed tasks and schedule slots
        # coming within the horizon (the node looks at schedules about once a second;
        # here at every tick, which the node's extra margin covers).
        soon = wall + timing.ARRIVAL_HORIZON_S
        near_starts = [(at, t.priority) for tid, at in view if at <= soon
                       and (t := s.tasks.get(tid)) is not None]
        self.arriving = timing.arriving_priorities((*near_starts, *self.near_fires), wall)
        ids = timing.due_starts(view, wall, frozenset(self.starting))
        if not ids:
            return
        for tid in ids:
            self.starting[tid] = now
        self.world.trace(f"{self.id} releases delayed {list(ids)}")

        def done(_: Any, err: int, term: int | None = self.leading_term) -> None:
            if term == self.leading_term:
                for tid in ids:
                    self.starting.pop(tid, None)

        self.propose(StartDue(ids, wall), callback=done)  # type: ignore[attr-defined]

    def fire_tick(self, wall: float) -> None:
        """Timekeeper._step_fires: the schedules' views, due_fires, one FireSchedules."""
        now = self.world.now
        self.firing = {k: at for k, at in self.firing.items() if now - at <= FIRE_RETRY_S}
        views = [timing.ScheduleView(sid, sc["cron"], sc["tz"], sc["last_slot"], sc["paused"],
                                     sc["missed"], sc["catchup_s"],
                                     int(sc["template"].get("priority", 0) or 0))
                 for sid, sc in self.replica.schedules.items()]
        self.near_fires = timing.near_slots(timing.next_slots(views), wall)
        fires = timing.due_fires(views, wall, frozenset(self.firing))
        if not fires:
            return
        for f in fires:
            self.firing[f.schedule_id] = now
        self.world.trace(f"{self.id} fires {[(f.schedule_id, f.slot, f.run) for f in fires]}")

        def done(_: Any, err: int, term: int | None = self.leading_term) -> None:
            if term == self.leading_term:
                for f in fires:
                    self.firing.pop(f.schedule_id, None)

        self.propose(FireSchedules(tuple((f.schedule_id, f.slot, f.run)  # type: ignore[attr-defined]
                                         for f in fires), wall), callback=done)
