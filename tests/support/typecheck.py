"""Run mypy on the ``taskandgo`` package as it installs, so cross-module imports resolve.

The source folders install under other names (pyproject.toml's setuptools ``package-dir``:
``node/_root`` is ``taskandgo``, ``node/`` is ``taskandgo.node``, ...), and the editable
install reaches them through an import hook that mypy cannot follow. Without help every
``taskandgo.*`` import would be unresolved, and every cross-module call unchecked.

:func:`build_tree` lays out the installed shape as a tree of symlinks to the source files
(read from pyproject.toml, so a new package or module needs no change here); :func:`run_mypy`
checks it with ``mypy -p taskandgo`` and maps every reported path back to the source file.
The tree lives in ``.mypy_cache/`` (which mypy keeps out of git) at a fixed place, so mypy's
incremental cache stays valid between runs.

Usage: ``python3 tests/support/typecheck.py`` prints the findings; exit status 0 when clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TREE = REPO / ".mypy_cache" / "taskandgo-tree"
SUFFIXES = (".py", ".pyi")


def package_dirs(repo: Path = REPO) -> dict[str, Path]:
    """Package name -> source folder, as setuptools maps them for the installed package."""
    config = tomllib.loads((repo / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools.get("package-dir", {})
    return {name: repo / mapping.get(name, name.replace(".", "/"))
            for name in setuptools["packages"]}


def build_tree(tree: Path = TREE, repo: Path = REPO) -> dict[Path, Path]:
    """Make ``tree`` hold the installed package layout as symlinks to the source files.

    Idempotent: links already right are kept (their mtimes, which mypy's cache compares,
    stay), stale ones are removed. Returns link -> source file for every module.
    """
    links: dict[Path, Path] = {}
    for package, folder in package_dirs(repo).items():
        target_dir = tree.joinpath(*package.split("."))
        for source in sorted(folder.iterdir()):
            if source.is_file() and source.name.endswith(SUFFIXES):
                links[target_dir / source.name] = source
    for link, source in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and Path(os.readlink(link)) == source:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    wanted = set(links)
    for existing in sorted(tree.rglob("*"), reverse=True):
        if existing.is_symlink() and existing not in wanted:
            existing.unlink()
    return links


@dataclass(frozen=True)
class MypyResult:
    """What one mypy run reported; ``findings`` are its error/note lines with source paths."""

    returncode: int
    findings: list[str]
    output: str

    @property
    def clean(self) -> bool:
        return self.returncode == 0


def run_mypy(extra_args: list[str] | None = None, targets: list[str] | None = None,
             tree: Path = TREE, repo: Path = REPO, timeout_s: float = 600.0) -> MypyResult:
    """Type-check ``targets`` (default: the whole package, ``-p taskandgo``; ``-c CODE``
    checks a snippet against it) through the link tree with the repo's mypy configuration.
    """
    links = build_tree(tree, repo)
    env = dict(os.environ, MYPYPATH=str(tree))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(repo / "pyproject.toml"),
           "--cache-dir", str(repo / ".mypy_cache"), "--no-color-output", "--no-error-summary",
           *(extra_args or []), *(targets or ["-p", "taskandgo"])]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    # mypy names a module by the path it found it under, the link; name the source instead.
    sources = {str(link): source for link, source in links.items()}
    findings = []
    for reported in proc.stdout.splitlines():
        path, sep, rest = reported.partition(":")
        source = sources.get(str(repo / path)) if sep else None
        line = f"{source.relative_to(repo)}:{rest}" if source is not None else reported
        if line.strip():
            findings.append(line)
    return MypyResult(proc.returncode, findings, proc.stdout + proc.stderr)


def main(argv: list[str]) -> int:
    result = run_mypy(argv)
    print("\n".join(result.findings) or "mypy: no issues in package taskandgo")
    if result.returncode not in (0, 1):
        print(result.output, file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
