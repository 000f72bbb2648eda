"""Random access to WebDataset tar members by key.

A tar's member headers give each member's byte offset and size; :func:`tar_index` reads only the headers (tarfile
seeks past the data) and caches them as ``RUN/_tarindex/<stage>/<name>.parquet`` (schema ``tar_index``).  The shards
stage then reads each selected image with one seek + read, instead of scanning every pool shard for every output
shard; the report does the same for its image grids.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa

from curation.pipeline.layout import RunLayout
from curation.pipeline.storage import iter_tar_members, read_table, write_table


def scan_tar(path: str | Path) -> pa.Table:
    keys, exts, offsets, sizes = [], [], [], []
    with tarfile.open(path, "r:") as tar:
        for key, ext, info in iter_tar_members(tar):
            keys.append(key)
            exts.append(ext)
            offsets.append(info.offset_data)
            sizes.append(info.size)
    return pa.table({"key": pa.array(keys, pa.string()), "ext": pa.array(exts, pa.string()),
                     "offset": pa.array(offsets, pa.int64()), "size": pa.array(sizes, pa.int64())})


def tar_index(root: str | Path, tar: str | Path) -> pa.Table:
    """The member index of `tar` (cached under RUN/_tarindex/<folder of tar>/<tar stem>.parquet)."""
    tar = Path(tar)
    cache = RunLayout(root).tarindex(tar)
    if cache.exists() and cache.stat().st_mtime_ns >= tar.stat().st_mtime_ns:
        return read_table(cache, "tar_index")
    return write_table(cache, scan_tar(tar), "tar_index")


IMAGE_EXT_PREFERENCE = ("jpg", "jpeg", "png", "webp")


def member_locations(root: str | Path, tars: list[Path], keys: set[str] | None = None
                     ) -> dict[str, tuple[str, int, int, int, int]]:
    """key -> (tar path, image offset, image size, json offset, json size) over `tars`, restricted to `keys` when
    given; only keys with an image member; json offset and size are -1 when the sample has no json member."""
    out: dict[str, tuple[str, int, int, int, int]] = {}
    for tar in tars:
        idx = tar_index(root, tar).to_pydict()
        best: dict[str, tuple[int, int, int]] = {}
        meta: dict[str, tuple[int, int]] = {}
        for k, e, o, s in zip(idx["key"], idx["ext"], idx["offset"], idx["size"]):
            if keys is not None and k not in keys:
                continue
            if e == "json":
                meta[k] = (o, s)
            elif e in IMAGE_EXT_PREFERENCE:
                rank = IMAGE_EXT_PREFERENCE.index(e)
                if k not in best or rank < best[k][0]:
                    best[k] = (rank, o, s)
        for k, (_, o, s) in best.items():
            out[k] = (str(tar), o, s, *meta.get(k, (-1, -1)))
    return out


def image_locations(root: str | Path, tars: list[Path], keys: set[str] | None = None) -> dict[str, tuple[str, int, int]]:
    """key -> (tar path, offset, size) of its image member, over `tars` (restricted to `keys` when given)."""
    return {k: v[:3] for k, v in member_locations(root, tars, keys).items()}


class MemberReader:
    """Reads members by (tar, offset, size), keeping the files open."""

    def __init__(self):
        self._files = {}

    def read(self, tar: str, offset: int, size: int) -> bytes:
        f = self._files.get(tar)
        if f is None:
            f = self._files[tar] = open(tar, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{tar}: short read at {offset} ({len(data)} of {size} bytes)")
        return data

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
