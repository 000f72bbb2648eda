"""Does the trainer learn what raw pixels cannot? DINOv2 on "pasted digits", on CPU.

Dataset (built here, deterministic): scikit-learn's 1,797 8x8 digits, each pasted at a random scale (``--min-px``
to ``--max-px``, default 14 to 32 px) and position onto a ``--size`` px (64) image of grey Gaussian noise
(standard deviation ``--noise``, 8), in white ink (``--ink white``; ``both``: white or black at random, which the
features learn as a shortcut; ``random``: a random RGB colour per digit, a shortcut that every crop of an image
shares and DINOv2's colour jitter, hue 0.1, keeps; ``--crops '{"channel_permute_p": 1, "channel_invert_p": 0.5}'``
gives each crop its own channel order and inversions). The 1,797 digits are split once: the first 1,297 give the unlabelled SSL set
(``--pastes`` placements each) and the labelled k-NN train set (one more placement each), the rest the labelled
k-NN validation set (500). Position and scale vary, so nearest neighbours on raw pixels mostly match placement,
not the digit: raw-pixel k-NN is 0.25-0.28 at the defaults (0.37 at 56 px), and a backbone has to learn shape
to beat it.

Recipe (the defaults; BENCHMARKS.md has the runs that chose it): a ViT with patch 16, dim 96, depth 4,
LayerScale 1, 512 prototypes, 2 global 64 px + 4 local 32 px crops at DINOv2's scales and no other augmentation
(``--aug light``), teacher temperature 0.01, lr 6e-4, batch 32, 1,500 iterations. With DINOv2's temperature,
learning rate and augmentations the teacher collapses to the uniform target on this data within tens of steps
(training/collapse.py warns of it).

Reported (weighted k-NN, k=20, T=0.07, top-1 on the validation digits; evaluation as training/evaluate.py):
raw pixels (the same resized, normalised images, flattened), the backbone at initialisation and the trained EMA
teacher (also every ``--eval-period`` iterations), each also on what the placement gives away (size, position);
plus the run's wall time and the training curves (``OUT/run/loss_curves.png`` beside ``OUT/run/metrics.jsonl``,
drawn by ``lvd plot``'s training/plot.py). One JSON line on stdout.

    python bench/learning_bench.py --threads 2 --out runs/learning_bench
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.checkpoint import backbone_from_state, find_latest_checkpoint, load_checkpoint  # noqa: E402
from training.config import load_config  # noqa: E402
from training.evaluate import extract_features, knn_accuracy, list_labelled_folder  # noqa: E402
from training.plot import plot_metrics, read_metrics_rows  # noqa: E402
from training.train import train  # noqa: E402


INKS = {"both": (255.0, 0.0), "white": (255.0,), "black": (0.0,), "random": ()}
"""``--ink``: the grey levels a digit's ink is drawn from; ``random``: a random RGB colour per image
(``random_ink``)."""
RANDOM_INK_MIN_CONTRAST = 64
"""A random ink's colour differs from the background's mean grey (128) by at least this in one channel, so that
every digit stays visible; below it a redraw."""
AUGMENTATIONS = {"light": {"flip_p": 0.0, "color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": [0.0, 0.0, 0.0]},
                 "dinov2": {}}
"""``--aug``: crops settings on top of the trainer's defaults (training/config.py CropsConfig)."""


def random_ink(rng: np.random.Generator) -> np.ndarray:
    """A uniform random RGB colour (0-255 per channel), redrawn until one channel is at least
    ``RANDOM_INK_MIN_CONTRAST`` away from the background's grey 128."""
    while True:
        rgb = rng.integers(0, 256, 3).astype(np.float64)
        if np.abs(rgb - 128).max() >= RANDOM_INK_MIN_CONTRAST:
            return rgb


def paste_digit(digit: np.ndarray, size: int, rng: np.random.Generator, min_px: int, max_px: int,
                ink: str = "both", noise: float = 48.0,
                ink_rng: np.random.Generator | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """One ``size`` x ``size`` RGB uint8 image: noise, and the 8x8 digit (values 0-16) at a random scale, position
    and ink (``both``: white or black at random, ``random``: a random RGB colour from ``ink_rng``, else one ink for
    every image); the noise is grey, standard deviation ``noise``. Also returns the placement: digit size ``px``,
    top-left ``y``, ``x`` and ``ink`` (the grey level 0-255; for ``random`` the colour's octant 0-7, bit c set
    where channel c is above 128, and ``rgb``)."""
    from PIL import Image

    bg = rng.normal(128, noise, (size, size, 1)).clip(0, 255).repeat(3, axis=2)
    px = int(rng.integers(min_px, max_px + 1))
    alpha = np.asarray(Image.fromarray((digit / 16 * 255).astype(np.uint8)).resize((px, px), Image.BILINEAR),
                       dtype=np.float64)[..., None] / 255
    y, x = rng.integers(0, size - px + 1, 2)
    inks = INKS[ink]
    u = rng.random()  # drawn for every ink: the same placements whatever the ink
    if ink == "random":  # its own generator, so the placements stay those of the other inks
        colour = random_ink(ink_rng if ink_rng is not None else rng)
        placement = {"ink": int(sum(1 << c for c in range(3) if colour[c] > 128)), "rgb": colour.astype(int).tolist()}
    else:
        colour = np.full(3, inks[0] if u < 0.5 else inks[-1])
        placement = {"ink": int(colour[0])}
    patch = bg[y:y + px, x:x + px]
    bg[y:y + px, x:x + px] = patch * (1 - alpha) + colour * alpha
    return bg.round().astype(np.uint8), {"px": px, "y": int(y), "x": int(x), **placement}


def build_dataset(root: Path, size: int = 64, train_digits: int = 1297, pastes: int = 2, min_px: int = 28,
                  max_px: int = 48, seed: int = 0, ink: str = "both",
                  noise: float = 48.0) -> dict[str, int]:
    """``root/ssl`` (unlabelled), ``root/knn_train/<digit>`` and ``root/knn_val/<digit>`` PNGs, and
    ``root/placements.json`` (each image's placement by its path under ``root``); returns counts."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    ink_rng = np.random.default_rng([seed, 1])  # random-colour ink only
    perm = rng.permutation(len(d.images))
    counts = {"ssl": 0, "knn_train": 0, "knn_val": 0}
    placements = {}
    for i, idx in enumerate(perm):
        jobs = [("ssl", None)] * pastes + [("knn_train", d.target[idx])] if i < train_digits \
            else [("knn_val", d.target[idx])]
        for j, (split, label) in enumerate(jobs):
            sub = root / split / ("" if label is None else str(label))
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"{i:05d}_{j}.png"
            img, placements[str(path.relative_to(root))] = paste_digit(d.images[idx], size, rng, min_px, max_px,
                                                                       ink, noise, ink_rng)
            Image.fromarray(img).save(path)
            counts[split] += 1
    (root / "placements.json").write_text(json.dumps(placements))
    return counts


def knn_by_attribute(root: Path, size: int, backbone: torch.nn.Module, k: int = 20,
                     T: float = 0.07) -> dict[str, float]:
    """k-NN top-1 (the evaluation's preprocessing and classifier) of ``backbone``'s features on the digit and on
    what the digit's placement gives away: its size, horizontal and vertical centre (each in 3 equal bins over
    its range) and, when the inks differ, its ink. Features that score high on placement or ink and low on the
    digit learned a shortcut (``torch.nn.Flatten()``: raw pixels)."""
    placements = json.loads((root / "placements.json").read_text())
    feats, labels = {}, {}
    for split in ("knn_train", "knn_val"):
        paths, digit, _ = list_labelled_folder(root / split)
        feats[split] = extract_features(backbone, paths, size, crop_ratio=1.0)
        pl = [placements[str(Path(p).relative_to(root))] for p in paths]
        labels[split] = {"digit": digit, "size": [p["px"] for p in pl], "x": [p["x"] + p["px"] / 2 for p in pl],
                         "y": [p["y"] + p["px"] / 2 for p in pl], "ink": [p["ink"] for p in pl]}
    out = {}
    for attr in ("digit", "size", "x", "y", "ink"):
        both = labels["knn_train"][attr] + labels["knn_val"][attr]
        if len(set(both)) < 2:
            continue
        if attr in ("size", "x", "y"):  # 3 equal-width bins over the attribute's range
            edges = np.linspace(min(both), max(both), 4)[1:-1]
            lab = {s: np.digitize(labels[s][attr], edges).tolist() for s in labels}
        else:
            lab = {s: labels[s][attr] for s in labels}
        out[attr] = round(knn_accuracy(feats["knn_train"], lab["knn_train"], feats["knn_val"], lab["knn_val"], k, T),
                          3)
    return out


def binomial_z(a: float, b: float, n: int) -> float:
    """How many standard deviations accuracy ``a`` lies above ``b``, both measured on ``n`` test images: each has
    the binomial standard deviation sqrt(p (1 - p) / n), and the two are combined as for independent estimates,
    sqrt(sd_a^2 + sd_b^2) (the two share the test images, whose correlation would only shrink the difference's
    spread, so this errs on the strict side)."""
    sd = ((a * (1 - a) + b * (1 - b)) / n) ** 0.5
    if sd > 0:
        return round((a - b) / sd, 2)
    return 0.0 if a == b else math.copysign(math.inf, a - b)  # both exact (0 or 1): no spread


def recipe(root: Path, size: int, steps: int, batch: int, args: argparse.Namespace) -> dict:
    """The small-model recipe (CPU-sized DINOv2: a 4-block ViT, DINO + iBOT + KoLeo) from the flags."""
    return {
        "model": {"arch": "vit_tiny_patch14", "patch_size": args.patch, "embed_dim": args.dim, "depth": args.depth,
                  "num_heads": 3, "drop_path_rate": 0.0, "layerscale": args.layerscale},
        "head": {"n_prototypes": args.prototypes, "hidden_dim": 256, "bottleneck_dim": args.bottleneck},
        "loss": {"centering": args.centering, "koleo_weight": args.koleo, "ibot_weight": args.ibot},
        "teacher": {"momentum_teacher": args.momentum, "final_momentum_teacher": 0.999,
                    "warmup_teacher_temp": min(0.04, args.teacher_temp), "teacher_temp": args.teacher_temp,
                    "warmup_teacher_temp_epochs": 0.1},
        "optim": {"epochs": 1, "iters_per_epoch": steps, "batch_size_per_gpu": batch, "base_lr": args.lr,
                  "lr_scaling": "none", "warmup_epochs": 0.1,
                  "freeze_last_layer_epochs": args.freeze_last_layer,
                  "layerwise_decay": 1.0, "min_lr": 1e-5, "weight_decay": 0.04, "weight_decay_end": 0.1},
        "crops": {"global_crops_size": size, "local_crops_number": args.locals,
                  "local_crops_size": max(args.patch, size // 2 // args.patch * args.patch),  # a patch multiple
                  "solarize_p": args.solarize, **AUGMENTATIONS[args.aug],
                  **({"global_crops_scale": [0.5, 1.0], "local_crops_scale": [0.2, 0.5]}
                     if args.crop_scales == "bench" else {}), **json.loads(args.crops)},
        "data": {"shuffle_buffer": 512, "num_workers": 0},
        "eval": {"train_dir": str(root / "knn_train"), "val_dir": str(root / "knn_val"), "at_start": True,
                 "period_iters": args.eval_period,
                 "center_crop_ratio": 1.0, "linear_probe": False},
        "checkpoint": {"period_iters": 10 ** 6},
        "device": "cpu", "seed": args.seed, "progress_bar": False,
    }


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags; their defaults are the recipe and dataset described in the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/learning_bench")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--prototypes", type=int, default=512)
    p.add_argument("--locals", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.0006)
    p.add_argument("--layerscale", type=float, default=1.0, help="LayerScale init (DINOv2: 1e-5)")
    p.add_argument("--bottleneck", type=int, default=64)
    p.add_argument("--teacher-temp", type=float, default=0.01,
                   help="after a warmup from min(0.04, this) over 10%% of the run")
    p.add_argument("--momentum", type=float, default=0.99, help="teacher EMA momentum at the start (cosine to 0.999)")
    p.add_argument("--koleo", type=float, default=0.1, help="KoLeo weight")
    p.add_argument("--ibot", type=float, default=1.0, help="iBOT weight (0: DINO on the class token only)")
    p.add_argument("--freeze-last-layer", type=float, default=0.0,
                   help="fraction of the run with the prototype layers frozen (1: fixed random prototypes)")
    p.add_argument("--pastes", type=int, default=2)
    p.add_argument("--centering", choices=["centering", "sinkhorn_knopp"], default="centering")
    p.add_argument("--crop-scales", choices=["bench", "reference"], default="reference",
                   help="bench: global (0.5, 1), local (0.2, 0.5); reference: DINOv2's (0.32, 1) and (0.05, 0.32)")
    p.add_argument("--ink", choices=sorted(INKS), default="white",
                   help="both: each digit in white or black ink at random; white / black: one ink for all; "
                        "random: a random RGB colour per digit (a shortcut every crop of an image shares)")
    p.add_argument("--min-px", type=int, default=14, help="smallest pasted digit side (px)")
    p.add_argument("--max-px", type=int, default=32, help="largest pasted digit side (px)")
    p.add_argument("--noise", type=float, default=8.0, help="standard deviation of the grey background noise")
    p.add_argument("--solarize", type=float, default=0.0, help="crops.solarize_p (second global crop only)")
    p.add_argument("--aug", choices=sorted(AUGMENTATIONS), default="light",
                   help="light: crops only (no flip, colour jitter, grayscale or blur: flipping changes a digit, and "
                        "the rest gives a random ViT views that no longer match); dinov2: the trainer's defaults")
    p.add_argument("--crops", default="{}",
                   help='more crops settings as JSON (training/config.py CropsConfig), e.g. \'{"blur_p": [0, 0, 0]}\'')
    p.add_argument("--eval-period", type=int, default=0, help="k-NN every N iterations too (0: start and end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--raw-only", action="store_true", help="build the dataset and report raw-pixel k-NN only")
    return p


def train_recipe(data: Path, run_dir: Path, args: argparse.Namespace) -> tuple[Path, float, list[dict]]:
    """Train the flags' recipe on ``data/ssl`` into a fresh ``run_dir`` (k-NN on ``data/knn_*``), draw the curves;
    returns ``run_dir``, the wall time (s) and the metrics rows."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = load_config(raw=recipe(data, args.size, args.steps, args.batch, args))
    t0 = time.time()
    train(cfg, str(data / "ssl"), run_dir)
    wall = time.time() - t0
    plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss_curves.png")
    return run_dir, wall, read_metrics_rows(run_dir / "metrics.jsonl")


def run(args: argparse.Namespace) -> dict:
    """Build the dataset under ``args.out``, train, evaluate; the result (the JSON line ``main`` prints)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    counts = build_dataset(data, args.size, pastes=args.pastes, min_px=args.min_px, max_px=args.max_px,
                           seed=args.seed, ink=args.ink, noise=args.noise)
    result = {"bench": "learning", "size": args.size, "ink": args.ink, "noise": args.noise,
              "digit_px": [args.min_px, args.max_px], "images": counts, "threads": args.threads,
              "raw_pixels_knn_top1_by_attribute": knn_by_attribute(data, args.size, torch.nn.Flatten())}
    result["raw_pixels_knn_top1"] = result["raw_pixels_knn_top1_by_attribute"]["digit"]
    if not args.raw_only:
        run_dir, wall, rows = train_recipe(data, out / "run", args)
        evals = [r for r in rows if r.get("type") == "eval"]
        ck = load_checkpoint(find_latest_checkpoint(run_dir))
        result["trained_knn_top1_by_attribute"] = knn_by_attribute(
            data, args.size, backbone_from_state(ck["backbone"], ck["teacher"]))
        result.update({"steps": args.steps, "batch": args.batch, "wall_s": round(wall, 1),
                       "init_knn_top1": evals[0]["knn_top1"], "trained_knn_top1": evals[-1]["knn_top1"],
                       "knn_top1_by_iteration": {e["iteration"]: round(e["knn_top1"], 3) for e in evals},
                       "recipe": recipe_flags(args),
                       "z_trained_vs": {"raw_pixels": binomial_z(evals[-1]["knn_top1"], result["raw_pixels_knn_top1"],
                                                                 counts["knn_val"]),
                                        "init": binomial_z(evals[-1]["knn_top1"], evals[0]["knn_top1"],
                                                           counts["knn_val"])},
                       "metrics": str(run_dir / "metrics.jsonl"), "loss_curves": str(run_dir / "loss_curves.png")})
    return result


RECIPE_FLAGS = ("patch", "dim", "depth", "layerscale", "prototypes", "bottleneck", "locals", "lr", "teacher_temp",
                "momentum", "koleo", "ibot", "freeze_last_layer", "pastes", "centering", "crop_scales", "ink",
                "solarize", "aug", "crops", "noise", "min_px", "max_px", "size")


def recipe_flags(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """The flags that set the recipe and data, as the result's ``recipe`` records them."""
    return {k: getattr(args, k) for k in RECIPE_FLAGS if k not in skip}


def main(argv: list[str] | None = None, run=run, parser=build_parser) -> int:
    """Print the bench's one JSON line (``run`` / ``parser``: another bench's, sharing this entry point)."""
    print(json.dumps(run(parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
