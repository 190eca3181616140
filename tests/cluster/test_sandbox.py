"""Task isolation with real node processes: the bubblewrap sandbox around subprocess
tasks, the undumpable node, the fallback when the sandbox cannot start, and the
poison rule (a task that keeps killing the node running it ends failed).

Each attack is the one a security review ran against a cluster whose tasks ran as
the node, unisolated: read the node's environment and secret files, kill another
task's process group, kill the node itself, reach the node's /tmp and data dir,
write system directories, and a task that killed node after node until the cluster
lost its majority. Needs bubblewrap (apt-get install bubblewrap); skipped without.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster, serve, wait_for
from system_deps import ensure_debian_package
from taskandgo.node.config import scrub_secret_env

_HAVE_BWRAP = ensure_debian_package("bubblewrap", lambda: shutil.which("bwrap") is not None)
pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(not _HAVE_BWRAP, reason="needs bubblewrap (apt-get install "
                                 "bubblewrap, as root)")]

#: Held in every node's environment: what an attacker wants to read.
MARKER = "sandbox-test-" + secrets.token_hex(8)
TOKEN = secrets.token_hex(16)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids_running(argv: list[str]) -> list[int]:
    """Host pids whose command line is exactly argv."""
    want = "\0".join(argv) + "\0"
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline") as f:
                    if f.read() == want:
                        out.append(int(name))
            except OSError:
                pass
    return out


def _run(c: Cluster, data: str, timeout_s: float = 60.0) -> dict:
    with c.client() as cl:
        tid = cl.submit(data, strategy="batch")
        return cl.wait(tid, timeout_s=timeout_s)[0]


@pytest.fixture(scope="module")
def secret_dir() -> Iterator[Path]:
    """A secrets directory under /etc (a directory every sandbox shows), as the
    Helm chart mounts its Secret at /etc/taskandgo/secret."""
    if not os.access("/etc", os.W_OK):
        pytest.skip("needs a writable /etc to place a secret where tasks could see it")
    d = Path("/etc") / f"taskandgo-test-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o700)
    try:
        (d / "api-token").write_text(TOKEN + "\n")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sandboxed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              secret_dir: Path) -> Iterator[Cluster]:
    """Two nodes with a token from a file under /etc and a secret in their environment;
    the sandbox on (the default)."""
    c = Cluster(tmp_path_factory.mktemp("sandboxed"), n=2,
                env={"SANDBOX_TEST_SECRET": MARKER,
                     "TASKANDGO_API_TOKEN_FILE": str(secret_dir / "api-token")},
                client_kw={"token": TOKEN})
    yield from serve(request, c)


def _node_pids(c: Cluster) -> list[int]:
    return [p.pid for p in c.procs if p is not None]


def test_the_node_says_its_tasks_are_sandboxed(sandboxed: Cluster) -> None:
    for i in range(sandboxed.n):
        assert "task sandbox: bwrap" in (sandboxed.root / f"node-{i}.log").read_text()


def test_a_task_cannot_read_the_nodes_environment_or_secret_files(
        sandboxed: Cluster, secret_dir: Path) -> None:
    pids = " ".join(map(str, _node_pids(sandboxed)))
    t = _run(sandboxed, "sh: cat /proc/$PPID/environ; "
             f"for p in {pids}; do cat /proc/$p/environ; done; "
             f"cat {secret_dir}/api-token; ls -a {secret_dir}; true")
    assert t["status"] == "succeeded", t["error"]
    assert MARKER not in t["result"], "a task read the node's environment"
    assert TOKEN not in t["result"], "a task read the node's token file"
    assert "api-token" not in t["result"], "a task listed the node's secrets directory"


#: The node and the reader run as one user with no capabilities (as any unprivileged
#: user's processes do; run as root with capabilities, the kernel's capability
#: checks would decide instead of the dumpable flag).
NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


def test_a_process_of_the_nodes_user_cannot_read_its_proc_files(tmp_path: Path) -> None:
    """Undumpable: another process of the node's user is refused
    /proc/<node>/environ and mem (a task run without the sandbox is such a process)."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    # No sandbox here: without capabilities, root's bwrap cannot start (and the
    # sandbox hides the node's /proc anyway; this is about every other process).
    c = Cluster(tmp_path, n=1, env={"SANDBOX_TEST_SECRET": MARKER, "TASKANDGO_SANDBOX": "off"})
    c.argvs[0] = NO_CAPS + c.argvs[0]
    # A dumpable process started the same way: the reader can read it (the test is live).
    control = subprocess.Popen([*NO_CAPS, "sleep", "60"], env={"PROBE": MARKER},
                               stdout=subprocess.DEVNULL)
    c.start()
    try:
        c.wait_ready()

        def read(pid: int, name: str) -> subprocess.CompletedProcess:
            return subprocess.run([*NO_CAPS, "head", "-c", "65536", f"/proc/{pid}/{name}"],
                                  capture_output=True, timeout=10, check=False)

        assert MARKER.encode() in read(control.pid, "environ").stdout
        node = c.procs[0]
        assert node is not None
        for name in ("environ", "mem"):
            res = read(node.pid, name)
            assert res.returncode != 0 and MARKER.encode() not in res.stdout, \
                f"a same-user process read /proc/<node>/{name}"
            assert b"Permission denied" in res.stderr, res.stderr
    finally:
        control.kill()
        control.wait(timeout=10)
        c.stop()


def test_a_task_cannot_kill_the_node_or_another_tasks_processes(sandboxed: Cluster) -> None:
    victim = ["sleep", f"300.{uuid.uuid4().int % 10**6:06d}"]
    with sandboxed.client() as cl:
        tid = cl.submit("sh: " + " ".join(victim), strategy="batch")
        pid = wait_for(lambda: (_pids_running(victim) or [None])[0], 30, "the victim to start")
        pgid = os.getpgid(pid)
        nodes = _node_pids(sandboxed)
        t = _run(sandboxed, f"sh: kill -9 -{pgid}; kill -9 {pid}; "
                 + "; ".join(f"kill -9 {n}" for n in nodes) + "; echo tried")
        assert t["status"] == "succeeded" and t["result"] == "tried", t
        assert all(p.poll() is None for p in sandboxed.procs if p is not None), \
            "a task killed its node"
        assert _alive(pid), "a task killed another task's process group"
        assert cl.get(tid)["status"] == "running"
        # Everything it can see, it may kill: only its own sandbox. (Never without
        # one: run as root, that would be every process on the machine.)
        assert all("task sandbox: bwrap" in _log(sandboxed, i) for i in range(sandboxed.n))
        _run(sandboxed, "sh: kill -9 -1; echo survived")
        assert all(p.poll() is None for p in sandboxed.procs if p is not None)
        assert _alive(pid)
        # Cancel still ends the whole sandbox, grandchildren included.
        cl.cancel(tid)
        wait_for(lambda: not _alive(pid), 15, "the cancelled task's process to end")
        assert cl.wait(tid, timeout_s=30)[0]["status"] == "cancelled"
    assert _run(sandboxed, "python: print(6*7)")["result"] == "42"


def test_a_task_has_a_private_tmp_and_cannot_write_system_dirs(sandboxed: Cluster) -> None:
    tag = uuid.uuid4().hex[:10]
    host_file = Path("/tmp") / f"tg-host-{tag}"
    host_file.write_text("host")
    written = [Path(d) / f"tg-task-{tag}" for d in ("/usr", "/etc", "/opt", "/bin", "/lib",
                                                    "/tmp")]
    data_dir = sandboxed.root / "node-0"
    try:
        t = _run(sandboxed, f"sh: test -e {host_file} && echo host-tmp-visible; "
                 f"ls {data_dir} >/dev/null 2>&1 && echo data-dir-visible; "
                 f"for d in /usr /etc /opt /bin /lib; do touch $d/tg-task-{tag} 2>/dev/null "
                 f"&& echo wrote-$d; done; echo scratch > /tmp/tg-task-{tag} && "
                 f"cat /tmp/tg-task-{tag}; pwd")
        assert t["status"] == "succeeded", t["error"]
        lines = t["result"].splitlines()
        assert lines == ["scratch", "/taskandgo-task"], lines
        assert not [p for p in written if p.exists()], "a task wrote outside its sandbox"
    finally:
        host_file.unlink()
        for p in written:
            if p.exists():
                p.unlink()


def test_scrub_secret_env_drops_secret_values_and_keeps_paths() -> None:
    env = {"TASKANDGO_RAFT_PASSWORD": "x", "TASKANDGO_API_TOKEN": "y",
           "TASKANDGO_API_TOKENS": "z", "TASKANDGO_TOKEN": "t", "TASKANDGO_OTHER_PASSWORD": "w",
           "TASKANDGO_API_TOKEN_FILE": "/p", "TASKANDGO_RAFT_PASSWORD_FILE": "/q", "PATH": "/bin"}
    assert scrub_secret_env(env) == sorted(["TASKANDGO_API_TOKEN", "TASKANDGO_API_TOKENS",
                                            "TASKANDGO_OTHER_PASSWORD", "TASKANDGO_RAFT_PASSWORD",
                                            "TASKANDGO_TOKEN"])
    assert env == {"TASKANDGO_API_TOKEN_FILE": "/p", "TASKANDGO_RAFT_PASSWORD_FILE": "/q",
                   "PATH": "/bin"}


# --------------------------------------------------------------------------- fallback


def _log(c: Cluster, i: int = 0) -> str:
    return (c.root / f"node-{i}.log").read_text(errors="replace")


def test_require_refuses_to_start_without_a_working_sandbox(tmp_path: Path) -> None:
    c = Cluster(tmp_path, n=1, env={"TASKANDGO_SANDBOX": "require",
                                    "TASKANDGO_BWRAP": str(tmp_path / "no-such-bwrap")})
    c.start()
    try:
        proc = c.procs[0]
        assert proc is not None
        wait_for(lambda: proc.poll() is not None, 30, "the node to refuse to start")
        assert proc.returncode == 2
        log = _log(c)
        assert "refusing to start: --sandbox require" in log and "bubblewrap not found" in log
    finally:
        c.stop()


def test_without_a_working_sandbox_auto_runs_tasks_as_before_and_says_so(tmp_path: Path) -> None:
    """bwrap that cannot start (here: a program that always fails, as bwrap does where
    user namespaces are refused): a warning with the reason, tasks still run."""
    c = Cluster(tmp_path, n=1, env={"TASKANDGO_BWRAP": shutil.which("false") or "/bin/false"})
    c.start()
    try:
        c.wait_ready()
        assert "task sandbox: none: bubblewrap could not start" in _log(c)
        t = _run(c, "sh: echo $PPID")
        assert t["status"] == "succeeded" and int(t["result"]) == c.procs[0].pid
    finally:
        c.stop()


# --------------------------------------------------------------------------- poison


def test_a_task_that_kills_its_node_fails_after_two_node_losses(tmp_path: Path) -> None:
    """With the sandbox off, a task kills the node running it. Each killed node is
    restarted at once, as Kubernetes would. The task ends failed after the second
    node loss, with the reason, and the cluster keeps its majority and serves."""
    c = Cluster(tmp_path, n=3, env={"TASKANDGO_SANDBOX": "off"})
    c.start()
    deaths: list[str] = []
    try:
        c.wait_ready()
        with c.client() as cl:
            tid = cl.submit("sh: kill -9 $PPID", strategy="batch", retries=3)

        def final() -> dict | None:
            for i, p in enumerate(c.procs):
                if p is not None and p.poll() is not None:
                    deaths.append(f"node-{i}")
                    assert len(deaths) <= 2, f"a third node was killed: {deaths}"
                    c.procs[i] = None
                    c.start(i)
            with c.client(timeout_s=3) as cl2:
                t = cl2.get(tid)
            return t if t["status"] in ("succeeded", "failed", "cancelled") else None

        task = wait_for(final, 120, "the poison task to end", every_s=0.1)
        assert task["status"] == "failed", task
        assert "died 2 times" in task["error"], task["error"]
        assert len(deaths) == 2, deaths
        c.wait_ready(60)
        assert all(p is not None and p.poll() is None for p in c.procs)
        with c.client() as cl:
            ok = cl.submit("python: print('still serving')", strategy="batch")
            assert cl.wait(ok, timeout_s=60)[0]["result"] == "still serving"
        c.check_invariants([tid, ok], allow=("succeeded", "failed"))
    except BaseException:
        print("\n===== node logs =====\n" + c.logs())
        raise
    finally:
        c.stop()


def test_the_sigterm_handback_is_not_a_node_loss(tmp_path: Path) -> None:
    """A node drained with SIGTERM hands its running task back: that does not count
    towards the poison rule, so a task survives more than two rolling restarts."""
    c = Cluster(tmp_path, n=3)
    c.start()
    try:
        c.wait_ready()
        with c.client() as cl:
            tid = cl.submit("sh: sleep 600", strategy="batch")

        def running(attempt: int) -> dict | None:
            with c.client(timeout_s=3) as cl2:
                t = cl2.get(tid)
            return t if t["status"] == "running" and t["attempts"] >= attempt \
                and t["node"] else None

        for n in range(1, 4):
            node = wait_for(lambda n=n: running(n), 60, f"attempt {n} to run")["node"]
            i = int(node.rsplit("-", 1)[1])
            proc = c.procs[i]
            assert proc is not None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            c.procs[i] = None
            c.start(i)
            c.wait_ready(60)
        t = wait_for(lambda: running(4), 60, "attempt 4 to run")
        assert "lost" not in t["error"], t
        with c.client() as cl:
            cl.cancel(tid)
            assert cl.wait(tid, timeout_s=30)[0]["status"] == "cancelled"
    except BaseException:
        print("\n===== node logs =====\n" + c.logs())
        raise
    finally:
        c.stop()


def test_a_node_in_a_virtualenv_beside_its_checkout_gets_the_sandbox() -> None:
    """A node run from a virtualenv (what the README's install in a venv gives) must
    find its interpreter inside the sandbox: the task's working directory used to be
    mounted at /work and hid every venv and checkout under /work."""
    venv = Path.cwd() / f".tg-venv-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                        "--system-site-packages", str(venv)], check=True, timeout=120)
        res = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             ("from taskandgo.node.executor import Sandbox; "
              "print(Sandbox.probe('auto').describe())")],
            capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "bwrap", res.stdout
    finally:
        shutil.rmtree(venv, ignore_errors=True)
