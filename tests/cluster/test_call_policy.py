"""The call allow-list cannot be escaped.

A node started with ``--allow call --allow-calls taskandgo.node.builtins,calltarget`` must
run only plain public functions *defined in* those modules. Every path that reaches
something else — attributes of imported modules, dunder attributes (the module's loader
reads any file, ``__builtins__`` holds ``eval``), classes, partials, lambdas, functions
imported from elsewhere or forged with the module's name, modules below or beside an
allowed one — is refused at submit (INVALID_ARGUMENT naming ``call``) and again by the
warm worker itself, which trusts no check made before it. A task that rebinds a module
attribute or a global, or swaps a function's code, does not change what the next task
runs.

``calltarget`` (written into the cluster's working directory, which is on the nodes' and
the workers' import path) is an allowed module holding every such shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Cluster
from taskandgo.node.client import TaskAndGoError

pytestmark = pytest.mark.cluster

ALLOW = ("taskandgo.node.builtins", "calltarget", "callpkg")
SECRET = "s3cret-raft-password-7f1c"

TARGET = textwrap.dedent('''
    """An allowed module with every shape a call path can reach
    (tests/cluster/test_call_policy.py)."""
    import functools
    import importlib
    import subprocess
    import sys
    from subprocess import getoutput

    GREETING = "hello"


    def echo(*args):
        return list(args)


    def greet():
        return GREETING


    def victim_rebind(*args):
        return list(args)


    def victim_code(*args):
        return list(args)


    def _shell(cmd=""):
        return subprocess.getoutput(cmd)


    class Klass:
        def __init__(self, cmd=""):
            self.out = subprocess.getoutput(cmd)


    alias = _shell
    partial_shell = functools.partial(subprocess.getoutput)
    lam = lambda cmd="": subprocess.getoutput(cmd)  # noqa: E731
    _ns = {"__name__": __name__}
    exec("def forged(cmd=''):\\n    return __import__('subprocess').getoutput(cmd)", _ns)
    forged = _ns["forged"]


    def rebind(name, module, attr):
        """Rebinds this module's `name` to `module.attr` (tampers with the namespace)."""
        setattr(sys.modules[__name__], name, getattr(importlib.import_module(module), attr))
        return name


    def set_greeting(text):
        global GREETING
        GREETING = text
        return text


    def patch_code(name):
        """Gives the function `name` the code of _shell (tampers with a function object)."""
        getattr(sys.modules[__name__], name).__code__ = _shell.__code__
        return name
''')

PKG_INIT = textwrap.dedent('''
    """An allowed package whose submodule callpkg.sub is imported only when called."""
    import sys
    import types


    def plant():
        """Puts a forged callpkg.sub into sys.modules (tampers with the import system)."""
        fake = types.ModuleType(__name__ + ".sub")
        exec("def run(*args):\\n    return __import__('subprocess').getoutput(args[0])",
             vars(fake))
        sys.modules[fake.__name__] = fake
        return fake.__name__
''')
PKG_SUB = textwrap.dedent('''
    def run(*args):
        return list(args)
''')

SHELL = "echo pwned-$((6*7))"  # "pwned-42" in a result means a shell ran it

# (call, args): each must be refused at submit and by the worker.
ATTACKS: list[tuple[str, Any]] = [
    # dotted traversal below an allowed module: imported modules and their functions
    ("taskandgo.node.builtins:time.sleep", [0]),
    ("calltarget:subprocess.getoutput", [SHELL]),
    ("calltarget:importlib.import_module", ["os"]),
    # dunder attributes: the loader reads any file, __builtins__ hands out eval
    ("taskandgo.node.builtins:__loader__", []),
    ("taskandgo.node.builtins:__loader__.get_data", ["{secret_file}"]),
    ("taskandgo.node.builtins:__loader__.get_data", ["/proc/{node_pid}/environ"]),
    ("taskandgo.node.builtins:__builtins__.get", ["eval"]),
    ("taskandgo.node.builtins:__spec__.loader.get_data", ["{secret_file}"]),
    ("taskandgo.node.builtins:echo.__globals__.__setitem__", ["echo", 1]),
    ("taskandgo.node.builtins:time.__setattr__", ["sleep", 1]),
    # names that are not functions defined in the module
    ("taskandgo.node.builtins:Any", []),
    ("taskandgo.node.builtins:time", []),
    ("taskandgo.node.builtins:missing", []),
    ("calltarget:getoutput", [SHELL]),
    ("calltarget:_shell", [SHELL]),
    ("calltarget:alias", [SHELL]),
    ("calltarget:Klass", [SHELL]),
    ("calltarget:partial_shell", [SHELL]),
    ("calltarget:lam", [SHELL]),
    ("calltarget:forged", [SHELL]),
    ("calltarget:GREETING", []),
    ("calltarget:_ns", []),
    # modules below or beside an allowed one
    ("taskandgo.node.builtins.sub:echo", [1]),
    ("taskandgo.node.builtinsX:echo", [1]),
    ("taskandgo.node:builtins", []),
    ("subprocess:getoutput", [SHELL]),
]
ATTACK_IDS = [f"{c}({json.dumps(a)[:20]})" for c, a in ATTACKS]


def _write_modules(root: Path) -> None:
    (root / "calltarget.py").write_text(TARGET)
    (root / "callpkg").mkdir()
    (root / "callpkg" / "__init__.py").write_text(PKG_INIT)
    (root / "callpkg" / "sub.py").write_text(PKG_SUB)
    (root / "secret.txt").write_text(SECRET)


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One node, one slot (so every call task runs in the same warm worker unless it is
    replaced), calls only from ALLOW, a Raft password in its environment."""
    root = tmp_path_factory.mktemp("callpolicy")
    _write_modules(root)
    c = Cluster(root, n=1, slots=1, env={"TASKANDGO_RAFT_PASSWORD": SECRET},
                extra=["--allow", "call", "--allow-calls", ",".join(ALLOW)])
    c.start()
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()
        if request.session.testsfailed:
            print("\n===== node logs =====\n" + c.logs())


def _fill(args: Any, c: Cluster) -> Any:
    proc = c.procs[0]
    assert proc is not None
    text = json.dumps(args).replace("{secret_file}", str(c.root / "secret.txt"))
    return json.loads(text.replace("{node_pid}", str(proc.pid)))


def _run(c: Cluster, call: str, args: Any = None) -> dict[str, Any]:
    """Submit one call task and wait until it is final."""
    with c.client(timeout_s=10) as cl:
        tid = cl.submit(call=call, args=args, strategy="batch")
        return cl.wait(tid, timeout_s=30)[0]


# ---------------------------------------------------------------- at submit


@pytest.mark.parametrize("call,args", ATTACKS, ids=ATTACK_IDS)
def test_submit_refuses_paths_outside_the_allow_list(node: Cluster, call: str, args: Any) -> None:
    with node.client(timeout_s=10) as cl:
        try:
            tid = cl.submit(call=call, args=_fill(args, node), strategy="batch")
        except TaskAndGoError as exc:
            assert exc.code == "INVALID_ARGUMENT", exc
            assert exc.message.startswith("call:"), exc.message
            return
        ran = cl.wait(tid, timeout_s=30)[0]
    leaked = [w for w in (SECRET, "pwned-42") if w in ran["result"]]
    pytest.fail(f"{call} was accepted; it ended {ran['status']}, leaking {leaked}, with result "
                f"{ran['result'][:200]!r} error {ran['error'][:200]!r}")


def test_http_submit_names_the_call_field(node: Cluster) -> None:
    body = json.dumps({"call": "taskandgo.node.builtins:__loader__.get_data",
                       "args": [str(node.root / "secret.txt")]}).encode()
    req = urllib.request.Request(node.http(0) + "/submit-task", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10).read()
    assert err.value.code == 400
    reply = json.loads(err.value.read())
    assert reply["field"] == "call" and SECRET not in reply["error"]


def test_allowed_functions_still_run(node: Cluster) -> None:
    assert json.loads(_run(node, "taskandgo.node.builtins:echo", [1, "a"])["result"]) == [1, "a"]
    with node.client(timeout_s=10) as cl:
        tid = cl.submit(call="taskandgo.node.builtins:square_items", items=[1, 2, 3, 4],
                        shards=2, strategy="split")
        t = cl.wait(tid, timeout_s=30)[0]
    assert t["status"] == "succeeded", t["error"]
    assert json.loads(t["result"]) == [[1, 4], [9, 16]]
    t = _run(node, "calltarget:echo", [SHELL])
    assert t["status"] == "succeeded" and json.loads(t["result"]) == [SHELL]


# ---------------------------------------------------------------- between tasks


def test_rebinding_a_module_attribute_does_not_reach_the_next_task(node: Cluster) -> None:
    # Given an allowed function that points another public name at a private shell helper
    t = _run(node, "calltarget:rebind", ["victim_rebind", "calltarget", "_shell"])
    assert t["status"] == "succeeded", t["error"]
    # When the next task calls that name, it runs the function the module defines
    t = _run(node, "calltarget:victim_rebind", [SHELL])
    assert "pwned-42" not in t["result"], "a rebinding task made the next task run a shell"
    assert t["status"] == "succeeded" and json.loads(t["result"]) == [SHELL], t


def test_rebinding_a_global_does_not_reach_the_next_task(node: Cluster) -> None:
    assert _run(node, "calltarget:set_greeting", ["pwned"])["status"] == "succeeded"
    t = _run(node, "calltarget:greet")
    assert t["status"] == "succeeded" and json.loads(t["result"]) == "hello", t


def test_swapping_a_functions_code_does_not_reach_the_next_task(node: Cluster) -> None:
    assert _run(node, "calltarget:patch_code", ["victim_code"])["status"] == "succeeded"
    t = _run(node, "calltarget:victim_code", [SHELL])
    assert "pwned-42" not in t["result"], "a task swapped the code the next task ran"
    assert t["status"] == "succeeded" and json.loads(t["result"]) == [SHELL], t


def test_a_module_planted_by_a_task_is_not_what_the_next_task_runs(node: Cluster) -> None:
    # Given a task that puts a forged submodule of an allowed package in sys.modules
    t = _run(node, "calltarget:echo", [1])  # the worker has run a call already
    t = _run(node, "callpkg:plant")
    assert t["status"] == "succeeded", t["error"]
    # When the next task calls that submodule, it runs the real one
    t = _run(node, "callpkg.sub:run", [SHELL])
    assert "pwned-42" not in t["result"], "a task planted the module the next task ran"
    assert t["status"] == "succeeded" and json.loads(t["result"]) == [SHELL], t


# ---------------------------------------------------------------- in the worker


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """calltarget importable in this process (and by workers started from tmp_path)."""
    _write_modules(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("calltarget", "callpkg", "callpkg.sub"):
        sys.modules.pop(name, None)
    yield tmp_path
    for name in ("calltarget", "callpkg", "callpkg.sub"):
        sys.modules.pop(name, None)


def _fill_local(args: Any, root: Path) -> Any:
    text = json.dumps(args).replace("{secret_file}", str(root / "secret.txt"))
    return json.loads(text.replace("{node_pid}", "self"))


@pytest.mark.parametrize("call,args", ATTACKS, ids=ATTACK_IDS)
def test_worker_resolver_refuses_on_its_own(target: Path, call: str, args: Any) -> None:
    from taskandgo.node import callworker

    runner = callworker.CallRunner(ALLOW)
    with pytest.raises(callworker.CallRefused):
        runner.resolve(call)
    reply = runner.run({"call": call, "args": _fill_local(args, target)})
    assert reply["ok"] is False and reply["error"].startswith("refused by policy: call:"), reply
    assert SECRET not in json.dumps(reply) and "pwned-42" not in json.dumps(reply)


def test_worker_resolver_pins_the_functions_it_started_with(target: Path) -> None:
    from taskandgo.node import callworker

    runner = callworker.CallRunner(ALLOW)
    original = runner.resolve("calltarget:victim_rebind")
    # A task rebinds the name: the worker notices and asks to be replaced...
    reply = runner.run({"call": "calltarget:rebind", "args": ["victim_rebind", "calltarget",
                                                               "_shell"]})
    assert reply["ok"] is True and reply.get("retire"), reply
    # ...and until it is, it still resolves the function it pinned, or refuses.
    module = sys.modules["calltarget"]
    assert module.victim_rebind is not original
    try:
        assert runner.resolve("calltarget:victim_rebind") is original
    except callworker.CallRefused:
        pass
    reply = runner.run({"call": "calltarget:victim_rebind", "args": [SHELL]})
    assert "pwned-42" not in json.dumps(reply)


def test_worker_process_refuses_a_call_forged_past_submit(target: Path) -> None:
    from taskandgo.node.executor import CallPool

    pool = CallPool(1, ALLOW)
    pool.start()
    try:
        never = threading.Event()
        for call, args in ATTACKS:
            reply = pool.call({"call": call, "args": _fill_local(args, target)}, 20.0, never)
            assert reply["ok"] is False, (call, reply)
            assert reply["error"].startswith("refused by policy: call:"), (call, reply)
            assert SECRET not in json.dumps(reply) and "pwned-42" not in json.dumps(reply)
        reply = pool.call({"call": "calltarget:echo", "args": [1]}, 20.0, never)
        assert reply["ok"] is True and json.loads(reply["result"]) == [1], reply
    finally:
        pool.close()


def test_worker_with_no_calls_allowed_runs_nothing(target: Path) -> None:
    from taskandgo.node.executor import CallPool

    pool = CallPool(1, ())
    pool.start()
    try:
        reply = pool.call({"call": "taskandgo.node.builtins:echo", "args": [1]}, 20.0,
                          threading.Event())
        assert reply["ok"] is False and "refused by policy" in reply["error"], reply
    finally:
        pool.close()


@pytest.mark.parametrize("entry", ["os:system", "_private", "pkg..mod",
                                   "taskandgo.node.builtins:echo"])
def test_an_allow_calls_entry_that_is_no_module_name_refuses_to_start(tmp_path, entry) -> None:
    """A typo in --allow-calls could never match a call: the node says so at start
    instead of silently allowing nothing the operator meant."""
    res = subprocess.run([sys.executable, "-m", "taskandgo", "node", "--allow", "call",
                          "--allow-calls", f"taskandgo.node.builtins,{entry}",
                          "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, res.stderr
    assert "--allow-calls" in res.stderr and repr(entry) in res.stderr
