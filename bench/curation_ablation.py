"""Does curation help? The same trainer recipe on curated shards and on a random pool subset of the same size.

Pool (built here, deterministic in ``--data-seed``): ``--target`` Fashion-MNIST training images (Debian
``dataset-fashion-mnist``, /usr/share/datasets/fashion-mnist) among ``--distractors`` distractors per target image
(default 4, so a random subset is about one fifth clothes) of three kinds -
digits drawn here (PIL text, random size, position, stroke and grey levels), noise textures (smoothed Gaussian
noise at random scales) and crops of photographs (the Debian wallpapers when installed, else the sample photographs
matplotlib and scikit-learn ship) - all 32 px RGB JPEG, plus ``--dup-share`` planted duplicates (exact copies and
near copies: brightened, shifted by 2 px) of random pool images.  Anchor set: ``--anchors`` other Fashion-MNIST
training images.  Evaluation: ``--knn-train`` further labelled training images as the k-NN memory and the first
``--knn-val`` images of Fashion-MNIST's held-out test set.

Curation: the project's own stages on a run root (filter, hash, sscd with the pixel descriptor, dedup, embed with
the pixel embedder, retrieve with two anchor sets over the same anchors - ``sample`` (k = ``--k``) and ``cluster``
- and shards).  Then the learning bench's recipe (bench/learning_bench.py ``recipe`` and its flags, at 32 px with
patch 8, DINOv2's augmentations and solarisation 0.2 as the Fashion-MNIST bench) trains on (a) the curated shards and (b) a random subset of the pool of the same size, for each seed of
``--seeds``.  Reported: the trained teacher's weighted k-NN top-1 (k=20, T=0.07, training/evaluate.py) on the
held-out images for both arms, raw pixels, the binomial standard deviation sqrt(p (1 - p) / n) of each, and the
share of Fashion-MNIST in each arm's training set.  A table on stdout, then one JSON line.  The table is also
written as ``stats/ablation.parquet`` into the curated run (``OUT/curate/run``), whose report page
(``stats/report.html``) is rendered again with its "Curation ablation" section.

    python bench/curation_ablation.py --threads 2 --out runs/curation_ablation
"""
from __future__ import annotations

import argparse
import copy
import gzip
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from learning_bench import build_parser as learning_parser  # noqa: E402
from learning_bench import recipe  # noqa: E402

from training.checkpoint import backbone_from_state, find_latest_checkpoint, load_checkpoint  # noqa: E402
from training.config import load_config as load_train_config  # noqa: E402
from training.evaluate import extract_features, knn_accuracy, list_labelled_folder  # noqa: E402
from training.train import train  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE = 32
EVAL_SET = "fashion-mnist test"  # the k-NN's held-out images: the first --knn-val of the test split


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as an array: images [n, 28, 28] or labels [n]."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    if not (FASHION / f"{prefix}-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"curation_ablation: {FASHION} is missing (apt-get install dataset-fashion-mnist)")
    return read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz"), read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")


def _rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


def drawn_digit(rng: np.random.Generator) -> Image.Image:
    """A digit drawn with PIL's default font at a random size and place, random stroke and grey levels."""
    bg, ink = (int(v) for v in rng.choice(256, 2, replace=False))
    im = Image.new("L", (SIZE, SIZE), bg)
    font = ImageFont.load_default(size=int(rng.integers(14, 30)))
    d = ImageDraw.Draw(im)
    d.text((int(rng.integers(0, 12)), int(rng.integers(-4, 8))), str(int(rng.integers(10))), fill=ink, font=font,
           stroke_width=int(rng.integers(0, 2)), stroke_fill=ink)
    return im.convert("RGB")


def noise_texture(rng: np.random.Generator) -> Image.Image:
    cells = int(rng.integers(3, 17))
    arr = rng.normal(128, rng.uniform(20, 70), (cells, cells, 3)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))


def photo_sources() -> list[Image.Image]:
    paths = sorted(Path("/usr/share/wallpapers").glob("*/contents/images/640x480.jpg"))
    if not paths:
        import matplotlib
        import sklearn

        paths = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
                 Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg",
                 Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"]
    return [Image.open(p).convert("RGB") for p in paths]


def photo_crop(photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    im = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(32, min(im.size) // 2))
    x, y = int(rng.integers(0, im.width - side)), int(rng.integers(0, im.height - side))
    return im.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.Resampling.BOX)


def near_copy(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.5:
        return ImageEnhance.Brightness(im).enhance(float(rng.uniform(1.1, 1.25)))
    dx, dy = (int(v) for v in rng.integers(-2, 3, 2))
    return im.transform(im.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=(0, 0, 0))


def _labelled(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (g, y) in enumerate(zip(images, labels)):
        sub = folder / str(int(y))
        sub.mkdir(parents=True, exist_ok=True)
        _rgb(g).save(sub / f"{i:05d}.png")


def build(out: Path, args: argparse.Namespace) -> dict:
    """The pool (``out/pool.json`` kinds by key), anchors, k-NN folders; returns counts."""
    rng = np.random.default_rng(args.data_seed)
    tx, ty = fashion("train")
    vx, vy = fashion("test")
    perm = rng.permutation(len(tx))
    n_t, n_a, n_k = args.target, args.anchors, args.knn_train
    pool_idx, anchor_idx, knn_idx = perm[:n_t], perm[n_t:n_t + n_a], perm[n_t + n_a:n_t + n_a + n_k]
    photos = photo_sources()
    images: list[tuple[str, Image.Image]] = [("fashion", _rgb(tx[i])) for i in pool_idx]
    makers = {"digit": drawn_digit, "noise": noise_texture, "photo": lambda r: photo_crop(photos, r)}
    per = int(round(args.distractors * args.target)) // len(makers)
    for kind, make in makers.items():
        images += [(kind, make(rng)) for _ in range(per)]
    for _ in range(int(args.dup_share * len(images))):
        kind, im = images[int(rng.integers(len(images)))]
        images.append((kind, im.copy() if rng.random() < 0.5 else near_copy(im, rng)))
    order = rng.permutation(len(images))
    pool = [(f"{j:010d}", images[i][0], _jpeg(images[i][1])) for j, i in enumerate(order)]
    anchors = out / "anchors" / "fashion"
    anchors.mkdir(parents=True)
    for i in anchor_idx:
        _rgb(tx[i]).save(anchors / f"a{i:05d}.png")
    _labelled(out / "knn_train", tx[knn_idx], ty[knn_idx])
    _labelled(out / "knn_val", vx[:args.knn_val], vy[:args.knn_val])
    kinds = {k: kind for k, kind, _ in pool}
    (out / "pool.json").write_text(json.dumps(kinds))
    return {"pool": pool, "kinds": kinds}


def curate(out: Path, pool: list[tuple[str, str, bytes]], args: argparse.Namespace) -> list[str]:
    """Run the curation stages on the pool; the keys of the curated shards' samples."""
    from curation.config import load_config
    from curation.pipeline.runner import run_pipeline
    from curation.data.samples import iter_shard_samples
    from tests.curation.fakerun import make_run

    anchors = str(out / "anchors")
    (out / "curate").mkdir(parents=True, exist_ok=True)
    cfg = make_run(out / "curate", [(k, b) for k, _, b in pool], shard_size=1000,
                   stages=["filter", "hash", "sscd", "dedup", "embed", "retrieve", "shards"],
                   filter={"detector": "none", "min_side": 16},
                   sscd={"descriptor": "pixels", "num_workers": 1},
                   dedup={"threshold": 0.95, "eval_threshold": 0.95},
                   embed={"model": "pixels", "img_size": SIZE, "batch_size": 256, "num_workers": 0,
                          "device": "cpu"},
                   retrieve={"device": "cpu", "anchor_sets": [
                       {"name": "near", "path": anchors, "method": "sample", "k": args.k},
                       {"name": "clusters", "path": anchors, "method": "cluster", "clusters": args.clusters,
                        "min_anchors_per_cluster": 1, "per_cluster": args.per_cluster}]},
                   shards={"samples_per_shard": 1000})
    run_pipeline(load_config(data=copy.deepcopy(cfg)), progress=False)
    keys = []
    for tar in sorted((out / "curate" / "run" / "shards").glob("*.tar")):
        keys += [s.key for s in iter_shard_samples(tar, None)]
    return keys


def _teacher_knn(run_dir: Path, data: Path) -> float:
    ck = load_checkpoint(find_latest_checkpoint(run_dir))
    return knn(backbone_from_state(ck["backbone"], ck["teacher"]), data)


def knn(backbone: torch.nn.Module, data: Path) -> float:
    feats, labels = {}, {}
    for split in ("knn_train", "knn_val"):
        paths, labels[split], _ = list_labelled_folder(data / split)
        feats[split] = extract_features(backbone, paths, SIZE, crop_ratio=1.0)
    return knn_accuracy(feats["knn_train"], labels["knn_train"], feats["knn_val"], labels["knn_val"], 20, 0.07)


def _write_folder(folder: Path, pool: dict[str, bytes], keys: list[str]) -> None:
    folder.mkdir(parents=True)
    for k in keys:
        (folder / f"{k}.jpg").write_bytes(pool[k])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/curation_ablation")
    p.add_argument("--target", type=int, default=1000, help="Fashion-MNIST images in the pool")
    p.add_argument("--distractors", type=float, default=4.0,
                   help="distractor images per target image (split evenly over digits, noise and photo crops)")
    p.add_argument("--dup-share", type=float, default=0.1, help="planted duplicates, a share of the pool")
    p.add_argument("--anchors", type=int, default=300)
    p.add_argument("--k", type=int, default=4, help="sample retrieval: neighbours per anchor")
    p.add_argument("--clusters", type=int, default=40)
    p.add_argument("--per-cluster", type=int, default=40)
    p.add_argument("--knn-train", type=int, default=2000)
    p.add_argument("--knn-val", type=int, default=10000,
                   help="held-out images scored (Fashion-MNIST's test split has 10,000): the binomial sd shrinks as 1/sqrt(n)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipe", default="--patch 8 --locals 2 --aug dinov2 --solarize 0.2",
                   help="learning bench flags on top of its defaults (the size is always 32); the default is the "
                        "Fashion-MNIST bench's recipe (DINOv2's augmentations, solarisation 0.2), which moves the "
                        "features within a few hundred iterations, where crops alone barely move them")
    return p


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    built = build(out, args)
    pool_bytes = {k: b for k, _, b in built["pool"]}
    kinds = built["kinds"]
    curated = curate(out, built["pool"], args)
    curate_s = time.time() - t0
    n = len(curated)
    n_val = args.knn_val
    result = {"bench": "curation_ablation", "pool": len(pool_bytes), "curated": n, "threads": args.threads,
              "curate_s": round(curate_s, 1), "steps": args.steps, "recipe": args.recipe,
              "fashion_share_pool": round(np.mean([v == "fashion" for v in kinds.values()]), 3),
              "fashion_share_curated": round(np.mean([kinds[k] == "fashion" for k in curated]) if n else 0.0, 3),
              "raw_pixels_knn_top1": round(knn(torch.nn.Flatten(), out), 4), "knn_val": n_val, "runs": []}
    if not n:
        raise SystemExit("curation_ablation: the curated shards are empty")
    largs = learning_parser().parse_args(["--size", str(SIZE), *args.recipe.split()])
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        rng = np.random.default_rng(1000 + seed)
        random_keys = sorted(rng.choice(sorted(pool_bytes), n, replace=False).tolist())
        _write_folder(out / f"random_{seed}", pool_bytes, random_keys)
        row = {"seed": seed, "fashion_share_random": round(np.mean([kinds[k] == "fashion" for k in random_keys]), 3)}
        for arm, data in (("curated", out / "curate" / "run" / "shards"), ("random", out / f"random_{seed}")):
            largs.seed = seed
            cfg = load_train_config(raw={**recipe(out, SIZE, args.steps, largs.batch, largs),
                                         "eval": {"at_start": False, "period_iters": 0, "linear_probe": False,
                                                  "train_dir": str(out / "knn_train"),
                                                  "val_dir": str(out / "knn_val"), "center_crop_ratio": 1.0}})
            run_dir = out / f"train_{arm}_{seed}"
            t1 = time.time()
            train(cfg, str(data), run_dir)
            row[f"{arm}_s"] = round(time.time() - t1, 1)
            row[arm] = round(_teacher_knn(run_dir, out), 4)
            shutil.rmtree(run_dir)
        result["runs"].append(row)
        print(f"[curation_ablation] seed {seed}: curated {row['curated']:.4f}, random {row['random']:.4f} "
              f"(raw pixels {result['raw_pixels_knn_top1']:.4f}, {time.time() - t0:.0f} s so far)",
              file=sys.stderr, flush=True)
    result["report"] = str(write_ablation(out / "curate" / "run", result))
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def ablation_rows(result: dict) -> "pa.Table":
    """The result's runs as the rows of ``stats/ablation.parquet`` (schema ``ablation``)."""
    import pyarrow as pa

    from schemas.tables import SCHEMAS

    rows = [{"seed": r["seed"], "eval_set": EVAL_SET, "eval_images": result["knn_val"],
             "train_images": result["curated"], "curated_knn_top1": r["curated"], "random_knn_top1": r["random"],
             "raw_pixels_knn_top1": result["raw_pixels_knn_top1"],
             "curated_target_share": result["fashion_share_curated"],
             "random_target_share": r["fashion_share_random"]} for r in result["runs"]]
    return pa.Table.from_pylist(rows, schema=SCHEMAS["ablation"])


def write_ablation(run_root: Path, result: dict) -> Path:
    """Write the result as ``stats/ablation.parquet`` into the curated run and render that run's report again,
    so its page shows the ablation section; returns the page's path."""
    from curation.pipeline.layout import RunLayout
    from curation.pipeline.storage import write_table
    from curation.report import ABLATION, build_report

    write_table(RunLayout(run_root).stats(ABLATION), ablation_rows(result), ABLATION)
    return build_report(run_root)


def table(result: dict) -> str:
    """The Markdown table of a result: one row per seed, then the mean (the report's ablation summary)."""
    from curation.report import ablation_summary

    n = result["knn_val"]
    lines = [f"pool {result['pool']} images (Fashion-MNIST share {result['fashion_share_pool']}), curated "
             f"{result['curated']} (share {result['fashion_share_curated']}); k-NN top-1 on {n} held-out images, "
             "+- binomial standard deviation; mean row: z counts the seeds' standard error too",
             "", "| seed | curated | random subset | curated - random | z | raw pixels |",
             "| --- | --- | --- | --- | --- | --- |"]
    if not result["runs"]:
        return "\n".join(lines)
    s = ablation_summary(ablation_rows(result).to_pandas())
    for r in s.itertuples():
        spread = "" if np.isnan(r.seed_se) else f" (seed se {r.seed_se:.3f})"
        lines.append(f"| {r.seed} | {r.curated:.3f} +- {r.curated_sd:.3f} | {r.random:.3f} +- {r.random_sd:.3f} | "
                     f"{r.difference:+.3f} +- {r.difference_sd:.3f}{spread} | {r.z:.1f} | "
                     f"{r.raw_pixels:.3f} +- {r.raw_pixels_sd:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    result = run(build_parser().parse_args(argv))
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
