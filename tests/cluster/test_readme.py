"""The README's examples, run as written against `taskandgo local` (its first command),
so they stay true: every command of "Using it", the seed's curl and the Python snippet.

Only the ports change (the README's base port 7000 becomes a free one) and ``ID``
becomes the id the README's own ``--id`` example submitted. ``taskandgo watch``, which
follows events until stopped, is given ``--max-events``."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_for

pytestmark = pytest.mark.cluster

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(lang: str, after: str) -> list[str]:
    """The fenced ``lang`` blocks of the README section whose heading is ``after``."""
    text = README.read_text()
    section = text[text.index(after):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _free_base() -> int:
    """A base port B with B..B+2, B+100..B+102 and B+1000..B+1002 free (local's layout)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 1003 > 65535:
            continue
        try:
            socks = []
            for p in [base + k for k in (0, 1, 2, 100, 101, 102, 1000, 1001, 1002)]:
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
        return base
    raise RuntimeError("no free port layout for taskandgo local")


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """`taskandgo local --nodes 3` as the README starts it (its first command, with a
    free base port), stopped with Ctrl-C (SIGINT) as the README says."""
    cwd = tmp_path_factory.mktemp("readme")
    base = _free_base()
    log = open(cwd / "local.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "taskandgo", "local", "--nodes", "3",
                             "--base-port", str(base)], cwd=cwd, stdout=log, stderr=log)
    try:
        def ready() -> bool:
            st = subprocess.run([sys.executable, "-m", "taskandgo", "status", "--all",
                                 "--node", f"127.0.0.1:{base}"], capture_output=True,
                                check=False, timeout=30)
            return st.returncode == 0
        wait_for(ready, 60, "taskandgo local's three nodes to be ready")
        yield base, cwd
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ported(text: str, base: int) -> str:
    for old, new in (("127.0.0.1:7000", base), ("127.0.0.1:7001", base + 1),
                     ("127.0.0.1:8001", base + 1001)):
        text = text.replace(old, f"127.0.0.1:{new}")
    return text


def test_every_command_of_using_it_works_as_written(local: tuple[int, Path]) -> None:
    base, cwd = local
    env = dict(os.environ, TASKANDGO_NODE=f"127.0.0.1:{base}")
    lines = _blocks("sh", "## Using it")[0].splitlines()  # the block of commands
    commands = [ln.split("  #")[0].strip() for ln in lines
                if ln.strip().startswith("taskandgo ")]
    assert len(commands) >= 12, commands
    task_id = ""
    for line in commands:
        cmd = _ported(line, base)
        if "--id nightly" in cmd:
            cmd = cmd.replace("taskandgo submit", "taskandgo submit --json", 1)
        if " ID" in cmd:
            assert task_id, f"{line}: no task id yet"
            cmd = cmd.replace(" ID", f" {task_id}")
        argv = [sys.executable, "-m", "taskandgo", *shlex.split(cmd)[1:]]
        if cmd.startswith("taskandgo watch"):
            # It follows events until stopped: it must show those of a task submitted
            # while it runs (and end after them here).
            with subprocess.Popen([*argv, "--max-events", "2"], stdout=subprocess.PIPE,
                                  text=True, cwd=cwd, env=env) as watch:
                assert watch.stdout is not None
                first = ""
                for _ in range(100):  # bounded: until it has attached (it prints nothing
                    sub = subprocess.run(  # before an event), one submit per round
                        [sys.executable, "-m", "taskandgo", "submit", "--wait", "--",
                         "echo", "watched"], env=env, capture_output=True, text=True,
                        timeout=60, check=False)
                    assert sub.returncode == 0, sub
                    try:
                        watch.wait(timeout=1)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                first = watch.stdout.read()
                assert watch.returncode == 0 and first.strip(), (line, first)
            continue
        res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env,
                             timeout=120, check=False)
        if line.startswith("taskandgo cancel"):
            # The backup script does not exist here: its task has failed by now, and
            # cancelling a finished task says so (exit 1) without changing it.
            assert res.returncode in (0, 1) and "Traceback" not in res.stderr, (line, res)
            continue
        if line.startswith("taskandgo output"):
            assert res.returncode == 0 or "not kept" in res.stderr or res.stderr, (line, res)
            continue
        assert res.returncode == 0, (line, res.stdout[-500:], res.stderr[-500:])
        if "--id nightly" in cmd:
            task_id = json.loads(res.stdout)["task_id"]
            wait_for(lambda tid=task_id: json.loads(subprocess.run(
                [sys.executable, "-m", "taskandgo", "get", "--json", tid], env=env,
                capture_output=True, text=True, check=False, timeout=30).stdout or "{}"
            ).get("status") in ("succeeded", "failed"), 60, "the backup task to end")
        if "print(6*7)" in line:
            assert "42" in res.stdout, res.stdout
        if "--shards 6" in line:
            assert json.loads(res.stdout.strip().splitlines()[-1]) == [
                f"chunk {i} of 6" for i in range(6)], res.stdout


def test_the_seed_curl_and_the_python_snippet(local: tuple[int, Path]) -> None:
    base, cwd = local
    curl = [ln for block in _blocks("sh", "Every query command takes") for ln in block.splitlines()
            if ln.startswith("curl ")]
    assert len(curl) == 2, curl
    res = subprocess.run(shlex.split(_ported(curl[0], base)), capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0 and json.loads(res.stdout)["task_id"] == "123", res
    def task() -> dict:
        out = subprocess.run(shlex.split(_ported(curl[1], base)), capture_output=True,
                             text=True, timeout=60, check=False)
        return json.loads(out.stdout or "{}")

    wait_for(lambda: task().get("status") == "succeeded", 60, "the seed's task to succeed")
    assert task()["result"] == "task details"
    snippet = _blocks("python", "From Python")[0]
    res = subprocess.run([sys.executable, "-c", _ported(snippet, base)], capture_output=True,
                         text=True, timeout=120, check=False, cwd=cwd)
    assert res.returncode == 0 and res.stdout.strip() == "42", res
