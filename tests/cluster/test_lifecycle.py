"""Starting and stopping: SIGTERM ends every node cleanly, `taskandgo local` starts
a working cluster and stops every node it started, bad settings are refused."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Cluster, wait_for
from taskandgo import Client

pytestmark = pytest.mark.cluster


def test_sigterm_stops_every_node_cleanly(tmp_path: Path) -> None:
    c = Cluster(tmp_path, n=3).start()
    try:
        c.wait_ready()
        procs = [p for p in c.procs if p is not None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(timeout=15) == 0
        for i in range(3):
            assert "stopped" in (tmp_path / f"node-{i}.log").read_text()
    finally:
        c.stop()


def _free_base() -> int:
    for _ in range(200):
        base = random.randrange(20000, 40000)
        ports = [base + off + i for off in (0, 100, 1000) for i in range(3)]
        try:
            socks = []
            for port in ports:
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            for s in socks:
                s.close()
            return base
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def test_local_starts_a_cluster_and_stops_every_node(tmp_path: Path) -> None:
    base = _free_base()
    local = subprocess.Popen(
        [sys.executable, "-m", "taskandgo", "local", "--nodes", "3", "--base-port", str(base),
         "--data-dir", str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        with Client([f"127.0.0.1:{base + i}" for i in range(3)], timeout_s=10) as c:
            wait_for(lambda: [s["role"] for s in c.status_all()].count("leader") == 1
                     and len(c.status_all()) == 3, 30, "a 3-node cluster with a leader")
            tid = c.submit("python: print(6*7)", strategy="batch")
            assert c.wait(tid, timeout_s=30)[0]["result"] == "42"
            ids = [json.loads(subprocess.run(
                [sys.executable, "-m", "taskandgo", "status", "--json", "--node",
                 f"127.0.0.1:{base + i}"], capture_output=True, text=True, timeout=30,
                check=False).stdout)["id"]
                for i in range(3)]
            assert ids == ["node-0", "node-1", "node-2"]
        local.send_signal(signal.SIGTERM)
        out, _ = local.communicate(timeout=30)
        assert local.returncode == 0, out
        for port in (base, base + 100 + 1, base + 1000 + 2):
            assert f"127.0.0.1:{port}" in out
        assert "stopped." in out
        node_lines = subprocess.run(["pgrep", "-f", f"--grpc-port {base}"], capture_output=True,
                                    text=True, check=False).stdout.split()
        assert not node_lines, "a node outlived taskandgo local"
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()


@pytest.mark.parametrize("env,flag,message", [
    ({}, ["--bind", "0.0.0.0"], "TASKANDGO_RAFT_PASSWORD"),
    ({"SCHEDULER_STRATEGY": "fastest"}, [], "SCHEDULER_STRATEGY"),
    ({}, ["--voters", "nohost"], "--voters"),
])
def test_bad_settings_are_refused_with_the_setting_named(env: dict, flag: list, message: str,
                                                         tmp_path: Path) -> None:
    import os

    res = subprocess.run([sys.executable, "-m", "taskandgo", "node", "--data-dir",
                          str(tmp_path), *flag], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, check=False)
    assert res.returncode == 2 and message in res.stderr, res.stderr
