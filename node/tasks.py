"""Task spec limits and helpers, shared by gRPC, HTTP and the CLI.

Nothing reaches the replicated state machine without passing :func:`normalize`,
which returns a plain dict in the one shape the state machine stores, or raises
:class:`InvalidTask` naming the field that was wrong. The checks themselves are
:meth:`taskandgo.node.vocabulary.TaskSpec.check`; this module holds the limits and
the parsing helpers they use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from taskandgo.consensus.state import PRIORITY_LEVELS, STATUSES

if TYPE_CHECKING:
    from taskandgo.node.vocabulary import TaskSpec

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


def normalize(raw: Mapping[str, Any] | TaskSpec, default_strategy: str) -> dict[str, Any]:
    """Check a spec and return it in stored form (see module docstring). ``raw`` is a
    request mapping (checked here by :meth:`TaskSpec.check`) or a spec the servers
    checked already (given the node's default strategy if it names none)."""
    spec_type = _vocabulary.TaskSpec
    if isinstance(raw, spec_type):
        return raw.resolved(default_strategy).to_stored()
    return spec_type.check(raw, default_strategy).to_stored()


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
    for k in ("data", "argv", "call", "args", "timeout_s", "parents"):
        if k in spec:
            p[k] = spec[k]
    if chunk >= 0:
        p["items"] = chunk_items(spec.get("items"), chunk, count)
    return p


# At the end: vocabulary imports this module's names, so it can be imported only once
# they exist (whichever of the two is imported first); normalize looks it up per call.
import taskandgo.node.vocabulary as _vocabulary  # noqa: E402
