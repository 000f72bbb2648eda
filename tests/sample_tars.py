"""The samples of several pool shards in order: what tests and benches read whole shards with (the stages read
one shard restricted to their input keys, :func:`curation.data.samples.iter_shard_samples`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from curation.data.samples import Sample, iter_shard_samples


def iter_tars(tars: Iterable[Path], keys: set[str] | None = None) -> Iterator[Sample]:
    """The samples of several tar shards, in order (restricted to `keys` when given)."""
    for tar in tars:
        yield from iter_shard_samples(Path(tar), keys)
