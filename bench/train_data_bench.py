"""Training data path throughput: can decode + multi-crop augmentation + masking keep the GPU fed?

    python bench/train_data_bench.py                               # reference crops (2x224 + 8x98), 1/2/4/8 workers
    python bench/train_data_bench.py --workers 0 1 2 --images 256  # a quick CPU run

Synthetic 640x480 JPEGs (web-image sized) in WebDataset shards are read through the trainer's own stream
(``training.train.build_stream``: decode, DINOv2's augmentations, block masks, collation) and
DataLoader (``training.data.make_loader``), for each worker count. Prints images/s (after the first batch) per
worker count; compare with the training step's images/s from ``bench/train_throughput.py`` to choose
``data.num_workers``. Needs neither Ray nor a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embed_bench import make_shards  # noqa: E402  (same synthetic shards as the embedding bench)


def bench_workers(cfg, tars: list[Path], workers: int, batches: int) -> dict:
    from training.data import make_loader
    from training.train import build_stream

    loader = make_loader(build_stream(cfg, [str(t) for t in tars]), workers)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    bs = cfg.optim.batch_size_per_gpu
    del it, loader
    return {"workers": workers, "batch": bs, "batches": batches, "seconds": round(dt, 3),
            "images_per_s": round(batches * bs / dt, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=32, help="images per batch")
    ap.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    ap.add_argument("--images", type=int, default=512, help="distinct-file count in the shards (cycled)")
    ap.add_argument("--src-size", default="640x480")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=98)
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    from training.config import TrainConfig

    cfg = TrainConfig.model_validate({
        "optim": {"batch_size_per_gpu": args.batch},
        "crops": {"global_crops_size": args.global_size, "local_crops_size": args.local_size,
                  "local_crops_number": args.local_crops},
        "data": {"shuffle_buffer": 64},
    })
    w, h = (int(v) for v in args.src_size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tars = make_shards(Path(tmp), args.images, 128, (w, h))
        for workers in args.workers:
            row = bench_workers(cfg, tars, workers, args.batches)
            row.update(src=args.src_size, crops=f"2x{args.global_size}+{args.local_crops}x{args.local_size}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
