"""DataLoader workers die with the process that started them (a SIGKILLed trainer leaves no worker behind).

torch's own check (``ManagerWatchdog``) runs only between two fetches, so a worker inside a long or hung fetch
(a shard on a stalled filesystem, a big decode) outlives a killed parent. ``exit_with_parent`` (the
``worker_init_fn`` of ``training.data.make_loader``) closes that gap twice: on Linux the kernel sends the worker
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``; checked once after the call, for a parent that died
before it), and on every platform a daemon thread polls the parent once a second and ends the worker. (The
kernel signal follows the *thread* that started the workers: the one iterating the loader, which lives as long as
the loader is used, also in a Ray Train worker.)
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["exit_with_parent"]

PR_SET_PDEATHSIG = 1


def _parent_gone(parent_pid: int, direct: bool) -> bool:
    if direct:  # re-parented (to init or a subreaper) once the parent died
        return os.getppid() != parent_pid
    try:  # workers started through a fork server: watch the trainer's pid itself
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{parent_pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped
    except OSError:
        return False


def _watch(parent_pid: int, direct: bool, interval: float) -> None:
    while not _parent_gone(parent_pid, direct):
        time.sleep(interval)
    os._exit(1)


def exit_with_parent(parent_pid: int, worker_id: int | None = None, interval: float = 1.0) -> None:
    """Make this process exit when ``parent_pid`` (the process that built the DataLoader) dies."""
    direct = os.getppid() == parent_pid
    if direct and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog thread still covers it
    if _parent_gone(parent_pid, direct):
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid, direct, interval), name="exit-with-parent",
                     daemon=True).start()
