"""A warm pool process: runs Python callables by import path, one at a time, and the
call allow-list that both this process and the node apply.

Started by :class:`taskandgo.node.processes.CallPool` as
``python -m taskandgo.node.callworker --allow-calls MODULES``. Protocol: one JSON object
per line on stdin (``{"call": "mod:fn", "args": [...] | {...}, "kwargs": {...}}``), one
JSON object per line on the original stdout (``{"ok": bool, "result": str, "error": str}``
plus ``"retire": true`` when this process must not run another call, and ``"fresh":
true`` when the call did not run and a fresh process should be asked instead). Anything
the callable prints goes to stderr, so it cannot corrupt the protocol.

The process ends when its node does: an idle worker reads EOF on stdin and returns, and
a busy one is killed with its process group (whatever the callable started) by the
node's lifeline watcher, through the inherited fd of the lifeline pipe (see
:class:`taskandgo.node.processes.Lifeline`; never close fds this process did not open).

What may be called (checked here on every call, whatever the node checked before):

- ``module:function``; every part of ``module`` and ``function`` is an ASCII identifier
  that does not start with ``_``; nothing after the colon is dotted, so no attribute is
  ever traversed.
- ``module`` is an allowed module or a submodule of one (an allowed package), is
  importable under that very name (``sys.modules[module].__name__ == module``).
- The name is bound, in the module's own namespace, to a plain ``def`` function
  (:class:`types.FunctionType`: no builtin, class, partial, lambda, method, callable
  object) created by that module's code (its ``__globals__`` are the module's namespace)
  under that same name.

The functions are pinned: a module is imported and its functions recorded before any
task touches it, and calls resolve against that record. The allowed modules are pinned
at start; a submodule of an allowed package that is first called after this process
ran other calls, and is already in ``sys.modules`` by then (a task may have planted
it), is left to a fresh process (``"fresh"``). After every call the worker compares the
pinned modules' namespaces and functions with the record; if a task rebound a name,
swapped a function's code or defaults, or replaced a module, the reply carries
``"retire": true`` and the process exits, so the next task gets a fresh one. Checking
costs a few microseconds a call; a fresh process per call (a fork) would cost about a
millisecond of CPU, more than the scheduler spends on a no-op task.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from types import FunctionType, ModuleType
from typing import Any

_PART = r"[A-Za-z][A-Za-z0-9_]*"
CALL_RE = re.compile(rf"(?P<module>{_PART}(?:\.{_PART})*):(?P<name>{_PART})")
MODULE_RE = re.compile(rf"{_PART}(?:\.{_PART})*")
CALL_SHAPE = ("expected module:function, each part letters, digits and _ and not "
              "starting with _, nothing dotted after the colon")

# Keys a module's namespace gains by itself (the warnings module's dedup registry):
# a change there says nothing about what a call resolves to.
_IGNORED_KEYS = frozenset({"__warningregistry__"})
_MISSING = object()


class CallRefused(ValueError):
    """A call path the allow-list does not let run; the message says why."""


class _NeedsFreshWorker(Exception):
    """The module was imported after this worker had run calls: a task may have put it
    in ``sys.modules``, so only a worker that has run nothing may pin it."""


def parse_allow(text: str | None) -> tuple[str, ...] | None:
    """``--allow-calls`` text -> module names; ``"*"`` -> None (any module), ``""`` -> ()."""
    text = (text or "").strip()
    if text == "*":
        return None
    return tuple(m.strip() for m in text.split(",") if m.strip())


def format_allow(allowed: tuple[str, ...] | None) -> str:
    """The inverse of :func:`parse_allow`."""
    return "*" if allowed is None else ",".join(allowed)


def check_shape(path: Any, allowed: tuple[str, ...] | None) -> tuple[str, str]:
    """Split ``module:function`` and check its shape and module against the allow-list
    (None: any module) without importing anything. Raises CallRefused."""
    m = CALL_RE.fullmatch(path) if isinstance(path, str) else None
    if m is None:
        raise CallRefused(CALL_SHAPE)
    module, name = m.group("module"), m.group("name")
    if allowed is not None and not any(module == a or module.startswith(a + ".")
                                       for a in allowed):
        raise CallRefused(f"callables from {module!r} are not allowed on this cluster")
    return module, name


def import_allowed(module: str) -> ModuleType:
    """Import ``module`` (already checked by :func:`check_shape`) and check that it is
    the module of that name, not an alias (``os.path`` is ``posixpath``). CallRefused
    if it cannot be imported."""
    try:
        mod = importlib.import_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import failure is a refusal
        raise CallRefused(f"cannot import {module!r}: {type(exc).__name__}: {exc}") from None
    if sys.modules.get(module) is not mod or getattr(mod, "__name__", None) != module:
        raise CallRefused(f"{module!r} is not imported under its own name")
    return mod


def own_function(mod: ModuleType, name: str) -> FunctionType:
    """The plain function ``mod`` defines as ``name`` (see the module docstring), read
    from the module's namespace (never getattr: no module ``__getattr__``, no
    properties). Raises CallRefused naming what is there instead."""
    if name.startswith("_"):
        raise CallRefused(f"{name!r} is private")
    namespace = vars(mod)
    if name not in namespace:
        raise CallRefused(f"{mod.__name__!r} has no function {name!r}")
    fn = namespace[name]
    if type(fn) is not FunctionType:
        raise CallRefused(f"{mod.__name__}:{name} is a {type(fn).__name__}, not a function "
                          "defined with def")
    if (fn.__globals__ is not namespace or fn.__module__ != mod.__name__
            or fn.__name__ != name or fn.__qualname__ != name):
        raise CallRefused(f"{mod.__name__}:{name} is not a function {mod.__name__!r} "
                          f"defines under that name (it is {fn.__module__}.{fn.__qualname__})")
    return fn


def resolve_fresh(path: Any, allowed: tuple[str, ...] | None) -> FunctionType:
    """Check ``path`` completely, importing its module (allowed by then) and reading the
    function from it as it is now. For the node, whose modules no task runs in."""
    module, name = check_shape(path, allowed)
    return own_function(import_allowed(module), name)


def _function_state(fn: FunctionType) -> tuple[int, ...]:
    """Identities of what a task could swap on a function object to change what a call
    does (code, defaults, globals, closure). Compared as ints, never with ``==`` (which
    would run a default value's own code); the objects are kept alive by the pin, so an
    identity cannot be reused by a replacement."""
    return (id(fn.__code__), id(fn.__defaults__), id(fn.__kwdefaults__), id(fn.__globals__),
            id(fn.__closure__))


@dataclass
class _Pin:
    """A module as it was when pinned: its namespace (key -> object) and its functions."""

    module: ModuleType
    namespace: dict[str, Any]
    functions: dict[str, tuple[FunctionType, tuple[int, ...], tuple[Any, ...]]] = field(
        default_factory=dict)


class CallRunner:
    """Resolves and runs calls against pinned modules; one per worker process.

    Not thread-safe (a worker runs one call at a time)."""

    def __init__(self, allowed: tuple[str, ...] | None) -> None:
        self.allowed = allowed
        self._pins: dict[str, _Pin] = {}
        self._ran = False  # has a call run in this process?

    def warm(self) -> None:
        """Pin every allowed module now, before any task runs, and the submodules an
        allowed package imported itself; one that cannot be imported is retried when
        a call names it. Other submodules are pinned when first called."""
        for module in self.allowed or ():
            if MODULE_RE.fullmatch(module) and not any(p.startswith("_")
                                                       for p in module.split(".")):
                try:
                    self._pin(module)
                except CallRefused:
                    pass
        for name in sorted(sys.modules):
            try:
                check_shape(name + ":f", self.allowed if self.allowed is not None else ())
                self._pin(name)
            except CallRefused:
                pass

    def _pin(self, module: str) -> _Pin:
        pin = self._pins.get(module)
        if pin is not None:
            return pin
        # With "any" module allowed there is no boundary to keep: any function may
        # run, so one module planted by a task is no further escape.
        if self._ran and module in sys.modules and self.allowed is not None:
            raise _NeedsFreshWorker(module)
        mod = import_allowed(module)
        namespace = {k: v for k, v in vars(mod).items() if k not in _IGNORED_KEYS}
        pin = _Pin(mod, namespace)
        for name in namespace:
            try:
                fn = own_function(mod, name)
            except CallRefused:
                continue
            held = (fn.__code__, fn.__defaults__, fn.__kwdefaults__, fn.__closure__)
            pin.functions[name] = (fn, _function_state(fn), held)
        self._pins[module] = pin
        return pin

    def resolve(self, path: Any) -> FunctionType:
        """The pinned function ``path`` names. Raises CallRefused."""
        module, name = check_shape(path, self.allowed)
        pin = self._pin(module)
        entry = pin.functions.get(name)
        if entry is None:
            own_function(pin.module, name)  # raises, saying what the name is instead
            raise CallRefused(f"{module}:{name} was not a function when the worker started")
        fn, state, _ = entry
        # The pinned record is authoritative; a live module that disagrees was
        # tampered with since (the worker retires after such a call, this is the
        # second line).
        if (sys.modules.get(module) is not pin.module or vars(pin.module).get(name) is not fn
                or _function_state(fn) != state):
            raise CallRefused(f"{module}:{name} changed since the worker started")
        return fn

    def tampered(self) -> str | None:
        """What changed in a pinned module or function since it was pinned, or None."""
        for module, pin in self._pins.items():
            if sys.modules.get(module) is not pin.module:
                return f"sys.modules[{module!r}] was replaced"
            now = vars(pin.module)
            for key, value in pin.namespace.items():
                if now.get(key, _MISSING) is not value:
                    return f"{module}.{key} was rebound or deleted"
            if len(now) != len(pin.namespace):
                added = now.keys() - pin.namespace.keys() - _IGNORED_KEYS
                if added:
                    return f"{module}.{min(added)} was added"
            for name, (fn, state, _) in pin.functions.items():
                if _function_state(fn) != state:
                    return f"{module}:{name} was changed"
        return None

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        """Run one request; never raises. Adds ``"retire": True`` when the call left a
        pinned module or function changed."""
        try:
            fn = self.resolve(req.get("call"))
        except CallRefused as exc:
            return {"ok": False, "result": "", "error": f"refused by policy: call: {exc}"}
        except _NeedsFreshWorker as exc:
            return {"ok": False, "result": "", "retire": True, "fresh": True,
                    "error": f"{exc} was imported after this worker ran other calls; "
                    "a fresh worker has to pin it (retry)"}
        self._ran = True
        reply = _call(fn, req)
        why = self.tampered()
        if why is not None:
            reply["retire"] = True
            print(f"call worker: retiring, {req.get('call')} changed its module: {why}",
                  file=sys.stderr)
        return reply


def _call(fn: FunctionType, req: dict[str, Any]) -> dict[str, Any]:
    try:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m taskandgo.node.callworker")
    parser.add_argument("--allow-calls", default="",
                        help="allowed modules, comma separated; '*' any; '' none (default)")
    allowed = parse_allow(parser.parse_args(argv).allow_calls)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    runner = CallRunner(allowed)
    runner.warm()
    out.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            req, bad = json.loads(line), "expected a JSON object"
        except ValueError as exc:
            req, bad = None, f"not JSON: {exc}"
        if not isinstance(req, dict):
            refused = {"ok": False, "result": "", "error": f"bad request: {bad}"}
            out.write(json.dumps(refused) + "\n")
            continue
        reply = runner.run(req)
        out.write(json.dumps(reply) + "\n")
        if reply.get("retire"):
            return 0  # whatever the pool does, this process runs nothing more
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
