"""SSCD model loading (both official file formats, built here), the descriptor pipeline, and the quality of the
``pixels`` descriptor on the demo corpus."""

import io
from functools import partial

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curation.config import SSCDConfig
from curation.models.describe import describe
from curation.pipeline.layout import RunLayout
from curation.models.embedder import build_copy_embedder
from curation.models.sscd import (IMAGENET_MEAN, IMAGENET_STD, GeM, build_sscd_random, load_sscd, pixel_descriptor,
                                  sscd_transform)
from curation.pipeline import accounting
from curation.data.samples import Sample
from tests.sample_tars import iter_tars
from curation.data.vectors import load_descriptors
from schemas import validate
from tests.tolerance import assert_close


# SSCD's ResNet-50 in fp32 (tests/tolerance.py): 49 convolutions + the fc layer chained, the longest reduction
# 3 x 3 x 512 = 4608 terms; descriptors are L2-normalised (512 values).
RESNET50 = {"n_terms": 3 * 3 * 512, "dtype": torch.float32, "depth": 49 + 1 + 1}
UNIT_512 = {"n_terms": 512, "dtype": torch.float32, "depth": 2, "magnitude": 1.0}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """The two official formats, made from one random model: a torchvision-layout state dict and TorchScript."""
    d = tmp_path_factory.mktemp("sscd")
    model = build_sscd_random(seed=3)
    sd = model.backbone.state_dict()  # conv1.weight ... fc.weight [512, 2048], fc.bias
    assert tuple(sd["fc.weight"].shape) == (512, 2048) and not any(k.startswith("avgpool") for k in sd)
    torch.save(sd, d / "sscd_disc_mixup.torchvision.pt")
    torch.save({f"backbone.{k}": v for k, v in sd.items()}, d / "prefixed.torchvision.pt")
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64))
    traced.save(str(d / "sscd_disc_mixup.torchscript.pt"))
    return model, d


def test_load_both_official_formats_identically(official_files):
    model, d = official_files
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        a = load_sscd(d / "sscd_disc_mixup.torchvision.pt")(x)
        b = load_sscd(d / "sscd_disc_mixup.torchscript.pt")(x)
        c = load_sscd(d / "prefixed.torchvision.pt")(x)
    assert a.shape == (2, 512)
    assert_close(a, b, **RESNET50)  # eager against TorchScript
    assert_close(a, ref, **RESNET50)
    assert torch.equal(a, c)  # the same file layout once the prefix is stripped: the same arithmetic
    assert_close(a.norm(dim=1), torch.ones(2), **UNIT_512)


def test_load_rejects_other_files(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="ResNet-50"):
        load_sscd(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_sscd(tmp_path / "missing.pt")


def test_gem_is_generalised_mean():
    x = torch.rand(2, 4, 5, 6)
    gem = {"n_terms": 5 * 6, "dtype": torch.float32, "depth": 3, "magnitude": 1.0}  # pow, mean of 30, pow; x < 1
    assert_close(GeM(3.0)(x), x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3), **gem)
    assert_close(GeM(1.0)(x), x.mean((2, 3)), **gem)


def test_transforms():
    im = Image.new("RGB", (400, 300), (124, 116, 104))  # ~ the ImageNet mean
    a = sscd_transform("square320")(im)
    b = sscd_transform("short288")(im)
    assert a.shape == (3, 320, 320) and b.shape == (3, 288, 384)
    # a uniform image stays uniform through the resize: every pixel is the ImageNet-normalised colour
    want = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for x in (a, b):
        assert_close(x, want.view(3, 1, 1).expand_as(x), dtype=torch.float32, depth=3, magnitude=1 / min(IMAGENET_STD))


def _samples(n):
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        im = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((160, 120))
        buf = io.BytesIO()
        im.save(buf, "JPEG")
        out.append(Sample(f"k{i}", buf.getvalue(), {}))
    out.append(Sample("broken", b"not an image", {}))
    return out


def test_describe_with_workers_matches_direct_model(official_files):
    _, d = official_files
    samples = _samples(3)
    sscd = build_copy_embedder(SSCDConfig(weights=d / "sscd_disc_mixup.torchscript.pt", device="cpu"))
    keys, vec, failed = describe(sscd, partial(iter, samples), batch_size=2, num_workers=2)
    assert keys == ["k0", "k1", "k2"] and [(k, r) for k, r, _ in failed] == [("broken", "undecodable")]
    assert vec.shape == (3, 512) and vec.dtype == np.float32
    model = load_sscd(d / "sscd_disc_mixup.torchvision.pt")
    t = sscd_transform("square320")
    with torch.no_grad():
        direct = model(torch.stack([t(Image.open(io.BytesIO(s.data)).convert("RGB")) for s in samples[:3]]))
    order = [keys.index(f"k{i}") for i in range(3)]
    assert_close(vec[order], direct.numpy(), **RESNET50)  # other batches (2 + 1 against 3)
    # the pixel descriptor through the same pipeline
    pixels = build_copy_embedder(SSCDConfig(descriptor="pixels"))
    keys2, vec2, _ = describe(pixels, partial(iter, samples), batch_size=256)
    assert vec2.shape == (3, 3 * 24 * 24)
    assert_close(np.linalg.norm(vec2, axis=1), 1.0, n_terms=vec2.shape[1], dtype=np.float32, depth=2, magnitude=1.0)


def test_pixel_descriptor_invariances():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).resize((480, 400), Image.BILINEAR)
    v = pixel_descriptor(im)
    flip = pixel_descriptor(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    small = pixel_descriptor(im.resize((240, 200)))
    crop = pixel_descriptor(im.crop((10, 8, 470, 392)))  # ~92% area
    other = pixel_descriptor(Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))
                             .resize((480, 400), Image.BILINEAR))
    assert v @ flip > 0.99 and v @ small > 0.95 and v @ crop > 0.6
    assert abs(float(v @ other)) < 0.3
    assert not pixel_descriptor(Image.new("RGB", (100, 100), (9, 9, 9))).any()  # flat: the zero vector


def test_pixel_descriptor_quality_on_the_corpus(demo_cleaned):
    """Measured on the demo corpus: planted copies are far above unrelated images."""
    root = demo_cleaned["root"]
    truth = {f"{t['row_id']:010d}": t for t in demo_cleaned["truth"].to_pylist()}
    for p in (root / "sscd").rglob("part-*.parquet"):
        validate(pq.read_table(p), "descriptors")
    layout = RunLayout(root)
    pool_keys, _ = load_descriptors(layout.vectors_parts("sscd", "pool"))
    # the sscd stage describes every image the filter kept (hash duplicates too: they stay nodes of the dedup graph)
    assert pool_keys == accounting.kept_keys(root, "filter")["key"].to_pylist()
    ekeys, E = load_descriptors(layout.vectors_parts("sscd", "eval", "heldout"))
    pixels = build_copy_embedder(SSCDConfig(descriptor="pixels"))
    keys, X, _ = describe(pixels, partial(iter_tars, layout.pool_tars()), 256)
    assert len(ekeys) >= 10 and X.shape[1] == E.shape[1]
    idx = {k: i for i, k in enumerate(keys)}
    copies = {}
    for k, t in truth.items():
        if t["role"] == "near_duplicate" and k in idx and f"{t['dup_of_row']:010d}" in idx:
            copies.setdefault(t["edit"], []).append(float(X[idx[k]] @ X[idx[f"{t['dup_of_row']:010d}"]]))
    ev_sims, unrelated_ev = [], []
    for k, t in truth.items():
        if k not in idx:
            continue
        s = E @ X[idx[k]]
        if t["role"] == "eval_copy":
            j = ekeys.index(t["dup_of_eval"])
            ev_sims.append(float(s[j]))
            s = np.delete(s, j)
        unrelated_ev.append(float(s.max()))
    fam = np.array([truth[k]["dup_of_row"] if truth[k]["dup_of_row"] is not None else truth[k]["row_id"]
                    for k in keys])
    sim = X @ X.T
    unrelated = sim[(fam[:, None] != fam[None, :])]
    mins = {e: round(min(v), 3) for e, v in copies.items()}
    print(f"\npixels descriptor on the demo corpus: copy cosine minima by edit {mins}; eval copies min "
          f"{min(ev_sims):.3f}; unrelated pool-eval max {max(unrelated_ev):.3f}; unrelated pool pairs p99 "
          f"{np.quantile(unrelated, 0.99):.3f}, max {unrelated.max():.3f}")
    for edit in ("resize", "jpeg", "color", "flip", "text"):
        assert mins[edit] > 0.9, (edit, mins)
    assert mins["crop"] > 0.6
    assert min(ev_sims) > 0.8 and max(unrelated_ev) < demo_cleaned["config"]["dedup"]["eval_threshold"]
    assert np.quantile(unrelated, 0.99) < 0.45


def test_loader_plan_gives_the_cpu_model_the_task_cores():
    from curation.models.describe import loader_plan
    from curation.models.embedder import CPU_BATCH
    from curation.cluster.workers import cpu_split

    with pytest.warns(UserWarning, match="random SSCD weights"):
        sscd = build_copy_embedder(SSCDConfig(device="cpu"))
    assert loader_plan(sscd, 4, 256) == (*cpu_split("cpu", 4), CPU_BATCH)
    assert loader_plan(sscd, 4, 2) == (*cpu_split("cpu", 4), 2)
    pixels = build_copy_embedder(SSCDConfig(descriptor="pixels", device="cpu"))
    assert loader_plan(pixels, 3, 64) == (3, None, 64)  # no model: decoding is the work
