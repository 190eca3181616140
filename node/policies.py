"""The usage policy through this node: concurrency limits (with how many units hold
each key now), fair-share weights and the tenant label, as the API reads and
changes them (gRPC GetPolicy/SetPolicy, HTTP /api/v1/policy, ``taskandgo policy``).

A change is checked here (InvalidTask naming the field), then proposed by the
leader as one ``write_usage_policy`` command (consensus/policy.py); a follower
forwards it to the leader, a non-voter to a voter. Reads come from this replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from taskandgo.consensus.policy import (
    LIMIT,
    MAX_ENTRIES,
    MAX_LIMIT,
    MAX_WEIGHT,
    TENANT_LABEL,
    WEIGHT,
    spec_keys,
    valid_limit,
    valid_name,
    valid_weight,
)
from taskandgo.consensus.state import SchedulerState
from taskandgo.node.replica import Replica
from taskandgo.node.tasks import InvalidTask

#: The fields of a change (HTTP body, and SetPolicyRequest in dict form).
CHANGE_FIELDS = ("limits", "remove_limits", "weights", "remove_weights", "tenant_label",
                 "set_tenant_label")


def _name(value: Any, field: str) -> str:
    if not valid_name(value):
        raise InvalidTask(field, f"{str(value)[:64]!r}: a name is letters, digits and . _ / - "
                          "(at most 63, starting with a letter or digit)")
    return str(value)


def check_change(raw: Any) -> list[list[Any]]:
    """A change as policy ops, or InvalidTask naming the field. ``raw``: ``limits``
    {key: n or None (remove)}, ``weights`` {tenant: w or None (back to 1)},
    ``remove_limits``/``remove_weights`` lists, ``tenant_label`` (a label key; "" or
    None turns fair share off; taken when present in an HTTP body, or with
    ``set_tenant_label`` from a SetPolicyRequest)."""
    if not isinstance(raw, Mapping):
        raise InvalidTask("policy", "expected an object")
    unknown = [k for k in raw if k not in CHANGE_FIELDS]
    if unknown:
        raise InvalidTask(str(unknown[0]), f"not a policy field (expected one of "
                          f"{', '.join(CHANGE_FIELDS[:5])})")
    ops: list[list[Any]] = []
    limits = raw.get("limits") or {}
    weights = raw.get("weights") or {}
    if not isinstance(limits, Mapping) or len(limits) > MAX_ENTRIES:
        raise InvalidTask("limits", "expected an object of key: limit")
    if not isinstance(weights, Mapping) or len(weights) > MAX_ENTRIES:
        raise InvalidTask("weights", "expected an object of tenant: weight")
    for key, value in limits.items():
        field = f"limits.{_name(key, 'limits')}"
        n = value
        if n is not None and not valid_limit(n):
            if isinstance(n, float) and n.is_integer() and valid_limit(int(n)):
                n = int(n)
            else:
                raise InvalidTask(field, f"expected a whole number 0..{MAX_LIMIT} (0 holds "
                                  "every unit with the key back), or null to remove it")
        ops.append([LIMIT, key, n])
    ops.extend([LIMIT, key, None] for key in _names(raw.get("remove_limits"), "remove_limits"))
    for tenant, w in weights.items():
        field = f"weights.{_name(tenant, 'weights')}"
        if w is not None and not valid_weight(w):
            raise InvalidTask(field, f"expected a number > 0 and <= {MAX_WEIGHT:g}, or null "
                              "for the default 1")
        ops.append([WEIGHT, tenant, None if w is None else float(w)])
    ops.extend([WEIGHT, t, None] for t in _names(raw.get("remove_weights"), "remove_weights"))
    if "tenant_label" in raw and raw.get("set_tenant_label", True):
        label = raw["tenant_label"] or ""
        if label:
            _name(label, "tenant_label")
        ops.append([TENANT_LABEL, label])
    return ops


def _names(raw: Any, field: str) -> list[str]:
    if raw in (None, [], ()):
        return []
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_ENTRIES:
        raise InvalidTask(field, "expected a list of names")
    return [_name(k, field) for k in raw]


def _change_of(ops: list[list[Any]]) -> dict[str, Any]:
    """Checked ops as a change (what a node forwards: values already in their types,
    ``2.0`` as the limit 2)."""
    out: dict[str, Any] = {"limits": {}, "weights": {}}
    for op in ops:
        if op[0] == LIMIT:
            out["limits"][op[1]] = None if op[2] is None else int(op[2])
        elif op[0] == WEIGHT:
            out["weights"][op[1]] = None if op[2] is None else float(op[2])
        else:
            out["tenant_label"] = op[1]
    return out


def policy_view(s: SchedulerState) -> dict[str, Any]:
    """The policy with how many assigned units hold each key (under the lock)."""
    out = s.policy()
    held = {k: n for k, n in s.key_held.items() if n}
    out["held"] = dict(sorted(held.items()))
    return out


def holders(s: SchedulerState, key: str, limit: int = 5) -> list[str]:
    """Up to ``limit`` task ids with a unit assigned that holds ``key`` (under the
    lock; walks the running units, bounded by the cluster's capacity)."""
    out: list[str] = []
    for tid, _chunk in s.running:
        t = s.tasks.get(tid)
        if t is not None and "concurrency_keys" in t.spec and key in spec_keys(t.spec) \
                and tid not in out:
            out.append(tid)
            if len(out) >= limit:
                break
    return out


def key_room_of(s: SchedulerState, in_flight: Iterable[Any],
                reported: Iterable[tuple[str, Iterable[Any]]],
                unit_of: Callable[[Any], Any]) -> dict[str, int] | None:
    """How many more units holding each limited concurrency key may be assigned
    (decisions.key_room; under the replica's lock): the replica's count, the units
    in flight (``task_id`` attributes), and the attempts live workers report still
    running that are no longer their own (``reported``: (node, attempt keys);
    ``unit_of`` looks a unit up as decisions.ReplicaUnit)."""
    from taskandgo.node import decisions as d

    tasks = s.tasks

    def keys(tid: str) -> tuple[str, ...]:
        t = tasks.get(tid)
        return spec_keys(t.spec) if t is not None and "concurrency_keys" in t.spec else ()

    holding = [k for p in in_flight if (k := keys(p.task_id))]
    for node, units in reported:
        holding.extend(d.stale_held_keys(node, units, s.running, unit_of, keys))
    return d.key_room(s.limits, s.key_held, holding)


class PolicyBook:
    """The usage policy through this node. ``forward()`` gives a Client to a voter
    (a non-voter's calls), ``to_leader()`` a Client to the leader (a follower's
    writes: only the leader knows every voter's release)."""

    def __init__(self, replica: Replica, *, forward: Callable[[], Any],
                 to_leader: Callable[[], Any]) -> None:
        self.replica = replica
        self._forward = forward
        self._to_leader = to_leader

    def get(self) -> dict[str, Any]:
        if self.replica.replicated is None:
            with self._forward() as c:
                return dict(c.policy())
        return dict(self.replica.read(policy_view))

    def change(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Check and apply a change (see :func:`check_change`); the policy after."""
        ops = check_change(raw)
        if not ops:
            return self.get()
        if self.replica.replicated is None or not self.replica.is_leader():
            remote = self._forward if self.replica.replicated is None else self._to_leader
            with remote() as c:
                return dict(c.set_policy(_change_of(ops)))
        self.replica.write_policy(ops)
        return self.get()


__all__ = ["CHANGE_FIELDS", "PolicyBook", "check_change", "holders", "key_room_of",
           "policy_view"]
