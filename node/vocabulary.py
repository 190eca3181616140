"""The API's vocabulary: the typed values gRPC, HTTP, the CLI and the client speak,
their one protobuf codec and one JSON codec, the one error mapping and the one token
check. Each shape is made in one place:

* :class:`TaskSpec`, a checked task spec. It is made only by :meth:`TaskSpec.check`
  (every field checked, errors :class:`InvalidTask` naming the field as the caller
  spelled it) or :meth:`TaskSpec.from_stored` (a spec the state machine holds, so
  already checked). Its forms:

  - ``to_stored()``: the plain dict the replicated state machine stores (and
    snapshots and journals carry): that format is unchanged by this type;
  - ``to_proto()`` / :meth:`TaskSpec.from_proto`: the ``taskandgo.v1.TaskSpec``
    message (``to_api()``: the same as a dict, as ``Task.spec`` shows it over both
    protocols);
  - ``to_json()`` / :meth:`TaskSpec.from_json`: the HTTP body (the seed's
    ``task_id``/``priority``/``data`` plus the optional fields).

  A request is first decoded into a *request mapping* (:func:`request_from_proto`,
  :func:`request_from_json`: the wire's own checks, no defaults), which
  :meth:`TaskSpec.check` turns into a spec with the node's default strategy.
* :func:`message_from_dict` / :func:`dict_from_message`: the API's views (a task, a
  list page, an event, a node status) as a message and back, for every message of
  ``taskandgo.v1``. The views themselves are built once, as dicts, by the node
  (``node/replica.py`` ``task_to_api``, ``node/events.py``).
* :func:`api_error`: the one table from the node's exceptions to (gRPC code, HTTP
  status), with the message, the field and the retry hint; both servers answer
  through it.
* :func:`check_bearer`: the one bearer-token check both servers run.

Thread-safe: everything here is a pure function or an immutable value.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

# As a module: placement imports tasks, which imports this module at its end.
import taskandgo.node.placement as _placement
from taskandgo.node.callworker import CALL_RE, CALL_SHAPE
from taskandgo.node.tasks import (
    ID_RE,
    LABEL_KEY_RE,
    MAX_CALL,
    MAX_ITEMS,
    MAX_ITEMS_BYTES,
    MAX_JSON_DEPTH,
    MAX_LABELS,
    MAX_PAYLOAD,
    MAX_RETRIES,
    MAX_SHARDS,
    MAX_TIMEOUT_S,
    InvalidTask,
    _json_field,
    check_size,
    parse_priority,
)
from taskandgo.protos import taskandgo_pb2 as pb
from taskandgo.strategies import STRATEGIES

if TYPE_CHECKING:
    from taskandgo.node.security import TokenAuth

#: What one JSON value may be (arguments and items are JSON lists and objects).
Json = Any


def _dumps(value: Json) -> str:
    return json.dumps(value, separators=(",", ":"))


# ---------------------------------------------------------------------- TaskSpec


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task spec that passed every check (see the module docstring for its forms).

    Exactly one of ``data``, ``argv``, ``call`` is set; ``args`` only with ``call``.
    ``strategy`` is ``split`` or ``batch``, or ``""`` only in a spec checked without
    a default (the client's: the node it reaches picks its own, see :meth:`resolved`).
    ``args`` and ``items`` are parsed JSON values, not copied: treat them as read-only.
    Equality compares every field (labels as a mapping, whatever their order)."""

    id: str
    priority: int
    strategy: str
    data: str = ""
    argv: tuple[str, ...] = ()
    call: str = ""
    args: Json | None = None
    shards: int = 0
    items: list[Json] | None = None
    timeout_s: float = 0.0
    retries: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Run once on every live node (a split task cut into one chunk per node).
    on_every_node: bool = False
    #: Not before this time (seconds since the epoch; 0: at once). Given as
    #: ``run_at`` (RFC 3339) or ``delay_s`` (from the checking node's clock).
    run_at: float = 0.0
    #: Run only once these tasks (which exist) have succeeded (``after_any``: ended).
    after: tuple[str, ...] = ()
    after_any: bool = False
    #: What each unit needs free on its node (``cpu`` cores, ``memory`` bytes, named
    #: resources), node labels it must have and would rather have (node/placement.py).
    resources: Mapping[str, float] = field(default_factory=dict)
    require: tuple[str, ...] = ()
    prefer: tuple[str, ...] = ()
    #: Cluster-wide concurrency keys its units hold while assigned (an operator sets
    #: each key's limit: ``taskandgo policy limit KEY N``; consensus/policy.py).
    concurrency_keys: tuple[str, ...] = ()

    # ------------------------------------------------------------ made here

    @classmethod
    def check(cls, raw: Mapping[str, Any], default_strategy: str, where: str = "") -> TaskSpec:
        """Check a request mapping (keys as :data:`REQUEST_FIELDS`; absent, empty and
        zero all mean the default, as in protobuf) and return the spec, or raise
        InvalidTask naming the field, prefixed with ``where`` (``tasks[3].``).

        ``default_strategy`` is the node's (``SCHEDULER_STRATEGY``); ``""`` leaves an
        unnamed strategy to the node, which then checks what needs ``split``."""
        try:
            return cls._check(raw, default_strategy)
        except InvalidTask as exc:
            if where:
                raise InvalidTask(where + exc.field, exc.message) from None
            raise

    @classmethod
    def _check(cls, raw: Mapping[str, Any], default_strategy: str) -> TaskSpec:
        if not isinstance(raw, (dict, Mapping)):  # dict first: the ABC check is slower
            raise InvalidTask("task", "expected an object")
        tid = raw.get("id")
        if tid is None or tid == "":
            tid = uuid.uuid4().hex
        if not isinstance(tid, str) or not ID_RE.fullmatch(tid):
            raise InvalidTask("task_id", "1-128 characters of letters, digits and ._:@- "
                              "starting with a letter or digit")
        priority = parse_priority(raw.get("priority"))

        data, argv, call = raw.get("data") or "", raw.get("argv") or [], raw.get("call") or ""
        kinds = [k for k, v in (("data", data), ("argv", argv), ("call", call)) if v]
        if not kinds:
            raise InvalidTask("data", "a task needs data, argv or call")
        if len(kinds) > 1:
            raise InvalidTask(kinds[1],
                              f"give only one of data, argv, call (got {', '.join(kinds)})")
        if data:
            if not isinstance(data, str):
                raise InvalidTask("data", "expected a string")
            check_size("data", data, MAX_PAYLOAD)
        if argv:
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise InvalidTask("argv", "expected a list of strings")
            check_size("argv", argv, MAX_PAYLOAD)
        # Errors name the field as the caller spelled it: ``args`` (a JSON value, HTTP
        # and the client) or ``args_json`` (JSON text, gRPC); the same for items.
        args_field = "args" if raw.get("args") is not None else "args_json"
        args = None
        if call:
            if not isinstance(call, str) or not CALL_RE.fullmatch(call):
                raise InvalidTask("call", CALL_SHAPE)  # the allow-list's rules: callworker.py
            check_size("call", call, MAX_CALL)
            args = _json_field(args_field, raw.get("args", raw.get("args_json")), MAX_PAYLOAD)
            if args is not None and not isinstance(args, (list, dict)):
                raise InvalidTask(args_field, "expected a JSON list or object")
        elif raw.get("args") or raw.get("args_json"):
            raise InvalidTask(args_field, "arguments are only for call tasks")

        strategy = raw.get("strategy") or default_strategy
        if strategy and (not isinstance(strategy, str) or strategy not in STRATEGIES):
            raise InvalidTask("strategy", f"{strategy!r}: expected split or batch")

        shards = raw.get("shards") or 0
        if isinstance(shards, bool) or not isinstance(shards, int) \
                or not 0 <= shards <= MAX_SHARDS:
            raise InvalidTask("shards", f"expected an integer 0..{MAX_SHARDS}")
        items_field = "items" if raw.get("items") is not None else "items_json"
        items = _json_field(items_field, raw.get("items", raw.get("items_json")),
                            MAX_ITEMS_BYTES)
        if items is not None:
            if not isinstance(items, list):
                raise InvalidTask(items_field, "expected a JSON list")
            if len(items) > MAX_ITEMS:
                raise InvalidTask(items_field, f"more than {MAX_ITEMS} items")
        if shards and items and shards > len(items):
            shards = len(items)
        if (shards or items) and strategy and strategy != "split":
            raise InvalidTask("strategy", "shards and items need the split strategy")
        if items and not shards:
            shards = min(len(items), MAX_SHARDS)
        every = raw.get("on_every_node") or False
        if not isinstance(every, bool):
            raise InvalidTask("on_every_node", "expected true or false")
        if every and (shards or items):
            raise InvalidTask("on_every_node", "runs the task once per node: give it or "
                              "shards/items, not both")
        if every and raw.get("strategy") and raw.get("strategy") != "split":
            raise InvalidTask("on_every_node", "runs the task once per node, which is the "
                              "split strategy: leave the strategy out or give split")
        if every:
            strategy = "split"
        elif strategy == "split" and not shards and not items:
            # Split cuts work into parts; a task with nothing to cut runs once, as one
            # unit (it was cut into one chunk per live node, running it on each).
            strategy = "batch"

        timeout = raw.get("timeout_s") or 0
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not math.isfinite(timeout) or not 0 <= timeout <= MAX_TIMEOUT_S:
            raise InvalidTask("timeout_s", f"expected seconds 0..{MAX_TIMEOUT_S:g}")
        retries = raw.get("retries") or 0
        if isinstance(retries, bool) or not isinstance(retries, int) \
                or not 0 <= retries <= MAX_RETRIES:
            raise InvalidTask("retries", f"expected an integer 0..{MAX_RETRIES}")

        labels = raw.get("labels") or {}
        if not isinstance(labels, (dict, Mapping)) or len(labels) > MAX_LABELS:
            raise InvalidTask("labels", f"expected at most {MAX_LABELS} key=value pairs")
        for k, v in labels.items():
            if not isinstance(k, str) or not LABEL_KEY_RE.fullmatch(k):
                raise InvalidTask("labels", f"bad label key {k!r}")
            if not isinstance(v, str) or len(v) > 255:
                raise InvalidTask("labels",
                                  f"label {k}: value must be a string of at most 255 chars")
        run_at = start_time(raw.get("run_at"), raw.get("delay_s"))
        after, after_any = check_after(tid, raw.get("after"), raw.get("after_any"))
        if after and run_at:
            raise InvalidTask("after", "give after or a start time (run_at, delay_s), not "
                              "both")
        resources = _placement.check_resources(raw.get("resources"))
        require = _placement.check_terms(raw.get("require"), "require")
        prefer = _placement.check_terms(raw.get("prefer"), "prefer")
        if every and (resources or require):
            raise InvalidTask("on_every_node", "runs the task once on every node: give it or "
                              "resources/require, not both")
        keys = check_keys(raw.get("concurrency_keys"))
        return cls(id=tid, priority=priority, strategy=strategy, data=data,
                   argv=tuple(argv), call=call, args=args, shards=shards,
                   items=items or None, timeout_s=float(timeout), retries=retries,
                   labels=dict(labels), on_every_node=every, run_at=run_at,
                   after=after, after_any=after_any, resources=resources,
                   require=require, prefer=prefer, concurrency_keys=keys)

    def resolved(self, default_strategy: str) -> TaskSpec:
        """This spec with the node's default strategy where it names none (checked
        again: shards and items need ``split``)."""
        if self.strategy:
            return self
        return TaskSpec.check(self.to_json(), default_strategy)

    # ------------------------------------------------------------ stored form

    def to_stored(self) -> dict[str, Any]:
        """The dict the replicated state stores: the keys, their order and their
        types exactly as before this type existed (snapshots and journals carry it;
        replicas compare states by it). Only for a spec with a strategy."""
        out: dict[str, Any] = {"id": self.id, "priority": self.priority}
        if self.data:
            out["data"] = self.data
        if self.argv:
            out["argv"] = list(self.argv)
        if self.call:
            out["call"] = self.call
            if self.args is not None:
                out["args"] = self.args
        out["strategy"] = self.strategy
        if self.items is not None:
            out["items"] = self.items
        if self.shards:
            out["shards"] = self.shards
        if self.timeout_s:
            out["timeout_s"] = self.timeout_s
        if self.retries:
            out["retries"] = self.retries
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.run_at:
            out["run_at"] = self.run_at
        if self.after:
            out["after"] = list(self.after)
            if self.after_any:
                out["after_any"] = True
        _placement_out(out, self.resources, self.require, self.prefer)
        if self.concurrency_keys:
            out["concurrency_keys"] = list(self.concurrency_keys)
        return out

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> TaskSpec:
        """A spec from the replicated state (checked when it was submitted: not
        checked again)."""
        return cls(id=stored["id"], priority=stored.get("priority", 0),
                   strategy=stored.get("strategy", ""), data=stored.get("data", ""),
                   argv=tuple(stored.get("argv", ())), call=stored.get("call", ""),
                   args=stored.get("args"), shards=stored.get("shards", 0),
                   items=stored.get("items"), timeout_s=stored.get("timeout_s", 0.0),
                   retries=stored.get("retries", 0), labels=dict(stored.get("labels", {})),
                   on_every_node=every_node(stored), run_at=stored.get("run_at", 0.0),
                   after=tuple(stored.get("after") or ()),
                   after_any=bool(stored.get("after_any")),
                   resources=dict(stored.get("resources") or {}),
                   require=tuple(stored.get("require") or ()),
                   prefer=tuple(stored.get("prefer") or ()),
                   concurrency_keys=tuple(stored.get("concurrency_keys") or ()))

    # ------------------------------------------------------------ protobuf

    def to_api(self) -> dict[str, Any]:
        """The ``taskandgo.v1.TaskSpec`` fields as a dict (what ``Task.spec`` shows
        over gRPC and HTTP): see :func:`spec_to_api`."""
        return spec_to_api(self.to_stored())

    def to_proto(self) -> pb.TaskSpec:
        return pb.TaskSpec(**self.to_api())

    @classmethod
    def from_proto(cls, msg: pb.TaskSpec, default_strategy: str, where: str = "") -> TaskSpec:
        """Check a TaskSpec message (errors name ``args_json``/``items_json``)."""
        return cls.check(request_from_proto(msg), default_strategy, where)

    # ------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """The HTTP body of this spec (``POST /submit-task``, ``/api/v1/tasks``):
        the seed's ``task_id``/``priority``/``data`` and the optional fields that are
        set, arguments and items as JSON values."""
        out: dict[str, Any] = {"task_id": self.id, "priority": self.priority}
        if self.data:
            out["data"] = self.data
        if self.argv:
            out["argv"] = list(self.argv)
        if self.call:
            out["call"] = self.call
            if self.args is not None:
                out["args"] = self.args
        if self.strategy:
            out["strategy"] = self.strategy
        if self.items is not None:
            out["items"] = self.items
        if self.shards:
            out["shards"] = self.shards
        if self.timeout_s:
            out["timeout_s"] = self.timeout_s
        if self.retries:
            out["retries"] = self.retries
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.on_every_node:
            out["on_every_node"] = True
        if self.run_at:
            out["run_at"] = rfc3339(self.run_at)
        if self.after:
            out["after"] = list(self.after)
            if self.after_any:
                out["after_any"] = True
        _placement_out(out, self.resources, self.require, self.prefer)
        if self.concurrency_keys:
            out["concurrency_keys"] = list(self.concurrency_keys)
        return out

    @classmethod
    def from_json(cls, body: Any, default_strategy: str, where: str = "") -> TaskSpec:
        """Check an HTTP body (see :func:`request_from_json`); errors name the field
        prefixed with ``where``."""
        return cls.check(request_from_json(body, where), default_strategy, where)


def check_many(raws: Sequence[Mapping[str, Any]], default_strategy: str) -> list[TaskSpec]:
    """Check a batch: errors name ``tasks[i].field`` when there is more than one."""
    if len(raws) == 1:
        return [TaskSpec.check(raws[0], default_strategy)]
    return [TaskSpec.check(r, default_strategy, f"tasks[{i}].") for i, r in enumerate(raws)]


def every_node(stored: Mapping[str, Any]) -> bool:
    """Does a stored spec run once on every live node? Its stored form is a split task
    with nothing to cut (no shards, no items), which is cut into one chunk per live
    node, as every release has done; a task with nothing to cut that should run once
    is stored as batch (see TaskSpec.check)."""
    return stored.get("strategy") == "split" and not stored.get("shards") \
        and not stored.get("items")


def spec_to_api(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored spec -> the ``taskandgo.v1.TaskSpec`` fields as a dict (JSON values
    as compact JSON text), leaving out what is unset."""
    out: dict[str, Any] = {"id": stored["id"], "priority": str(stored.get("priority", ""))}
    for k in ("data", "call", "strategy"):
        if stored.get(k):
            out[k] = stored[k]
    if stored.get("argv"):
        out["argv"] = list(stored["argv"])
    if "args" in stored:
        out["args_json"] = _dumps(stored["args"])
    if "items" in stored:
        out["items_json"] = _dumps(stored["items"])
    for k in ("shards", "timeout_s", "retries"):
        if stored.get(k):
            out[k] = stored[k]
    if stored.get("labels"):
        out["labels"] = dict(stored["labels"])
    if every_node(stored):
        out["on_every_node"] = True
    if stored.get("run_at"):
        out["run_at"] = rfc3339(stored["run_at"])
    if stored.get("after"):
        out["after"] = list(stored["after"])
        if stored.get("after_any"):
            out["after_any"] = True
    _placement_out(out, stored.get("resources"), stored.get("require"), stored.get("prefer"))
    if stored.get("concurrency_keys"):
        out["concurrency_keys"] = list(stored["concurrency_keys"])
    return out


def _placement_out(out: dict[str, Any], resources: Mapping[str, float] | None,
                   require: Sequence[str] | None, prefer: Sequence[str] | None) -> None:
    """Add a spec's request and label terms to ``out`` (the stored, API and JSON
    forms spell them alike), only those set: a spec without them reads as before."""
    if resources:
        out["resources"] = dict(resources)
    if require:
        out["require"] = list(require)
    if prefer:
        out["prefer"] = list(prefer)


#: At most this many concurrency keys per task.
MAX_KEYS = 8


def check_keys(raw: Any) -> tuple[str, ...]:
    """A task's concurrency keys: a list of names (or comma-separated text), each as
    a label key, each once, in order; InvalidTask naming ``concurrency_keys``."""
    if raw in (None, "", [], ()):
        return ()
    if isinstance(raw, str):
        raw = [k for k in re.split(r"[,\s]+", raw) if k]
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_KEYS:
        raise InvalidTask("concurrency_keys", f"expected a list of at most {MAX_KEYS} key names")
    for k in raw:
        if not isinstance(k, str) or not LABEL_KEY_RE.fullmatch(k):
            raise InvalidTask("concurrency_keys",
                              f"{str(k)[:64]!r}: a key is letters, digits and . _ / - "
                              "(at most 63, starting with a letter or digit)")
    return tuple(dict.fromkeys(raw))


#: At most this many parents per task (a fan-in of a thousand maps is two submits).
MAX_AFTER = 10_000


def check_after(tid: str, after: Any, after_any: Any) -> tuple[tuple[str, ...], bool]:
    """A request's ``after`` (task ids, a list or comma-separated text) and
    ``after_any``: the parents, each once, in order; InvalidTask naming the field.
    Whether they exist is the node's check (Submitter), against its replica."""
    if after in (None, "", []):
        if after_any not in (None, False):
            raise InvalidTask("after_any", "only with after")
        return (), False
    if isinstance(after, str):
        after = [a.strip() for a in after.split(",") if a.strip()]
    if not isinstance(after, (list, tuple)) or not all(isinstance(a, str) for a in after):
        raise InvalidTask("after", "expected a list of task ids")
    if len(after) > MAX_AFTER:
        raise InvalidTask("after", f"more than {MAX_AFTER} tasks")
    for a in after:
        if not ID_RE.fullmatch(a):
            raise InvalidTask("after", f"{a[:64]!r} is not a task id")
        if a == tid:
            raise InvalidTask("after", "a task cannot wait for itself")
    if not isinstance(after_any, (bool, type(None))):
        raise InvalidTask("after_any", "expected true or false")
    return tuple(dict.fromkeys(after)), bool(after_any)


#: How far ahead a delayed task may be scheduled.
MAX_DELAY_S = 366 * 24 * 3600.0


def rfc3339(t: float) -> str:
    """Seconds since the epoch as RFC 3339 text in UTC (``2026-12-01T08:00:00Z``;
    microseconds when there are any), as the API shows times it was given."""
    text = datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()
    return text.replace("+00:00", "Z")


def parse_time(field: str, value: Any) -> float:
    """An RFC 3339 time (with its offset: ``2026-12-01T09:00:00+01:00``, ``...Z``) or
    seconds since the epoch as a number -> seconds since the epoch; InvalidTask
    naming ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidTask(field, "expected an RFC 3339 time such as 2026-12-01T08:00:00Z")
    if isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidTask(field, f"{value[:64]!r} is not an RFC 3339 time such as "
                              "2026-12-01T08:00:00Z") from None
        if when.tzinfo is None:
            raise InvalidTask(field, f"{value[:64]!r} has no time zone offset (add Z for "
                              "UTC, or +01:00)")
        t = when.timestamp()
    else:
        t = float(value)
    if not math.isfinite(t) or t <= 0:
        raise InvalidTask(field, "expected a time after 1970")
    return t


def start_time(run_at: Any, delay_s: Any, now: float | None = None) -> float:
    """When a task may start (0.0: at once) from a request's ``run_at`` (RFC 3339 or
    epoch seconds) or ``delay_s`` (seconds from ``now``, this node's clock): at most
    one of them, at most :data:`MAX_DELAY_S` ahead; a time in the past means at once
    (its task is queued when accepted)."""
    clock = time.time() if now is None else now
    if run_at not in (None, "", 0, 0.0):
        if delay_s not in (None, 0, 0.0):
            raise InvalidTask("delay_s", "give run_at or delay_s, not both")
        t = parse_time("run_at", run_at)
        if t > clock + MAX_DELAY_S:
            raise InvalidTask("run_at", f"more than {MAX_DELAY_S / 86400:g} days ahead")
        return t
    if delay_s in (None, 0, 0.0):
        return 0.0
    if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) \
            or not math.isfinite(delay_s) or not 0 <= delay_s <= MAX_DELAY_S:
        raise InvalidTask("delay_s", f"expected seconds 0..{MAX_DELAY_S:g}")
    return clock + float(delay_s)


# ---------------------------------------------------------------------- requests

#: Keys of a request mapping (what :meth:`TaskSpec.check` reads), and the fields an
#: HTTP body may carry (``task_id`` is the seed's name for ``id``; ``args`` and
#: ``items`` are JSON values, ``args_json`` and ``items_json`` JSON text).
REQUEST_FIELDS = ("id", "task_id", "priority", "data", "argv", "call", "args", "args_json",
                  "strategy", "shards", "items", "items_json", "timeout_s", "retries", "labels",
                  "on_every_node", "run_at", "delay_s", "after", "after_any", "resources",
                  "require", "prefer", "concurrency_keys")
#: JSON types of the optional fields of an HTTP body (``null`` only where it means
#: "the default"). The checker takes absent, empty and zero alike (as protobuf
#: does); over JSON a value of the wrong type is refused, even a falsy one like
#: ``"retries": ""``.
JSON_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "priority": ((str, int, type(None)), "low, medium, high, critical or an integer"),
    "data": ((str,), "a string"), "argv": ((list,), "a list of strings"),
    "call": ((str,), "module:function"), "args": ((list, dict), "a JSON list or object"),
    "args_json": ((str,), "a string of JSON"), "strategy": ((str,), "split or batch"),
    "shards": ((int,), "an integer"), "items": ((list,), "a JSON list"),
    "items_json": ((str,), "a string of JSON"), "timeout_s": ((int, float), "a number"),
    "retries": ((int,), "an integer"), "labels": ((dict,), "an object of strings"),
    "on_every_node": ((bool,), "true or false"),
    "run_at": ((str, int, float, type(None)), "an RFC 3339 time such as 2026-12-01T08:00:00Z"),
    "delay_s": ((int, float, type(None)), "seconds"),
    "after": ((list, str, type(None)), "a list of task ids"),
    "after_any": ((bool, type(None)), "true or false"),
    "resources": ((dict, type(None)), "an object of name: amount (cpu, memory, gpu, ...)"),
    "require": ((list, str, type(None)), "a list of node labels key=value or key"),
    "prefer": ((list, str, type(None)), "a list of node labels key=value or key"),
    "concurrency_keys": ((list, str, type(None)), "a list of concurrency key names"),
}


def request_from_proto(m: pb.TaskSpec) -> dict[str, Any]:
    """A TaskSpec message -> the request mapping :meth:`TaskSpec.check` reads."""
    return {
        "id": m.id, "priority": m.priority, "data": m.data, "argv": list(m.argv),
        "call": m.call, "args_json": m.args_json, "strategy": m.strategy, "shards": m.shards,
        "items_json": m.items_json, "timeout_s": m.timeout_s, "retries": m.retries,
        "labels": dict(m.labels), "on_every_node": m.on_every_node,
        "run_at": m.run_at, "delay_s": m.delay_s, "after": list(m.after),
        "after_any": m.after_any, "resources": dict(m.resources), "require": list(m.require),
        "prefer": list(m.prefer), "concurrency_keys": list(m.concurrency_keys),
    }


def request_from_json(body: Any, where: str = "") -> dict[str, Any]:
    """An HTTP body -> the request mapping :meth:`TaskSpec.check` reads, after the
    JSON form's own checks: an object, only :data:`REQUEST_FIELDS`, one spelling of
    each field, the types of :data:`JSON_FIELD_TYPES`, JSON text nested at most
    :data:`MAX_JSON_DEPTH` deep, an id. ``where`` prefixes field names in errors."""
    if not isinstance(body, dict):
        raise InvalidTask(where.rstrip(".") or "body", "expected a JSON object")
    unknown = set(body) - set(REQUEST_FIELDS)
    if unknown:
        raise InvalidTask(where + min(unknown), "unknown field")
    for a, b in (("task_id", "id"), ("args", "args_json"), ("items", "items_json")):
        if a in body and b in body:
            raise InvalidTask(where + b, f"give {a} or {b}, not both")
    for name, (types, expected) in JSON_FIELD_TYPES.items():
        if name in body and ((isinstance(body[name], bool) and bool not in types)
                             or not isinstance(body[name], types)):
            raise InvalidTask(where + name, f"expected {expected}")
    for name in ("args_json", "items_json"):
        # JSON inside a string: the checker parses it but does not bound the parser's
        # recursion; too deep, and parsing or replicating it would recurse away.
        if body.get(name):
            try:
                nested_ok = depth_ok(json.loads(body[name]), MAX_JSON_DEPTH)
            except RecursionError:
                nested_ok = False
            except ValueError:
                nested_ok = True  # the checker names the field and the JSON error
            if not nested_ok:
                raise InvalidTask(where + name, f"nested deeper than {MAX_JSON_DEPTH} levels")
    raw = dict(body)
    if "task_id" in raw:
        tid = raw.pop("task_id")
        # The seed's ids look numeric ("123"); accept a JSON number for them too.
        if isinstance(tid, bool) or not isinstance(tid, (str, int, type(None))):
            raise InvalidTask(where + "task_id", "expected a string")
        raw["id"] = "" if tid is None else str(tid)
    elif "id" in raw and not isinstance(raw["id"], (str, type(None))):
        raise InvalidTask(where + "id", "expected a string")
    # ID_RE is anchored with ``$``, which also matches before a trailing newline.
    if raw.get("id") and not ID_RE.fullmatch(raw["id"]):
        raise InvalidTask(where + "task_id", "1-128 characters of letters, digits and ._:@- "
                          "starting with a letter or digit")
    return raw


def depth_ok(value: Json, limit: int) -> bool:
    """True when ``value`` nests lists/objects at most ``limit`` deep (iterative)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


# ---------------------------------------------------------------------- views

def _is_repeated(f: Any) -> bool:
    rep = getattr(f, "is_repeated", None)  # protobuf >= 5.29; label is deprecated
    if rep is not None:
        return bool(rep)
    return bool(f.label == f.LABEL_REPEATED)


def dict_from_message(msg: Any) -> dict[str, Any]:
    """A message as a plain dict: every field by its proto name, int64 as int, unset
    sub-messages left out (what json_format.MessageToDict gives with
    preserving_proto_field_name and always_print_fields_with_no_presence, about ten
    times faster: waiting for 10,000 tasks spent a second there)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        sub = f.message_type
        if sub is not None and sub.GetOptions().map_entry:
            vsub = sub.fields_by_name["value"].message_type
            out[f.name] = {k: dict_from_message(x) if vsub is not None else x
                           for k, x in v.items()}
        elif _is_repeated(f):
            out[f.name] = [dict_from_message(x) for x in v] if sub is not None else list(v)
        elif sub is not None:
            if msg.HasField(f.name):
                out[f.name] = dict_from_message(v)
        else:
            out[f.name] = v
    return out


def message_from_dict(cls: Any, d: Mapping[str, Any]) -> Any:
    """A view dict -> a message of class ``cls``. The constructor is about ten times
    faster than json_format (it was ~9% of a busy node's time); json_format is the
    fallback for anything the constructor refuses (unknown keys, strings for
    numbers), which it skips or converts."""
    try:
        return cls(**d)
    except (TypeError, ValueError):
        from google.protobuf import json_format

        return json_format.ParseDict(dict(d), cls(), ignore_unknown_fields=True)


# ---------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ApiError:
    """How both servers answer one failure: the gRPC status code (by name), the
    HTTP status, the message, the field the HTTP body names (``""``: none) and the
    retry hint (seconds; gRPC trailing ``retry-after-ms``, HTTP ``Retry-After``)."""

    code: str
    http_status: int
    message: str
    field: str = ""
    retry_after_s: float | None = None
    #: HTTP ``Retry-After`` is this many seconds more than ``retry_after_s`` rounded.
    retry_pad_s: float = 0.0

    @property
    def grpc_code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = getattr(grpc.StatusCode, self.code, grpc.StatusCode.UNKNOWN)
        return code

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return (("retry-after-ms", str(int(self.retry_after_s * 1000))),)

    def http_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.http_status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s + self.retry_pad_s)))
        return headers


#: gRPC codes that no exception of the node raises but a forwarded call may answer.
OTHER_CODES_HTTP = {"DEADLINE_EXCEEDED": 503, "INTERNAL": 502, "UNKNOWN": 502}


@functools.cache
def error_table() -> tuple[tuple[type[BaseException], str, int, str, float], ...]:
    """(exception type, gRPC code name, HTTP status, HTTP field, Retry-After pad),
    the first entry the exception is an instance of wins. Built on first use: the
    exception types live in modules a client never needs."""
    from taskandgo.node.replica import NotFound, Unavailable
    from taskandgo.node.security import Overloaded, PermissionDenied, RateLimited, Unauthenticated
    from taskandgo.node.streams import BadTicket, TooManyStreams

    return (
        (InvalidTask, "INVALID_ARGUMENT", 400, "", 0.0),
        (NotFound, "NOT_FOUND", 404, "", 0.0),
        (Unavailable, "UNAVAILABLE", 503, "", 0.0),
        (Unauthenticated, "UNAUTHENTICATED", 401, "Authorization", 0.0),
        (BadTicket, "UNAUTHENTICATED", 401, "ticket", 0.0),
        (PermissionDenied, "PERMISSION_DENIED", 403, "", 0.0),
        # Rate limit and full queue: the hint rounded up (at least the wait asked).
        (RateLimited, "RESOURCE_EXHAUSTED", 429, "", 0.5),
        (Overloaded, "RESOURCE_EXHAUSTED", 429, "", 0.5),
        (TooManyStreams, "RESOURCE_EXHAUSTED", 429, "", 0.0),
    )


def http_status_of(code: str) -> int:
    """The HTTP status for a gRPC code name (a call this node forwarded failed)."""
    for _, c, status, _, _ in error_table():
        if c == code:
            return status
    return OTHER_CODES_HTTP.get(code, 503)


def api_error(exc: BaseException) -> ApiError | None:
    """How to answer ``exc`` over either protocol; None for an unexpected exception
    (the server logs it and answers INTERNAL / 500 without its details).

    A call this node forwarded to another (``TaskAndGoError`` from the client, or a
    ``grpc.RpcError``) is answered with that node's code and message; over HTTP a
    400 names the field its message starts with."""
    for cls, code, status, table_field, pad in error_table():
        if isinstance(exc, cls):
            fld = exc.field if isinstance(exc, InvalidTask) else table_field
            retry = getattr(exc, "retry_after_s", None) if status == 429 else None
            return ApiError(code, status, str(exc), fld, retry, pad)
    from taskandgo.node.client import TaskAndGoError

    if isinstance(exc, TaskAndGoError):
        code, message = exc.code, exc.message
        if not hasattr(grpc.StatusCode, code):
            code = "UNAVAILABLE"
    elif isinstance(exc, grpc.RpcError):
        status_code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNAVAILABLE
        code = status_code.name
        details = exc.details() if hasattr(exc, "details") else str(exc)
        message = details or ""
    else:
        return None
    status = http_status_of(code)
    fld = message.split(":", 1)[0] if status == 400 and ":" in message else ""
    return ApiError(code, status, message, fld, 1.0 if status == 429 else None)


# ---------------------------------------------------------------------- auth


def token_required(auth: TokenAuth, read_only: bool) -> bool:
    """True when a call needs a bearer token: tokens are configured, and the call is
    not to a read-only endpoint (health, reflection, metrics) left open."""
    return auth.enabled and not (auth.open_read_only and read_only)


def check_bearer(auth: TokenAuth, token: str | None, read_only: bool) -> str | None:
    """The one token check of gRPC and HTTP: raise Unauthenticated unless the call
    may proceed. ``token`` is the bearer token presented (``TokenAuth.parse_header``
    of the ``authorization`` header or metadata; None: none); ``read_only`` says the
    call is to a health, reflection or metrics endpoint. Returns the token checked
    (None when none was needed)."""
    if not token_required(auth, read_only):
        return None
    auth.check(token)
    return token


__all__ = ["JSON_FIELD_TYPES", "REQUEST_FIELDS", "ApiError", "TaskSpec", "api_error",
           "check_bearer", "check_many", "dict_from_message", "error_table", "http_status_of",
           "message_from_dict", "request_from_json", "request_from_proto", "spec_to_api",
           "token_required"]
