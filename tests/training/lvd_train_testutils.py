"""Helpers shared by the trainer tests (imported by name: tests/training has no __init__.py)."""
from __future__ import annotations

import io
import os
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

TINY_CFG = {
    "model": {"arch": "vit_tiny_patch14", "embed_dim": 48, "depth": 2, "num_heads": 3, "drop_path_rate": 0.1},
    "head": {"n_prototypes": 128, "hidden_dim": 64, "bottleneck_dim": 32},
    "teacher": {"warmup_teacher_temp_epochs": 1},
    "optim": {"epochs": 2, "iters_per_epoch": 4, "batch_size_per_gpu": 4, "base_lr": 0.002, "lr_scaling": "none",
              "warmup_epochs": 0.5, "freeze_last_layer_epochs": 0.5},
    "crops": {"global_crops_size": 28, "local_crops_number": 2, "local_crops_size": 14},
    "masking": {"min_num_patches": 1},
    "data": {"shuffle_buffer": 8, "num_workers": 0},
    "checkpoint": {"period_iters": 2, "keep_last": 2},
    "progress_bar": False,
}

# Rounding tolerance (tests/tolerance.py) of values TINY_CFG's model computes in fp32: its longest reduction is
# the MLP's inner dimension 4 x 48 (a batch's tokens and the 128 prototypes are fewer); one training step chains
# 2 blocks x (attention, MLP) + 3 head layers + the prototype layer = 8 reductions, and each step adds them again
# (Adam's step is ~lr whatever the gradient's rounding).
TINY_REDUCTION = 4 * 48
TINY_LAYERS = 2 * 2 + 3 + 1


def tiny_tol(steps: int = 1) -> dict:
    """Keyword arguments of tests.tolerance for TINY_CFG values after ``steps`` training steps."""
    return {"n_terms": TINY_REDUCTION, "dtype": "float32", "depth": TINY_LAYERS * max(steps, 1)}


def random_image(rng: np.random.Generator, h: int = 40, w: int = 48) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def write_shards(out: Path, n_shards: int = 3, per_shard: int = 10, seed: int = 0, ext: str = "jpg") -> list[Path]:
    """Curated-shard layout: key.jpg + key.json per sample."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        p = out / f"lvd-{s:06d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(per_shard):
                key = f"{s:06d}{i:04d}"
                buf = io.BytesIO()
                random_image(rng).save(buf, "JPEG" if ext == "jpg" else "PNG")
                meta = json.dumps({"source": "test", "anchor_set": "none", "similarity": 0.5}).encode()
                for name, data in ((f"{key}.{ext}", buf.getvalue()), (f"{key}.json", meta)):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        paths.append(p)
    return paths


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def shards_and_config(tmp_path: Path, cfg: dict) -> tuple[Path, Path]:
    """Three shards of ten images under tmp_path/shards and `cfg` as tmp_path/cfg.yaml: (data, config path)."""
    data = tmp_path / "shards"
    write_shards(data, n_shards=3, per_shard=10)
    return data, write_yaml(tmp_path / "cfg.yaml", cfg)


def read_metrics(path: Path, kind: str = "train") -> list[dict]:
    return [r for r in (json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()) if r["type"] == kind]


def subprocess_env() -> dict[str, str]:
    """Environment for a trainer subprocess: the repo importable, one thread per process, fixed hash seed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_digits(root: Path, size: int, splits: dict[str, int], seed: int = 0) -> None:
    """scikit-learn's 8 x 8 digits upsampled to ``size`` px as PNGs, in a random order split into consecutive parts:
    ``{"ssl": 800, "knn_train": 300}`` writes 800 unlabelled images to root/ssl and the next 300 into class
    subfolders of root/knn_train (any split but "ssl" is labelled)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = iter(np.random.default_rng(seed).permutation(len(d.images)))
    for split, n in splits.items():
        for _ in range(n):
            idx = next(perm)
            img = Image.fromarray((d.images[idx] / 16 * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            sub = root / split / ("" if split == "ssl" else str(d.target[idx]))
            sub.mkdir(parents=True, exist_ok=True)
            img.convert("RGB").save(sub / f"{idx:05d}.png")


def synthetic_batch(cfg, seed: int = 0, mask_probability: float = 1.0) -> dict:
    """One collated multi-crop batch of ``cfg``'s sizes from Gaussian noise (no files, no augmentation): for
    trainer steps that need exact inputs."""
    import random

    import torch

    from training.masking import MaskingGenerator, collate_multicrop

    c = cfg.crops
    g = torch.Generator().manual_seed(seed)
    gs, ls = c.global_crops_size, c.local_crops_size
    samples = [{"global_crops": [torch.randn(3, gs, gs, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, ls, ls, generator=g) for _ in range(c.local_crops_number)]}
               for _ in range(cfg.optim.batch_size_per_gpu)]
    grid = gs // cfg.model.patch_size
    return collate_multicrop(samples, MaskingGenerator(grid, min_num_patches=1), random.Random(seed), (0.3, 0.6),
                             mask_probability)
