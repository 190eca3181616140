"""Debian packages some tests need, installed the way a new user on a fresh machine
would (the README's test command is all CI runs): only as root, only with apt-get,
once per test run. A test that still lacks its tool skips and says why."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

_tried: set[str] = set()


def ensure_debian_package(package: str, present: Callable[[], bool]) -> bool:
    """True if ``present()``, after installing ``package`` with apt-get when it was
    not (refreshing the package lists first if the install fails: a fresh machine
    may have none)."""
    if present():
        return True
    if package in _tried or os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    _tried.add(package)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(cmd, capture_output=True, env=env, timeout=600, check=False).returncode:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600,
                       check=False)
        subprocess.run(cmd, capture_output=True, env=env, timeout=600, check=False)
    return present()
