"""Embedding and exact k-NN throughput, end to end, in one run.

    python bench/embed_bench.py                               # GPU defaults: ViT-H/14 224 px, 10M x 1024 k-NN
    python bench/embed_bench.py --device cpu --model vit_tiny_patch16_224 --img-size 64 --images 96 \\
        --batch-size 32 --num-workers 2 --knn-db 20000 --knn-queries 1000 --dim 256      # a CPU smoke run

1. **Embedding** (timm model, random weights, ``pretrained=False``): synthetic JPEGs (``--src-size``, 640x480 by
   default, like web images) written as WebDataset shards, then
   * *pipeline*: the embed stage's path (:func:`curation.models.describe.make_loader` feeding the embedder): DataLoader
     workers decode + resize/crop to uint8, pinned memory, normalisation on the device, bf16 autocast on CUDA (fp32
     on CPU), ``--batch-size`` images;
   * *naive*: the same images decoded and transformed in the main process, float32 tensors, eager fp32 model,
     one batch at a time (what a first script does).
   Both report images/s after a warm-up batch; the model is the same object.
2. **Exact k-NN** of ``--knn-queries`` random unit vectors against ``--knn-db`` (``--dim``): on CUDA, fp16 matmul +
   top-k over database chunks with a running merge (queries/s); on CPU, FAISS ``IndexFlatIP``.

Prints one line per measurement and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_shards(out: Path, n: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """n JPEGs (64 distinct smooth random images, cycled) in WebDataset shards of per_shard samples."""
    from PIL import Image

    from curation.pipeline.storage import TarShardWriter

    rng = np.random.default_rng(seed)
    distinct = []
    for _ in range(min(64, n)):
        small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        distinct.append(buf.getvalue())
    tars = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = out / f"{s:05d}.tar"
        with TarShardWriter(path) as w:
            for i in range(start, min(n, start + per_shard)):
                w.write(f"{i:010d}", {"jpg": distinct[i % len(distinct)], "json": {"key": f"{i:010d}"}})
        tars.append(path)
    return tars


def bench_pipeline(emb, tars, batch_size: int, num_workers: int, prefetch: int) -> dict:
    from functools import partial

    from curation.models.describe import make_loader
    from tests.sample_tars import iter_tars

    loader = make_loader(emb, partial(iter_tars, tars), batch_size, num_workers, prefetch_factor=prefetch)
    n, t0, first = 0, None, 0
    for keys, x, _ in loader:
        v = emb.embed(x)  # returns numpy: synchronises
        if t0 is None:  # warm-up batch (worker start, cuDNN/autotune) not timed
            t0, first = time.perf_counter(), len(keys)
            continue
        n += len(keys)
    dt = time.perf_counter() - t0
    assert v.shape[1] == emb.dim
    return {"images": n, "seconds": round(dt, 3), "img_per_s": round(n / dt, 1) if dt > 0 else None,
            "warmup_images": first}


def bench_naive(emb, tars, batch_size: int, max_images: int) -> dict:
    """Main-process decode + float32 CPU transform + eager fp32 forward, batch by batch."""
    from curation.data.images import decode_image
    from curation.models.embedder import resize_center_crop
    from curation.data.samples import iter_shard_samples

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    model = emb.model.float()

    def batches():
        buf = []
        for t in tars:
            for s in iter_shard_samples(t):
                im, _ = decode_image(s.data)
                im = resize_center_crop(im, emb.img_size)
                x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
                buf.append((x - mean) / std)
                if len(buf) == batch_size:
                    yield torch.stack(buf)
                    buf = []
        if buf:
            yield torch.stack(buf)

    n, t0 = 0, None
    with torch.no_grad():
        for x in batches():
            f = model.forward_features(x.to(emb.device))
            f = f[:, 0] if f.ndim == 3 else f.mean(dim=(2, 3))
            torch.nn.functional.normalize(f, dim=1).cpu()
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += len(x)
            if n >= max_images:
                break
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": round(dt, 3), "img_per_s": round(n / dt, 1) if dt > 0 else None}


def bench_knn(n_db: int, n_q: int, dim: int, k: int, device: str, db_chunk: int, q_chunk: int, seed: int = 0) -> dict:
    if device == "cuda":
        g = torch.Generator(device="cuda").manual_seed(seed)
        db = torch.empty(n_db, dim, device="cuda", dtype=torch.float16)
        for s in range(0, n_db, 1_000_000):  # fill in chunks (fp32 temporaries stay small)
            x = torch.randn(min(1_000_000, n_db - s), dim, device="cuda", generator=g)
            db[s:s + len(x)] = torch.nn.functional.normalize(x, dim=1).half()
        q = torch.nn.functional.normalize(torch.randn(n_q, dim, device="cuda", generator=g), dim=1).half()
        torch.cuda.synchronize()

        def run():
            sims_all, ids_all = [], []
            for qs in range(0, n_q, q_chunk):
                qq = q[qs:qs + q_chunk]
                best_s = torch.full((len(qq), k), -float("inf"), device="cuda")
                best_i = torch.zeros((len(qq), k), dtype=torch.int64, device="cuda")
                for ds in range(0, n_db, db_chunk):
                    s, i = torch.topk(qq @ db[ds:ds + db_chunk].T, k, dim=1)
                    cs = torch.cat([best_s, s.float()], 1)
                    ci = torch.cat([best_i, i + ds], 1)
                    best_s, top = torch.topk(cs, k, dim=1)
                    best_i = torch.gather(ci, 1, top)
                sims_all.append(best_s)
                ids_all.append(best_i)
            torch.cuda.synchronize()
            return torch.cat(sims_all), torch.cat(ids_all)

        run_small = q[: min(n_q, q_chunk)]
        _ = run_small @ db[:db_chunk].T  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sims, ids = run()
        dt = time.perf_counter() - t0
        # spot-check exactness on a few queries against a plain fp16 matmul
        ref = torch.topk((q[:4] @ db.T).float(), k, dim=1).indices
        exact = bool((ref == ids[:4]).all().item())
        backend = "torch fp16 matmul+topk (chunked)"
    else:
        import faiss

        rng = np.random.default_rng(seed)
        db = rng.normal(size=(n_db, dim)).astype(np.float32)
        db /= np.linalg.norm(db, axis=1, keepdims=True)
        q = rng.normal(size=(n_q, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(dim)
        index.add(db)
        t0 = time.perf_counter()
        _, ids = index.search(q, k)
        dt = time.perf_counter() - t0
        ref = np.argsort(-(q[:4] @ db.T), axis=1)[:, :k]
        exact = bool((ref == ids[:4]).all())
        backend = f"faiss IndexFlatIP fp32 ({faiss.omp_get_max_threads()} threads)"
    return {"db": n_db, "queries": n_q, "dim": dim, "k": k, "seconds": round(dt, 3),
            "queries_per_s": round(n_q / dt, 1), "backend": backend, "spot_check_exact": exact}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model", default="vit_huge_patch14_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=8192, help="images for the pipeline measurement")
    ap.add_argument("--naive-images", type=int, default=2048, help="images for the naive baseline")
    ap.add_argument("--src-size", default="640x480")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--knn-db", type=int, default=10_000_000)
    ap.add_argument("--knn-queries", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--db-chunk", type=int, default=2_000_000)
    ap.add_argument("--q-chunk", type=int, default=4096)
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--skip-knn", action="store_true")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from curation.config import EmbedConfig
    import torch

    from curation.cluster import gpu
    from curation.models.embedder import build_embedder

    dev = torch.device(gpu.resolve(args.device))
    label = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    results = {"device": label, "torch": torch.__version__}
    print(f"device: {label}")
    if not args.skip_embed:
        w, h = map(int, args.src_size.split("x"))
        with tempfile.TemporaryDirectory(prefix="lvd-embed-bench-") as tmp:
            t0 = time.perf_counter()
            tars = make_shards(Path(tmp), args.images, args.shard_size, (w, h))
            print(f"wrote {args.images} JPEGs ({w}x{h}) in {len(tars)} shards in {time.perf_counter() - t0:.1f}s")
            emb = build_embedder(EmbedConfig(model=args.model, img_size=args.img_size, device=dev.type,
                                             batch_size=args.batch_size))
            params = sum(p.numel() for p in emb.model.parameters()) / 1e6
            pipe = bench_pipeline(emb, tars, args.batch_size, args.num_workers, args.prefetch)
            pipe.update(precision=emb.precision, num_workers=args.num_workers, batch_size=args.batch_size)
            print(f"[embed pipeline] {args.model} {args.img_size}px {emb.precision}, {args.num_workers} workers: "
                  f"{pipe['img_per_s']} img/s ({pipe['images']} images, {pipe['seconds']} s)")
            naive = bench_naive(emb, tars, args.batch_size, args.naive_images)
            naive.update(precision="fp32 eager, main-process decode")
            print(f"[embed naive]    {args.model} {args.img_size}px fp32, decode in main process: "
                  f"{naive['img_per_s']} img/s ({naive['images']} images, {naive['seconds']} s)")
            results["embed"] = {"model": args.model, "params_m": round(params, 1), "img_size": args.img_size,
                                "pipeline": pipe, "naive": naive,
                                "speedup": round(pipe["img_per_s"] / naive["img_per_s"], 2)
                                if pipe["img_per_s"] and naive["img_per_s"] else None}
    if not args.skip_knn:
        r = bench_knn(args.knn_db, args.knn_queries, args.dim, args.k, dev.type, args.db_chunk, args.q_chunk)
        print(f"[exact k-NN]     {r['queries']} queries x {r['db']} x {r['dim']}, k={r['k']}, {r['backend']}: "
              f"{r['queries_per_s']} queries/s ({r['seconds']} s, exact on spot check: {r['spot_check_exact']})")
        results["knn"] = r
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
