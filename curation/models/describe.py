"""Decode and describe: the one pipeline from image samples to vectors, used by the sscd and embed stages.

:func:`describe` runs an embedder (:mod:`curation.models.embedder`: a retrieval model, the SSCD model or a pixel
function) over a stream of samples (:mod:`curation.data.samples`: a pool shard restricted to some keys, or an anchor
or evaluation set) and returns :class:`Described` (keys, float32 vectors, failures), sorted by key.

* Each image is decoded once, by :func:`curation.data.images.decode_image` with the one set of limits the stage gives
  (``max_pixels``; an animated image keeps its first frame: whether the pool holds animated images was decided by
  download), then preprocessed by the embedder.
* Decoding and preprocessing run in ``num_workers`` DataLoader worker processes (each with one torch thread, as
  torch sets), worker w of n taking samples w, w + n, ... of the stream, so shards are read streaming and image
  files are read only by the worker that decodes them; ``prefetch_factor`` batches per worker are prepared ahead.
  With 0 workers the calling process decodes between batches.
* Batches go to CUDA pinned and non-blocking; the model runs in the calling process.
* An image that cannot be read or decoded is a failure ``(key, reason, detail)`` with a reason of the drop
  vocabulary; what a failure means is the stage's decision.

:func:`loader_plan` is how a stage sizes the pipeline to its task: a model on CPU gets the task's cores
(:func:`curation.cluster.workers.cpu_split`), a pixel function keeps its decode workers; :func:`describe_in_task` runs
:func:`describe` so sized, as the sscd and embed stages do.  Results do not depend on the worker count, and on the
batch size only through float rounding.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curation.data.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from curation.data.samples import Sample
from curation.cluster.workers import cpu_split, loader_workers, torch_threads
from training.worker_exit import exit_with_parent


class Described(NamedTuple):
    keys: list[str]
    vectors: np.ndarray  # float32 [N, D], L2-normalised rows (the pixel descriptor: zero rows for flat images)
    failures: list[tuple[str, str, str]]  # (key, reason, detail)


class ImageStream(IterableDataset):
    """Decoded, preprocessed images of ``samples()``, split across DataLoader workers.  Yields
    ``(key, preprocessed image, None)`` or ``(key, None, (reason, detail))``."""

    def __init__(self, samples: Callable[[], Iterable[Sample]], preprocess, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.samples, self.preprocess, self.max_pixels = samples, preprocess, max_pixels

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, s in enumerate(self.samples()):
            if i % nw != wid:
                continue
            try:
                im, _ = decode_image(s.data, self.max_pixels, drop_animated=False)
                yield s.key, self.preprocess(im), None
            except ImageRejected as err:
                yield s.key, None, (err.reason, err.detail)
            except OSError as err:  # an image set's file could not be read
                yield s.key, None, ("undecodable", str(err))


def collate(items) -> tuple[list[str], torch.Tensor | None, list[tuple[str, str, str]]]:
    """A DataLoader batch of :class:`ImageStream` items -> (keys, stacked images or None, failures)."""
    keys = [k for k, x, _ in items if x is not None]
    xs = [x for _, x, _ in items if x is not None]
    failures = [(k, *f) for k, x, f in items if x is None]
    if not xs:
        return keys, None, failures
    batch = torch.from_numpy(np.stack(xs)) if isinstance(xs[0], np.ndarray) else torch.stack(xs)
    return keys, batch, failures


def loader_plan(embedder, num_workers: int, batch_size: int) -> tuple[int, int | None, int]:
    """(decode workers, torch threads or None to leave them, batch size) for running ``embedder`` in a task: a
    model on CPU gets the task's cores (:func:`curation.cluster.workers.cpu_split`) and batches of at most its
    ``cpu_max_batch``; a pixel function (no model) keeps its decode workers, since decoding is its work."""
    if not embedder.uses_model:
        return num_workers, None, batch_size
    workers, threads = cpu_split(embedder.device.type, num_workers)
    if embedder.device.type == "cpu" and embedder.cpu_max_batch:
        batch_size = min(batch_size, embedder.cpu_max_batch)
    return workers, threads, batch_size


def describe_in_task(embedder, samples: Callable[[], Iterable[Sample]], num_workers: int, batch_size: int, *,
                     prefetch_factor: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS) -> Described:
    """:func:`describe` with the decode workers, torch threads and batch size :func:`loader_plan` gives the running
    task for the configured ``num_workers`` and ``batch_size``."""
    workers, threads, batch = loader_plan(embedder, num_workers, batch_size)
    with torch_threads(threads):
        return describe(embedder, samples, batch, workers, prefetch_factor=prefetch_factor, max_pixels=max_pixels)


def make_loader(embedder, samples: Callable[[], Iterable[Sample]], batch_size: int, num_workers: int = 0, *,
                prefetch_factor: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS) -> DataLoader:
    """The DataLoader of :func:`describe`: batches ``(keys, preprocessed images or None, failures)`` of the images
    of ``samples()`` (a picklable callable: DataLoader workers call it), decoded by exactly ``num_workers`` worker
    processes (at most the usable CPUs), ``batch_size`` per batch (at most the embedder's ``max_batch``)."""
    num_workers = loader_workers(num_workers)
    return DataLoader(
        ImageStream(samples, embedder.preprocess, max_pixels),
        batch_size=min(batch_size, embedder.max_batch or batch_size), num_workers=num_workers, collate_fn=collate,
        pin_memory=embedder.device.type == "cuda",
        prefetch_factor=prefetch_factor if num_workers else None,
        # workers die with this process, also when it is killed with kill -9 mid-read (the trainer's rule)
        worker_init_fn=partial(exit_with_parent, os.getpid()) if num_workers else None,
    )


def describe(embedder, samples: Callable[[], Iterable[Sample]], batch_size: int, num_workers: int = 0, *,
             prefetch_factor: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS) -> Described:
    """Run ``embedder`` over the images of ``samples()`` (loaded as :func:`make_loader` says) -> keys, vectors and
    failures, sorted by key."""
    keys, vecs, failures = [], [], []
    for k, x, f in make_loader(embedder, samples, batch_size, num_workers, prefetch_factor=prefetch_factor,
                               max_pixels=max_pixels):
        failures += f
        if x is not None:
            keys += k
            vecs.append(embedder.embed(x))
    vectors = np.concatenate(vecs) if vecs else np.zeros((0, embedder.dim), np.float32)
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable") if keys else np.zeros(0, np.int64)
    return Described([keys[i] for i in order], vectors[order], sorted(failures))
