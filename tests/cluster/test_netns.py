"""Network faults (root only): three voters, each in its own network namespace with a
StatefulSet-style DNS name, the leader partitioned into a minority with nft rules.

The majority elects a new leader and keeps scheduling (including the work that was
running on the cut-off leader); the old leader stops accepting work (its submit fails
and is never committed) and steps down; after healing, the cluster converges on one
leader, every replica holds the same state, and every acknowledged task exists once
and ended succeeded, its result committed once.

Skipped, with the reason, when not root or when ``ip``/``nft`` (or namespaces) are
missing. See ``tests/support/netns.py`` for the network and the in-namespace client agent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from harness import wait_for
from netns import Agent, NetCluster
from taskandgo.node.client import TaskAndGoError, task_spec

pytestmark = pytest.mark.cluster

NOOP = "taskandgo.node.builtins:noop"


@pytest.fixture
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetCluster]:
    reason = netns.unavailable_reason(install=True)
    if reason:
        pytest.skip(reason)
    c = NetCluster(tmp_path, n=3, lease_s=1.5)
    ok = False
    try:
        c.create_network()
        c.start()
        yield c
        rep = getattr(request.node, "rep_call", None)
        ok = rep is not None and rep.passed
    finally:
        problems = c.teardown()
        if not ok:
            print("\n===== node logs =====\n" + c.logs())
        assert not problems, f"cleanup left things behind: {problems}"


def _alive(net: NetCluster) -> None:
    dead = net.exited()
    if dead:
        raise AssertionError(f"a node process ended: {dead}")


def converged(net: NetCluster) -> tuple[int] | None:
    """(leader index,) once exactly one node is leader, every node follows it in the
    same term and is ready, and the leader hears from every node; else None."""
    _alive(net)
    sts = net.statuses()
    if any(s is None for s in sts.values()):
        return None
    leaders = [i for i, s in sts.items() if s and s["role"] == "leader"]
    if len(leaders) != 1:
        return None
    lead = leaders[0]
    term = sts[lead]["raft_term"]  # type: ignore[index]
    for s in sts.values():
        assert s is not None
        if not s["ready"] or s["leader_id"] != net.node_ids[lead] or s["raft_term"] != term:
            return None
    nodes = net.call("cluster_status", [net.addr(lead)], timeout_s=3)["nodes"]
    if sum(1 for n in nodes if n.get("ready")) < net.n:
        return None
    return (lead,)


def submit(net: NetCluster, nodes: list[int], specs: list[dict[str, Any]],
           timeout_s: float = 15.0) -> list[str]:
    res = net.call("submit_many", net.addrs(nodes), specs, timeout_s=timeout_s)
    assert [r["task_id"] for r in res] == [s["id"] for s in specs]
    return [s["id"] for s in specs]


def test_partitioned_leader_loses_to_the_majority_and_the_cluster_heals(net: NetCluster) -> None:
    t_begin = time.monotonic()
    every = list(range(net.n))
    acked: list[str] = []

    (leader,) = wait_for(lambda: converged(net), 45, "a leader known to every node", every_s=0.1)
    old_term = net.statuses([leader])[leader]["raft_term"]  # type: ignore[index]
    print(f"leader {net.node_ids[leader]} (term {old_term}) at {net.ips[leader]}, "
          f"ready {time.monotonic() - t_begin:.1f} s after start")

    # -- before the partition: quick tasks finish; long ones fill every slot, so some
    # are running on the leader when it is cut off.
    pre = submit(net, every, [task_spec(call=NOOP, id=f"pre-{k}", strategy="batch")
                              for k in range(20)])
    acked += pre
    tasks = net.call("wait", net.addrs(), pre, 30, timeout_s=40)
    assert all(t["status"] == "succeeded" for t in tasks)
    long_ids = submit(net, every, [task_spec("sh: sleep 1.5; echo long", id=f"long-{k}",
                                             strategy="batch") for k in range(12)])
    acked += long_ids

    def leader_busy() -> bool:
        _alive(net)
        st = net.statuses([leader])[leader]
        return bool(st and st["running"])

    wait_for(leader_busy, 15, "tasks running on the leader", every_s=0.05)
    (current,) = wait_for(lambda: converged(net), 15, "the leader before the cut", every_s=0.05)
    if current != leader:  # a spurious election meanwhile: cut off whoever leads now
        print(f"leadership moved to {net.node_ids[current]} before the cut")
        leader = current
    old_term = net.statuses([leader])[leader]["raft_term"]  # type: ignore[index]

    # -- partition: the leader's namespace drops everything to/from the other nodes.
    majority = [i for i in every if i != leader]
    t_cut = time.monotonic()
    net.partition(leader)
    print(f"partitioned {net.node_ids[leader]}:\n{net.rules(leader)}")
    assert net.agent is not None
    old_submit = net.agent.call_async(
        "submit_many", [net.addr(leader)], [task_spec(call=NOOP, id="old-0", strategy="batch")],
        timeout_s=4.0)

    def new_leader() -> tuple[int, int] | None:
        _alive(net)
        ls = net.leaders(majority)
        for i, st in ls.items():
            return (i, st["raft_term"])
        return None

    new, new_term = wait_for(new_leader, 15, "the majority to elect a new leader", every_s=0.02)
    t_new_leader = time.monotonic() - t_cut
    assert new != leader and new_term > old_term
    print(f"new leader {net.node_ids[new]} (term {new_term}) {t_new_leader:.2f} s after the cut")

    # The old leader stops accepting work: it steps down once it has not heard from a
    # majority for leaderFallbackTimeout (2 s) ...
    def stepped_down() -> bool:
        _alive(net)
        st = net.statuses([leader])[leader]
        return bool(st and st["role"] != "leader")

    wait_for(stepped_down, 10, "the cut-off leader to step down", every_s=0.05)
    t_stepdown = time.monotonic() - t_cut
    print(f"old leader {net.node_ids[leader]} stepped down {t_stepdown:.2f} s after the cut")

    # ... and the majority keeps scheduling: submits through majority nodes are committed.
    during: list[str] = []
    for k in range(10):
        specs = [task_spec(call=NOOP, id=f"during-{k}-{j}", strategy="batch") for j in range(3)]
        if k % 5 == 0:
            specs.append(task_spec("sh: echo $TASKANDGO_CHUNK_INDEX", id=f"during-split-{k}",
                                   strategy="split", shards=2))
        during += submit(net, majority, specs, timeout_s=15)
    acked += during

    # The submit made through the old leader right after the cut is refused within
    # the client's timeout and (checked after heal) never committed; so is one made
    # after it stepped down.
    with pytest.raises(TaskAndGoError) as refused:
        Agent.result(old_submit)
    t_refused = time.monotonic() - t_cut
    assert refused.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), refused.value
    assert t_refused < 10, t_refused
    t1 = time.monotonic()
    with pytest.raises(TaskAndGoError) as refused2:
        net.call("submit_many", [net.addr(leader)],
                 [task_spec(call=NOOP, id="old-1", strategy="batch")], timeout_s=4.0)
    t_refused2 = time.monotonic() - t1
    assert refused2.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), refused2.value
    print(f"old leader: submit at the cut refused after {t_refused:.2f} s "
          f"({refused.value.code}: {refused.value.message}); submit after stepping down "
          f"refused after {t_refused2:.2f} s ({refused2.value.code}: {refused2.value.message})")

    # Work submitted during the partition, and the long tasks (those on the cut-off
    # leader are requeued after its lease), all finish on the majority.
    tasks = net.call("wait", net.addrs(majority), during + long_ids, 40, timeout_s=50)
    bad = [(t["id"], t["status"], t["error"]) for t in tasks if t["status"] != "succeeded"]
    assert not bad, bad[:3]
    rerun = [t["id"] for t in tasks if t["id"].startswith("long-") and t["attempts"] > 1]
    print(f"during the partition: {len(during)} tasks acknowledged and finished; "
          f"{len(rerun)} long tasks rerun after the old leader's lease")

    # -- heal: the cluster converges on one leader, and the old node takes work again.
    t_heal = time.monotonic()
    net.heal(leader)
    (final_leader,) = wait_for(lambda: converged(net), 30, "the cluster to converge after heal",
                               every_s=0.1)
    t_converge = time.monotonic() - t_heal
    post = submit(net, [leader], [task_spec(call=NOOP, id=f"post-{k}", strategy="batch")
                                  for k in range(5)], timeout_s=15)
    acked += post
    # The real CLI, in the client namespace, sees the same: one leader, three nodes.
    cli_errors: list[str] = []

    def cli_status() -> list[dict[str, Any]] | None:
        res = net.cli("status", "--all", "--json", "--node", net.addr(final_leader),
                      "--timeout", "5", timeout_s=20)
        if res.returncode != 0:
            cli_errors.append(res.stderr.strip())
            return None
        return json.loads(res.stdout)

    cli_nodes = wait_for(cli_status, 30, "taskandgo status --all in the client namespace",
                         every_s=0.5)
    if cli_errors:
        print(f"taskandgo status --all failed {len(cli_errors)} time(s) first: {cli_errors}")
    assert sorted(st["id"] for st in cli_nodes) == net.node_ids, cli_nodes
    assert [st["role"] for st in cli_nodes].count("leader") == 1, cli_nodes
    assert {st["leader_id"] for st in cli_nodes} == {net.node_ids[final_leader]}, cli_nodes

    # -- invariants: none lost, none doubled, replicas agree.
    tasks = net.call("wait", net.addrs(), acked, 40, timeout_s=50)
    assert len(tasks) == len(acked)
    failed = [(t["id"], t["status"], t["error"]) for t in tasks if t["status"] != "succeeded"]
    assert not failed, failed[:3]
    listed = net.call("list", net.addrs(), limit=10**6, timeout_s=20)
    ids = [t["id"] for t in listed]
    doubled_ids = len(ids) - len(set(ids))
    lost = sorted(set(acked) - set(ids))
    assert not lost, f"acknowledged tasks lost: {lost[:5]}"
    assert doubled_ids == 0, "a task id is listed twice"
    assert not {"old-0", "old-1"} & set(ids), "a submit the old leader refused was committed"
    status = net.call("cluster_status", net.addrs(), timeout_s=10)
    units = sum(t["chunk_count"] or 1 for t in listed if t["status"] == "succeeded")
    doubled = status["committed_results"] - units  # no retries: one result per unit
    assert doubled == 0, (status["committed_results"], units)

    def agree() -> tuple[str, int] | None:
        _alive(net)
        sts = net.statuses(include_digest=True, timeout_s=5)
        if any(s is None for s in sts.values()):
            return None
        digests = {s["state_digest"] for s in sts.values()}  # type: ignore[index]
        applied = {s["applied_index"] for s in sts.values()}  # type: ignore[index]
        if len(digests) == 1 and len(applied) == 1:
            return digests.pop(), applied.pop()
        return None

    digest, applied = wait_for(agree, 30, "every replica to hold the same state", every_s=0.2)
    print(f"\nnetns figures: new leader {t_new_leader:.2f} s after the partition "
          f"({net.node_ids[leader]} -> {net.node_ids[new]}, term {old_term} -> {new_term}); "
          f"old leader refused a submit after {t_refused:.2f} s and stepped down by "
          f"{t_stepdown:.2f} s; tasks acknowledged during the partition {len(during)}; "
          f"converged {t_converge:.2f} s after heal (leader {net.node_ids[final_leader]}); "
          f"acknowledged {len(acked)}, lost {len(lost)}, doubled {doubled + doubled_ids}; "
          f"late results dropped {status['dropped_results']}; replicas agree at applied index "
          f"{applied} (digest {digest[:12]}); total {time.monotonic() - t_begin:.1f} s")
