"""Kill a run between checkpoints, resume, and get the uninterrupted run's losses step for step."""
import copy
import os
import signal
import subprocess
import sys
import time

import pytest
from lvd_train_testutils import REPO, TINY_CFG, read_metrics, shards_and_config, subprocess_env, tiny_tol

from tests.tolerance import approx

TOTAL = 12


def _cfg():
    cfg = copy.deepcopy(TINY_CFG)
    cfg["deterministic"] = True
    cfg["optim"].update({"epochs": 3, "iters_per_epoch": 4})  # 12 iterations
    cfg["checkpoint"] = {"period_iters": 2, "keep_last": 2}
    return cfg


def _cmd(cfg_path, data, out, *extra):
    return [sys.executable, str(REPO / "pipelines" / "train.py"), "--config", str(cfg_path), "--data", str(data),
            "--output", str(out), *extra]


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(out):
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(TOTAL)), [r["step"] for r in rows]
    return [(r["loss"], r["dino_loss"], r["ibot_loss"] if "ibot_loss" in r else 0.0, r["koleo_loss"]) for r in rows]


def _assert_same(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        for u, v in zip(x, y):
            assert u == approx(v, **tiny_tol(i + 1)), f"step {i}: {x} vs {y}"


@pytest.mark.slow
def test_resume_after_stop_and_after_sigkill_matches_uninterrupted(tmp_path):
    data, cfg_path = shards_and_config(tmp_path, _cfg())

    ref = tmp_path / "ref"
    _run(_cmd(cfg_path, data, ref))
    ref_losses = _losses(ref)

    # 1) stop with --max-steps, then restart: resumes from the checkpoint at iteration 6
    stop = tmp_path / "stop"
    _run(_cmd(cfg_path, data, stop, "--max-steps", "6"))
    assert len(read_metrics(stop / "metrics.jsonl")) == 6
    _run(_cmd(cfg_path, data, stop))
    _assert_same(_losses(stop), ref_losses)

    # 2) SIGKILL right after the first checkpoint was written, then restart
    kill = tmp_path / "kill"
    proc = subprocess.Popen(_cmd(cfg_path, data, kill), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=subprocess_env())
    ck = kill / "checkpoints" / "checkpoint_00000002.pt"
    deadline = time.time() + 240
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_at_kill = len(read_metrics(kill / "metrics.jsonl"))
    assert done_at_kill < TOTAL
    _run(_cmd(cfg_path, data, kill))
    _assert_same(_losses(kill), ref_losses)
    ckpts = sorted(p.name for p in (kill / "checkpoints").iterdir())
    assert ckpts == ["checkpoint_00000010.pt", "checkpoint_00000012.pt"]  # keep_last = 2, no temporary files
