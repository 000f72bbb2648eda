"""Learning, not just running: DINOv2 on scikit-learn digits (upsampled to 56 px) lifts k-NN accuracy of the
EMA-teacher backbone far above the same backbone at initialisation (which sits at chance, see DESIGN.md 7)."""
import json
import math

import numpy as np
import pytest
import torch

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
    # Not more: on the pasted digits of the learning bench no recipe has yet beaten raw pixels (with one ink, no
    # colour shortcut: at best 0.20 against 0.42 for raw pixels; BENCHMARKS.md, runs A-K and L1-N2), so what the
    # benchmark supports is "training moves k-NN off chance", not "above raw pixels" (0.97 on these digits).
    n_val = summary["eval"]["n_val"]
    margin = 3 * math.sqrt(2 * 0.25 / n_val)
    assert init <= 0.1 + 3 * math.sqrt(0.25 / n_val), msg  # chance: 10 classes
    assert trained >= init + margin, msg


def _learning_bench():
    import importlib.util
    from pathlib import Path

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
