"""embed: one ViT embedding per image of the pool, of every anchor set and of every evaluation set.

Units (each done when its output file exists, written atomically):

* ``pool-NNNNN``: the pool shard ``NNNNN.tar`` (``filter/`` or ``download/``, :mod:`curation.samples`), restricted
  to the keys kept by the nearest earlier ledger stage -> ``embed/pool/part-NNNNN.parquet``;
* ``anchors-<set>``: an anchor set (``as_is`` sets are copied, never searched, so they are not embedded)
  -> ``embed/anchors/<set>/part-00000.parquet``;
* ``eval-<set>``: an evaluation set -> ``embed/eval/<set>/part-00000.parquet``.

Tables have schema ``descriptors`` (key, source, L2-normalised float32 vector), sorted by key.  An image that
cannot be decoded is listed in ``.../failed/part-NNNNN.parquet`` (written first); retrieve drops such pool keys
with reason ``embed_failed``.

Throughput: decoding and resize/crop run in ``embed.num_workers`` DataLoader worker processes, each taking every
n-th sample of the unit's stream; batches travel as uint8 (4x less than float32) through pinned memory and are
normalised on the GPU; the model runs under bf16 autocast on CUDA with ``embed.batch_size`` images per step, so the
GPU is fed ``prefetch_factor`` batches ahead.  On CPU a ViT is the bottleneck, so the task's cores are split by
:func:`curation.workers.cpu_split` (on 2 cores: decode inline, both cores for the model).  The model is built once
per worker process (``cached_embedder``).  A pool shard whose images were all dropped earlier writes an empty part.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curation.images import ImageRejected, decode_image
from curation.samples import IMAGE_EXTS, detect_format, iter_image_set, iter_shard_samples, path_key, pool_shards
from curation.workers import cpu_split, loader_workers, torch_threads, wants_gpu
from curation.stages.base import Stage, Unit
from curation.storage import write_table
from curation.vectors import descriptor_table, input_keys


class ImageStream(IterableDataset):
    """Decoded, preprocessed images of one source, split across DataLoader workers (worker w of n takes samples
    w, w + n, ...).  Yields (key, uint8 tensor or None, error or None)."""

    def __init__(self, kind: str, path, preprocess, keys: set[str] | None = None, fmt: str = "auto"):
        """kind 'tar': `path` is a WebDataset tar or a list of them; kind 'set': an anchor / evaluation set."""
        self.kind, self.preprocess, self.keys, self.fmt = kind, preprocess, keys, fmt
        self.path = [str(p) for p in path] if isinstance(path, (list, tuple)) else str(path)

    def _raw(self) -> Iterator[tuple[str, bytes | Path]]:
        if self.kind == "tar":
            for tar in self.path if isinstance(self.path, list) else [self.path]:
                for s in iter_shard_samples(Path(tar), self.keys):
                    yield s.key, s.data
            return
        path = Path(self.path)
        fmt = detect_format(path) if self.fmt == "auto" else self.fmt
        if fmt == "folder":  # file paths only: each worker reads just its own files (same keys as iter_image_set)
            for p in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
                yield path_key(p.relative_to(path).as_posix()), p
        elif fmt == "parquet":
            for row in pq.read_table(path).to_pylist():
                p = Path(row["path"])
                yield str(row.get("key") or path_key(p.as_posix())), (p if p.is_absolute() else path.parent / p)
        else:
            for s in iter_image_set(path, fmt):
                yield s.key, s.data

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, (key, data) in enumerate(self._raw()):
            if i % nw != wid:
                continue
            try:
                if isinstance(data, Path):
                    data = data.read_bytes()
                im, _ = decode_image(data)
                yield key, self.preprocess(im), None
            except ImageRejected as err:
                yield key, None, (err.reason, err.detail)
            except OSError as err:
                yield key, None, ("undecodable", str(err))


def _collate(batch):
    keys = [b[0] for b in batch if b[1] is not None]
    x = torch.stack([b[1] for b in batch if b[1] is not None]) if keys else None
    failed = [(b[0], b[2][0], b[2][1]) for b in batch if b[1] is None]
    return keys, x, failed


def _worker_init(_):
    torch.set_num_threads(1)


def embed_stream(embedder, stream: ImageStream, batch_size: int, num_workers: int, prefetch_factor: int = 4):
    """Run `embedder` over `stream` -> (keys, float32 [N, D], failures [(key, reason, detail)]), sorted by key."""
    num_workers = loader_workers(num_workers)
    loader = DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        pin_memory=embedder.device.type == "cuda", worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=prefetch_factor if num_workers else None,
    )
    keys, vecs, failed = [], [], []
    for k, x, f in loader:
        failed += f
        if k:
            keys += k
            vecs.append(embedder.embed(x))
    vectors = np.concatenate(vecs) if vecs else np.zeros((0, embedder.dim), np.float32)
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable") if keys else np.zeros(0, np.int64)
    return [keys[i] for i in order], vectors[order], sorted(failed)


def _failures_table(failed, source: str) -> pa.Table:
    return pa.table({
        "key": pa.array([f[0] for f in failed], pa.string()),
        "source": pa.array([source] * len(failed), pa.string()),
        "reason": pa.array([f[1] for f in failed], pa.string()),
        "detail": pa.array([f[2] for f in failed], pa.string()),
    })


class EmbedStage(Stage):
    name = "embed"

    def resources(self) -> dict[str, float]:
        return {"num_cpus": 1, "num_gpus": wants_gpu(self.cfg.embed.device) if self.cfg.embed.model != "pixels" else 0}

    def _out(self, unit: Unit) -> Path:
        return self.dir / unit.payload["out"]

    def plan(self) -> list[Unit]:
        units = [Unit(f"pool-{t.stem}", {"kind": "tar", "path": str(t), "source": "pool",
                                         "out": f"pool/part-{t.stem}.parquet"}) for t in pool_shards(self.root)]
        for a in self.cfg.retrieve.anchor_sets:
            if a.method != "as_is":
                units.append(Unit(f"anchors-{a.name}", {"kind": "set", "path": str(a.path), "format": a.format,
                                                        "source": f"anchors/{a.name}",
                                                        "out": f"anchors/{a.name}/part-00000.parquet"}))
        for e in self.cfg.dedup.eval_sets:
            units.append(Unit(f"eval-{e.name}", {"kind": "set", "path": str(e.path), "format": "auto",
                                                 "source": f"eval/{e.name}", "out": f"eval/{e.name}/part-00000.parquet"}))
        return units

    def is_done(self, unit: Unit) -> bool:
        return self._out(unit).exists()

    def run_unit(self, unit: Unit) -> dict:
        from curation.models.embedder import cached_embedder

        p = unit.payload
        ec = self.cfg.embed
        embedder = cached_embedder(ec)
        keys = None
        if p["kind"] == "tar":
            keys = set(input_keys(self.root, self.name)["key"].to_pylist())
        stream = ImageStream(p["kind"], p["path"], embedder.preprocess, keys, p.get("format", "auto"))
        t0 = time.time()
        workers, threads = ec.num_workers, None
        if embedder.kind != "pixels":  # a model on CPU gets the task's cores (the pixels descriptor is decode-bound)
            workers, threads = cpu_split(embedder.device.type, ec.num_workers)
        with torch_threads(threads):
            ks, vecs, failed = embed_stream(embedder, stream, ec.batch_size, workers, ec.prefetch_factor)
        out = self._out(unit)
        if failed:
            write_table(out.parent / "failed" / out.name, _failures_table(failed, p["source"]), "embed_failures")
        write_table(out, descriptor_table(ks, vecs, p["source"]), "descriptors")
        return {"embedded": len(ks), "failed": len(failed), "embed_seconds": round(time.time() - t0, 3)}


