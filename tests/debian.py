"""Debian packages of real data the tests and benches read (photographs, Fashion-MNIST): installed with apt-get
when missing and this process may (CI runs as root); where they cannot be had the caller skips, saying why."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def ensure_package(package: str, path: str | Path) -> bool:
    """Whether `path` exists, after ``apt-get install package`` (and one ``apt-get update`` if that fails) when it
    did not and we are root; once per process and package."""
    path = Path(path)
    if path.exists():
        return True
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return path.exists()
