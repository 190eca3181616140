"""The image, built for real and run as three StatefulSet pods (root only).

What this shows, with real tools and no container registry (see image_pods.py for
how each part is made):

1. The repository's Dockerfile builds offline with podman (runc, low ulimits,
   ``--network none``) from a debootstrapped Debian base given as ``BASE`` and a
   wheelhouse built on the host; the image runs as a non-root numeric user and
   exposes the chart's ports.
2. Three containers of it, configured as the chart's StatefulSet configures its pods
   (environment, Secret files, read-only root, per-pod data volume, non-root uid),
   in network namespaces whose hosts files give the StatefulSet DNS names, form a
   cluster with one leader; the image's HEALTHCHECK command passes.
3. A task submitted through pod 2 (``taskandgo submit --wait`` from a client
   namespace on the same bridge) runs.
4. Killing pod 0 (``podman kill``, SIGKILL) while it runs tasks loses nothing: every
   task accepted before finishes (the ones pod 0 was running, elsewhere), and a task
   submitted afterwards runs.
5. Pod 0 recreated on the same volume has its journal: cut off from the others, its
   own replica already holds every task accepted before the kill (and not the one
   submitted after); reconnected, it becomes a follower, catches up to the same
   state as the others and takes work again.
6. SIGTERM to a pod (``podman stop``) ends the node cleanly (exit 0) as PID 1.

Everything the test makes (containers, image, namespaces, veths, bridge,
/etc/netns entries, temp dir) is removed at the end, failed or not; the base image
is kept as a cache. Set ``TASKANDGO_TEST_BASE`` to use (or make) another base.

Not covered: nothing here is a Kubernetes API server or kubelet, so probes,
PodDisruptionBudget, volume claims and scheduling are stood in for (a bind mount
plays the claim, the test plays the kubelet's restarts); the container gets no
resource limits.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import image_pods as ip
import pytest
from harness import wait_for
from taskandgo.node.client import TaskAndGoError

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                       reason="root only: builds the image with podman and runs its containers "
                       "in network namespaces the test makes"),
    pytest.mark.timeout(900),
]

SLEEP_S = 8  # long enough that tasks seen running on pod 0 are still running at the kill


def _units_on(tasks: list[dict[str, Any]], node: str) -> set[str]:
    """Tasks or chunks ('id#k') running on `node`."""
    out = set()
    for t in tasks:
        if t.get("chunks"):
            for ch in t["chunks"]:
                if ch["status"] == "running" and ch["node"] == node:
                    out.add(f"{t['id']}#{ch['index']}")
        elif t["status"] == "running" and t["node"] == node:
            out.add(t["id"])
    return out


def persisted_commit(data_dir: Path) -> int:
    """The commit index a voter's journal on its volume records (PySyncObj keeps it in
    ``raft.journal.meta``, a pickled dict it replaces atomically); 0 if none yet."""
    try:
        with open(data_dir / "raft.journal.meta", "rb") as f:
            return int(pickle.load(f).get("raftCommitIndex", 0))
    except (OSError, EOFError, pickle.UnpicklingError):
        return 0


def _unit_node_attempts(task: dict[str, Any], unit: str) -> tuple[str, int, str]:
    if "#" in unit:
        idx = int(unit.split("#")[1])
        ch = next(c for c in task["chunks"] if c["index"] == idx)
        return ch["node"], ch["attempts"], ch["status"]
    return task["node"], task["attempts"], task["status"]


class Run:
    """One test run's resources; cleanup() removes every one of them."""

    def __init__(self) -> None:
        self.prefix = ""
        existing = ip.netns_list()
        while not self.prefix or any(ns.startswith(self.prefix) for ns in existing):
            self.prefix = f"tgi{os.getpid() % 10000}{secrets.token_hex(2)}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.env = ip.podman_env(self.tmp)
        self.image = f"localhost/taskandgo-test:{self.prefix}"
        self.image_built = False
        self.net: ip.PodNet | None = None
        self.pods: ip.Pods | None = None
        print(f"[image] run {self.prefix}: temp dir {self.tmp}", flush=True)

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        t = time.monotonic()

        def step(what: str) -> None:
            nonlocal t
            print(f"[image]   cleanup: {what} {time.monotonic() - t:.1f} s", flush=True)
            t = time.monotonic()

        if self.pods is not None:
            problems += self.pods.teardown()
            step("containers")
        if self.net is not None:
            problems += self.net.teardown()
            step("namespaces")
        if self.image_built or ip.image_exists(self.image, self.env):
            res = ip.run(["podman", "rmi", "--force", self.image], env=self.env, check=False,
                         timeout_s=300)
            if res.returncode != 0 or ip.image_exists(self.image, self.env):
                problems.append(f"image {self.image} not removed: {res.stderr.strip()}")
            step("image")
        try:
            ip.remove_tree(self.tmp)
        except (OSError, ip.CommandError) as exc:
            problems.append(f"temp dir {self.tmp}: {exc}")
        step("temp dir")
        return problems


def test_image_pods_form_a_cluster_and_survive_losing_a_pod() -> None:
    phases = ip.Phases()
    with phases("tools (apt-get if missing)"):
        reason = ip.ensure_tools()
    if reason:
        pytest.skip(reason)
    r = Run()
    ok = False
    try:
        _scenario(r, phases)
        ok = True
    finally:
        if not ok and r.pods is not None:
            print("\n===== pod logs =====\n" + r.pods.logs(), flush=True)
        with phases("cleanup"):
            try:
                problems = r.cleanup()
            except Exception as exc:  # noqa: BLE001 - never hide the scenario's own failure
                problems = [f"cleanup raised {type(exc).__name__}: {exc}"]
        print(phases.summary(), flush=True)
    assert not problems, f"cleanup left things behind: {problems}"
    _assert_host_untouched(r)


def _assert_host_untouched(r: Run) -> None:
    """The host's own namespace got no link, address or firewall rule of the run."""
    links = ip.run(["ip", "-o", "link", "show"]).stdout
    addrs = ip.run(["ip", "-o", "-4", "addr", "show"]).stdout
    rules = ip.run(["nft", "list", "ruleset"], check=False).stdout
    assert r.prefix not in links and "tgi_" not in rules
    if r.net is not None:
        assert f"inet {r.net.net}." not in addrs and r.net.net not in rules


def _scenario(r: Run, phases: ip.Phases) -> None:
    base = os.environ.get("TASKANDGO_TEST_BASE", ip.DEFAULT_BASE)
    with phases("render the chart's pod"):
        tmpl = ip.chart_pod_template()
    print(f"[image] pod spec from {tmpl['source']}", flush=True)
    assert tmpl["voters"] == 3, "this test plays the chart's default 3 voters"

    # ---------------------------------------------------------------- build
    ctx = r.tmp / "context"
    ip.make_context(ctx)
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # debootstrap and pip overlap
        def timed(fn: Any, *a: Any) -> tuple[Any, float]:
            s = time.monotonic()
            return fn(*a), time.monotonic() - s

        f_base = pool.submit(timed, ip.ensure_base, base, r.tmp, r.env)
        f_wheels = pool.submit(timed, ip.build_wheels, ctx)
        (py, built), base_s = f_base.result()
        wheels, wheels_s = f_wheels.result()
    phases.add(f"base {base} ({'built from scratch' if built else 'cached'})", base_s)
    phases.add(f"pip wheel ({len(wheels)} wheels, in parallel)", wheels_s)
    print(f"[image] base and wheels together: {time.monotonic() - t0:.1f} s", flush=True)
    if py != sys.version_info[:2]:
        pytest.skip(f"the base has Python {py[0]}.{py[1]} but the wheels were built with "
                    f"{sys.version_info[0]}.{sys.version_info[1]} (pip wheel builds for the host)")

    with phases("podman build (Dockerfile, --network none)"):
        r.image_built = True
        config = ip.build_image(ctx, base, r.image, r.env)
    user = config.get("User", "")
    assert user and user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, \
        f"image user {user!r}: expected a numeric non-root uid"
    exposed = set(config.get("ExposedPorts") or {})
    for name, port in tmpl["ports"].items():
        assert f"{port}/tcp" in exposed, f"chart port {name}={port} not exposed: {exposed}"
    assert config.get("Entrypoint") == ["taskandgo"], config.get("Entrypoint")

    # ---------------------------------------------------------------- pods
    with phases("namespaces, bridge, veths"):
        names = [f"{tmpl['sts']}-{i}.{tmpl['headless']}.{tmpl['namespace']}.svc.cluster.local"
                 for i in range(3)]
        r.net = net = ip.PodNet(r.prefix, 3, names)
        net.create()
    print(f"[image] pods at {net.ips} on {net.net}.0/24, client at {net.client_ip}", flush=True)
    r.pods = pods = ip.Pods(r.prefix, r.image, net, tmpl, r.tmp, r.env)
    client = ip.ClientNS(net.client_ns, pods.token)
    every = [pods.addr(i) for i in range(3)]

    def statuses(idx: list[int]) -> dict[int, dict[str, Any]]:
        """node_status of each pod in idx that answers (the others are left out)."""
        out = {}
        for i in idx:
            try:
                out[i] = client.call([pods.addr(i)], "node_status", pods.addr(i),
                                     include_digest=True, follow_leader=False, timeout_s=3)
            except TaskAndGoError as exc:
                errors[pods.pod(i)] = f"{exc.code}: {exc.message}"
        return out

    errors: dict[str, str] = {}  # the last error each pod answered, shown on failure

    def wait_pods(cond: Any, timeout_s: float, what: str) -> Any:
        try:
            return wait_for(cond, timeout_s, what, every_s=0.3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last errors: {errors}") from None

    def one_leader(idx: list[int]) -> int | None:
        """Index of the single leader every pod in idx names and hears, or None."""
        sts = statuses(idx)
        if len(sts) != len(idx) or not all(s["ready"] for s in sts.values()):
            return None
        leaders = [i for i, s in sts.items() if s["role"] == "leader"]
        if len(leaders) != 1:
            return None
        ids = {s["leader_id"] for s in sts.values()}
        if ids != {pods.pod(leaders[0])}:
            return None
        if any(sts[i]["role"] != "follower" for i in idx if i != leaders[0]):
            return None
        return leaders[0] + 1

    with phases("3 pods start and elect one leader"):
        for i in range(3):
            pods.start(i)
        leader = wait_pods(lambda: one_leader([0, 1, 2]), 90,
                           "one leader named by all 3 pods") - 1
    print(f"[image] leader: {pods.pod(leader)}", flush=True)

    with phases("pod checks (healthcheck, uid, read-only root)"):
        health = config.get("Healthcheck", {}).get("Test") or []
        assert health[:1] == ["CMD"], f"image HEALTHCHECK {health!r}"
        for i in range(3):
            res = pods.exec(i, *health[1:], check=False)
            assert res.returncode == 0, f"HEALTHCHECK in {pods.pod(i)}: {res.stderr}"
        probe = ("import os\n"
                 "root = [l.split() for l in open('/proc/self/mountinfo') if l.split()[4] == '/']\n"
                 "print(os.getuid(), os.getgid(), 'ro' in root[-1][5].split(','))")
        uid, gid, ro = pods.exec(2, "python", "-c", probe).stdout.split()
        assert (int(uid), int(gid), ro) == (pods.uid, pods.gid, "True"), (uid, gid, ro)

    with phases("a task submitted through pod 2 runs"):
        res = client.cli("submit", "--node", pods.addr(2), "--wait", "--wait-timeout", "60",
                         "--json", "--id", "img-first", "--strategy", "batch", "--",
                         "python: import socket; print(socket.gethostname())")
        assert res.returncode == 0, f"submit through pod 2: {res.stdout}{res.stderr}"
        task = json.loads(res.stdout.strip().splitlines()[-1])
        assert task["status"] == "succeeded", task
        ran_on = task["result"].strip()
        assert ran_on in {pods.pod(i) for i in range(3)} and task["node"] == ran_on, task
    print(f"[image] img-first ran in pod {ran_on}", flush=True)
    accepted = ["img-first"]

    # ---------------------------------------------------------------- kill pod 0
    with phases("pod 0 killed while running tasks: nothing lost"):
        specs: list[dict[str, Any]] = [
            {"data": f"sh: sleep {SLEEP_S}; hostname", "id": f"img-kill-{k}",
             "strategy": "batch"} for k in range(8)]
        specs.append({"data": f"sh: sleep {SLEEP_S}; hostname", "id": "img-kill-split",
                      "strategy": "split", "shards": 3})
        res = client.call([pods.addr(2)], "submit_many", specs, timeout_s=30)
        assert all(x["created"] for x in res), res
        accepted += [s["id"] for s in specs]
        # Committed by a majority now: at or below the leader's commit index, the
        # highest any pod reports.
        batch_index = max(s["commit_index"] for s in statuses([0, 1, 2]).values())
        # PySyncObj records the commit index in the journal's metadata file lazily
        # (about once a second), and a restarted member applies its journal only up
        # to it until a leader tells it more. So that pod 0's journal alone can be
        # shown to hold the batch after the restart, kill it once its volume says
        # the batch is committed -- and while it runs some of the batch.
        wait_for(lambda: persisted_commit(pods.data_dir(0)) >= batch_index, 15,
                 f"pod 0's journal to record commit index {batch_index}", every_s=0.1)
        wait_for(lambda: _units_on(client.call([pods.addr(2)], "list", timeout_s=5),
                                   pods.pod(0)),
                 30, "a task running on pod 0", every_s=0.2)
        pods.kill(0)
        # What pod 0 was running when it died: its results can no longer come.
        lost = wait_for(lambda: _units_on(client.call(
            [pods.addr(1)], "list", follow_leader=False, timeout_s=5), pods.pod(0)),
            10, "pod 1's view of what pod 0 was running")
        print(f"[image] killed {pods.pod(0)} (was {'leader' if leader == 0 else 'follower'}) "
              f"while it ran {sorted(lost)}", flush=True)

        res = client.cli("submit", "--node", pods.addr(2), "--wait", "--wait-timeout", "60",
                         "--json", "--id", "img-after-kill", "--strategy", "batch", "--",
                         "python: import socket; print(socket.gethostname())")
        assert res.returncode == 0, f"submit after the kill: {res.stdout}{res.stderr}"
        task = json.loads(res.stdout.strip().splitlines()[-1])
        assert task["status"] == "succeeded" and task["result"].strip() in (
            pods.pod(1), pods.pod(2)), task
        accepted.append("img-after-kill")

        done = client.call(every[1:], "wait", accepted, 90, timeout_s=120)
        by_id = {t["id"]: t for t in done}
        for t in done:
            assert t["status"] == "succeeded", f"{t['id']} ended {t['status']}: {t['error']}"
        for unit in lost:
            node, attempts, status = _unit_node_attempts(by_id[unit.split("#")[0]], unit)
            assert status == "succeeded" and node != pods.pod(0) and attempts >= 2, \
                f"{unit}, lost with pod 0, ended {status} on {node} after {attempts} attempt(s)"
        listed = [t["id"] for t in client.call(every[1:], "list", limit=10_000, timeout_s=10)]
        assert sorted(listed) == sorted(accepted), (sorted(listed), sorted(accepted))

    # ---------------------------------------------------------------- restart pod 0
    with phases("pod 0 recreated on its volume: journal, rejoin"):
        journal = pods.data_dir(0) / "raft.journal"
        assert journal.is_file() and journal.stat().st_size > 0, \
            f"no journal in pod 0's volume: {sorted(os.listdir(pods.data_dir(0)))}"
        before_kill = [t for t in accepted if t != "img-after-kill"]
        net.isolate(0)
        pods.remove(0)
        pods.start(0)

        def own_replica() -> set[str] | None:
            """Task ids in pod 0's own replica, asked over its loopback."""
            res = pods.exec(0, "taskandgo", "tasks", "--json", "--limit", "10000", "--node",
                            f"127.0.0.1:{tmpl['ports'].get('grpc', 7000)}", "--timeout", "3",
                            check=False)
            if res.returncode != 0:
                errors[pods.pod(0)] = res.stderr.strip()[-500:]
                return None
            ids = {t["id"] for t in json.loads(res.stdout)}
            if set(before_kill) <= ids:
                return ids
            st = pods.exec(0, "taskandgo", "status", "--json", "--node",
                           f"127.0.0.1:{tmpl['ports'].get('grpc', 7000)}", check=False)
            volume = [(p.name, p.stat().st_size) for p in pods.data_dir(0).iterdir()]
            errors[pods.pod(0)] = (f"its replica lacks {sorted(set(before_kill) - ids)}; "
                                   f"status {st.stdout.strip()}{st.stderr.strip()}; "
                                   f"volume {volume}")
            return None

        ids = wait_pods(own_replica, 60, "pod 0, cut off, to replay its journal")
        assert "img-after-kill" not in ids, "pod 0 was cut off: it cannot know the new task"
        # (exit code 1 or 2: a node cut off and not ready is what status reports)
        st = json.loads(pods.exec(0, "taskandgo", "status", "--json", "--node",
                                  f"127.0.0.1:{tmpl['ports'].get('grpc', 7000)}",
                                  check=False).stdout)
        assert st["role"] != "leader" and not st["ready"], st
        print(f"[image] pod 0 replayed {len(ids)} tasks from its journal while cut off "
              f"(role {st['role']}, applied {st.get('applied_index')})", flush=True)

        net.rejoin(0)

        def caught_up() -> int | None:
            lead = one_leader([0, 1, 2])
            if lead is None or lead - 1 == 0:
                return None
            sts = statuses([0, 1, 2])
            if len(sts) != 3 or len({s["state_digest"] for s in sts.values()}) != 1 \
                    or len({s["applied_index"] for s in sts.values()}) != 1:
                return None
            return lead

        leader = wait_pods(caught_up, 60, "pod 0 to follow the leader with the same state") - 1
        mine = client.call([pods.addr(0)], "get_many", accepted, follow_leader=False,
                           timeout_s=10)
        assert all(mine[t] is not None and mine[t]["status"] == "succeeded" for t in accepted), \
            {t: (v or {}).get("status") for t, v in mine.items()}
        res = client.cli("submit", "--node", pods.addr(0), "--wait", "--wait-timeout", "60",
                         "--json", "--id", "img-after-rejoin", "--",
                         "python: import socket; print(socket.gethostname())")
        assert res.returncode == 0, f"submit through pod 0 after rejoin: {res.stdout}{res.stderr}"
        assert json.loads(res.stdout.strip().splitlines()[-1])["status"] == "succeeded"
    print(f"[image] pod 0 rejoined as follower of {pods.pod(leader)}", flush=True)

    with phases("SIGTERM (podman stop) ends a pod cleanly"):
        code = pods.stop(2, int(tmpl["grace_period_s"]))
        assert code == 0, f"{pods.pod(2)} exited {code} on SIGTERM:\n{pods.logs()[-3000:]}"
