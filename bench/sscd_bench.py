"""SSCD descriptor throughput end-to-end from WebDataset shards, against a naive baseline, plus k-NN queries/s.

    python bench/sscd_bench.py                          # GPU-sized defaults (2,048 images, batch 256, 8 workers)
    python bench/sscd_bench.py --images 24 --batch 8 --workers 2 --naive-images 8 --knn-db 20000 --knn-queries 2000

* **pipeline**: the sscd stage's path, :func:`curation.models.describe.describe` with the SSCD embedder
  (:func:`curation.models.embedder.build_copy_embedder`, built once) - JPEG decode + resize in DataLoader worker
  processes, uint8 batches pinned and copied non-blocking, normalised on the device, bf16 autocast + channels-last
  on CUDA; on CPU fp32, with the process's cores split between decode workers and torch threads by
  :func:`curation.models.describe.loader_plan` (on 2 cores: no decode worker, both cores for the model) and batches of at
  most ``CPU_BATCH``.
* **naive**: decode in the main process, batch 1, eager fp32, synchronous - what a first implementation does.
* **knn**: :func:`curation.engine.knn.knn_search` exact inner-product top-k (faiss flat on CPU, chunked torch on CUDA).

Images are synthetic 640x480 JPEGs (the size the 1-core decode figure of ~210 img/s was measured at) written to shards in a temp dir;
weights are random (speed does not depend on them).  Prints one line per measurement with the device.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests/ helpers, run as a script

from curation.config import SSCDConfig
from curation.models.describe import describe, describe_in_task, loader_plan
from curation.data.images import decode_image
from curation.engine.knn import knn_search
from curation.models.embedder import build_copy_embedder
from curation.models.sscd import build_sscd_random, sscd_transform
from tests.sample_tars import iter_tars
from curation.pipeline.storage import TarShardWriter


def make_shards(out: Path, n: int, per_shard: int, w: int = 640, h: int = 480) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(0, n, per_shard):
        p = out / f"{s // per_shard:05d}.tar"
        with TarShardWriter(p) as tar:
            for i in range(s, min(n, s + per_shard)):
                small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
                im = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=90)
                tar.write(f"{i:010d}", {"jpg": buf.getvalue(), "json": {"key": f"{i:010d}"}})
        paths.append(p)
    return paths


def _sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--naive-images", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--preprocess", default="square320", choices=["square320", "short288"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--knn-db", type=int, default=1_000_000)
    ap.add_argument("--knn-queries", type=int, default=100_000)
    ap.add_argument("--knn-k", type=int, default=64)
    args = ap.parse_args(argv)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "CPU"
    print(f"device: {dev} ({name}), torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.images, args.per_shard)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: speed does not depend on them
            emb = build_copy_embedder(SSCDConfig(device=dev, preprocess=args.preprocess))
        # warm-up (cudnn autotune) on a few images, not timed
        warm = list(iter_tars(shards))[: min(args.batch, 16)]
        describe(emb, partial(iter, warm), args.batch)
        _sync(dev)
        workers, threads, batch = loader_plan(emb, args.workers, args.batch)  # for the report line
        t0 = time.perf_counter()
        keys, vec, _ = describe_in_task(emb, partial(iter_tars, shards), args.workers, args.batch)  # as the stage
        _sync(dev)
        t_pipe = time.perf_counter() - t0
        assert len(keys) == args.images
        amp = "bf16 autocast, channels-last" if dev.startswith("cuda") else "fp32"
        split = f"{workers} decode workers" + (f", {threads} torch threads" if threads else "")
        print(f"pipeline: {args.images} images in {t_pipe:.2f} s = {args.images / t_pipe:.2f} img/s "
              f"(batch {batch}, {split}, {amp}, {args.preprocess}, {name})")

        model = build_sscd_random(0).to(dev).eval()
        transform = sscd_transform(args.preprocess)
        samples = list(iter_tars(shards))[: args.naive_images]
        with torch.inference_mode():
            model(transform(decode_image(samples[0].data)[0])[None].to(dev))
            _sync(dev)
            t0 = time.perf_counter()
            for s in samples:
                im, _ = decode_image(s.data)
                out = model(transform(im)[None].to(dev))
                out.cpu()
            _sync(dev)
        t_naive = time.perf_counter() - t0
        print(f"naive:    {len(samples)} images in {t_naive:.2f} s = {len(samples) / t_naive:.2f} img/s "
              f"(batch 1, decode in the main process, eager fp32, {name})")
        print(f"speed-up: {(args.images / t_pipe) / (len(samples) / t_naive):.2f}x")
    del emb, model

    rng = np.random.default_rng(0)
    db = rng.standard_normal((args.knn_db, 512), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[rng.choice(args.knn_db, args.knn_queries, replace=False)]
    knn_search(q[:10], db[:1000], args.knn_k, device=dev)  # warm-up
    t0 = time.perf_counter()
    sims, ids = knn_search(q, db, args.knn_k, device=dev)
    t_knn = time.perf_counter() - t0
    print(f"knn:      {args.knn_queries} queries x {args.knn_db} x 512 fp32, k={args.knn_k}, exact: "
          f"{t_knn:.2f} s = {args.knn_queries / t_knn:,.0f} queries/s ({'torch' if dev.startswith('cuda') else 'faiss'}"
          f", {name})")


if __name__ == "__main__":
    main()
