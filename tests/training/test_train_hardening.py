"""Trainer hardening: bad shards, restarts after a kill before
the first checkpoint, DataLoader workers of a killed trainer, diverging runs, one-line errors, architecture
overrides, training curves."""
import copy
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from lvd_train_testutils import REPO, TINY_CFG, random_image, read_metrics, subprocess_env, write_shards, write_yaml

from training.config import load_config
from training.export import main as export_main
from training.cli import main as train_main
from training.train import build_models


def _cfg(**over) -> dict:
    cfg = copy.deepcopy(TINY_CFG)
    for key, value in over.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def _train(tmp_path: Path, data, out: Path, *args: str, cfg: dict | None = None) -> int:
    cfg_path = write_yaml(tmp_path / "cfg.yaml", cfg or _cfg())
    return train_main(["--config", str(cfg_path), "--data", str(data), "--output", str(out), *args])


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_garbage_and_truncated_shards_are_skipped_and_counted(tmp_path):
    data = tmp_path / "shards"
    good, garbage, cut = write_shards(data, n_shards=3, per_shard=6)
    garbage.write_bytes(os.urandom(3000))  # tarfile.ReadError: invalid header
    raw = cut.read_bytes()
    with tarfile.open(cut) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".jpg")]
    # cut inside the 4th image: 3 complete samples stay, the 4th is lost (the rest have no header left)
    cut.write_bytes(raw[: members[3].offset_data + members[3].size // 2])
    out = tmp_path / "out"
    assert _train(tmp_path, data, out, "--max-steps", "2") == 0
    row = [r for r in (json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines())
           if r["type"] == "data"]
    assert len(row) == 1
    row = row[0]
    assert (row["units"], row["readable_units"], row["bad_units"], row["truncated_units"]) == (3, 2, 1, 1)
    assert row["samples"] == 6 + 3 and row["lost_samples"] == 1
    assert list(row["bad_unit_reasons"]) == [str(garbage)] and "ReadError" in row["bad_unit_reasons"][str(garbage)]
    train_rows = read_metrics(out / "metrics.jsonl")
    assert len(train_rows) == 2 and all(r["undecodable_samples"] == 0 for r in train_rows)


def test_large_datasets_walk_a_sample_of_shards_but_still_find_damaged_ones(tmp_path):
    from training.shard_check import check_sources

    data = tmp_path / "shards"
    shards = write_shards(data, n_shards=6, per_shard=5)
    shards[3].write_bytes(os.urandom(1500))
    with tarfile.open(shards[4]) as tf:
        second = [m for m in tf.getmembers() if m.name.endswith(".jpg")][1]
    shards[4].write_bytes(shards[4].read_bytes()[: second.offset_data + 100])  # 1 sample left, 1 cut, 3 gone
    full = check_sources(str(data))
    assert (full.samples, full.samples_estimated, full.lost_samples) == (4 * 5 + 1, False, 1)
    quick = check_sources(str(data), full_scan_shards=2)  # walks shards 0, 3 (+ 4: its size is not whole blocks)
    assert list(quick.bad_units) == [str(shards[3])] and quick.truncated_units == [str(shards[4])]
    assert quick.samples_estimated and quick.samples == 5 + 1 + 3 * 5  # 3 unwalked shards estimated at 5 each
    assert quick.readable == full.readable


def test_no_readable_shard_fails_with_one_line(tmp_path, capsys):
    data = tmp_path / "shards"
    for p in write_shards(data, n_shards=2, per_shard=2):
        p.write_bytes(os.urandom(2048))
    assert _train(tmp_path, data, tmp_path / "out", "--max-steps", "1") == 2
    line = _one_line(capsys.readouterr().err)
    assert "no readable sample in 2 shard(s)" in line and str(data) in line


def test_restart_after_kill_before_first_checkpoint_writes_metrics_once(tmp_path):
    data = tmp_path / "shards"
    write_shards(data, n_shards=2, per_shard=8)
    out = tmp_path / "out"
    cfg = _cfg(checkpoint__period_iters=10)  # the first checkpoint is the one at the end (iteration 3)
    assert _train(tmp_path, data, out, "--max-steps", "3", cfg=cfg) == 0
    # the state a kill inside the first checkpoint save leaves: rows 1-3 written, only a partial temporary file
    ck_dir = out / "checkpoints"
    final = ck_dir / "checkpoint_00000003.pt"
    tmp = ck_dir / "checkpoint_00000003.pt.tmp4242"
    tmp.write_bytes(final.read_bytes()[:5000])
    final.unlink()
    assert _train(tmp_path, data, out, "--max-steps", "3", cfg=cfg) == 0
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in ck_dir.iterdir()) == ["checkpoint_00000003.pt"]
    # a resume at a checkpoint keeps the rows up to it, once (and one data row per start)
    assert _train(tmp_path, data, out, "--max-steps", "4", cfg=cfg) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["iteration"] for r in rows if r["type"] == "data"] == [0, 3]


_HUNG_LOADER = r"""
import os, sys, time
from torch.utils.data import IterableDataset
from training.data import make_loader

class Hung(IterableDataset):  # a fetch that never returns (a stalled filesystem): torch's watchdog never runs
    def __iter__(self):
        open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
        while True:
            time.sleep(0.05)
        yield 0

next(iter(make_loader(Hung(), num_workers=2)))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_parent_and_wait_for_workers(proc: subprocess.Popen, worker_pids: list[int], bound_s: float = 60.0):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + bound_s
    try:
        while any(_alive(p) for p in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in worker_pids if _alive(p)], "DataLoader workers outlived their killed parent"
    finally:
        for p in worker_pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_loader_workers_in_a_hung_fetch_die_with_a_killed_parent(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _HUNG_LOADER, str(pids)], env=subprocess_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(pids.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == 2 and proc.poll() is None, "the loader did not start its 2 workers"
    _kill_parent_and_wait_for_workers(proc, workers)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_trainer_leaves_no_dataloader_worker(tmp_path):
    data = tmp_path / "shards"
    write_shards(data, n_shards=2, per_shard=8)
    cfg = _cfg(data__num_workers=2, optim__epochs=100)
    cfg_path = write_yaml(tmp_path / "cfg.yaml", cfg)
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "train.py"), "--config", str(cfg_path),
                             "--data", str(data), "--output", str(tmp_path / "out")], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and len(read_metrics(metrics) if metrics.exists()
                                                                        else []) < 2:
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, "the trainer did not start its DataLoader workers"
    _kill_parent_and_wait_for_workers(proc, workers)


def test_exploding_lr_stops_before_saving_exploded_weights(tmp_path, capsys):
    data = tmp_path / "shards"
    write_shards(data, n_shards=1, per_shard=8)
    out = tmp_path / "out"
    cfg = _cfg(checkpoint__period_iters=1)
    # iteration 1 runs at lr 0 (warm-up starts at 0) and is saved; iteration 2's step explodes the weights
    assert _train(tmp_path, data, out, "--max-steps", "3", "optim.base_lr=1e30", cfg=cfg) == 3
    line = _one_line(capsys.readouterr().err)
    assert "training diverged at iteration 2: the student weight norm" in line and "optim.max_weight_norm" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_00000001.pt"]
    # what was saved resumes: the same run at a sane lr continues from iteration 1, norms far below the bounds
    assert _train(tmp_path, data, out, "--max-steps", "3", cfg=cfg) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3] and all(0 < r["weight_norm"] < 1e3 for r in rows)
    # a checkpoint of exploded weights written without the guard (as before it existed) is named on resume
    old = tmp_path / "old"
    off = ("optim.max_weight_norm=0", "optim.max_grad_norm=0")
    assert _train(tmp_path, data, old, "--max-steps", "3", "optim.base_lr=1e30", *off, cfg=cfg) == 3
    capsys.readouterr()
    assert (old / "checkpoints" / "checkpoint_00000002.pt").exists()
    assert _train(tmp_path, data, old, "--max-steps", "3", cfg=cfg) == 3
    line = _one_line(capsys.readouterr().err)
    assert "checkpoint_00000002.pt holds diverged weights" in line and "optim.max_weight_norm" in line


def test_exploding_gradient_bound_is_configurable(tmp_path, capsys):
    data = tmp_path / "shards"
    write_shards(data, n_shards=1, per_shard=8)
    # a bound below any real gradient norm: the first step stops before the optimizer step and any save
    assert _train(tmp_path, data, tmp_path / "out", "--max-steps", "2", "optim.max_grad_norm=1e-12") == 3
    line = _one_line(capsys.readouterr().err)
    assert "gradient norm" in line and "optim.max_grad_norm=1e-12" in line
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_missing_data_and_export_paths_fail_with_one_line(tmp_path, capsys):
    assert _train(tmp_path, tmp_path / "nope", tmp_path / "out") == 2
    assert str(tmp_path / "nope") in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    assert export_main([str(tmp_path / "nope"), "-o", str(tmp_path / "b.pth")]) == 2
    assert "no such checkpoint" in _one_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty"), "-o", str(tmp_path / "b.pth")]) == 2
    assert "no training checkpoint" in _one_line(capsys.readouterr().err)


def test_eval_folder_with_one_class_fails_before_training(tmp_path, capsys):
    import numpy as np

    data = tmp_path / "shards"
    write_shards(data, n_shards=1, per_shard=8)
    ev = tmp_path / "eval" / "only_class"
    ev.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        random_image(rng).save(ev / f"{i}.jpg")
    out = tmp_path / "out"
    assert _train(tmp_path, data, out, "--max-steps", "2", "--eval-train-dir", str(tmp_path / "eval")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "at least 2 classes" in line and "only_class" in line
    assert not out.exists()  # nothing trained


def test_arch_override_brings_its_dims_and_export_records_them(tmp_path):
    from training.checkpoint import backbone_from_state
    from training.models.backbone_io import save_backbone
    from training.models.vision_transformer import ARCHS

    demo = REPO / "pipelines" / "configs" / "train_demo.yaml"
    cfg = load_config(demo, ["model.arch=vit_small_patch14", "head.n_prototypes=64"])
    student, _, info = build_models(cfg)
    spec = ARCHS["vit_small_patch14"]
    bb = student["backbone"]
    assert (bb.embed_dim, bb.depth, bb.num_heads) == (spec["embed_dim"], spec["depth"], spec["num_heads"])
    meta_path = save_backbone(backbone_from_state(info, student.state_dict()), tmp_path / "b.pth")
    meta = json.loads(meta_path.with_suffix(".json").read_text())
    assert (meta["arch"], meta["embed_dim"], meta["depth"], meta["num_heads"]) == ("vit_small_patch14", 384, 12, 6)
    # dims given next to the arch override stay; the file's own arch keeps the file's dims
    assert load_config(demo, ["model.arch=vit_small_patch14", "model.depth=2"]).model.build_kwargs()["depth"] == 2
    kept = load_config(demo, ["model.arch=vit_tiny_patch14"]).model
    assert (kept.embed_dim, kept.depth) == (96, 4)


def test_plot_draws_losses_lr_and_accuracy_and_log_states_sizes(tmp_path, caplog):
    import numpy as np
    from PIL import Image

    from pipelines.lvd import main as lvd

    data = tmp_path / "shards"
    write_shards(data, n_shards=2, per_shard=8)
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "eval" / c).mkdir(parents=True)
        for i in range(4):
            random_image(rng).save(tmp_path / "eval" / c / f"{i}.jpg")
    out = tmp_path / "out"
    cfg = _cfg()
    cfg["eval"] = {"period_iters": 2, "at_start": True, "batch_size": 8}
    with caplog.at_level(logging.INFO, logger="lvd.train"):
        assert _train(tmp_path, data, out, "--max-steps", "4", "--eval-train-dir", str(tmp_path / "eval"),
                      cfg=cfg) == 0
    text = caplog.text
    assert "dataset: 16 samples in 2 shards" in text
    n_backbone = sum(p.numel() for p in build_models(load_config(raw=cfg))[0]["backbone"].parameters())
    assert f"{n_backbone / 1e6:.2f}M params" in text
    assert "throughput:" in text and "img/s" in text
    assert lvd(["plot", str(out)]) == 0
    png = out / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 1300)
    from training.plot import plot_metrics

    drawn = plot_metrics(out / "metrics.jsonl", tmp_path / "again.png")
    assert drawn["loss"] == drawn["lr"] == 4 and drawn["knn_top1"] == drawn["linear_top1"] == 3  # at 0, 2, 4
    assert drawn["teacher_entropy"] == drawn["teacher_marginal_entropy"] == 4
    assert lvd(["plot", str(tmp_path / "nope")]) == 2
