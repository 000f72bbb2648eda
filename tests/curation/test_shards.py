"""shards: the union of selections as shuffled WebDataset shards, read back with the `webdataset` library."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.config import load_config
from curation.pipeline.runner import run_pipeline
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
    for i in range(4):  # PNGs: re-encoded as JPEG in the shards; larger than images.max_side: resized as pool images
        Image.new("RGB", (90, 60), (60 * i, 90, 10)).save(core / "c" / f"img{i}.png")
    cfg = make_run(tmp, images, shard_size=25, dropped=["0000009999"], seed=7,
                   retrieve={"anchor_sets": [
                       {"name": "near", "path": str(anchors), "method": "sample", "k": 4},
                       {"name": "core", "path": str(core), "method": "as_is"}],
                       "balanced": {"target_size": 12, "levels": [6, 2]}},
                   shards={"samples_per_shard": 10})
    cfg["images"] = {"max_side": 45}
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
        assert meta["key"] == sample["__key__"]  # one key per sample: the tar key is the json key
        src_key = meta["key"] if meta["source"] == "pool" else meta["key"].removeprefix("core_")
        row = sel[(meta["source"], src_key)]
        for f in ("url", "anchor_set", "anchor_key", "rank", "cluster"):
            assert meta[f] == row[f], (f, meta, row)
        if row["similarity"] is None:
            assert meta["similarity"] is None
        else:
            # the JSON holds the value rounded to 6 decimals (stages/shards.py): half a unit of the 6th decimal
            assert abs(meta["similarity"] - row["similarity"]) <= 0.5e-6 + rounding_tol(1.0, dtype=float)
        expect_key = src_key if meta["source"] == "pool" else f"core_{src_key}"
        assert sample["__key__"] == expect_key
        seen.append((meta["source"], src_key))
    assert len(seen) == len(set(seen)), "an image appears twice"
    assert set(seen) == set(sel)
    assert {s for s, _ in seen} == {"pool", "anchors/core"}
    # shuffled: not in (source, key) order
    assert seen != sorted(seen)


def test_shard_bytes_match_sources_and_index(shard_run):
    root = shard_run["root"]
    from curation.pipeline.storage import iter_tar_samples

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
            else:  # 90x60 PNG, resized to images.max_side like a downloaded image
                assert Image.open(io.BytesIO(m["jpg"])).size == (45, 30)
                assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (45, 30, 90, 60)
            n += 1
    index = pq.read_table(root / "shards_meta" / "index.parquet")
    validate(index, "shard_index")
    assert index.num_rows == n
    manifest = json.loads((root / "shards_meta" / "manifest.json").read_text())
    assert manifest["samples"] == n and manifest["by_source"]["anchors/core"] == 4
    assert manifest["files"] == sorted(p.name for p in (root / "shards").iterdir())


def test_trainer_style_read_and_deterministic_plan(shard_run, tmp_path):
    """Plain key.jpg/key.json pairs; the same seed plans the same shards, a rerun does nothing."""
    import tarfile

    root = shard_run["root"]
    first = sorted((root / "shards").glob("lvd-*.tar"))[0]
    with tarfile.open(first) as tar:
        names = tar.getnames()
    assert len(names) == 30 and all(n.endswith((".jpg", ".txt", ".json")) for n in names)
    stamps = {t.name: t.stat().st_mtime_ns for t in (root / "shards").glob("lvd-*.tar")}
    run_pipeline(load_config(data=shard_run["cfg"]), progress=False)
    assert stamps == {t.name: t.stat().st_mtime_ns for t in (root / "shards").glob("lvd-*.tar")}
    from curation.stages.shards import ShardsStage

    plan_before = pq.read_table(root / "shards_meta" / "_plan.parquet").column("sample_key").to_pylist()
    (root / "shards_meta" / "_plan.parquet").unlink()
    ShardsStage(load_config(data=shard_run["cfg"]), root).plan()
    assert pq.read_table(root / "shards_meta" / "_plan.parquet").column("sample_key").to_pylist() == plan_before


def test_captions_and_img2dataset_fields(shard_run):
    """key.txt holds the caption; key.json the img2dataset fields beside ours; to_tuple("jpg", "txt") works."""
    import webdataset as wds

    root = shard_run["root"]
    tars = [str(t) for t in sorted((root / "shards").glob("lvd-*.tar"))]
    pairs = list(wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert len(pairs) == json.loads((root / "shards_meta" / "manifest.json").read_text())["samples"]
    fields = {"key", "url", "caption", "width", "height", "original_width", "original_height", "sha256",
              "source", "anchor_set", "anchor_key", "rank", "similarity", "cluster"}
    for key, im, txt, meta in pairs:
        assert fields <= set(meta), sorted(fields - set(meta))
        assert im.size == (meta["width"], meta["height"]) if meta["width"] is not None else True
        if meta["source"] == "pool":
            assert txt == meta["caption"] == f"caption of {key}"
            assert meta["url"] == f"http://127.0.0.1/{key}.jpg"
        else:
            assert txt == "" and meta["caption"] is None and meta["url"] is None
            assert len(meta["sha256"]) == 64


def test_shards_folder_holds_only_tars(shard_run):
    """shards/ is the dataset and nothing else (ray.data.read_webdataset reads every file in it as a tar: see
    tests/curation/test_newcomer.py for the Ray Data read); the stage's own files are in shards_meta/."""
    root = shard_run["root"]
    files = sorted(p.name for p in (root / "shards").iterdir())
    assert files == json.loads((root / "shards_meta" / "manifest.json").read_text())["files"]
    assert all(p.is_file() and p.suffix == ".tar" for p in (root / "shards").iterdir())
    assert {p.name for p in (root / "shards_meta").iterdir()} >= {"_plan.parquet", "_index", "_staging",
                                                                   "index.parquet", "manifest.json"}


def test_trainer_reads_each_curated_image_once(shard_run):
    """An as_is anchor set's staging tar is not under shards/, and the trainer reads the shards the
    manifest lists, so every curated image (the as_is anchors included) is one sample of a training pass."""
    from tests.training.lvd_train_testutils import TINY_CFG
    from training.config import load_config as load_train_config
    from training.data import resolve_sources
    from training.train import build_stream

    root = shard_run["root"]
    manifest = json.loads((root / "shards_meta" / "manifest.json").read_text())
    kind, tars = resolve_sources(root / "shards")
    assert kind == "tar" and tars == [str(root / "shards" / f) for f in manifest["files"]]
    keys = sorted(pq.read_table(root / "shards_meta" / "index.parquet")["sample_key"].to_pylist())
    assert len(keys) == manifest["samples"] and sum(k.startswith("core_") for k in keys) == 4
    raw = json.loads(json.dumps(TINY_CFG))
    raw["optim"]["batch_size_per_gpu"] = len(keys)  # one batch = one pass over the data (no shuffle buffer)
    raw["data"]["shuffle_buffer"] = 1
    raw["device"] = "cpu"
    batch = next(iter(build_stream(load_train_config(raw=raw), str(root / "shards"))))
    assert sorted(batch["keys"]) == keys


def test_shuffle_into_shards_in_memory():
    import pyarrow as pa

    from curation.stages.shards import shuffle_into_shards

    sel = pa.table({"key": ["b", "a", "c", "a", "d"], "source": ["pool", "pool", "pool", "anchors/x", "pool"]})
    plan = shuffle_into_shards(sel, seed=3, samples_per_shard=2)
    again = shuffle_into_shards(sel.take([4, 3, 2, 1, 0]), seed=3, samples_per_shard=2)
    assert plan.equals(again)  # the shuffle starts from (source, key) order: input order does not matter
    rows = plan.to_pylist()
    assert [r["shard"] for r in rows] == ["lvd-000000"] * 2 + ["lvd-000001"] * 2 + ["lvd-000002"]
    assert [r["position"] for r in rows] == [0, 1, 0, 1, 0]
    assert sorted(r["sample_key"] for r in rows) == ["a", "b", "c", "d", "x_a"]
    order = np.random.default_rng(3).permutation(5)
    assert [(r["source"], r["key"]) for r in rows] == [sorted(zip(sel["source"].to_pylist(),
                                                                  sel["key"].to_pylist()))[i] for i in order]
    clash = pa.table({"key": ["x_a", "a"], "source": ["pool", "anchors/x"]})
    with pytest.raises(RuntimeError, match="same sample key"):
        shuffle_into_shards(clash, seed=0, samples_per_shard=2)
