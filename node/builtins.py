"""Small callables that ship with TaskAndGo, for trying the warm pool and for
benchmarks: ``taskandgo submit --call taskandgo.node.builtins:echo --args '[1]'``."""

from __future__ import annotations

import time
from typing import Any


def noop(*args: Any, **kwargs: Any) -> None:
    """Does nothing: measures the scheduler's own overhead per task."""
    return


def echo(*args: Any, **kwargs: Any) -> Any:
    """Returns its arguments (a split chunk sees chunk_index, chunk_count, items)."""
    if kwargs and not args:
        return kwargs
    return list(args) if len(args) != 1 or kwargs else args[0]


def sleep(seconds: float = 0.01, **kwargs: Any) -> float:
    """Sleeps, then returns the seconds slept (for priority and load tests)."""
    time.sleep(float(seconds))
    return float(seconds)


def square_items(chunk_index: int = 0, chunk_count: int = 1, items: Any = None) -> list:
    """A split-friendly example: squares this chunk's items."""
    return [x * x for x in (items or [])]
