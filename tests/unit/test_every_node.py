"""A task with nothing to cut runs once; running on every node is asked for
(node/vocabulary.py TaskSpec.check, the stored form and the API views)."""

from __future__ import annotations

import pytest
from taskandgo.node.tasks import InvalidTask
from taskandgo.node.vocabulary import TaskSpec, every_node, spec_to_api
from taskandgo.protos import taskandgo_pb2 as pb


@pytest.mark.parametrize("raw", [{"data": "x"}, {"data": "x", "strategy": "split"},
                                 {"call": "m:f"}, {"argv": ["true"], "strategy": ""}])
def test_nothing_to_cut_is_stored_as_one_unit(raw: dict) -> None:
    spec = TaskSpec.check(raw, "split")
    assert spec.strategy == "batch" and not spec.on_every_node
    assert not every_node(spec.to_stored()) and "on_every_node" not in spec.to_api()


def test_on_every_node_is_a_split_task_with_nothing_to_cut() -> None:
    for default in ("split", "batch", ""):
        spec = TaskSpec.check({"data": "x", "on_every_node": True}, default)
        stored = spec.to_stored()
        assert stored["strategy"] == "split" and "shards" not in stored
        assert every_node(stored) and spec.to_api()["on_every_node"] is True
        assert TaskSpec.from_stored(stored) == spec
        assert TaskSpec.from_proto(spec.to_proto(), default) == spec
        assert TaskSpec.from_json(spec.to_json(), default) == spec


def test_a_task_stored_by_an_earlier_release_shows_how_it_runs() -> None:
    """A split task with nothing to cut, stored before this release, was (and still
    is) cut into one chunk per live node: its view says so."""
    old = {"id": "t", "priority": 10, "data": "x", "strategy": "split"}
    assert spec_to_api(old)["on_every_node"] is True
    assert TaskSpec.from_stored(old).on_every_node


@pytest.mark.parametrize("raw", [
    {"data": "x", "on_every_node": True, "shards": 2},
    {"data": "x", "on_every_node": True, "items": [1, 2]},
    {"data": "x", "on_every_node": True, "strategy": "batch"},
    {"data": "x", "on_every_node": "yes"},
])
def test_on_every_node_refuses_what_contradicts_it(raw: dict) -> None:
    with pytest.raises(InvalidTask) as err:
        TaskSpec.check(raw, "split")
    assert err.value.field == "on_every_node"


def test_the_protobuf_field_carries_it() -> None:
    msg = pb.TaskSpec(data="x", on_every_node=True)
    assert TaskSpec.from_proto(msg, "batch").on_every_node
