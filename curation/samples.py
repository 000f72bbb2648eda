"""Where images come from, for every stage after download.

* The **pool**: the run's WebDataset shards - ``filter/NNNNN.tar`` once the filter stage has run (face-blurred,
  only kept images), else ``download/NNNNN.tar`` - restricted to the keys a given stage kept.
* **Image sets** (anchor sets, evaluation sets): an image folder (class subfolders optional), WebDataset tar
  shards, or a Parquet file with a ``path`` column (and optional ``key``/``class`` columns).  Keys are made from
  the relative path (``/`` and ``.`` replaced), so they are stable and unique within the set.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from curation.storage import iter_tar_samples

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Sample:
    key: str
    data: bytes  # encoded image
    meta: dict  # url/caption for pool samples, class/path for image sets


def pool_stage(root: Path) -> str:
    """The stage whose tar shards hold the pool images: 'filter' when it has run, else 'download'."""
    root = Path(root)
    return "filter" if any((root / "filter").glob("*.tar")) else "download"


def pool_shards(root: Path) -> list[Path]:
    root = Path(root)
    return sorted((root / pool_stage(root)).glob("[0-9]*.tar"))


#: the members a pool sample's image may be stored under, in order of preference
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def image_member(members: dict[str, bytes]) -> str | None:
    """The member (extension) holding a pool sample's image: the first non-empty one of :data:`IMAGE_MEMBERS`."""
    return next((ext for ext in IMAGE_MEMBERS if members.get(ext)), None)


def iter_shard_samples(tar_path: Path, keys: set[str] | None = None) -> Iterator[Sample]:
    for key, members in iter_tar_samples(tar_path):
        if keys is not None and key not in keys:
            continue
        ext = image_member(members)
        if ext is None:
            continue
        data = members[ext]
        meta = json.loads(members["json"]) if "json" in members else {}
        yield Sample(key, data, meta)


def iter_pool(root: Path, keys: Iterable[str] | None = None) -> Iterator[Sample]:
    keyset = set(keys) if keys is not None else None
    for tar in pool_shards(root):
        yield from iter_shard_samples(tar, keyset)


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


def path_key(rel: str) -> str:
    """A WebDataset-safe key from a relative path: 'cls/img.01.jpg' -> 'cls_img_01'."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return _KEY_BAD.sub("_", stem)


def detect_format(path: Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return "parquet"
    if path.is_file() and path.suffix == ".tar":
        return "webdataset"
    if path.is_dir() and any(path.glob("*.tar")):
        return "webdataset"
    if path.is_dir():
        return "folder"
    raise ValueError(f"{path}: not an image folder, .tar shard(s) or .parquet list")


def iter_image_set(path: Path, fmt: str = "auto") -> Iterator[Sample]:
    """Iterate an anchor or evaluation set in a deterministic order."""
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "folder":
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        for p in files:
            rel = p.relative_to(path).as_posix()
            cls = rel.split("/")[0] if "/" in rel else None
            yield Sample(path_key(rel), p.read_bytes(), {"path": str(p), "class": cls})
    elif fmt == "webdataset":
        tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
        for tar in tars:
            for s in iter_shard_samples(tar):
                s.meta.setdefault("class", s.meta.get("cls"))
                yield s
    elif fmt == "parquet":
        t = pq.read_table(path).to_pylist()
        base = path.parent
        for i, row in enumerate(t):
            p = Path(row["path"])
            p = p if p.is_absolute() else base / p
            key = row.get("key") or path_key(Path(row["path"]).as_posix())
            yield Sample(str(key), p.read_bytes(), {"path": str(p), "class": row.get("class")})
    else:
        raise ValueError(f"unknown image set format {fmt!r}")
