from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ for `from conftest import ...`; tests/support for the shared helpers (harness,
# tasklib, netns, ...), imported by plain module name from every test directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from harness import Cluster, serve


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             **kw: object) -> Iterator[Cluster]:
    yield from serve(request, Cluster(tmp_path_factory.mktemp("cluster"), **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster3(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-voter cluster, 4 slots per node, shared by a module's tests."""
    yield from _cluster(request, tmp_path_factory, n=3)
