"""Training data: WebDataset tar shards (``key.jpg`` + ``key.json``; .jpeg/.png/.webp accepted) or an image folder.

The stream is infinite (as the reference's infinite sampler; an "epoch" for the schedules is a fixed number of
iterations, ``optim.iters_per_epoch``). Determinism and resume:

* Ranks: each pass over the data (a *data epoch*) shuffles the shard order with ``seed + data_epoch``; with at
  least as many shards as ranks each rank reads every ``world_size``-th shard, otherwise every rank reads all
  shards and keeps every ``world_size``-th sample. A shuffle buffer (seeded per rank) mixes samples across
  shards and passes. This gives one deterministic raw sample sequence per rank.
* Batch ``g`` of a rank is samples ``[g * B, (g + 1) * B)`` of that sequence. DataLoader workers all walk the
  raw sequence (cheap: tar headers only; no image bytes read, nothing decoded) and each reads, decodes and
  augments only its own batches (worker ``k % W`` builds the k-th batch after ``start_batch``, matching the
  DataLoader's round-robin), so a batch's content depends
  only on ``g``: the data position is the number of batches consumed, and a resume (with any worker count)
  skips them exactly.
* Per-sample augmentation randomness is ``random.Random(f"{seed}-{rank}-{n}")`` for the rank's n-th sample;
  per-batch mask randomness is seeded with (seed, rank, g). No global RNG is involved. An undecodable image is
  replaced by a grey image (logged, counted in the batch's ``n_undecodable``), so batch boundaries never shift.
  Unreadable shards yield nothing and truncated ones their complete samples (training.shard_check reports them).
"""
from __future__ import annotations

import glob as _glob
import io
import logging
import os
import random
import tarfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import MultiCropAugmentation
from .masking import MaskingGenerator, collate_multicrop
from .worker_exit import exit_with_parent

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
__all__ = ["resolve_sources", "MultiCropStream", "make_loader", "decode_image", "IMAGE_EXTS"]


def resolve_sources(data: str | os.PathLike | list[str]) -> tuple[str, list[str]]:
    """Return ``("tar", shard paths)`` or ``("files", image paths)`` for a dir, glob, brace pattern or list.

    A directory ``D`` with a manifest beside it (``D_meta/manifest.json``, as the curation's ``shards_meta/``) is read
    as the shards the manifest lists, nothing else; otherwise every ``*.tar`` below ``D``."""
    if isinstance(data, (list, tuple)):
        paths = [str(p) for p in data]
        kind = "tar" if all(p.endswith(".tar") for p in paths) else "files"
        return kind, sorted(paths)
    data = str(data)
    p = Path(data)
    if p.is_dir():
        manifest = p.parent / f"{p.name}_meta" / "manifest.json"  # RUN/shards -> RUN/shards_meta/manifest.json
        if manifest.is_file():
            import json

            names = json.loads(manifest.read_text()).get("files")
            if names is not None:
                missing = [n for n in names if not (p / n).is_file()]
                if missing:
                    raise FileNotFoundError(f"{manifest} lists {len(missing)} shards missing under {data}: {missing[:3]}")
                return "tar", sorted(str(p / n) for n in names)
        tars = sorted(str(x) for x in p.rglob("*.tar"))
        if tars:
            return "tar", tars
        files = sorted(str(x) for x in p.rglob("*") if x.suffix.lower().lstrip(".") in IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"no .tar shards and no images (.jpg/.jpeg/.png/.webp) under {data}")
        return "files", files
    if p.is_file():
        return ("tar", [data]) if data.endswith(".tar") else ("files", [data])
    import braceexpand

    paths: list[str] = []
    for pat in braceexpand.braceexpand(data):
        paths += sorted(_glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if os.path.exists(pat) else [])
    if not paths:
        raise FileNotFoundError(f"--data {data!r} matches no shard or image")
    kind = "tar" if all(x.endswith(".tar") for x in paths) else "files"
    return kind, sorted(paths)


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _read_range(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _iter_unit(kind: str, unit: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(key, read) per image of a shard or file; ``read()`` fetches the bytes. Only tar headers are read while
    walking, so the DataLoader workers that all walk the stream each read just the images they decode."""
    if kind == "files":
        yield unit, partial(_read_range, unit, 0, -1)
        return
    try:  # an unreadable shard yields nothing (training.shard_check reports it at the start of a run)
        size = os.path.getsize(unit)
        tar = tarfile.open(unit, "r:")  # seekable: iterating skips member data
    except (tarfile.TarError, OSError):
        return
    with tar:
        key, best = None, None  # members of one sample are adjacent; keep its preferred image extension

        def pick() -> Iterator[tuple[str, Callable[[], bytes]]]:
            if best is not None:
                yield key, partial(_read_range, unit, best[1].offset_data, best[1].size)

        for info in _members(tar):
            # a member cut off by truncation is skipped (training.shard_check reported it at the start)
            if not info.isfile() or info.offset_data + info.size > size:
                continue
            k, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
            if k != key:
                yield from pick()
                key, best = k, None
            rank = IMAGE_EXTS.index(ext.lower()) if ext.lower() in IMAGE_EXTS else None
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, info)
        yield from pick()


_WARNED: set[str] = set()


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members up to the first unreadable header (a truncated or corrupt shard ends there; logged once per
    process, as every DataLoader worker walks the same shards)."""
    try:
        yield from tar
    except (tarfile.TarError, OSError, EOFError) as e:
        if tar.name not in _WARNED:
            _WARNED.add(tar.name)
            log.warning("shard %s is unreadable past byte %d (%s): its remaining samples are skipped", tar.name,
                        tar.offset, e)


class MultiCropStream(IterableDataset):
    def __init__(
        self,
        data: str | list[str],
        augment: MultiCropAugmentation,
        batch_size: int,
        mask_generator: MaskingGenerator,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        start_batch: int = 0,
    ):
        self.kind, self.units = resolve_sources(data)
        self.augment = augment
        self.batch_size = batch_size
        self.mask_generator = mask_generator
        self.mask_ratio_min_max = tuple(mask_ratio_min_max)
        self.mask_probability = mask_probability
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(int(shuffle_buffer), 1)
        self.start_batch = start_batch

    # raw (undecoded) samples of one slot, forever
    def _raw(self, slot: int, n_slots: int) -> Iterator[tuple[str, Callable[[], bytes]]]:
        data_epoch = 0
        while True:
            order = list(self.units)
            random.Random(self.seed * 1_000_003 + data_epoch).shuffle(order)
            yielded = 0
            if len(order) >= n_slots:
                for unit in order[slot::n_slots]:
                    for s in _iter_unit(self.kind, unit):
                        yielded += 1
                        yield s
            else:
                i = 0
                for unit in order:
                    for s in _iter_unit(self.kind, unit):
                        if i % n_slots == slot:
                            yielded += 1
                            yield s
                        i += 1
            if yielded == 0:
                raise RuntimeError(f"data slot {slot}/{n_slots} got no sample: dataset too small for "
                                   f"{self.world_size} rank(s) x workers, or no readable images in {self.units[:3]}")
            data_epoch += 1

    def _shuffled(self, slot: int, n_slots: int) -> Iterator[tuple[str, Callable[[], bytes]]]:
        rng = random.Random(f"shuffle-{self.seed}-{slot}")
        buf: list[tuple[str, Callable[[], bytes]]] = []
        for s in self._raw(slot, n_slots):
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                if len(buf) < self.shuffle_buffer:
                    continue
            i = rng.randrange(len(buf))
            out, buf[i] = buf[i], buf[-1]
            buf.pop()
            yield out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        bs = self.batch_size
        batch: list[dict[str, Any]] = []
        undecodable = 0
        # every worker walks the rank's raw (undecoded) stream; batch g = samples [g*bs, (g+1)*bs) and the
        # resumed loader's k-th batch (start_batch + k) is built by worker k % nw, which the DataLoader reads
        # round-robin from worker 0: so batch contents depend only on g, whatever the worker count.
        for n, (key, read) in enumerate(self._shuffled(self.rank, self.world_size)):
            g = n // bs
            if g < self.start_batch or (g - self.start_batch) % nw != wid:
                continue
            try:
                img = decode_image(read())
            except Exception as e:  # deterministic stand-in, so batch boundaries never shift
                log.warning("undecodable sample %s replaced by a grey image: %s", key, e)
                img = Image.new("RGB", (64, 64), (128, 128, 128))
                undecodable += 1
            sample = self.augment(img, rng=random.Random(f"{self.seed}-{self.rank}-{n}"))
            sample["key"] = key
            batch.append(sample)
            if len(batch) == bs:
                out = collate_multicrop(batch, self.mask_generator, random.Random(f"mask-{self.seed}-{self.rank}-{g}"),
                                        self.mask_ratio_min_max, self.mask_probability)
                out["batch_index"] = g
                out["n_undecodable"] = undecodable  # counted in the metrics rows
                yield out
                batch, undecodable = [], 0


def make_loader(stream: IterableDataset, num_workers: int = 0) -> DataLoader:
    """Workers exit with this process, even when it is SIGKILLed (training.worker_exit)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=2 if num_workers > 0 else None,
                      worker_init_fn=partial(exit_with_parent, os.getpid()) if num_workers > 0 else None)
