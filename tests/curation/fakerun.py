"""A run root with a download stage already done, built without HTTP, for the embed/retrieve/shards/report tests.

``make_run(tmp, images)`` writes ``download/NNNNN.tar`` (key.jpg + key.json with url and caption ``caption of KEY``) and the download ledger (all kept, plus
optional dropped keys), a dummy URL list, and returns a config dict for ``load_config(data=...)``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.pipeline import accounting
from curation.pipeline.storage import TarShardWriter


def jpeg(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_run(tmp: Path, images: list[tuple[str, bytes]], shard_size: int = 32, dropped: list[str] = (),
             **sections) -> dict:
    """`images`: (key, encoded bytes) in key order; `dropped`: extra keys the download 'failed' on."""
    tmp = Path(tmp)
    root = tmp / "run"
    urls = tmp / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1/{k}.jpg" for k, _ in images]}), urls)
    for i, start in enumerate(range(0, len(images), shard_size)):
        part = images[start:start + shard_size]
        with TarShardWriter(root / "download" / f"{i:05d}.tar") as w:
            for key, data in part:
                w.write(key, {"jpg": data, "json": {"key": key, "url": f"http://127.0.0.1/{key}.jpg",
                                                   "caption": f"caption of {key}"}})
        keys = [k for k, _ in part]
        reasons = [None] * len(keys)
        if i == 0:
            keys += list(dropped)
            reasons += ["http_error"] * len(dropped)
        accounting.write_ledger(root, "download", f"{i:05d}", accounting.make_ledger(
            "download", keys, [f"http://127.0.0.1/{k}.jpg" for k in keys], reasons))
    cfg = {"run_root": str(root), "input": {"url_list": str(urls)}, "ray": {"local": True},
           "stages": ["embed", "retrieve", "shards"],
           "embed": {"model": "pixels", "img_size": 64, "batch_size": 16, "num_workers": 0, "device": "cpu"}}
    cfg.update(sections)
    return cfg


def corpus_pool(corpus: Path) -> tuple[list[tuple[str, bytes]], dict[str, dict]]:
    """The demo corpus images that survive dedup (anchor_near, distractors, special kept), read from its www/
    folder: ([(key, bytes)], {key: manifest row})."""
    m = pq.read_table(corpus / "manifest.parquet").to_pylist()
    images, truth = [], {}
    for r in m:
        if r["expected_stage"] is not None or r["role"] not in ("anchor_near", "distractor", "special_kept"):
            continue
        p = corpus / "www" / r["path"].lstrip("/")
        if not p.is_file():
            continue
        key = f"{r['row_id']:010d}"
        images.append((key, p.read_bytes()))
        truth[key] = r
    return images, truth


def random_images(n: int, seed: int = 0, size=(48, 40)) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        out.append((f"{i:010d}", jpeg(Image.fromarray(arr))))
    return out
