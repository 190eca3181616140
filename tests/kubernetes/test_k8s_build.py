"""The control plane's build step without building: where Go is missing the tests
that need the plane skip saying so, and a changed Go module is built again."""

from __future__ import annotations

from pathlib import Path

import control_plane
import pytest


def test_missing_go_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no go there
    reason = control_plane.go_unavailable_reason()
    assert reason is not None and "Go is not installed" in reason


def test_binaries_are_rebuilt_when_the_module_changes(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("TASKANDGO_CONTROL_PLANE_CACHE", str(tmp_path))
    d = control_plane.bin_dir()
    d.mkdir(parents=True)
    for name in control_plane.BINARIES:
        (d / name).write_text("#!/bin/sh\n")
        (d / name).chmod(0o755)
    (d / "stamp").write_text(control_plane.module_hash() + "\n")
    assert control_plane.binaries_cached()
    (d / "stamp").write_text("0" * 16 + "\n")  # built from another go.mod
    assert not control_plane.binaries_cached()
    assert d == tmp_path / control_plane.KUBE_VERSION / "bin"
