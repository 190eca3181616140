"""What ``taskandgo status`` tells, through the CLI a user and a probe run, against
real node processes killed by pid: exit codes, the leader survivors name, and the
CPU and memory of the node's own cgroup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Cluster, wait_for
from taskandgo import Client
from taskandgo.node.client import TaskAndGoError, task_spec

pytestmark = pytest.mark.cluster

LEASE_S = 1.5
#: The longest a survivor may name a dead leader: an election timeout (0.6 s at
#: most by default) plus a lease, doubled for a loaded machine.
STALE_LEADER_S = 2 * (0.6 + LEASE_S)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three voters and one worker (node-3)."""
    c = Cluster(tmp_path, n=4, voters=3, extra=["--lease", str(LEASE_S)])
    c.start()
    try:
        c.wait_ready()
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def status_cli(c: Cluster, *args: str, nodes: list[int] | None = None
               ) -> subprocess.CompletedProcess[str]:
    live = [i for i in range(c.n) if c.procs[i] is not None] if nodes is None else nodes
    return subprocess.run([sys.executable, "-m", "taskandgo", "status", *args, "--node",
                           ",".join(c.addr(i) for i in live), "--timeout", "3"],
                          capture_output=True, text=True, timeout=60, check=False)


def own_status(c: Cluster, i: int) -> dict[str, Any]:
    with Client([c.addr(i)], timeout_s=2) as client:
        return client.node_status(c.addr(i))


def summary_of(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith('{"summary"')]
    assert lines, res.stderr
    return json.loads(lines[-1])["summary"]


def test_status_all_exits_non_zero_once_a_node_is_unreachable(cluster: Cluster) -> None:
    # Given every node up: exit 0, the JSON is the list of the nodes' statuses.
    res = status_cli(cluster, "--all", "--json")
    assert res.returncode == 0, res.stderr
    nodes = json.loads(res.stdout)
    assert isinstance(nodes, list) and sorted(n["id"] for n in nodes) == [
        f"node-{i}" for i in range(4)]
    assert summary_of(res)["exit_code"] == 0 and summary_of(res)["ready"] == 4
    text = status_cli(cluster, "--all")
    assert text.returncode == 0 and "4/4 nodes ready" in text.stdout, text.stdout
    # When a follower is killed (by pid):
    leader = cluster.leader_index()
    assert leader is not None
    victim = next(i for i in range(3) if i != leader)
    cluster.kill(victim)

    # Then status --all says so, and exits 1 (the leader still answers).
    def degraded() -> subprocess.CompletedProcess[str] | None:
        r = status_cli(cluster, "--all", "--json")
        return r if r.returncode == 1 else None

    res = wait_for(degraded, 30, "status --all to exit 1", every_s=0.5)
    by_id = {n["id"]: n for n in json.loads(res.stdout)}
    assert by_id[f"node-{victim}"]["role"] == "unreachable"
    s = summary_of(res)
    assert s["unreachable"] == [f"node-{victim}"] and s["leader"] == f"node-{leader}"
    text = status_cli(cluster, "--all")
    assert text.returncode == 1 and f"unreachable: node-{victim}" in text.stdout, text.stdout
    # A single live node's status is still fine.
    assert status_cli(cluster, nodes=[leader]).returncode == 0


def test_survivors_stop_naming_a_dead_leader(cluster: Cluster) -> None:
    first = cluster.leader_index()
    assert first is not None
    # When the leader is killed, a majority survives: each survivor names the new
    # leader (or none while electing), never the dead one for long.
    cluster.kill(first)
    killed_at = time.monotonic()
    survivors = [i for i in range(4) if i != first]

    def nobody_names(dead: str) -> bool:
        return all(own_status(cluster, i)["leader_id"] != dead for i in survivors)

    wait_for(lambda: nobody_names(f"node-{first}"), STALE_LEADER_S,
             f"survivors to stop naming dead leader node-{first}")
    print(f"dead leader forgotten after {time.monotonic() - killed_at:.2f} s")
    second = cluster.wait_ready()
    assert second != first
    # When the new leader is killed too, one voter and the worker are left: no
    # majority, no election. Neither may go on naming a dead leader, nor say ready.
    cluster.kill(second)
    killed_at = time.monotonic()
    survivors = [i for i in survivors if i != second]
    wait_for(lambda: all(not own_status(cluster, i)["leader_id"] for i in survivors),
             STALE_LEADER_S, f"the survivors {survivors} to name no leader")
    print(f"no leader named {time.monotonic() - killed_at:.2f} s after the kill")
    assert not any(own_status(cluster, i)["ready"] for i in survivors)
    # status on each survivor, and status --all, exit 2: no leader.
    for i in survivors:
        res = status_cli(cluster, "--json", nodes=[i])
        assert res.returncode == 2, (i, res.stdout, res.stderr)
        assert json.loads(res.stdout)["id"] == f"node-{i}"
    res = status_cli(cluster, "--all")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "leader none" in res.stdout, res.stdout
    # Nothing reachable at all: exit 2 as well.
    for i in survivors:
        cluster.kill(i)
    res = status_cli(cluster, "--all", nodes=[0, 1])
    assert res.returncode == 2, res.stderr


# ---------------------------------------------------------------------- real cgroups

CGROUP_FS = Path("/sys/fs/cgroup")
QUOTA_US, PERIOD_US = 50_000, 100_000     # half a CPU
MEMORY_LIMIT = 512 * 2**20


def _own_cgroups() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


class RealCgroup:
    """A child cgroup with a CPU quota and a memory limit, on cgroup v2 when
    /sys/fs/cgroup is v2, else on v1's cpu, cpuacct and memory hierarchies. Every
    directory it creates is removed in :meth:`remove` (once its processes ended)."""

    def __init__(self, name: str) -> None:
        self.dirs: list[Path] = []
        own = _own_cgroups()
        if (CGROUP_FS / "cgroup.controllers").exists():
            parent = CGROUP_FS / own.get("", "/").lstrip("/")
            controllers = (parent / "cgroup.subtree_control").read_text().split()
            if not {"cpu", "memory"} <= set(controllers):
                # Enabling controllers for children needs an empty parent (no
                # internal processes): not something a test should rearrange.
                raise PermissionError(f"cpu and memory not enabled below {parent}")
            d = parent / name
            d.mkdir()
            self.dirs = [d]
            (d / "cpu.max").write_text(f"{QUOTA_US} {PERIOD_US}")
            (d / "memory.max").write_text(str(MEMORY_LIMIT))
            return
        if not (CGROUP_FS / "cpu" / "cpu.cfs_quota_us").exists() or "memory" not in own:
            raise PermissionError("neither cgroup v2 nor v1 cpu + memory at /sys/fs/cgroup")
        try:
            for ctrl in ("cpu", "cpuacct", "memory"):
                base = CGROUP_FS / ctrl
                if not base.is_dir() or ctrl not in own:
                    raise PermissionError(f"no v1 {ctrl} hierarchy")
                # cpu and cpuacct: the same child path, so usage and quota match.
                parent = base / (own[ctrl].lstrip("/") if ctrl == "memory" else "")
                d = parent / name
                d.mkdir()
                self.dirs.append(d)
            cpu_dir, _, mem_dir = self.dirs
            (cpu_dir / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (cpu_dir / "cpu.cfs_quota_us").write_text(str(QUOTA_US))
            (mem_dir / "memory.limit_in_bytes").write_text(str(MEMORY_LIMIT))
        except BaseException:
            self.remove()
            raise

    def add(self, pid: int) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for d in reversed(self.dirs):
            deadline = time.monotonic() + 10
            while d.exists():
                try:
                    d.rmdir()
                except OSError:  # busy while its last processes exit
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)  # bounded: retried until the deadline
        self.dirs = []


@pytest.fixture
def cgroup() -> Iterator[RealCgroup]:
    try:
        cg = RealCgroup(f"taskandgo-test-{os.getpid()}")
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup with cpu and memory limits here: {exc}")
    try:
        yield cg
    finally:
        cg.remove()


def test_status_reports_the_node_cgroup_limits(tmp_path: Path, cgroup: RealCgroup) -> None:
    c = Cluster(tmp_path, n=1)
    c.start()
    try:
        c.wait_ready()
        proc = c.procs[0]
        assert proc is not None
        before = own_status(c, 0)
        # When the node process is moved into a cgroup limited to half a CPU and
        # 512 MiB:
        cgroup.add(proc.pid)

        def limited() -> dict[str, Any] | None:
            st = own_status(c, 0)
            return st if st.get("resources_source") == "cgroup" else None

        st = wait_for(limited, 15, "status to report the node's cgroup")
        # Then status reports that cgroup's limits, not the host's.
        assert st["cpu_limit_cores"] == pytest.approx(QUOTA_US / PERIOD_US)
        assert st["memory_limit"] == MEMORY_LIMIT
        assert 0 <= st["memory_used"] <= MEMORY_LIMIT
        assert st["memory_percent"] == pytest.approx(100 * st["memory_used"] / MEMORY_LIMIT,
                                                     abs=0.1)
        assert st["cgroup"].endswith(f"taskandgo-test-{os.getpid()}")
        print("before:", {k: before.get(k) for k in ("resources_source", "cpu_limit_cores",
                                                      "memory_limit")}, "after:", st)
        res = status_cli(c)
        assert res.returncode == 0, res.stderr
        assert "of 0.5 CPUs" in res.stdout and "of 512.0 MiB" in res.stdout, res.stdout
        assert "[cgroup]" in res.stdout
        # And a task burning CPU inside it shows as a share of the half CPU.
        with Client([c.addr(0)], timeout_s=10) as client:
            client.submit_many([task_spec(id="burn", strategy="batch", argv=[
                sys.executable, "-c",
                "import time\nt = time.time()\nwhile time.time() - t < 8: pass"])])
            wait_for(lambda: own_status(c, 0)["cpu_percent"] >= 60, 8,
                     "the busy task to show as most of the node's half CPU")
    except TaskAndGoError:
        print(c.logs())
        raise
    finally:
        c.stop()
