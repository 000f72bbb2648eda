"""shards: the union of selections as shuffled WebDataset shards, read back with the `webdataset` library."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.config import load_config
from curation.runner import run_pipeline
from schemas import validate
from tests.tolerance import rounding_tol
from tests.curation.fakerun import make_run, random_images


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    images = random_images(60, seed=4)
    anchors = tmp / "anchors"
    (anchors / "x").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(anchors / "x" / f"a{i}.jpg")
    core = tmp / "core"
    (core / "c").mkdir(parents=True)
    for i in range(4):  # PNGs: re-encoded as JPEG in the shards
        Image.new("RGB", (30, 20), (60 * i, 90, 10)).save(core / "c" / f"img{i}.png")
    cfg = make_run(tmp, images, shard_size=25, dropped=["0000009999"], seed=7,
                   retrieve={"anchor_sets": [
                       {"name": "near", "path": str(anchors), "method": "sample", "k": 4},
                       {"name": "core", "path": str(core), "method": "as_is"}],
                       "balanced": {"target_size": 12, "levels": [6, 2]}},
                   shards={"samples_per_shard": 10})
    run_pipeline(load_config(data=cfg), progress=False)
    return {"root": tmp / "run", "cfg": cfg}


def test_shards_read_with_webdataset(shard_run):
    import webdataset as wds

    root = shard_run["root"]
    sel = {(r["source"], r["key"]): r for r in pq.read_table(root / "retrieve" / "selection.parquet").to_pylist()}
    tars = sorted((root / "shards").glob("lvd-*.tar"))
    assert [t.name for t in tars] == [f"lvd-{i:06d}.tar" for i in range(len(tars))]
    assert len(tars) == -(-len(sel) // 10)
    ds = wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("pil")
    seen = []
    for sample in ds:
        meta = sample["json"]
        assert isinstance(sample["jpg"], Image.Image)
        row = sel[(meta["source"], meta["key"])]
        for f in ("url", "anchor_set", "anchor_key", "rank", "cluster"):
            assert meta[f] == row[f], (f, meta, row)
        if row["similarity"] is None:
            assert meta["similarity"] is None
        else:
            # the JSON holds the value rounded to 6 decimals (stages/shards.py): half a unit of the 6th decimal
            assert abs(meta["similarity"] - row["similarity"]) <= 0.5e-6 + rounding_tol(1.0, dtype=float)
        expect_key = meta["key"] if meta["source"] == "pool" else f"core_{meta['key']}"
        assert sample["__key__"] == expect_key
        seen.append((meta["source"], meta["key"]))
    assert len(seen) == len(set(seen)), "an image appears twice"
    assert set(seen) == set(sel)
    assert {s for s, _ in seen} == {"pool", "anchors/core"}
    # shuffled: not in (source, key) order
    assert seen != sorted(seen)


def test_shard_bytes_match_sources_and_index(shard_run):
    root = shard_run["root"]
    from curation.storage import iter_tar_samples

    pool = {}
    for t in sorted((root / "download").glob("*.tar")):
        for k, m in iter_tar_samples(t):
            pool[k] = m["jpg"]
    n = 0
    for t in sorted((root / "shards").glob("lvd-*.tar")):
        for k, m in iter_tar_samples(t):
            meta = json.loads(m["json"])
            assert m["jpg"][:3] == b"\xff\xd8\xff"
            if meta["source"] == "pool":
                assert m["jpg"] == pool[meta["key"]]  # copied byte for byte
            else:
                assert Image.open(io.BytesIO(m["jpg"])).size == (30, 20)
            n += 1
    index = pq.read_table(root / "shards" / "index.parquet")
    validate(index, "shard_index")
    assert index.num_rows == n
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["samples"] == n and manifest["by_source"]["anchors/core"] == 4


def test_trainer_style_read_and_deterministic_plan(shard_run, tmp_path):
    """Plain key.jpg/key.json pairs; the same seed plans the same shards, a rerun does nothing."""
    import tarfile

    root = shard_run["root"]
    first = sorted((root / "shards").glob("lvd-*.tar"))[0]
    with tarfile.open(first) as tar:
        names = tar.getnames()
    assert len(names) == 20 and all(n.endswith((".jpg", ".json")) for n in names)
    stamps = {t.name: t.stat().st_mtime_ns for t in (root / "shards").glob("lvd-*.tar")}
    run_pipeline(load_config(data=shard_run["cfg"]), progress=False)
    assert stamps == {t.name: t.stat().st_mtime_ns for t in (root / "shards").glob("lvd-*.tar")}
    from curation.stages.shards import ShardsStage

    plan_before = pq.read_table(root / "shards" / "_plan.parquet").column("sample_key").to_pylist()
    (root / "shards" / "_plan.parquet").unlink()
    ShardsStage(load_config(data=shard_run["cfg"]), root).plan()
    assert pq.read_table(root / "shards" / "_plan.parquet").column("sample_key").to_pylist() == plan_before
