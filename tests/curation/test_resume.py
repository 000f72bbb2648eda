"""Kill the curate driver with SIGKILL mid-download, rerun: finished shards are not fetched again and the final
tables equal an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.curation.conftest import base_config

REPO = Path(__file__).resolve().parents[2]


def _tables(root: Path) -> dict:
    out = {}
    for p in sorted((root / "download").glob("*.parquet")) + [root / "stats" / "drops.parquet",
                                                              root / "stats" / "funnel.parquet"]:
        out[p.relative_to(root).as_posix()] = pq.read_table(p).to_pylist()
    return out


@pytest.mark.slow
def test_sigkill_then_resume(demo_download, tmp_path):
    corpus = demo_download["corpus"]
    root = tmp_path / "run"
    cfg = base_config(corpus, root, stages=["download"])
    cfg["ray"] = {"max_in_flight": 1}  # a real (in-process) Ray driver, one shard at a time
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(REPO / "pipelines" / "curate.py"), "--config", str(cfg_path), "--no-progress"]
    ledgers = root / "download" / "_ledger"
    n_units = len(list(yaml.safe_load(Path(demo_download["root"], "download/_inputs/plan.json").read_text())["shards"]))

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        done = [p for p in ledgers.glob("0*.parquet")] if ledgers.exists() else []
        if len(done) >= 1 or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its process group
    proc.wait()
    # A Ray worker outside the group may finish the shard it was running before it notices the driver is gone:
    # wait until the set of finished shards is stable.
    last, stable_since = None, time.time()
    while time.time() - stable_since < 5:
        now = sorted(p.name for p in ledgers.glob("0*.parquet"))
        if now != last:
            last, stable_since = now, time.time()
        time.sleep(0.25)
    finished = sorted(p.stem for p in ledgers.glob("0*.parquet"))
    assert 1 <= len(finished) < n_units, f"kill came too late or too early: {finished} of {n_units}"
    stamps = {s: os.stat(root / "download" / f"{s}.tar").st_mtime_ns for s in finished}

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{n_units} units, {len(finished)} already complete" in rerun.stdout
    for s, stamp in stamps.items():  # finished shards were not downloaded again
        assert os.stat(root / "download" / f"{s}.tar").st_mtime_ns == stamp
    assert _tables(root) == _tables(demo_download["root"])

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert f"{n_units} units, {n_units} already complete" in again.stdout
