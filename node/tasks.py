"""Validation of task specs, shared by gRPC, HTTP and the CLI.

Nothing reaches the replicated state machine without passing :func:`normalize`,
which returns a plain dict in the one shape the state machine stores, or raises
:class:`InvalidTask` naming the field that was wrong.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import Any

from taskandgo.consensus.state import PRIORITY_LEVELS, STATUSES
from taskandgo.node.callworker import CALL_RE, CALL_SHAPE
from taskandgo.strategies import STRATEGIES

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MAX_PAYLOAD = 256 * 1024
MAX_ITEMS_BYTES = 1024 * 1024
MAX_SHARDS = 1000
MAX_ITEMS = 10_000
MAX_LABELS = 32
PRIORITY_RANGE = (-1000, 1000)
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_RETRIES = 100
MAX_JSON_DEPTH = 64
MAX_CALL = 1024
#: JSON text longer than this many times its field's limit is refused unparsed: no
#: spelling of a value under the limit is that long (``\uXXXX`` for one byte is 6).
TEXT_SLACK = 8


class InvalidTask(ValueError):
    """A spec field is wrong. ``field`` names it (as in the API)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_priority(value: Any) -> int:
    if value is None or value == "":
        return PRIORITY_LEVELS["medium"]
    if isinstance(value, bool):
        raise InvalidTask("priority", "expected low, medium, high, critical or an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        v = value.strip().lower()
        if v in PRIORITY_LEVELS:
            return PRIORITY_LEVELS[v]
        if not re.fullmatch(r"[+-]?\d{1,6}", v):
            raise InvalidTask("priority", f"{value!r} is not low, medium, high, critical "
                              "or an integer")
        n = int(v)
    else:
        raise InvalidTask("priority", "expected low, medium, high, critical or an integer")
    lo, hi = PRIORITY_RANGE
    if not lo <= n <= hi:
        raise InvalidTask("priority", f"{n} is outside {lo}..{hi}")
    return n


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON: what it costs in the replicated state
    (the journal, snapshots and every replica's memory) whatever JSON type it came as.
    A string counts as its UTF-8 bytes. ``value`` must be nested at most
    :data:`MAX_JSON_DEPTH` deep (check :func:`_depth` first: serialising recurses)."""
    text = value if isinstance(value, str) else json.dumps(
        value, ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: a lone surrogate ("\ud800" in JSON) is counted, not a crash.
    return len(text.encode("utf-8", "surrogatepass"))


def spec_bytes(spec: dict[str, Any]) -> int:
    """About how many bytes a normalised spec adds to a Raft entry (for batching
    submits into commands of bounded size; not a limit check)."""
    n = 200
    for key, value in spec.items():
        if isinstance(value, str):
            n += len(value)
        elif key in ("argv", "args", "items", "labels") and value:
            n += json_size(value)
    return n


def check_size(name: str, value: Any, limit: int) -> None:
    """The one size check of every sized field (data, argv, call, args, items), for
    gRPC, HTTP and the CLI alike: raise :class:`InvalidTask` naming ``name`` when
    ``value`` is over ``limit`` bytes by :func:`json_size`, so a list or an object
    is held to the same limit as a string."""
    size = json_size(value)
    if size > limit:
        what = "UTF-8" if isinstance(value, str) else "compact JSON"
        raise InvalidTask(name, f"{size} bytes as {what}; the limit is {limit} bytes")


def _json_field(name: str, value: Any, limit: int) -> Any:
    """A JSON-valued field, given as a JSON value or as JSON text (``*_json``): the
    parsed value, or None when absent. The limit applies to the parsed value's
    compact size, so the same arguments pass or fail whichever way they are sent
    (pretty-printed or ``\\u``-escaped text is not held against them)."""
    if isinstance(value, str):
        if value == "":
            return None
        if len(value) > TEXT_SLACK * limit:
            # Too long to be under the limit in any spelling: do not parse it.
            raise InvalidTask(name, f"JSON text of {len(value)} characters; the limit is "
                              f"{limit} bytes")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise InvalidTask(name, f"not valid JSON: {exc}") from None
    if value is None:
        return None
    if _depth(value) > MAX_JSON_DEPTH:
        raise InvalidTask(name, f"nested deeper than {MAX_JSON_DEPTH} levels")
    check_size(name, value, limit)
    return value


def _depth(value: Any, limit: int = 1000) -> int:
    """Nesting depth of a JSON value, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def normalize(raw: dict[str, Any], default_strategy: str) -> dict[str, Any]:
    """Check a spec and return it in stored form (see module docstring)."""
    if not isinstance(raw, dict):
        raise InvalidTask("task", "expected an object")
    spec: dict[str, Any] = {}
    tid = raw.get("id")
    if tid is None or tid == "":
        tid = uuid.uuid4().hex
    if not isinstance(tid, str) or not ID_RE.fullmatch(tid):
        raise InvalidTask("task_id", "1-128 characters of letters, digits and ._:@- "
                          "starting with a letter or digit")
    spec["id"] = tid
    spec["priority"] = parse_priority(raw.get("priority"))

    data, argv, call = raw.get("data") or "", raw.get("argv") or [], raw.get("call") or ""
    kinds = [k for k, v in (("data", data), ("argv", argv), ("call", call)) if v]
    if not kinds:
        raise InvalidTask("data", "a task needs data, argv or call")
    if len(kinds) > 1:
        raise InvalidTask(kinds[1], f"give only one of data, argv, call (got {', '.join(kinds)})")
    if data:
        if not isinstance(data, str):
            raise InvalidTask("data", "expected a string")
        check_size("data", data, MAX_PAYLOAD)
        spec["data"] = data
    if argv:
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise InvalidTask("argv", "expected a list of strings")
        check_size("argv", argv, MAX_PAYLOAD)
        spec["argv"] = list(argv)
    # Errors name the field as the caller spelled it: ``args`` (a JSON value, HTTP)
    # or ``args_json`` (JSON text, gRPC and the CLI); the same for items.
    args_field = "args" if raw.get("args") is not None else "args_json"
    if call:
        if not isinstance(call, str) or not CALL_RE.fullmatch(call):
            raise InvalidTask("call", CALL_SHAPE)  # the allow-list's rules: node/callworker.py
        check_size("call", call, MAX_CALL)
        spec["call"] = call
        args = _json_field(args_field, raw.get("args", raw.get("args_json")), MAX_PAYLOAD)
        if args is not None and not isinstance(args, (list, dict)):
            raise InvalidTask(args_field, "expected a JSON list or object")
        if args is not None:
            spec["args"] = args
    elif raw.get("args") or raw.get("args_json"):
        raise InvalidTask(args_field, "arguments are only for call tasks")

    strategy = raw.get("strategy") or default_strategy
    if strategy not in STRATEGIES:
        raise InvalidTask("strategy", f"{strategy!r}: expected split or batch")
    spec["strategy"] = strategy

    shards = raw.get("shards") or 0
    if isinstance(shards, bool) or not isinstance(shards, int) or not 0 <= shards <= MAX_SHARDS:
        raise InvalidTask("shards", f"expected an integer 0..{MAX_SHARDS}")
    items_field = "items" if raw.get("items") is not None else "items_json"
    items = _json_field(items_field, raw.get("items", raw.get("items_json")), MAX_ITEMS_BYTES)
    if items is not None:
        if not isinstance(items, list):
            raise InvalidTask(items_field, "expected a JSON list")
        if len(items) > MAX_ITEMS:
            raise InvalidTask(items_field, f"more than {MAX_ITEMS} items")
        if items:
            spec["items"] = items
    if shards and items and shards > len(items):
        shards = len(items)
    if (shards or items) and strategy != "split":
        raise InvalidTask("strategy", "shards and items need the split strategy")
    if items and not shards:
        shards = min(len(items), MAX_SHARDS)
    if shards:
        spec["shards"] = shards

    timeout = raw.get("timeout_s") or 0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or not 0 <= timeout <= MAX_TIMEOUT_S:
        raise InvalidTask("timeout_s", f"expected seconds 0..{MAX_TIMEOUT_S:g}")
    if timeout:
        spec["timeout_s"] = float(timeout)
    retries = raw.get("retries") or 0
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise InvalidTask("retries", f"expected an integer 0..{MAX_RETRIES}")
    if retries:
        spec["retries"] = retries

    labels = raw.get("labels") or {}
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise InvalidTask("labels", f"expected at most {MAX_LABELS} key=value pairs")
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_KEY_RE.fullmatch(k):
            raise InvalidTask("labels", f"bad label key {k!r}")
        if not isinstance(v, str) or len(v) > 255:
            raise InvalidTask("labels", f"label {k}: value must be a string of at most 255 chars")
    if labels:
        spec["labels"] = dict(labels)
    return spec


def check_status(status: str) -> str:
    if status and status not in STATUSES:
        raise InvalidTask("status", f"{status!r}: expected one of {', '.join(STATUSES)}")
    return status


def chunk_items(items: list | None, index: int, count: int) -> list | None:
    """The contiguous part of items that chunk ``index`` of ``count`` gets."""
    if items is None:
        return None
    n = len(items)
    return items[index * n // count:(index + 1) * n // count]


def payload_for(spec: dict[str, Any], chunk: int, count: int) -> dict[str, Any]:
    """What a worker needs to run one unit of a task."""
    p: dict[str, Any] = {}
    for k in ("data", "argv", "call", "args", "timeout_s"):
        if k in spec:
            p[k] = spec[k]
    if chunk >= 0:
        p["items"] = chunk_items(spec.get("items"), chunk, count)
    return p
