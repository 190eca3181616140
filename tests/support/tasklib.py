"""Callables the cluster tests run in the nodes' warm pools (on PYTHONPATH there)."""

from __future__ import annotations

import time
from typing import Any


def stamp(tag: str = "", sleep_s: float = 0.0) -> dict[str, Any]:
    """Records when it started; sleeps; returns both."""
    started = time.time()
    if sleep_s:
        time.sleep(sleep_s)
    return {"tag": tag, "started": started}


def boom(message: str = "boom") -> None:
    raise RuntimeError(message)
