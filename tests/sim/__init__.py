"""A deterministic simulator of a TaskAndGo cluster (FoundationDB / TigerBeetle style).

N nodes run in one process under one seeded RNG and one simulated clock: the real
replicated state machine (:class:`taskandgo.consensus.state.SchedulerState`, one per
voter, fed the same committed commands), the real planner
(:func:`taskandgo.strategies.planner.plan`) and a model of each node's leader and
worker sides (``node.py``). Consensus is a linearizable log whose leader changes lose
uncommitted proposals; the network delays, drops, duplicates, reorders and
partitions messages; executors run units for seeded durations; faults crash,
restart, pause and partition nodes, move leadership and jump clocks. After every
step ``invariants.py`` checks what must hold. A failing schedule is a seed:
``TASKANDGO_SIM_SEED=N python3 -m pytest tests/sim -k replay`` runs it again, exactly.

Modules: ``world.py`` (clock, log, network, faults, the step loop), ``node.py`` (one
node), ``invariants.py`` (the checks and their precise definitions), ``test_sim.py``.
"""
