"""The run-root lock: one driver per run root, across the nodes of a cluster.

The driver creates ``RUN/_markers/run.lock`` with ``O_CREAT | O_EXCL`` (atomic on POSIX filesystems and on the
shared mounts a cluster's run root lives on), holding its host, pid, the process's start time (kernel clock
ticks, so a reused pid is not mistaken for the holder) and the wall-clock time it started; it removes the file when
the run ends, however it ends short of ``kill -9``.  A second driver refuses in one line naming the holder.  A lock
whose holder is gone (same host, no process with that pid and start time: a killed run) is taken over with a
message.  A lock from another host is never taken over (this host cannot see that host's processes): when that run
is gone for certain, delete the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from curation.config import ConfigError
from curation.pipeline.layout import RunLayout


def lock_path(root: Path) -> Path:
    return RunLayout(root).root / "_markers" / "run.lock"


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    now = process_start(pid)
    return start is None or now is None or now == start


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _create(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


@contextlib.contextmanager
def run_root_lock(root: Path) -> Iterator[Path]:
    """Hold the lock of run root `root` for the block; ConfigError (one line) when another run holds it."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):  # a takeover races at most with another taker: the loser sees the winner's lock
        if _create(path, me):
            break
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError):
            raise ConfigError(f"config error: run root {root} has an unreadable lock file {path} (a run was killed "
                              "while creating it?); if no other run uses this run root, delete it and rerun") from None
        if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)), holder.get("start")):
            print(f"taking over the stale lock of a run that is gone ({_describe(holder)}): {path}", flush=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        remote = "" if holder.get("host") == me["host"] else (
            "; it runs on another host: if that run is gone for certain (its node was lost), delete the lock file")
        raise ConfigError(f"config error: run root {root} is in use by another run ({_describe(holder)}; lock "
                          f"{path}): wait for it to end, or use another run_root{remote}")
    else:
        raise ConfigError(f"config error: run root {root}: could not take the lock {path}; rerun")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(path.read_text())
            if (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):
                path.unlink()
