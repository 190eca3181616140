"""A warm pool process: runs Python callables by import path, one at a time.

Started by :class:`taskandgo.node.executor.CallPool` as
``python -m taskandgo.node.callworker``. Protocol: one JSON object per line on
stdin (``{"call": "mod:fn", "args": [...] | {...}, "kwargs": {...}}``), one JSON
object per line on the original stdout (``{"ok": bool, "result": str, "error": str}``).
Anything the callable prints goes to stderr, so it cannot corrupt the protocol.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from typing import Any, Callable

_cache: dict[str, Callable[..., Any]] = {}


def resolve(path: str) -> Callable[..., Any]:
    fn = _cache.get(path)
    if fn is None:
        module, _, name = path.partition(":")
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{path} is not callable")
        fn = _cache[path] = obj
    return fn


def run_one(req: dict[str, Any]) -> dict[str, Any]:
    try:
        fn = resolve(str(req["call"]))
        args = req.get("args")
        kwargs = dict(req.get("kwargs") or {})
        if isinstance(args, dict):
            kwargs.update(args)
            value = fn(**kwargs)
        else:
            value = fn(*(args or []), **kwargs)
        return {"ok": True, "result": json.dumps(value, default=repr)}
    except BaseException as exc:  # noqa: BLE001 - report every failure to the node
        tb = traceback.format_exc(limit=5)
        return {"ok": False, "result": "", "error": f"{type(exc).__name__}: {exc}\n{tb}"[-4000:]}


def main() -> int:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    out.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError as exc:
            out.write(json.dumps({"ok": False, "result": "", "error": f"bad request: {exc}"}) + "\n")
            continue
        out.write(json.dumps(run_one(req)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
