"""Learning, not just running: DINOv2 on scikit-learn digits (upsampled to 56 px) lifts k-NN accuracy of the
EMA-teacher backbone far above the same backbone at initialisation (which sits at chance: a ViT at initialisation gives nearly the same CLS output for every image); on the
learning bench's pasted digits, built so that raw pixels mostly match placement, the bench's recipe beats the
raw pixels' k-NN and the DINOv2 recipe's teacher collapses, which the trainer reports."""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lvd_train_testutils import read_metrics
from tests.tolerance import rounding_tol
from training.config import load_config
from training.train import train


def _write_digits(root):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.images))
    for i, idx in enumerate(perm):
        img = Image.fromarray((d.images[idx] / 16 * 255).astype(np.uint8)).resize((56, 56), Image.BICUBIC)
        split = "ssl" if i < 1200 else ("knn_train" if i < 1500 else "knn_val")
        sub = root / split / ("" if split == "ssl" else str(d.target[idx]))
        sub.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(sub / f"{i:05d}.png")


@pytest.mark.slow
def test_dino_training_improves_knn_on_digits(tmp_path, capsys):
    _write_digits(tmp_path)
    torch.set_num_threads(2)
    cfg = load_config(raw={
        "model": {"arch": "vit_tiny_patch14", "embed_dim": 96, "depth": 4, "num_heads": 3, "drop_path_rate": 0.0},
        "head": {"n_prototypes": 512, "hidden_dim": 256, "bottleneck_dim": 64},
        "loss": {"centering": "centering"},
        "teacher": {"momentum_teacher": 0.99, "final_momentum_teacher": 0.999, "warmup_teacher_temp": 0.04,
                    "teacher_temp": 0.06, "warmup_teacher_temp_epochs": 0.2},
        "optim": {"epochs": 1, "iters_per_epoch": 200, "batch_size_per_gpu": 32, "base_lr": 0.003,
                  "lr_scaling": "none", "warmup_epochs": 0.1, "freeze_last_layer_epochs": 0,
                  "layerwise_decay": 1.0, "min_lr": 1e-5},
        "crops": {"global_crops_size": 56, "local_crops_number": 4, "local_crops_size": 28},
        "data": {"shuffle_buffer": 256, "num_workers": 0},
        "eval": {"train_dir": str(tmp_path / "knn_train"), "val_dir": str(tmp_path / "knn_val"), "at_start": True,
                 "center_crop_ratio": 1.0, "linear_probe": False},
        "checkpoint": {"period_iters": 1000},
        "progress_bar": False,
    })
    summary = train(cfg, str(tmp_path / "ssl"), tmp_path / "out")
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["iteration"] for r in evals] == [0, 200]
    init, trained = evals[0]["knn_top1"], evals[-1]["knn_top1"]
    msg = f"k-NN top-1 (k=20, T=0.07) on digits: init {init:.3f}, trained {trained:.3f}"
    with capsys.disabled():  # shown in the test log even when the test passes
        print(f"\n{msg}")
    assert summary["eval"]["knn_top1"] == trained
    # Threshold from the sampling noise of a k-NN accuracy on n_val images (binomial: standard deviation at most
    # sqrt(0.25 / n_val), 0.029 for the 297 validation digits): the backbone at initialisation sits at chance
    # (bench/learning_bench.py measures 0.11 for 10 classes, BENCHMARKS.md), and training must lift it by more
    # than 3 standard deviations of the difference of two such accuracies, sqrt(2 x 0.25 / n_val) each (0.12).
    # This recipe (DINOv2's temperatures and LayerScale, a high learning rate) is kept as it was: on plain digits
    # it learns although its DINO head collapses; what the learning bench shows about raw pixels is tested below
    # on the bench's own data and recipe.
    n_val = summary["eval"]["n_val"]
    margin = 3 * math.sqrt(2 * 0.25 / n_val)
    assert init <= 0.1 + 3 * math.sqrt(0.25 / n_val), msg  # chance: 10 classes
    assert trained >= init + margin, msg


def _knn_sd(n_val: int) -> float:
    """The largest standard deviation of a k-NN accuracy measured on ``n_val`` images (binomial, p = 0.5)."""
    return math.sqrt(0.25 / n_val)


@pytest.mark.slow
def test_bench_recipe_beats_raw_pixels_on_pasted_digits_without_a_collapse(tmp_path, capsys, caplog):
    """bench/learning_bench.py at its defaults (the recipe and data of its docstring, seed 0) but 700 of its
    1,500 iterations (its schedules follow --steps), for under half the time.

    Thresholds: the trained teacher beats the backbone at initialisation by more than 3 standard deviations of
    the difference of two accuracies on the 500 validation digits (binomial: sqrt(2 x 0.25 / 500) = 0.032), and
    beats raw pixels. A 700-iteration run measured raw 0.248, init 0.116, trained 0.310 (103 s on an idle 2-core
    CPU; 1,000 iterations gave 0.318, BENCHMARKS.md): +0.19 over init (6.1 of those standard deviations) and
    +0.062 over raw pixels.  The data (seed 0) is the same on every machine, so what another CPU's rounding can
    change is only the run's trajectory; the three seeds of the 1,500-iteration runs (each its own draw of data
    and run) stood within 0.372-0.388 at iteration 1,000, a spread of 0.016, well inside the 0.062 margin.  The teacher must also stay out of both collapses
    (training/collapse.py) over the last 100 iterations."""
    from training.collapse import CollapseWatch

    bench = _learning_bench()
    args = bench.build_parser().parse_args(["--out", str(tmp_path), "--threads", "2", "--steps", "700"])
    with caplog.at_level(logging.WARNING, logger="lvd.train"):
        result = bench.run(args)
    raw, init, trained = result["raw_pixels_knn_top1"], result["init_knn_top1"], result["trained_knn_top1"]
    msg = f"k-NN top-1 on pasted digits: raw pixels {raw:.3f}, init {init:.3f}, trained {trained:.3f}"
    with capsys.disabled():
        print(f"\n{msg}")
    n_val = result["images"]["knn_val"]
    sd_diff = math.sqrt(2) * _knn_sd(n_val)
    assert trained >= init + 3 * sd_diff, msg
    assert trained > raw, msg
    train_rows = read_metrics(result["metrics"])
    assert len(train_rows) == args.steps
    watch = CollapseWatch(args.prototypes)
    assert all(not watch.kinds(r) for r in train_rows[-100:]), msg
    assert "collapsed" not in caplog.text


@pytest.mark.slow
def test_dinov2_recipe_collapses_on_pasted_digits_and_the_log_says_so(tmp_path, caplog):
    """The bench's data with DINOv2's LayerScale init (1e-5), teacher temperature (0.04 -> 0.06) and augmentations
    and the bench's earlier learning rate (3e-3): the teacher gives every image the uniform target from about
    iteration 20 on (the DINO loss at ln K), and the trainer logs that once."""
    from training.collapse import CollapseWatch

    bench = _learning_bench()
    args = bench.build_parser().parse_args([
        "--out", str(tmp_path), "--threads", "2", "--steps", "300", "--layerscale", "1e-5", "--teacher-temp",
        "0.06", "--lr", "0.003", "--aug", "dinov2", "--solarize", "0.2"])
    with caplog.at_level(logging.WARNING, logger="lvd.train"):
        result = bench.run(args)
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1 and "(uniform)" in warnings[0] and "teacher_temp" in warnings[0], caplog.text
    last = read_metrics(result["metrics"])[-50:]
    log_k = math.log(args.prototypes)
    # the DINO loss is a mean of cross-entropies against those targets, each teacher view in as many pairs, so it
    # is at least their mean entropy (up to rounding of sums over K prototypes and 2 x 32 rows)
    slack = rounding_tol(log_k, n_terms=args.prototypes * 64)
    assert all(r["dino_loss"] >= r["teacher_entropy"] - slack for r in last)
    watch = CollapseWatch(args.prototypes)
    assert all("uniform" in watch.kinds(r) for r in last)


def _learning_bench():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "learning_bench.py"
    spec = importlib.util.spec_from_file_location("learning_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_bench_one_ink_keeps_the_placements_and_carries_no_ink_information():
    """``--ink white``: the same noise, scale and position as ``--ink both`` (same random draws), but every digit in
    white ink, so the ink colour no longer tells images apart (the shortcut the trained features took)."""
    from sklearn.datasets import load_digits

    bench = _learning_bench()
    digits = load_digits().images[:40]
    both = [bench.paste_digit(d, 56, np.random.default_rng(i), 28, 48, "both") for i, d in enumerate(digits)]
    white = [bench.paste_digit(d, 56, np.random.default_rng(i), 28, 48, "white") for i, d in enumerate(digits)]
    assert [p for _, p in white] == [{**p, "ink": 255} for _, p in both]  # same size and position, white ink
    inked = []
    for (b, pb), (w, _) in zip(both, white):
        diff = np.abs(b.astype(int) - w.astype(int)).any(axis=2)
        if diff.any():  # a black-ink digit: it differs only where the digit lies, and there by its ink
            inked.append(True)
            ys, xs = np.nonzero(diff)
            assert pb["ink"] == 0 and pb["y"] <= ys.min() and ys.max() < pb["y"] + pb["px"] \
                and pb["x"] <= xs.min() and xs.max() < pb["x"] + pb["px"]
            assert (w[diff].astype(int) > b[diff].astype(int)).all()  # blended towards white, not black
        else:
            inked.append(False)
            assert pb["ink"] == 255
        # the digit's full-ink pixels (the brightest of an 8x8 digit reach 16) are white in the white-ink image
        assert w.max() == 255
    assert 5 < sum(inked) < 35  # "both" draws black ink for about half of the digits


def test_learning_bench_random_ink_keeps_the_placements_and_inks_each_digit_in_a_visible_colour():
    """``--ink random``: the placements of the other inks (its colours come from a generator of their own), each
    digit in one RGB colour that differs from the grey background by at least the bench's contrast in a
    channel, and the recorded octant is that colour's."""
    from sklearn.datasets import load_digits

    bench = _learning_bench()
    digits = load_digits().images[:40]
    ink_rng = np.random.default_rng(99)
    white = [bench.paste_digit(d, 56, np.random.default_rng(i), 28, 48, "white") for i, d in enumerate(digits)]
    black = [bench.paste_digit(d, 56, np.random.default_rng(i), 28, 48, "black")[0] for i, d in enumerate(digits)]
    rand = [bench.paste_digit(d, 56, np.random.default_rng(i), 28, 48, "random", ink_rng=ink_rng)
            for i, d in enumerate(digits)]
    colours = set()
    for (w, pw), b, (r, pr) in zip(white, black, rand):
        assert {k: pr[k] for k in ("px", "y", "x")} == {k: pw[k] for k in ("px", "y", "x")}
        rgb = np.array(pr["rgb"])
        assert np.abs(rgb - 128).max() >= bench.RANDOM_INK_MIN_CONTRAST
        assert pr["ink"] == sum(1 << c for c in range(3) if rgb[c] > 128)
        # each image is background (1 - alpha) + ink alpha, rounded: white - black = 255 alpha, black = the
        # background's share, so random = black + colour alpha; the three roundings (0.5 each, and at most 1 for
        # colour x alpha's 1/255 error) bound the difference by 2
        w, b, r = (a.astype(float) for a in (w, b, r))
        alpha = (w - b) / 255
        assert alpha.max() > 0.5 and np.abs(r - (b + alpha * rgb)).max() <= 2
        colours.add(tuple(rgb))
    assert len(colours) == len(digits)  # a colour per digit


def test_learning_bench_z_is_the_difference_over_the_two_binomial_standard_deviations():
    bench = _learning_bench()
    # 0.2 and 0.1 on 500 images: sd sqrt((0.2 * 0.8 + 0.1 * 0.9) / 500) = sqrt(0.0005) = 0.02236, z = 4.472
    assert bench.binomial_z(0.2, 0.1, 500) == 4.47
    assert bench.binomial_z(0.1, 0.2, 500) == -4.47
    assert bench.binomial_z(0.5, 0.5, 100) == 0.0
    assert bench.binomial_z(1.0, 0.0, 10) == float("inf") and bench.binomial_z(0.0, 0.0, 10) == 0.0
