"""sscd: copy-detection descriptors for the pool and every evaluation set.

Units: one per pool shard (``pool-NNNNN``: the keys the filter kept, read from ``filter/NNNNN.tar``, or
``download/`` when the filter did not run) and one per evaluation set (``eval-<name>``, read with
:func:`curation.samples.iter_image_set`).  Outputs (schema ``descriptors``): ``sscd/pool/part-NNNNN.parquet`` and
``sscd/eval/<set>/part-00000.parquet``; a unit is complete when its part exists.

Descriptor (``sscd.descriptor``):

* ``sscd`` - the SSCD ResNet-50 (:mod:`curation.models.sscd`; ``sscd.weights``, random weights when null, for
  tests only).  Images are decoded and resized in ``sscd.num_workers`` torch DataLoader worker processes (each
  worker takes every num_workers-th sample of the stream, so shards are read streaming), batches of
  ``sscd.batch_size`` go to the device pinned and non-blocking; on CUDA under bf16 autocast with channels-last
  memory (``sscd.precision``, ``sscd.channels_last``).  On CPU it runs fp32 with the task's cores split by
  :func:`curation.workers.cpu_split` (on 2 cores: decode inline, both cores for the model) and batches of at most
  :data:`CPU_BATCH`.  ``short288`` preprocessing keeps the aspect ratio, so it runs batch 1.
* ``pixels`` - :func:`curation.models.sscd.pixel_descriptor`, computed in the same workers (no model).

A pool unit describes every image the previous ledger stage (filter) kept: hash duplicates too, since the dedup
stage joins hash groups and SSCD neighbours in one graph.  A unit with no such image writes an empty part.  An
evaluation image that cannot be decoded is skipped with a warning (it is not a pool row, so no ledger entry).
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from curation import accounting
from curation.images import ImageRejected, decode_image
from curation.samples import iter_image_set, iter_shard_samples, pool_shards
from curation.workers import cluster_has_gpu, cpu_split, loader_workers, torch_threads
from curation.stages.base import Stage, Unit
from curation.storage import write_table
from curation.vectors import descriptor_table, input_stage

log = logging.getLogger("lvd")

_MODEL_CACHE: dict = {}  # (weights, device) -> model, reused across units in one worker process
# On CPU, batches beyond this add memory, not speed (ResNet-50 at 320 px, 2 cores: batch 1 0.27, 4 0.70, 8 0.70 img/s)
CPU_BATCH = 8


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("sscd.device is 'cuda' but no CUDA device is visible to this process")
    return device


def get_model(weights: Path | None, device: str, channels_last: bool = False):
    import torch

    from curation.models.sscd import build_sscd_random, load_sscd

    key = (str(weights) if weights else None, device, channels_last)
    if key not in _MODEL_CACHE:
        if weights is None:
            warnings.warn("sscd.weights is null: random SSCD weights (meaningless descriptors; testing only)")
            model = build_sscd_random(0).to(device)
        else:
            model = load_sscd(weights, device)
        if channels_last and device.startswith("cuda") and not isinstance(model, torch.jit.ScriptModule):
            model = model.to(memory_format=torch.channels_last)
        _MODEL_CACHE[key] = model.eval()
    return _MODEL_CACHE[key]


def _decode_stream(factory, transform, max_pixels):
    """A torch IterableDataset over `factory()` samples: (key, transformed image or None, error)."""
    from torch.utils.data import IterableDataset, get_worker_info

    class Stream(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
            for i, s in enumerate(factory()):
                if i % nw != wid:
                    continue
                try:
                    im, _ = decode_image(s.data, max_pixels, drop_animated=False)
                except ImageRejected as err:
                    yield s.key, None, str(err)
                    continue
                yield s.key, transform(im), None

    return Stream()


def _collate(items):
    import torch

    keys = [k for k, x, _ in items if x is not None]
    xs = [x for _, x, _ in items if x is not None]
    failed = [(k, e) for k, x, e in items if x is None]
    if xs and isinstance(xs[0], np.ndarray):
        batch = torch.from_numpy(np.stack(xs))
    else:
        batch = torch.stack(xs) if xs else None
    return keys, batch, failed


def compute_descriptors(
    factory,
    descriptor: str = "sscd",
    *,
    weights: Path | None = None,
    preprocess: str = "square320",
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    bf16: bool = True,
    channels_last: bool = True,
    max_pixels: int = 89_478_485,
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Descriptors of the samples `factory()` yields: (keys, float32 [n, d] unit rows, [(key, decode error)])."""
    from torch.utils.data import DataLoader

    from curation.models.sscd import pixel_descriptor, sscd_transform

    if descriptor == "pixels":
        transform, dev, model = pixel_descriptor, "cpu", None
    elif descriptor == "sscd":
        dev = resolve_device(device)
        transform = sscd_transform(preprocess)
        model = get_model(weights, dev, channels_last)
    else:
        raise ValueError(f"unknown descriptor {descriptor!r}")
    bs = 1 if (descriptor == "sscd" and preprocess == "short288") else batch_size
    num_workers = loader_workers(num_workers)
    loader = DataLoader(
        _decode_stream(factory, transform, max_pixels), batch_size=bs, num_workers=num_workers,
        collate_fn=_collate, pin_memory=dev.startswith("cuda"),
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
    )
    keys, outs, failed = [], [], []
    cuda = dev.startswith("cuda")
    _run(loader, model, dev, cuda and channels_last, cuda and bf16, keys, outs, failed)
    d = outs[0].shape[1] if outs else 0
    return keys, (np.concatenate(outs) if outs else np.zeros((0, d), np.float32)).astype(np.float32), failed


def loader_plan(descriptor: str, device: str, num_workers: int, batch_size: int) -> tuple[int, int | None, int]:
    """(decode workers, torch threads or None, batch size) the stage runs with: on CPU the SSCD model gets the
    task's cores (:func:`curation.workers.cpu_split`) and batches of at most :data:`CPU_BATCH`; the pixels descriptor
    has no model and keeps its decode workers."""
    if descriptor != "sscd":
        return num_workers, None, batch_size
    dev = resolve_device(device)
    workers, threads = cpu_split(dev, num_workers)
    return workers, threads, batch_size if dev.startswith("cuda") else min(batch_size, CPU_BATCH)


def _run(loader, model, dev, channels_last, bf16, keys, outs, failed) -> None:
    import torch

    with torch.inference_mode():
        for bkeys, batch, bfailed in loader:
            failed += bfailed
            if batch is None:
                continue
            if model is None:
                out = batch.float()
            else:
                x = batch.to(dev, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    out = model(x)
                out = torch.nn.functional.normalize(out.float(), dim=1)
            keys += bkeys
            outs.append(out.cpu().numpy())


def _kept_in_range(root: Path, lo: str, hi: str) -> set[str]:
    """Keys the input ledger stage kept within [lo, hi] (row-group pruning keeps this cheap on huge ledgers)."""
    files = sorted(accounting.ledger_dir(root, input_stage(root, "sscd")).glob("*.parquet"))
    keys: set[str] = set()
    for f in files:
        t = pq.read_table(f, columns=["key", "kept"], filters=[("key", ">=", lo), ("key", "<=", hi), ("kept", "=", True)])
        keys.update(t["key"].to_pylist())
    return keys


class SSCDStage(Stage):
    name = "sscd"

    def resources(self) -> dict[str, float]:
        gpus = 0
        if self.cfg.sscd.descriptor == "sscd" and self.cfg.sscd.device != "cpu":
            gpus = 1 if cluster_has_gpu() else 0
        return {"num_cpus": max(self.num_cpus, float(min(self.cfg.sscd.num_workers, 4)) or 1.0), "num_gpus": gpus}

    def plan(self) -> list[Unit]:
        units = [Unit(f"pool-{p.stem}", {"kind": "pool", "shard": str(p)}) for p in pool_shards(self.root)]
        for es in self.cfg.dedup.eval_sets:
            units.append(Unit(f"eval-{es.name}", {"kind": "eval", "set": es.name, "path": str(es.path)}))
        return units

    def out_path(self, unit: Unit) -> Path:
        if unit.payload["kind"] == "pool":
            return self.dir / "pool" / f"part-{Path(unit.payload['shard']).stem}.parquet"
        return self.dir / "eval" / unit.payload["set"] / "part-00000.parquet"

    def is_done(self, unit: Unit) -> bool:
        return self.out_path(unit).exists()

    def run_unit(self, unit: Unit) -> dict:
        sc = self.cfg.sscd
        if unit.payload["kind"] == "pool":
            tar = Path(unit.payload["shard"])
            shard_keys = self._shard_keys(tar)
            keys = _kept_in_range(self.root, min(shard_keys), max(shard_keys)) if shard_keys else set()
            factory = partial(iter_shard_samples, tar, keys)
            source = "pool"
        else:
            factory = partial(iter_image_set, Path(unit.payload["path"]))
            source = f"eval/{unit.payload['set']}"
            keys = None
        workers, threads, batch = loader_plan(sc.descriptor, sc.device, sc.num_workers, sc.batch_size)
        with torch_threads(threads):
            out_keys, vec, failed = compute_descriptors(
                factory, sc.descriptor, weights=sc.weights, preprocess=sc.preprocess, batch_size=batch,
                num_workers=workers, device=sc.device, bf16=sc.precision != "fp32", channels_last=sc.channels_last,
                max_pixels=self.cfg.images.max_image_pixels,
            )
        if failed:
            if keys is not None:  # pool images were decoded by the filter: a failure here is a real error
                raise RuntimeError(f"sscd {unit.id}: {len(failed)} pool images failed to decode, e.g. {failed[0]}")
            for k, e in failed:
                log.warning("sscd %s: skipping undecodable evaluation image %s: %s", unit.id, k, e)
        if keys is not None and set(out_keys) != keys:
            raise RuntimeError(f"sscd {unit.id}: {len(keys - set(out_keys))} kept keys missing from {tar}")
        write_table(self.out_path(unit), descriptor_table(out_keys, vec, source), "descriptors")
        return {"described": len(out_keys), "skipped": len(failed)}

    def _shard_keys(self, tar: Path) -> list[str]:
        """The keys of a pool shard, from its (small) ledger part rather than the tar's image bytes."""
        ledger = accounting.ledger_path(self.root, tar.parent.name, tar.stem)
        t = pq.read_table(ledger, columns=["key", "kept"])
        return sorted(k for k, kept in zip(t["key"].to_pylist(), t["kept"].to_pylist()) if kept)


