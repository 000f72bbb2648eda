"""Headless Chromium for page-rendering tests (no conftest needed: import and call).

:func:`chromium_binary` finds ``/usr/bin/chromium`` (or ``chromium`` / ``chromium-browser`` on PATH); when missing
it runs ``apt-get install -y chromium chromium-driver`` once per process (Debian packages) and, if that is
impossible (no root, no network, no apt), calls ``pytest.skip`` with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_INSTALL_ATTEMPT: dict[str, str | None] = {}

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--allow-file-access-from-files"]


def _find() -> str | None:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def chromium_binary() -> str:
    import pytest

    found = _find()
    if found:
        return found
    if "error" not in _INSTALL_ATTEMPT:
        err = None
        if shutil.which("apt-get") is None:
            err = "apt-get is not available"
        elif os.geteuid() != 0:
            err = "not root, cannot apt-get install chromium"
        else:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            try:
                r = subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], env=env,
                                   capture_output=True, text=True, timeout=900)
                if r.returncode != 0:
                    upd = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=300)
                    r = subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], env=env,
                                       capture_output=True, text=True, timeout=900) if upd.returncode == 0 else upd
                if r.returncode != 0:
                    err = f"apt-get install chromium failed: {(r.stderr or r.stdout)[-300:]}"
            except (OSError, subprocess.TimeoutExpired) as e:
                err = f"apt-get install chromium failed: {e}"
        _INSTALL_ATTEMPT["error"] = err
    found = _find()
    if found:
        return found
    pytest.skip(f"headless Chromium unavailable: {_INSTALL_ATTEMPT.get('error') or 'not found after install'}")


def run_chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="lvd-chromium-") as profile:
        cmd = [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(page: Path, budget_ms: int = 5000) -> str:
    r = run_chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", Path(page).resolve().as_uri()])
    if r.returncode != 0 and not r.stdout:
        raise RuntimeError(f"chromium --dump-dom failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def screenshot(page: Path, png: Path, size: str = "1200,2400", budget_ms: int = 5000) -> Path:
    r = run_chromium([f"--virtual-time-budget={budget_ms}", f"--screenshot={Path(png).resolve()}",
                      f"--window-size={size}", Path(page).resolve().as_uri()])
    if not Path(png).exists():
        raise RuntimeError(f"chromium --screenshot wrote nothing ({r.returncode}): {r.stderr[-2000:]}")
    return Path(png)
