"""The cluster-wide usage policy, replicated (RAFT_PROTOCOL 9): concurrency limits
per key and fair-share weights per tenant, set by operators.

* A **concurrency limit** caps how many units holding a key (a task's
  ``concurrency_keys``) are assigned at once anywhere in the cluster. The state
  enforces it when it applies an assignment (consensus/state.py apply_assign), so
  it holds whoever leads; the planner respects it too (strategies/planner.py), so a
  leader does not propose what the state would skip. A key with no limit is
  unlimited; a limit of 0 holds every unit with the key back.
* **Fair share**: with a tenant label set (``team``, say), the queue serves the
  tenants of one priority level in proportion to their weights (default 1) instead
  of first come first served (see consensus/fairshare.py).

Pure and total: :func:`apply_ops` never raises, whatever a log entry holds; a bad
op is skipped and counted.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: RAFT_PROTOCOL of the usage policy: the policy command, and tasks with concurrency
#: keys (a leader of an earlier release would not count them), are proposed only once
#: every voter runs it.
POLICY_PROTOCOL = 9
#: A concurrency key, a tenant, a tenant label: like a label key.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
#: Limits are 0..MAX_LIMIT units; weights 0 < w <= MAX_WEIGHT.
MAX_LIMIT = 1_000_000
MAX_WEIGHT = 1_000_000.0
#: At most this many limits and weights each (a policy is small).
MAX_ENTRIES = 10_000
#: Op kinds (each op is a list: kind, then its arguments).
LIMIT, WEIGHT, TENANT_LABEL = "limit", "weight", "tenant_label"


def valid_name(value: Any) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def valid_limit(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_LIMIT


def valid_weight(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and 0 < value <= MAX_WEIGHT


def apply_ops(limits: dict[str, int], weights: dict[str, float], tenant_label: str,
              ops: Any) -> tuple[str, int]:
    """Apply policy ops in place; returns the tenant label after and how many ops
    were skipped as malformed. Ops: ``["limit", key, n]`` (n None: remove the
    limit), ``["weight", tenant, w]`` (w None: back to 1), ``["tenant_label",
    label]`` ("": fair share off)."""
    skipped = 0
    for op in ops if isinstance(ops, (list, tuple)) else ():
        if not isinstance(op, (list, tuple)) or not op:
            skipped += 1
            continue
        kind, args = op[0], list(op[1:])
        if kind == LIMIT and len(args) == 2 and valid_name(args[0]):
            if args[1] is None:
                limits.pop(args[0], None)
                continue
            if valid_limit(args[1]) and (args[0] in limits or len(limits) < MAX_ENTRIES):
                limits[args[0]] = args[1]
                continue
        elif kind == WEIGHT and len(args) == 2 and valid_name(args[0]):
            if args[1] is None:
                weights.pop(args[0], None)
                continue
            if valid_weight(args[1]) and (args[0] in weights or len(weights) < MAX_ENTRIES):
                weights[args[0]] = float(args[1])
                continue
        elif kind == TENANT_LABEL and len(args) == 1 and (args[0] == "" or valid_name(args[0])):
            tenant_label = args[0]
            continue
        skipped += 1
    return tenant_label, skipped


def spec_keys(spec: Any) -> tuple[str, ...]:
    """The concurrency keys a stored spec holds (``concurrency_keys``), valid ones
    only, each once, in order."""
    raw = spec.get("concurrency_keys") if isinstance(spec, dict) else None
    if not isinstance(raw, list) or not raw:
        return ()
    return tuple(dict.fromkeys(k for k in raw if valid_name(k)))


__all__ = ["LIMIT", "MAX_ENTRIES", "MAX_LIMIT", "MAX_WEIGHT", "NAME_RE", "POLICY_PROTOCOL",
           "TENANT_LABEL", "WEIGHT", "apply_ops", "spec_keys", "valid_limit", "valid_name",
           "valid_weight"]
