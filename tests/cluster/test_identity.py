"""Cluster identity and fail-stop, with real node processes.

A data dir records its cluster (id agreed through the log, and the voter set it was
created with). A node whose flags disagree refuses to start; a node of another cluster
is refused by its peers; a replica that finds it diverged stops (exit 3) and refuses
to rejoin until an operator has dealt with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Cluster, wait_for

pytestmark = pytest.mark.cluster


def _cluster_ids(c: Cluster) -> set[str]:
    return {s.get("cluster_id", "") for s in c.statuses()}


def _agreed_id(c: Cluster) -> str:
    def agreed() -> str | None:
        ids = _cluster_ids(c)
        live = sum(p is not None for p in c.procs)
        sts = c.statuses()
        if len(sts) == live and len(ids) == 1 and "" not in ids:
            return ids.pop()
        return None
    return wait_for(agreed, 30, "every node to record the same cluster id")


def _leaders(c: Cluster) -> list[tuple[str, int]]:
    return [(s["id"], s["raft_term"]) for s in c.statuses() if s["role"] == "leader"]


def _run_node(argv: list[str], cwd: Path, timeout_s: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "support"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(argv, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def _without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def test_restart_without_voters_is_refused_and_never_makes_two_leaders(tmp_path: Path) -> None:
    c = Cluster(tmp_path, n=3).start()
    try:
        c.wait_ready()
        cid = _agreed_id(c)
        with c.client() as cl:
            before = [cl.submit("sh: echo one", strategy="batch") for _ in range(5)]
        data = tmp_path / "node-2"
        ident = (data / "cluster.json").read_text()
        assert cid in ident
        c.kill(2, signal.SIGTERM)
        wait_for(lambda: c.procs[2].poll() is not None, 20, "node-2 to stop")
        c.procs[2] = None
        # The forgotten --voters of the issue: a one-node cluster on a 3-node journal.
        res = _run_node(_without(c.argvs[2], "--voters"), tmp_path)
        assert res.returncode == 2, res.stderr[-2000:]
        err = res.stderr
        assert "refusing to start" in err and cid in err, err[-2000:]
        for port in c.raft_ports:  # what the data dir says: all three voters
            assert f"127.0.0.1:{port}" in err
        assert "one-node cluster" in err and "--voters" in err
        # Another voter list (a typo in one address) is refused too.
        typo = ",".join(f"127.0.0.1:{c.grpc_ports[i]}:{c.raft_ports[i] + (i == 0)}"
                        for i in range(3))
        res = _run_node(_with(c.argvs[2], "--voters", typo), tmp_path)
        assert res.returncode == 2 and "refusing to start" in res.stderr, res.stderr[-2000:]
        # Never two leaders, and the two survivors kept serving.
        assert len(_leaders(c)) == 1
        with c.client() as cl:
            after = cl.submit("sh: echo two", strategy="batch")
        # With the right flags it rejoins: one cluster, one id, every task present.
        c.start(2)
        c.wait_ready()
        assert _cluster_ids(c) == {cid}
        c.check_invariants(before + [after])
    finally:
        c.stop()


def test_node_with_another_clusters_data_dir_is_refused(tmp_path: Path) -> None:
    """Same voter addresses (a reused address, a copied data dir) but another cluster's
    journal: its peers refuse its messages; it never joins, never leads."""
    other = Cluster(tmp_path / "other", n=1).start()
    try:
        other.wait_ready()
        other_id = _agreed_id(other)
        with other.client() as cl:
            cl.submit("sh: echo other", strategy="batch")
    finally:
        other.stop()
    c = Cluster(tmp_path / "main", n=3).start()
    try:
        c.wait_ready()
        cid = _agreed_id(c)
        assert cid != other_id
        c.kill(2, signal.SIGTERM)
        wait_for(lambda: c.procs[2].poll() is not None, 20, "node-2 to stop")
        c.procs[2] = None
        node2 = tmp_path / "main" / "node-2"
        ident = (node2 / "cluster.json").read_text().replace(cid, other_id)
        shutil.rmtree(node2)
        shutil.copytree(tmp_path / "other" / "node-0", node2)
        (node2 / "cluster.json").write_text(ident)  # the voters match; the id does not
        c.start(2)

        def refused() -> bool:
            sts = {s["id"]: s for s in c.statuses()}
            main_side = any(f"127.0.0.1:{c.raft_ports[2]}" in " ".join(s.get("foreign_peers", []))
                            for k, s in sts.items() if k != "node-2")
            its_side = "node-2" in sts and sts["node-2"].get("foreign_peers") \
                and not sts["node-2"]["ready"]
            return bool(main_side and its_side)
        wait_for(refused, 30, "both sides to refuse each other's Raft messages")
        assert [lid for lid, _ in _leaders(c)] != ["node-2"] and len(_leaders(c)) == 1
        with c.client(0) as cl:
            t = cl.submit("sh: echo still-serving", strategy="batch")
            assert cl.wait(t, 30)[0]["status"] == "succeeded"
        assert "belongs to cluster" in (tmp_path / "main" / "node-0.log").read_text() \
            or "belongs to cluster" in (tmp_path / "main" / "node-1.log").read_text()
    finally:
        c.stop()


LEGACY = Path(__file__).resolve().parents[1] / "support" / "fixtures" / "snapshot-v0.1.0"


@pytest.mark.parametrize("forked_by", ["new-release", "release-0.1.0"])
def test_replica_that_diverged_stops_and_refuses_to_rejoin(tmp_path: Path,
                                                          forked_by: str) -> None:
    """A replica whose applied log differs from the cluster's (what a node that led a
    one-node cluster of its own did before identities) stops with exit code 3 and a
    reason in its log and data dir, instead of serving on diverged. The forked journal
    comes from a one-node cluster of this release (it names its own cluster id) or of
    release 0.1.0 (no id at all: only the log and state audit can tell)."""
    forked = tmp_path / "fork" / "node-0"
    if forked_by == "new-release":
        fork = Cluster(tmp_path / "fork", n=1).start()
        try:
            fork.wait_ready()
            with fork.client() as cl:
                ids = [cl.submit("sh: echo forked", strategy="batch") for _ in range(20)]
                cl.wait(ids, 30)
        finally:
            fork.stop()
    else:
        shutil.copytree(LEGACY, forked)
    c = Cluster(tmp_path / "main", n=3).start()
    try:
        leader = c.wait_ready()
        _agreed_id(c)
        with c.client() as cl:
            accepted = [cl.submit("sh: echo main", strategy="batch") for _ in range(5)]
        # A second term, so the forked journal (all term 1) can never win an election.
        c.kill(leader)
        c.start(leader)
        leader = c.wait_ready()
        victim = (leader + 1) % 3
        c.kill(victim, signal.SIGTERM)
        wait_for(lambda: c.procs[victim].poll() is not None, 20, "victim to stop")
        c.procs[victim] = None
        data = tmp_path / "main" / f"node-{victim}"
        for f in data.glob("raft.*"):
            f.unlink()
        for f in forked.glob("raft.*"):
            shutil.copy(f, data / f.name)
        c.start(victim)
        proc = c.procs[victim]
        wait_for(lambda: proc.poll() is not None, 60, "the diverged replica to stop itself")
        assert proc.returncode == 3
        c.procs[victim] = None
        log = (tmp_path / "main" / f"node-{victim}.log").read_text()
        assert "diverged" in log
        assert (data / "DIVERGED").exists()
        # The others never served a different state, and keep serving.
        with c.client(leader) as cl:
            t = cl.submit("sh: echo after", strategy="batch")
            assert cl.wait(t, 30)[0]["status"] == "succeeded"
        c.check_invariants(accepted + [t])
        # A restart refuses to rejoin with the diverged data, and says what to do.
        res = _run_node(c.argvs[victim], tmp_path / "main")
        assert res.returncode == 2
        assert "diverged" in res.stderr and "empty --data-dir" in res.stderr
    finally:
        c.stop()


def test_status_shows_identity_and_durability(cluster3: Cluster) -> None:
    cid = _agreed_id(cluster3)
    with cluster3.client() as cl:
        st = cl.node_status(cluster3.addr(0))
    assert st["cluster_id"] == cid and st["fsync"] == "always" and not st.get("fatal")
    res = _run_node([sys.executable, "-m", "taskandgo", "status", "--node", cluster3.addr(0)],
                    cluster3.root)
    assert res.returncode == 0 and cid in res.stdout and "fsync always" in res.stdout
