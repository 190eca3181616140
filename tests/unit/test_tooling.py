"""The linters see the whole code base, and stay clean.

mypy checks the package as it installs (``taskandgo.*``, through the link tree of
tests/support/typecheck.py), so a wrong call from one module into another is reported;
ruff checks the repository with the rule set pinned in pyproject.toml. Both run at the
versions pinned in the ``dev`` extra. A finding fails the test with the finding listed.
"""

from __future__ import annotations

import ast
import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import typecheck

REPO = typecheck.REPO
#: The folders whose classes make up the node's API (tests and bench may shadow freely).
PACKAGE_DIRS = ("node", "consensus", "strategies")
#: Methods allowed a builtin's name, each with its reason.
ALLOWED_BUILTIN_NAMES = {
    # The deprecated name of Client.list_tasks (it warns), kept for one release so that
    # users' code moves over; set with setattr after the class.
    ("node/client.py", "Client", "list"),
}


def test_mypy_finds_nothing_in_the_installed_package() -> None:
    result = typecheck.run_mypy()
    assert result.returncode in (0, 1), result.output
    assert result.clean, "mypy findings (python3 tests/support/typecheck.py):\n" + \
        "\n".join(result.findings)


def test_mypy_sees_the_types_across_taskandgo_modules() -> None:
    """A call into another taskandgo module with a wrong argument is reported, so imports
    of taskandgo.* resolve to the source (they would be Any if they did not)."""
    probe = ("from taskandgo.node.decisions import plan_round\n"
             "from taskandgo.consensus.commands import from_args\n"
             "plan_round('not a view')\n"
             "from_args(42, [])\n")
    result = typecheck.run_mypy(targets=["-c", probe])
    probe_findings = [f for f in result.findings if f.startswith("<string>:")]
    assert any('"plan_round" has incompatible type "str"; expected "PlanView"' in f
               for f in probe_findings), result.output
    assert len([f for f in probe_findings if ": error:" in f]) == 2, result.output


def test_ruff_finds_nothing_in_the_repository() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                           "--output-format", "concise", str(REPO)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, "ruff findings:\n" + proc.stdout + proc.stderr


def _builtin_named_methods(path: Path, root: Path = REPO) -> list[tuple[str, str, str]]:
    """(file, class, name) for every method of a class in ``path`` named like a builtin:
    a def in the class body, a class-level alias (``list = list_tasks``), or a
    ``setattr(Class, "list", ...)`` at module level."""
    shadowing = {name for name in dir(builtins) if not name.startswith("_")}
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names = [item.name]
                elif isinstance(item, ast.Assign) and \
                        isinstance(item.value, ast.Name | ast.Attribute | ast.Lambda):
                    names = [t.id for t in item.targets if isinstance(t, ast.Name)]
                else:
                    continue
                found += [(rel, node.name, n) for n in names if n in shadowing]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "setattr" and len(node.args) == 3 \
                and isinstance(node.args[0], ast.Name) \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in shadowing:
            found.append((rel, node.args[0].id, str(node.args[1].value)))
    return found


def test_no_method_is_named_like_a_builtin() -> None:
    found = [hit for d in PACKAGE_DIRS for path in sorted((REPO / d).rglob("*.py"))
             for hit in _builtin_named_methods(path)]
    assert set(found) - ALLOWED_BUILTIN_NAMES == set(), found
    assert set(found) == ALLOWED_BUILTIN_NAMES, "an allowed name is gone: drop it from the list"


@pytest.mark.parametrize("source,expected", [
    ("class A:\n    def list(self): ...\n", [("A", "list")]),
    ("class A:\n    async def map(self): ...\n", [("A", "map")]),
    ("class A:\n    def f(self): ...\n    filter = f\n", [("A", "filter")]),
    ("class A: ...\nsetattr(A, 'open', len)\n", [("A", "open")]),
    ("class A:\n    id: str = ''\n    def __iter__(self): ...\n    def listing(self): ...\n",
     []),
])
def test_builtin_named_methods_are_found(tmp_path: Path, source: str,
                                         expected: list[tuple[str, str]]) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert [(c, n) for _, c, n in _builtin_named_methods(path, tmp_path)] == expected


def test_test_module_names_are_unique_across_folders() -> None:
    # pytest imports test modules by basename (rootdir-relative, no __init__.py in
    # most test folders): two test_x.py in different folders stop the whole run with
    # "import file mismatch" when collected together, as the default command does.
    names: dict[str, list[str]] = {}
    for p in sorted((REPO / "tests").rglob("test_*.py")):
        names.setdefault(p.name, []).append(str(p.relative_to(REPO)))
    assert {n: ps for n, ps in names.items() if len(ps) > 1} == {}
