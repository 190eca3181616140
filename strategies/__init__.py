"""Pure planning strategies (split, batch). No I/O, no clock, no Raft, no gRPC."""

from taskandgo.strategies.planner import (
    BATCH,
    SPLIT,
    STRATEGIES,
    Assignment,
    QueuedUnit,
    Worker,
    chunk_count_for,
    plan,
)

__all__ = [
    "BATCH", "SPLIT", "STRATEGIES", "Assignment", "QueuedUnit", "Worker",
    "chunk_count_for", "plan",
]
