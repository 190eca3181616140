"""node/resources.py against fake cgroup trees: a temporary /proc/self (cgroup and
mountinfo files) whose mounts name temporary directories of cgroup files, read by
the real parser. The real kernel's cgroups are exercised in
tests/cluster/test_status.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from taskandgo.node.resources import ResourceMonitor, find_cgroup, parse_cpuset

GiB = 2**30
MiB = 2**20
HOST_CPUS = 8
HOST_MEMORY = 16 * GiB


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def write(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def proc_self(tmp: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """A fake /proc/self: ``cgroup`` as is, mountinfo from (fstype, root, mount point,
    super options)."""
    lines = [f"{30 + i} 25 0:{26 + i} {root} {point} rw,nosuid,nodev,noexec - {fs} {fs} {opts}"
             for i, (fs, root, point, opts) in enumerate(mounts)]
    lines.insert(0, "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw")
    return write(tmp / "proc" / "self", {"cgroup": cgroup, "mountinfo": "\n".join(lines) + "\n"})


def monitor(proc: Path, clock: Clock | None = None) -> ResourceMonitor:
    return ResourceMonitor(proc, min_interval_s=0.5, clock=clock or Clock(),
                           host_cpus=lambda: HOST_CPUS, host_memory_total=lambda: HOST_MEMORY)


def v2_pod(tmp: Path, *, cpu_max: str = "50000 100000", memory_max: str = str(512 * MiB),
           pod_memory_max: str = str(384 * MiB), cpuset: str = "0-3") -> Path:
    """A pod (memory limited at the pod level too) and its container on cgroup v2,
    seen without a cgroup namespace (the full path)."""
    root = tmp / "cg2"
    write(root, {"cgroup.controllers": "cpuset cpu io memory pids", "cpu.stat": "usage_usec 9\n"})
    write(root / "kubepods", {"cpu.max": "max 100000", "memory.max": "max"})
    write(root / "kubepods" / "pod1", {"cpu.max": "max 100000", "memory.max": pod_memory_max})
    write(root / "kubepods" / "pod1" / "ctr", {
        "cpu.max": cpu_max, "memory.max": memory_max,
        "cpu.stat": "usage_usec 1000000\nuser_usec 800000\nsystem_usec 200000\n",
        "memory.current": str(300 * MiB),
        "memory.stat": "anon 104857600\nfile 209715200\ninactive_file 104857600\n",
        "cpuset.cpus.effective": cpuset})
    return proc_self(tmp, "0::/kubepods/pod1/ctr\n",
                     [("cgroup2", "/", str(root), "rw,nsdelegate")])


def set_usage_usec(tmp: Path, usec: int) -> None:
    (tmp / "cg2" / "kubepods" / "pod1" / "ctr" / "cpu.stat").write_text(
        f"usage_usec {usec}\nuser_usec 0\nsystem_usec 0\n")


def test_v2_limits_are_the_tightest_of_the_container_and_its_parents(tmp_path: Path) -> None:
    r = monitor(v2_pod(tmp_path)).sample()
    assert r.source == "cgroup" and r.cgroup == "/kubepods/pod1/ctr"
    assert r.cpu_limit_cores == 0.5                      # 50000 / 100000
    assert r.memory_limit == 384 * MiB                   # the pod's, below the container's
    assert r.memory_used == 200 * MiB                    # current - inactive_file
    assert r.memory_percent == pytest.approx(100 * 200 / 384, abs=0.01)
    assert r.as_status()["resources_source"] == "cgroup"


def test_v2_cpu_percent_is_of_the_quota_over_the_interval(tmp_path: Path) -> None:
    clock = Clock()
    m = monitor(v2_pod(tmp_path), clock)
    assert m.sample().cpu_percent == 0.0                 # no interval yet
    clock.t += 1.0
    set_usage_usec(tmp_path, 1_000_000 + 250_000)         # a quarter CPU for 1 s
    assert m.sample().cpu_percent == pytest.approx(50.0)  # = half of a 0.5-CPU quota
    clock.t += 2.0
    set_usage_usec(tmp_path, 1_250_000 + 1_000_000)       # half a CPU for 2 s
    assert m.sample().cpu_percent == pytest.approx(100.0)


def test_samples_closer_than_the_interval_repeat_the_last(tmp_path: Path) -> None:
    clock = Clock()
    m = monitor(v2_pod(tmp_path), clock)
    m.sample()
    clock.t += 1.0
    set_usage_usec(tmp_path, 1_500_000)
    first = m.sample()
    clock.t += 0.1
    set_usage_usec(tmp_path, 9_000_000)
    assert m.sample() is first


def test_a_cpuset_smaller_than_the_quota_is_the_limit(tmp_path: Path) -> None:
    r = monitor(v2_pod(tmp_path, cpu_max="max 100000", cpuset="2,5")).sample()
    assert r.source == "cgroup" and r.cpu_limit_cores == 2


def test_a_cgroup_without_limits_reports_the_host(tmp_path: Path) -> None:
    r = monitor(v2_pod(tmp_path, cpu_max="max 100000", memory_max="max",
                       pod_memory_max="max")).sample()
    assert r.source == "host" and r.cgroup == ""
    assert r.cpu_limit_cores == HOST_CPUS and r.memory_limit > 0


def test_a_memory_limit_above_the_host_is_the_host(tmp_path: Path) -> None:
    r = monitor(v2_pod(tmp_path, memory_max=str(64 * GiB), pod_memory_max="max")).sample()
    assert r.source == "cgroup" and r.memory_limit == HOST_MEMORY


def test_no_cgroup_filesystem_reports_the_host(tmp_path: Path) -> None:
    assert find_cgroup(tmp_path / "nowhere") is None
    r = monitor(tmp_path / "nowhere").sample()
    assert r.source == "host" and r.memory_limit > 0 and 0 <= r.memory_percent <= 100


def test_garbage_in_cgroup_files_is_ignored_not_raised(tmp_path: Path) -> None:
    proc = v2_pod(tmp_path, cpu_max="lots", memory_max="?", pod_memory_max=str(GiB))
    (tmp_path / "cg2" / "kubepods" / "pod1" / "ctr" / "cpu.stat").write_text("usage_usec x\n")
    r = monitor(proc).sample()
    assert r.source == "cgroup" and r.memory_limit == GiB and r.cpu_limit_cores == 4


def test_v2_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    """A container with its own cgroup namespace sees its cgroup as "/" at the mount."""
    root = write(tmp_path / "ns", {"cpu.max": "150000 100000", "memory.max": str(GiB),
                                   "cpu.stat": "usage_usec 5\n", "memory.current": str(MiB),
                                   "memory.stat": "inactive_file 0\n"})
    proc = proc_self(tmp_path, "0::/\n", [("cgroup2", "/", str(root), "rw")])
    r = monitor(proc).sample()
    assert (r.source, r.cpu_limit_cores, r.memory_limit, r.memory_used) == (
        "cgroup", 1.5, GiB, MiB)


def test_v1_hierarchies(tmp_path: Path) -> None:
    """cgroup v1 as Docker without a cgroup namespace shows it: each controller mounted
    at the container's path (the mount's root), cpu and cpuacct together."""
    cpu = write(tmp_path / "cpu,cpuacct", {"cpu.cfs_quota_us": "200000",
                                           "cpu.cfs_period_us": "100000",
                                           "cpuacct.usage": "3000000000"})
    mem = write(tmp_path / "memory", {
        "memory.limit_in_bytes": str(768 * MiB), "memory.usage_in_bytes": str(500 * MiB),
        "memory.stat": "cache 100\ninactive_file 5\ntotal_inactive_file 104857600\n"})
    cpuset = write(tmp_path / "cpuset", {"cpuset.effective_cpus": "0-5"})
    path = "/docker/abc"
    proc = proc_self(tmp_path, f"12:memory:{path}\n4:cpu,cpuacct:{path}\n3:cpuset:{path}\n"
                     f"1:name=systemd:{path}\n0::/system.slice/docker.service\n", [
                         ("cgroup", path, str(cpu), "rw,cpu,cpuacct"),
                         ("cgroup", path, str(mem), "rw,memory"),
                         ("cgroup", path, str(cpuset), "rw,cpuset"),
                         ("cgroup", path, str(tmp_path / "systemd"), "rw,name=systemd")])
    clock = Clock()
    m = monitor(proc, clock)
    r = m.sample()
    assert (r.source, r.cgroup, r.cpu_limit_cores, r.memory_limit, r.memory_used) == (
        "cgroup", path, 2.0, 768 * MiB, 400 * MiB)
    clock.t += 1.0
    (cpu / "cpuacct.usage").write_text(str(3_000_000_000 + 1_000_000_000))  # 1 CPU for 1 s
    assert m.sample().cpu_percent == pytest.approx(50.0)


def test_v1_unlimited_values_mean_no_limit(tmp_path: Path) -> None:
    cpu = write(tmp_path / "cpu", {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000",
                                   "cpuacct.usage": "1"})
    mem = write(tmp_path / "memory", {"memory.limit_in_bytes": "9223372036854771712",
                                      "memory.usage_in_bytes": "1"})
    proc = proc_self(tmp_path, "4:memory:/\n2:cpu,cpuacct:/\n0::/\n", [
        ("cgroup", "/", str(cpu), "rw,cpu,cpuacct"), ("cgroup", "/", str(mem), "rw,memory")])
    assert monitor(proc).sample().source == "host"


def test_a_node_moved_to_another_cgroup_reports_the_new_one(tmp_path: Path) -> None:
    proc = v2_pod(tmp_path)
    write(tmp_path / "cg2" / "other", {"cpu.max": "200000 100000", "memory.max": str(GiB),
                                       "cpu.stat": "usage_usec 1\n"})
    clock = Clock()
    m = monitor(proc, clock)
    assert m.sample().cpu_limit_cores == 0.5
    (proc / "cgroup").write_text("0::/other\n")
    clock.t += 1.0
    r = m.sample()
    assert (r.cgroup, r.cpu_limit_cores, r.memory_limit) == ("/other", 2.0, GiB)
    assert r.cpu_percent == 0.0  # no delta across two different counters


@pytest.mark.parametrize(("text", "n"), [("0-3", 4), ("0-3,6,8-9", 7), ("5", 1), ("", 0),
                                         ("0-x", 0), (" 1 , 3 ", 2)])
def test_parse_cpuset(text: str, n: int) -> None:
    assert parse_cpuset(text) == n
