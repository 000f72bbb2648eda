"""Helper process of the kill -9 resume test: ``python -m tests.curation.killrun SPEC.json OUT.json``.

It imports the pipeline once, then forks one child per run, so that a run costs no interpreter start:

1. a reference child runs the whole pipeline and reports how many crash points it passed (every atomic commit
   and stage boundary, see :func:`curation.pipeline.storage.crash_point`);
2. for each of ``trials`` kill points drawn with ``seed`` from that range, a child runs the pipeline on a fresh run
   root with ``LVD_CRASH_AT`` set and SIGKILLs itself there (a real ``kill -9``: no cleanup, no finally blocks),
   then a second child resumes the same run root to the end.

The children run stages in-process (``ray.local``) and torch single-threaded, and this process never runs torch
itself, so forking is safe.  OUT.json records, per trial, the kill point, how the killed child ended and the
resume's exit code; the test compares the run roots.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import traceback
from pathlib import Path

from curation.pipeline import storage  # noqa: E402
from curation.config import load_config  # noqa: E402
from curation.pipeline.runner import run_pipeline  # noqa: E402
# Imported here, before forking, so that no child pays for them (importing starts no thread pool).
import curation.engine.knn  # noqa: E402,F401
import curation.models.embedder  # noqa: E402,F401
import curation.models.sscd  # noqa: E402,F401
import curation.stages  # noqa: E402,F401
from curation.stages.download import img2dataset_downloader  # noqa: E402
import faiss  # noqa: E402
import torch  # noqa: E402
import torch.utils.data  # noqa: E402,F401

img2dataset_downloader()  # imports img2dataset (and its albumentations) once, before forking


def _child(cfg: dict, log: Path, kill_at: int | None, count_file: Path | None) -> None:
    """Body of a forked child; never returns."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
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


def run_child(cfg: dict, log: Path, kill_at: int | None = None, count_file: Path | None = None) -> str:
    pid = os.fork()
    if pid == 0:
        _child(cfg, log, kill_at, count_file)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
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
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
