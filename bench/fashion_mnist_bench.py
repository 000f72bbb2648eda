"""Does the trainer learn on real images, with DINOv2's augmentations on? DINOv2 on Fashion-MNIST, on CPU.

Data: the original IDX files (``--idx-dir``, default ``/usr/share/datasets/fashion-mnist``: the Debian package
``dataset-fashion-mnist``; gzip or plain), read here, never downloaded. 28 x 28 grey photographs of clothes, 10
classes. The first ``--ssl`` training images (default 10,000) are the unlabelled SSL set, the next
``--knn-train`` (5,000) the labelled k-NN train set; the k-NN validation set is the first ``--knn-val`` test images
(default all 10,000). Images are resized to ``--size`` px (32, bilinear) and stored as grey PNGs (the trainer reads
them as RGB with three equal channels).

Augmentations (``--aug dinov2``, the default here): the trainer's DINOv2 defaults (flips, colour jitter - on grey
images brightness and contrast act, saturation and hue do not -, random grayscale, Gaussian blur 1.0 / 0.1 / 0.5)
and solarisation 0.2 on the second global crop. The recipe's other flags are the pasted-digits bench's
(``bench/learning_bench.py``; a ViT of patch ``--patch`` 8 here, 4 x 4 tokens per 32 px global crop).

Reported (weighted k-NN, k=20, T=0.07, top-1 on the test images; training/evaluate.py): raw pixels (the same
resized, normalised images, flattened), the backbone at initialisation and the trained EMA teacher, also every
``--eval-period`` iterations (the curve), the teacher-collapse monitors' last values, the wall time, and the
training curves (``OUT/run/loss_curves.png`` beside ``OUT/run/metrics.jsonl``). One JSON line on stdout.

    python bench/fashion_mnist_bench.py --threads 2 --steps 1000 --out runs/fashion_mnist
"""
from __future__ import annotations

import gzip
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from learning_bench import build_parser as digits_parser, main as digits_main, recipe_flags, train_recipe  # noqa: E402
from training.evaluate import extract_features, knn_accuracy, list_labelled_folder  # noqa: E402

DEFAULT_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as an array: magic ``0 0 type ndim``, ``ndim`` big-endian uint32 sizes, data.
    A truncated or malformed file raises ``ValueError`` naming it."""
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != need:
        raise ValueError(f"{path}: IDX header says {dims} ({need} bytes of data), the file holds {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def idx_file(idx_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (idx_dir / name).is_file():
            return idx_dir / name
    raise FileNotFoundError(f"{idx_dir}: no {stem}[.gz] (Debian: apt-get install dataset-fashion-mnist)")


def build_dataset(root: Path, idx_dir: Path, size: int = 32, ssl: int = 10_000, knn_train: int = 5_000,
                  knn_val: int = 10_000) -> dict[str, int]:
    """``root/ssl`` (unlabelled), ``root/knn_train/<class>`` and ``root/knn_val/<class>`` PNGs; returns counts."""
    from PIL import Image

    x_tr, y_tr = read_idx(idx_file(idx_dir, "train-images-idx3-ubyte")), read_idx(idx_file(idx_dir, "train-labels-idx1-ubyte"))
    x_te, y_te = read_idx(idx_file(idx_dir, "t10k-images-idx3-ubyte")), read_idx(idx_file(idx_dir, "t10k-labels-idx1-ubyte"))
    if ssl + knn_train > len(x_tr):
        raise ValueError(f"--ssl + --knn-train ({ssl + knn_train}) exceeds the {len(x_tr)} training images")
    jobs = [("ssl", x_tr[:ssl], None), ("knn_train", x_tr[ssl:ssl + knn_train], y_tr[ssl:ssl + knn_train]),
            ("knn_val", x_te[:knn_val], y_te[:knn_val])]
    counts = {}
    for split, images, labels in jobs:
        for i, img in enumerate(images):
            sub = root / split / ("" if labels is None else CLASSES[int(labels[i])])
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((size, size), Image.BILINEAR).save(sub / f"{i:05d}.png")
        counts[split] = len(images)
    return counts


def raw_pixel_knn(root: Path, size: int, k: int = 20, T: float = 0.07) -> float:
    feats, labels = {}, {}
    for split in ("knn_train", "knn_val"):
        paths, labels[split], _ = list_labelled_folder(root / split)
        feats[split] = extract_features(torch.nn.Flatten(), paths, size, crop_ratio=1.0)
    return knn_accuracy(feats["knn_train"], labels["knn_train"], feats["knn_val"], labels["knn_val"], k, T)


def build_parser():
    p = digits_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--idx-dir", default=str(DEFAULT_IDX_DIR))
    p.add_argument("--ssl", type=int, default=10_000, help="unlabelled SSL images (the first training images)")
    p.add_argument("--knn-train", type=int, default=5_000, help="labelled k-NN train images (the next ones)")
    p.add_argument("--knn-val", type=int, default=10_000, help="labelled k-NN validation images (test set)")
    p.set_defaults(out="runs/fashion_mnist", size=32, patch=8, aug="dinov2", solarize=0.2, steps=1000)
    return p


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    counts = build_dataset(data, Path(args.idx_dir), args.size, args.ssl, args.knn_train, args.knn_val)
    result = {"bench": "fashion_mnist", "size": args.size, "images": counts, "threads": args.threads,
              "raw_pixels_knn_top1": round(raw_pixel_knn(data, args.size), 4)}
    if args.raw_only:
        return result
    run_dir, wall, rows = train_recipe(data, out / "run", args)
    evals = [r for r in rows if r.get("type") == "eval"]
    steps = [r for r in rows if "teacher_entropy" in r]
    result.update({
        "steps": args.steps, "batch": args.batch, "wall_s": round(wall, 1), "seed": args.seed,
        "init_knn_top1": evals[0]["knn_top1"], "trained_knn_top1": evals[-1]["knn_top1"],
        "knn_top1_by_iteration": {e["iteration"]: round(e["knn_top1"], 4) for e in evals},
        "last_teacher_entropy": steps[-1]["teacher_entropy"] if steps else None,
        "last_teacher_marginal_entropy": steps[-1].get("teacher_marginal_entropy") if steps else None,
        "recipe": recipe_flags(args, skip=("ink", "noise", "min_px", "max_px", "pastes")),
        "metrics": str(run_dir / "metrics.jsonl"), "loss_curves": str(run_dir / "loss_curves.png")})
    return result


def main(argv: list[str] | None = None) -> int:
    return digits_main(argv, run, build_parser)


if __name__ == "__main__":
    sys.exit(main())
