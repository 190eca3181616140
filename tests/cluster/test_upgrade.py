"""Upgrades: data written by an earlier release restores, and journals keep their meaning.

tests/support/fixtures/snapshot-v0.1.0 is a data dir as release 0.1.0 left it (a pickled
SchedulerState snapshot plus journal entries after it). Today's node must restore it,
record an identity for it, write its next snapshot in the versioned format, and come
back from that too.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import socket
from pathlib import Path

import pytest
from harness import Cluster, wait_for
from pysyncobj import SyncObjConf
from taskandgo.consensus.commands import COMMAND_IDS
from taskandgo.consensus.raft import SafeSyncObj
from taskandgo.consensus.replicated import SNAPSHOT_FORMAT, ReplicatedState

FIXTURE = Path(__file__).resolve().parents[1] / "support" / "fixtures" / "snapshot-v0.1.0"


def test_command_ids_never_move() -> None:
    """Journals store PySyncObj's method numbers: a renamed or inserted command would
    replay every journal on disk as the wrong commands."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rs = ReplicatedState()
    so = SafeSyncObj(f"127.0.0.1:{port}", [], conf=SyncObjConf(autoTick=False), consumers=[rs])
    try:
        names = [so._idToMethod[i].__name__ for i in range(len(so._idToMethod))]
        assert tuple(n.rsplit("_v", 1)[0] for n in names) == COMMAND_IDS
    finally:
        so.destroy()


def _dump_format(path: Path) -> object:
    with gzip.open(path) as f:
        data = pickle.load(f)
    return data[0][1].get("format") if isinstance(data[0][1], dict) else None


@pytest.mark.cluster
def test_data_dir_of_release_0_1_0_restores(tmp_path: Path) -> None:
    c = Cluster(tmp_path, n=1, extra=["--snapshot-interval", "1"])
    data = tmp_path / "node-0"
    shutil.copytree(FIXTURE, data)
    assert _dump_format(data / "raft.dump") is None  # the old pickled-class format
    c.start()
    try:
        c.wait_ready()
        with c.client() as cl:
            got = {t: cl.get(t) for t in ("legacy-a", "legacy-b", "legacy-split",
                                          "legacy-d", "legacy-long")}
            assert {t: g["status"] for t, g in got.items()} == {
                "legacy-a": "succeeded", "legacy-b": "succeeded", "legacy-split": "succeeded",
                "legacy-d": "succeeded", "legacy-long": "cancelled"}
            assert got["legacy-b"]["result"] == "42"
            assert got["legacy-split"]["result"] == '["chunk 0", "chunk 1", "chunk 2"]'
            assert len(got["legacy-split"]["chunks"]) == 3
            assert [t["id"] for t in cl.list_tasks(labels=["team=x"])] == ["legacy-d"]
            new = cl.submit("sh: echo after-upgrade", strategy="batch")
            assert cl.wait(new, 30)[0]["result"] == "after-upgrade"
        assert (data / "cluster.json").exists()
        # The next snapshot is written in the versioned format...
        wait_for(lambda: _dump_format(data / "raft.dump") == SNAPSHOT_FORMAT, 30,
                 "a snapshot in the versioned format")
        c.stop()
        # ...and a restart restores from it.
        c.start()
        c.wait_ready()
        with c.client() as cl:
            assert cl.get("legacy-split")["result"] == '["chunk 0", "chunk 1", "chunk 2"]'
            assert cl.get(new)["status"] == "succeeded"
    finally:
        c.stop()
