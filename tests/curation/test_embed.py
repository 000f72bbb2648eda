"""embed: the embedder (timm, our exported backbone, pixels) and the stage's outputs."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curation.pipeline import accounting
from curation.config import EmbedConfig, load_config
from curation.models.describe import describe
from curation.models.embedder import Preprocess, build_embedder, resize_center_crop
from curation.pipeline.runner import run_pipeline
from curation.data.samples import iter_shard_samples
from curation.data.vectors import load_descriptors
from schemas import validate
from tests.tolerance import assert_close
from tests.curation.fakerun import make_run, random_images


def _imgs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (30 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_preprocess_short_side_centre_crop():
    im = Image.new("RGB", (100, 50))
    im.paste((255, 0, 0), (0, 0, 25, 50))  # red left quarter: cropped away by the centre square
    out = resize_center_crop(im, 32)
    assert out.size == (32, 32)
    x = Preprocess(32)(im)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert int(x[0, :, 0].float().mean()) < 20


@pytest.mark.parametrize("pooling,dim", [("cls", 192), ("mean", 192), ("both", 384)])
def test_timm_vit_embeddings(pooling, dim):
    emb = build_embedder(EmbedConfig(model="vit_tiny_patch16_224", img_size=32, pooling=pooling, device="cpu"))
    v = emb.embed_images(_imgs())
    assert v.shape == (3, dim) and v.dtype == np.float32
    assert_close(np.linalg.norm(v, axis=1), 1.0, n_terms=dim, dtype=np.float32, depth=2, magnitude=1.0)
    assert emb.precision == "fp32"


def test_timm_dinov2_and_cnn_and_checkpoint(tmp_path):
    # a DINOv2-style timm ViT at a non-default size (dynamic_img_size), weights from a local file
    emb = build_embedder(EmbedConfig(model="vit_small_patch14_dinov2", img_size=28, device="cpu"))
    assert emb.embed_images(_imgs()).shape == (3, 384)
    ckpt = tmp_path / "w.pth"
    torch.save(emb.model.state_dict(), ckpt)
    emb2 = build_embedder(EmbedConfig(model="vit_small_patch14_dinov2", img_size=28, device="cpu", checkpoint=ckpt))
    # ViT-S/14 in fp32, unit outputs: 12 blocks x (attention, MLP) chained, the MLP's 1536-term reduction longest
    assert_close(emb.embed_images(_imgs()), emb2.embed_images(_imgs()), n_terms=1536, dtype=np.float32,
                 depth=2 * 12 + 2, magnitude=1.0)
    cnn = build_embedder(EmbedConfig(model="resnet18", img_size=32, device="cpu"))
    assert cnn.embed_images(_imgs()).shape == (3, 512)


def test_lvd_exported_backbone(tmp_path):
    vt = pytest.importorskip("training.models.vision_transformer")
    backbone_io = pytest.importorskip("training.models.backbone_io")
    model = vt.build_backbone("vit_tiny_patch14", depth=2, img_size=56)
    torch.nn.init.normal_(model.cls_token, std=1.0)
    path = backbone_io.save_backbone(model, tmp_path / "backbone.pth")
    emb = build_embedder(EmbedConfig(model="lvd", checkpoint=path, img_size=28, pooling="cls", device="cpu"))
    imgs = _imgs()
    v = emb.embed_images(imgs)
    assert v.shape == (3, 192)
    x = torch.stack([Preprocess(28)(im) for im in imgs]).float()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        ref = model.eval().forward_features((x - mean) / std)["x_norm_clstoken"]
    # 2 blocks x (attention, MLP 4 x 192 terms) + patch embedding + normalisations; unit outputs
    assert_close(v, torch.nn.functional.normalize(ref, dim=1).numpy(), n_terms=4 * 192, dtype=np.float32,
                 depth=2 * 2 + 3, magnitude=1.0)
    both = build_embedder(EmbedConfig(model="lvd", checkpoint=path, img_size=28, pooling="both", device="cpu"))
    assert both.embed_images(imgs).shape == (3, 384)


def test_pixels_model_is_deterministic():
    e = build_embedder(EmbedConfig(model="pixels", img_size=64, device="cpu"))
    a, b = e.embed_images(_imgs()), e.embed_images(_imgs())
    np.testing.assert_array_equal(a, b)
    assert_close(np.linalg.norm(a, axis=1), 1.0, n_terms=a.shape[1], dtype=np.float32, depth=2, magnitude=1.0)


def test_embed_stage_outputs(tmp_path):
    images = random_images(30, seed=1)
    images[3] = (images[3][0], b"not an image at all")
    anchors = tmp_path / "anchors"
    (anchors / "k").mkdir(parents=True)
    for i, im in enumerate(_imgs(4, seed=2)):
        im.save(anchors / "k" / f"x{i}.png")
    evald = tmp_path / "heldout"
    evald.mkdir()
    for i, im in enumerate(_imgs(2, seed=3)):
        im.save(evald / f"e{i}.jpg")
    cfg = make_run(tmp_path, images, shard_size=12, stages=["embed"],
                   retrieve={"anchor_sets": [{"name": "a", "path": str(anchors), "method": "sample"},
                                             {"name": "skip", "path": str(anchors), "method": "as_is"}]},
                   sscd={"descriptor": "pixels"}, dedup={"eval_sets": [{"name": "heldout", "path": str(evald)}]})
    cfg["embed"].update(model="vit_tiny_patch16_224", img_size=32, num_workers=0, batch_size=4)
    # random weights saved once: the stage's worker and this test build the same model from them
    torch.save(build_embedder(EmbedConfig(**cfg["embed"])).model.state_dict(), tmp_path / "vit.pth")
    cfg["embed"]["checkpoint"] = str(tmp_path / "vit.pth")
    root = tmp_path / "run"
    # a later ledger stage (dedup) dropped one key: embed takes the keys it kept
    kept = accounting.kept_keys(root, "download")
    keys, urls = kept["key"].to_pylist(), kept["url"].to_pylist()
    accounting.write_ledger(root, "dedup", "final", accounting.make_ledger(
        "dedup", keys, urls, ["exact_duplicate" if k == keys[5] else None for k in keys]))
    run_pipeline(load_config(data=cfg), progress=False)
    parts = sorted((root / "embed" / "pool").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for p in parts:
        validate(pq.read_table(p), "descriptors")
    pkeys, pv = load_descriptors(parts)
    assert pkeys == sorted(set(keys) - {keys[5], keys[3]}) and pv.shape == (28, 192)
    failed = pq.read_table(root / "embed" / "pool" / "failed" / "part-00000.parquet").to_pylist()
    assert [(f["key"], f["reason"]) for f in failed] == [(keys[3], "undecodable")]
    akeys, av = load_descriptors([root / "embed" / "anchors" / "a" / "part-00000.parquet"])
    assert akeys == [f"k_x{i}" for i in range(4)] and av.shape == (4, 192)
    assert not (root / "embed" / "anchors" / "skip").exists()
    ekeys, _ = load_descriptors([root / "embed" / "eval" / "heldout" / "part-00000.parquet"])
    assert ekeys == ["e0", "e1"]
    # DataLoader workers split the stream: the same keys and vectors as in-process decoding
    e = build_embedder(load_config(data=cfg).embed)
    k0, v0, _ = describe(e, partial(iter_shard_samples, root / "download" / "00000.tar", set(pkeys)), 5,
                         num_workers=2, prefetch_factor=2)
    # ViT-Ti/16, 12 blocks, MLP 4 x 192 terms, unit outputs; other batches in the workers
    assert_close(v0, pv[: len(k0)], n_terms=4 * 192, dtype=np.float32, depth=2 * 12 + 2, magnitude=1.0)
    assert k0 == pkeys[: len(k0)]
