"""Placement at submit and across releases (issue 18), on a real, unstarted node's
Submitter and the pure planner: a request no node could hold is refused naming the
largest node; a placed spec is never proposed while a voter runs an earlier release
(its leader would place it anywhere); a worker of an earlier release (no offer, no
labels) never gets a unit with a request or a required label; node flags and env."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import free_ports
from taskandgo.node import flags
from taskandgo.node.app import NodeApp
from taskandgo.node.config import ConfigError, NodeConfig, _placement, parse_voters
from taskandgo.node.placement import (
    OFFER_MEMORY_S,
    PLACEMENT_PROTOCOL,
    Offer,
    remember_offers,
    unfit_reason,
)
from taskandgo.node.replica import Unavailable
from taskandgo.node.submitting import Submitter
from taskandgo.node.tasks import InvalidTask
from taskandgo.strategies import QueuedUnit, Worker, plan
from taskandgo.strategies.placement import amounts

OFFERS = (Offer("node-0", 2, amounts({"cpu": 4, "memory": 8 << 30}), (("zone", "a"),)),
          Offer("node-1", 2, amounts({"cpu": 2, "gpu": 1}), (("zone", "b"),)))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[NodeApp]:
    """A node whose replica runs (Raft on a free loopback port; its two partners
    never answer, so nothing commits) and nothing else."""
    grpc, raft, http = free_ports(3)
    cfg = NodeConfig(node_id="n0", bind="127.0.0.1", advertise="127.0.0.1", grpc_port=grpc,
                     raft_port=raft, http_port=http, data_dir=str(tmp_path), slots=1,
                     voters=parse_voters(f"127.0.0.1:{grpc}:{raft},127.0.0.2:1:2,"
                                         "127.0.0.3:1:2"))
    a = NodeApp(cfg)
    a.replica.start()
    try:
        yield a
    finally:
        a.stop()


def _submitter(app: NodeApp) -> Submitter:
    """The node's Submitter with the cluster's offers and no leader to forward to."""
    return Submitter(app.cfg, app.replica, threading.Event(), accepting=lambda: True,
                     hold_for=lambda *_: None, forward=app.forward_client,
                     observe=lambda *_: None, guard=lambda f: f, to_leader=None,
                     offers=lambda: OFFERS)


def test_a_request_no_node_can_hold_is_refused_naming_the_largest(app: NodeApp) -> None:
    sub = _submitter(app)
    with pytest.raises(InvalidTask) as big:
        sub.submit([{"data": "sh: true", "resources": {"cpu": 8}}])
    assert big.value.field == "resources" and "largest is node-0 with cpu=4" in str(big.value)
    with pytest.raises(InvalidTask) as gpus:
        sub.submit([{"data": "x"}, {"data": "sh: true", "resources": {"gpu": 2}}])
    assert gpus.value.field == "tasks[1].resources" and "node-1" in str(gpus.value)
    with pytest.raises(InvalidTask) as zone:
        sub.submit([{"data": "sh: true", "require": ["zone=c"]}])
    assert zone.value.field == "require" and "no node has zone=c" in str(zone.value)
    with pytest.raises(InvalidTask) as both:
        # Each fits a node; together on one they do not.
        sub.submit([{"data": "sh: true", "resources": {"cpu": 3, "gpu": 1}}])
    assert "more than any node has" in str(both.value)


def test_a_placed_spec_waits_for_every_voter_to_plan_by_it(app: NodeApp) -> None:
    """Given two voters of an earlier release (RAFT_PROTOCOL 7), a spec with a request
    or labels is refused Unavailable (an earlier leader would place it anywhere); a
    plain one is not held back by that. Once they report 8 the placed one passes too
    (it then times out: nothing here commits)."""
    sub = _submitter(app)
    for v in app.cfg.voters[1:]:
        app.replica.note_voter_level(v.raft, PLACEMENT_PROTOCOL - 1)
    for spec in ({"resources": {"cpu": 1}}, {"require": ["zone=a"]}, {"prefer": ["zone=b"]}):
        with pytest.raises(Unavailable, match="earlier release"):
            sub.submit([{"data": "sh: true", **spec}], timeout_s=0.2)
    with pytest.raises(Unavailable, match="not committed in time"):
        sub.submit([{"data": "sh: true"}], timeout_s=0.2)
    for v in app.cfg.voters[1:]:
        app.replica.note_voter_level(v.raft, PLACEMENT_PROTOCOL)
    with pytest.raises(Unavailable, match="not committed in time"):
        sub.submit([{"data": "sh: true", "resources": {"cpu": 1}}], timeout_s=0.2)


def test_a_worker_of_an_earlier_release_gets_no_placed_unit() -> None:
    old = Worker("old", 4)  # its heartbeat carries no offer and no labels
    new = Worker("new", 2, amounts({"cpu": 1}), amounts({"cpu": 1}), (("zone", "a"),))
    queued = [QueuedUnit("cpu", -1, 0, "batch", request=amounts({"cpu": 1})),
              QueuedUnit("zone", -1, 0, "batch", require=("zone=a",)),
              QueuedUnit("plain", -1, 0, "batch")]
    out = {a.task_id: a.worker for a in plan(queued, [old, new])}
    assert out == {"cpu": "new", "zone": "new", "plain": "old"}
    # Alone, the old worker takes neither (they wait for a node that can), only plain work.
    assert [a.task_id for a in plan(queued, [old])] == ["plain"]


def test_node_flags_and_environment() -> None:
    p = argparse.ArgumentParser()
    flags.add_node_arguments(p)
    args = p.parse_args(["--cpu", "1500m", "--resource", "gpu=2", "--node-label", "zone=a"])
    got = _placement(args, {"TASKANDGO_MEMORY": "2Gi", "TASKANDGO_NODE_LABELS": "zone=b",
                            "TASKANDGO_RESOURCES": "fpga=1"})
    assert got == {"offer": {"gpu": 2.0, "cpu": 1.5, "memory": 2.0 * (1 << 30)},
                   "node_labels": {"zone": "a"}}
    # The chart's downward API gives an empty zone where the pod has none: no label.
    env = _placement(p.parse_args([]), {"TASKANDGO_NODE_LABELS": "node=k8s-1,zone="})
    assert env["node_labels"] == {"node": "k8s-1"} and env["offer"] == {}
    with pytest.raises(ConfigError, match="TASKANDGO_CPU"):
        _placement(p.parse_args([]), {"TASKANDGO_CPU": "many"})
    with pytest.raises(ConfigError, match="--resource"):
        _placement(p.parse_args(["--resource", "gpu"]), {})


def test_a_worker_missing_from_one_heartbeat_answer_still_counts_at_submit(
        app: NodeApp) -> None:
    # Given the leader described both workers, then only node-1 (node-0's heartbeat
    # was late on a busy machine)...
    from taskandgo.protos import peer_pb2

    def answer(*offers: Offer) -> list:
        return [peer_pb2.NodeOffer(node_id=o.node_id, slots=o.slots, resources=dict(o.resources),
                                   node_labels=dict(o.labels)) for o in offers]

    app.worker.note_offers(answer(*OFFERS))
    app.worker.note_offers(answer(OFFERS[1]))
    # ...then the submit check still knows node-0: a request only it can hold is not
    # refused (the fresh-clone run refused one naming node-1 as the largest), while
    # the live picture (pending reasons) has node-1 alone.
    assert [o.node_id for o in app.worker.cluster_offers] == ["node-1"]
    known = app.submitter._offers() if app.submitter._offers is not None else ()
    assert [o.node_id for o in known] == ["node-0", "node-1"]
    assert unfit_reason(amounts({"cpu": 4}), (), known) is None


def test_offers_are_remembered_for_a_while_then_forgotten() -> None:
    seen, known = remember_offers({}, OFFERS, now=100.0)
    seen, known = remember_offers(seen, OFFERS[1:], now=100.0 + OFFER_MEMORY_S)
    assert [o.node_id for o in known] == ["node-0", "node-1"]
    seen, known = remember_offers(seen, OFFERS[1:], now=100.1 + OFFER_MEMORY_S)
    assert [o.node_id for o in known] == ["node-1"] and set(seen) == {"node-1"}
