"""Helper process of the kill -9 resume test: ``python -m tests.curation.killrun SPEC.json OUT.json``.

It imports the pipeline once, then forks one child per run, so that a run costs no interpreter start:

1. a reference child runs the whole pipeline and reports how many crash points it passed (every atomic commit
   and stage boundary, see :func:`curation.pipeline.storage.crash_point`);
2. for each of ``trials`` kill points drawn with ``seed`` from that range, a child runs the pipeline on a fresh run
   root with ``LVD_CRASH_AT`` set and SIGKILLs itself there (a real ``kill -9``: no cleanup, no finally blocks),
   then a second child resumes the same run root to the end.

3. for each stage of ``stage_kills`` (the stages that start worker processes: sscd and embed, whose units decode
   in DataLoader workers; no other stage starts a process), a child runs the pipeline with those workers on
   (``stage_kill_workers`` each) on a fresh run root and holds the workers of that stage's first unit in place
   (as a read from a stalled filesystem would); once one announces itself, this process, watching the child's
   descendants in /proc, SIGKILLs the child and records which processes it started outlive it (this process is
   their subreaper, so none escapes to init), then a second child resumes the run root to the end (Linux only).

The children run stages in-process (``ray.local``) and torch single-threaded, and this process never runs torch
itself, so forking is safe.  OUT.json records, per trial, the kill point, how the killed child ended and the
resume's exit code; the test compares the run roots.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

from curation.pipeline import storage  # noqa: E402
from curation.cluster.local_cluster import descendants  # noqa: E402
from curation.config import load_config  # noqa: E402
from curation.pipeline.runner import run_pipeline  # noqa: E402
# Imported here, before forking, so that no child pays for them (importing starts no thread pool).
import curation.engine.knn  # noqa: E402,F401
import curation.models.embedder  # noqa: E402,F401
import curation.models.sscd  # noqa: E402,F401
import curation.models.describe  # noqa: E402
import curation.pipeline.runner  # noqa: E402
import curation.stages  # noqa: E402,F401
from curation.stages.download import img2dataset_downloader  # noqa: E402
import faiss  # noqa: E402
import torch  # noqa: E402
import torch.utils.data  # noqa: E402,F401

img2dataset_downloader()  # imports img2dataset (and its albumentations) once, before forking


#: how long a guard waits for a child to reach the expected point, or for processes to go: against a hang only
HANG_S = 600


def _hold_decode_workers(stage_name: str, announce: Path) -> None:
    """In a child: the DataLoader workers of `stage_name` (and only those) announce themselves in `announce` (one
    file per worker, named by pid) and then stall, so the kill lands while they exist."""
    current = {"stage": None}
    run_stage, stream_iter = curation.pipeline.runner.run_stage, curation.models.describe.ImageStream.__iter__

    def tracking_run_stage(stage, *args, **kwargs):
        current["stage"] = stage.name  # forked workers inherit it
        return run_stage(stage, *args, **kwargs)

    def held_iter(self):
        if current["stage"] == stage_name and torch.utils.data.get_worker_info() is not None:
            (announce / str(os.getpid())).touch()
            time.sleep(HANG_S)  # stalled until the driver's death ends this process
        return stream_iter(self)

    curation.pipeline.runner.run_stage = tracking_run_stage
    curation.models.describe.ImageStream.__iter__ = held_iter


def _child(cfg: dict, log: Path, kill_at: int | None, count_file: Path | None, hold: tuple | None = None) -> None:
    """Body of a forked child; never returns."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if hold is not None:
            _hold_decode_workers(*hold)
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        storage._crash_count = 0
        if kill_at is not None:
            os.environ[storage.CRASH_ENV] = str(kill_at)
        else:
            os.environ.pop(storage.CRASH_ENV, None)
        for name, summary in run_pipeline(load_config(data=cfg), progress=False).items():
            print(f"  {name}: {summary['seconds']} s", flush=True)
        if count_file is not None:
            count_file.write_text(str(storage._crash_count))
        code = 0 if kill_at is None else 3  # 3: the kill point was never reached
    except BaseException:  # noqa: BLE001 - reported in the log, the exit code says it failed
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def run_child(cfg: dict, log: Path, kill_at: int | None = None, count_file: Path | None = None) -> str:
    pid = os.fork()
    if pid == 0:
        _child(cfg, log, kill_at, count_file)
    _, status = os.waitpid(pid, 0)
    return _ended(status)


def kill_in_stage(cfg: dict, log: Path, stage_name: str, announce: Path) -> dict:
    """Run a child until the decode workers of `stage_name` exist, SIGKILL it, and report which of its
    descendants (seen just before the kill) are still alive once the kernel has had time to end them."""
    announce.mkdir(parents=True)
    pid = os.fork()
    if pid == 0:
        _child(cfg, log, None, None, hold=(stage_name, announce))
    out = {"held": [], "descendants": [], "left": []}
    deadline = time.monotonic() + HANG_S
    while not any(announce.iterdir()) and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:  # ended before the stage's workers existed
            out["killed"] = _ended(status)
            return out
        time.sleep(0.05)
    out["held"] = sorted(int(p.name) for p in announce.iterdir())
    out["descendants"] = descendants(pid)
    os.kill(pid, signal.SIGKILL)
    out["killed"] = _ended(os.waitpid(pid, 0)[1])
    # This process is a subreaper (main): whatever the child started, also in the moment before the kill, is
    # re-parented here when the child dies, so every process still below this one is an orphan of the child.
    deadline = time.monotonic() + 60  # the kernel ends them at once; this only bounds a hang
    while _reap_orphans() and time.monotonic() < deadline:
        time.sleep(0.05)
    out["left"] = _reap_orphans()
    for p in out["left"]:  # an orphan is reported, not left running
        os.kill(p, signal.SIGKILL)
    return out


def _reap_orphans() -> list[int]:
    """Collect the exit status of orphans that ended; return those still alive below this process."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return descendants(os.getpid())


PR_SET_CHILD_SUBREAPER = 36  # Linux prctl: orphans below this process are re-parented to it, not to init


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("stage_kills"):
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    work = Path(spec["work"])
    cfg = spec["config"]
    count_file = work / "crash_points.txt"
    ref = run_child({**cfg, "run_root": str(work / "reference")}, work / "reference.log", count_file=count_file)
    result = {"reference": ref, "trials": []}
    if ref == "exit 0":
        total = int(count_file.read_text())
        result["crash_points"] = total
        points = sorted(random.Random(spec["seed"]).sample(range(1, total + 1), min(spec["trials"], total)))
        for i, k in enumerate(points):
            trial_cfg = {**cfg, "run_root": str(work / f"trial{i:02d}")}
            log = work / f"trial{i:02d}.log"
            killed = run_child(trial_cfg, log, kill_at=k)
            resumed = run_child(trial_cfg, log)
            result["trials"].append({"root": trial_cfg["run_root"], "kill_at": k, "killed": killed,
                                     "resumed": resumed, "log": str(log)})
        result["stage_kills"] = []
        workers = spec.get("stage_kill_workers", 2)
        for name in spec.get("stage_kills", []):
            trial_cfg = {**cfg, "run_root": str(work / f"kill-in-{name}"),
                         **{s: {**cfg[s], "num_workers": workers} for s in ("sscd", "embed")}}
            log = work / f"kill-in-{name}.log"
            trial = kill_in_stage(trial_cfg, log, name, work / f"held-{name}")
            trial.update(stage=name, root=trial_cfg["run_root"], log=str(log), resumed=run_child(trial_cfg, log))
            result["stage_kills"].append(trial)
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
