"""Mask generator, multi-crop augmentation decisions, collate, and the shard / folder stream."""
import random

import numpy as np
import pytest
import torch
from lvd_train_testutils import random_image, write_shards
from PIL import Image
from torchvision.transforms import functional as TF

from tests.tolerance import assert_close, rounding_tol
from training.augment import AugmentConfig, MultiCropAugmentation
from training.data import MultiCropStream, make_loader, resolve_sources
from training.masking import MaskingGenerator, collate_multicrop


def test_mask_generator_counts_and_shapes():
    gen = MaskingGenerator(16)
    assert gen.max_num_patches == 128
    rng = random.Random(0)
    for target in (0, 10, 40, 100):
        for _ in range(20):
            m = gen(target, rng)
            assert m.shape == (16, 16) and m.dtype == bool
            n = int(m.sum())
            assert n <= target + 0 or target == 0
            if target == 0:
                assert n == 0
            else:
                assert n >= min(target, 4) * 0.5  # reaches (most of) the target with >= 4-patch blocks
    # rectangles: every masked patch belongs to a masked 2x2 block or a line of >= 2 (no isolated pixels)
    m = gen(60, rng)
    assert m.sum() > 0


def test_collate_half_masked_stratified_ratios():
    grid = 14
    gen = MaskingGenerator(grid)
    n_tok = grid * grid
    B = 8  # 16 global crops -> 8 masked
    samples = [{"global_crops": [torch.zeros(3, 4, 4)] * 2, "local_crops": [torch.zeros(3, 2, 2)] * 3}
               for _ in range(B)]
    ratios_by_rank = [[] for _ in range(8)]
    for seed in range(30):
        out = collate_multicrop(samples, gen, random.Random(seed), (0.1, 0.5), 0.5)
        masks = out["masks"]
        assert out["global_crops"].shape == (2 * B, 3, 4, 4) and out["local_crops"].shape == (3 * B, 3, 2, 2)
        assert masks.shape == (2 * B, n_tok)
        counts = masks.sum(1)
        assert int((counts > 0).sum()) == B  # exactly half of the global crops are masked
        assert torch.equal(out["mask_indices"], masks.flatten().nonzero().flatten())
        w = out["masks_weight"]
        assert w.shape[0] == int(masks.sum())
        per_img = torch.zeros(2 * B).index_add_(0, masks.nonzero()[:, 0], w)
        # each masked image's weights 1/count (one rounding each) sum to 1 over at most n_tok terms
        assert_close(per_img[counts > 0], torch.ones(B), n_terms=n_tok, dtype=torch.float32)
        r = sorted((counts[counts > 0].float() / n_tok).tolist())
        for i, v in enumerate(r):
            ratios_by_rank[i].append(v)
        assert max(r) <= 0.5 + rounding_tol(0.5, dtype=torch.float32) and min(r) >= 0.05  # one fp32 division
    # stratified: the i-th smallest ratio sits near the i-th sub-interval of [0.1, 0.5]
    edges = np.linspace(0.1, 0.5, 9)
    for i in range(8):
        assert edges[i] - 0.06 <= np.mean(ratios_by_rank[i]) <= edges[i + 1] + 0.01


def test_augmentation_decision_probabilities():
    aug = MultiCropAugmentation(AugmentConfig(global_crops_size=14, local_crops_size=7, local_crops_number=2))
    img = random_image(np.random.default_rng(0), 20, 24)
    # draw_all takes exactly the decisions __call__ takes (same draws from the same generator)
    for seed in range(3):
        assert aug(img, rng=random.Random(seed), return_decisions=True)["decisions"] == \
            aug.draw_all(random.Random(seed), 24, 20)
    rng = random.Random(0)
    n = 4000  # binomial std <= 0.008: tolerance 0.03 is > 3.5 sigma
    stats = {"g1": [], "g2": [], "loc": []}
    for _ in range(n):
        d = aug.draw_all(rng, 24, 20)
        stats["g1"].append(d["global"][0])
        stats["g2"].append(d["global"][1])
        stats["loc"] += d["local"]
    freq = {v: {k: np.mean([x[k] for x in stats[v]]) for k in ("flip", "jitter", "grayscale", "blur", "solarize")}
            for v in stats}
    tol = 0.03
    for v in stats:
        assert abs(freq[v]["flip"] - 0.5) < tol
        assert abs(freq[v]["jitter"] - 0.8) < tol
        assert abs(freq[v]["grayscale"] - 0.2) < tol
    assert freq["g1"]["blur"] == 1.0
    assert abs(freq["g2"]["blur"] - 0.1) < tol
    assert abs(freq["loc"]["blur"] - 0.5) < tol
    assert abs(freq["g2"]["solarize"] - 0.2) < tol
    assert freq["g1"]["solarize"] == 0.0 and freq["loc"]["solarize"] == 0.0
    # crop scales: the fraction of the image area covered by the crop
    area = 20 * 24
    g_area = [x["crop"][2] * x["crop"][3] / area for x in stats["g1"] + stats["g2"]]
    l_area = [x["crop"][2] * x["crop"][3] / area for x in stats["loc"]]
    assert 0.25 < min(g_area) and max(g_area) <= 1.0
    assert min(l_area) < 0.1 and max(l_area) < 0.42


def test_augmentation_outputs_and_determinism():
    aug = MultiCropAugmentation(AugmentConfig(global_crops_size=28, local_crops_size=14, local_crops_number=3))
    img = random_image(np.random.default_rng(1))
    a = aug(img, rng=random.Random(5))
    b = aug(img, rng=random.Random(5))
    assert len(a["global_crops"]) == 2 and len(a["local_crops"]) == 3
    assert a["global_crops"][0].shape == (3, 28, 28) and a["local_crops"][0].shape == (3, 14, 14)
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(x, y)
    # ImageNet normalisation: values are no longer in [0, 1]
    assert float(torch.stack(a["global_crops"]).min()) < -0.5


def _plain_crops(**kw):
    """Crops with every DINOv2 colour, blur and flip step off, so only the options under test touch the pixels."""
    return AugmentConfig(global_crops_size=14, local_crops_size=7, local_crops_number=4, flip_p=0.0,
                         color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0, **kw)


def test_channel_options_off_draw_nothing():
    # off (the default) they take no random draw, so every other decision stays the reference recipe's stream
    d = MultiCropAugmentation(AugmentConfig()).draw_all(random.Random(0), 24, 20)
    views = d["global"] + d["local"]
    assert not any("channel_order" in v or "channel_invert" in v for v in views)
    on = MultiCropAugmentation(AugmentConfig(channel_invert_p=0.5)).draw_all(random.Random(0), 24, 20)
    assert on["global"][0]["crop"] == d["global"][0]["crop"]  # the first view's crop is drawn before them
    assert on != d


def test_channel_permutation_and_inversion_are_drawn_per_crop():
    aug = MultiCropAugmentation(_plain_crops(channel_permute_p=1.0, channel_invert_p=0.5))
    img = random_image(np.random.default_rng(0), 20, 24)
    for seed in range(3):  # draw_all takes exactly the decisions __call__ takes
        assert aug(img, rng=random.Random(seed), return_decisions=True)["decisions"] == \
            aug.draw_all(random.Random(seed), 24, 20)
    rng = random.Random(1)
    n = 2000
    orders, inverts, same_order = [], [], []
    for _ in range(n):
        d = aug.draw_all(rng, 24, 20)
        views = d["global"] + d["local"]
        orders += [tuple(v["channel_order"]) for v in views]
        inverts += [v["channel_invert"] for v in views]
        same_order.append(views[0]["channel_order"] == views[1]["channel_order"])
    m = len(orders)  # 12,000 views: each of the 6 orders at 1/6 has binomial std 0.0034, 0.02 is > 5 sigma
    assert sorted(set(orders)) == sorted({(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)})
    for o in set(orders):
        assert abs(orders.count(o) / m - 1 / 6) < 0.02
    assert np.abs(np.mean(inverts, axis=0) - 0.5).max() < 0.02  # std 0.0046 per channel
    # drawn per crop, not per image: the two global crops share an order only by chance (1/6; std 0.008)
    assert abs(np.mean(same_order) - 1 / 6) < 0.04


def test_channel_permutation_and_inversion_recolour_each_crop():
    aug = MultiCropAugmentation(_plain_crops(channel_permute_p=1.0, channel_invert_p=0.5))
    colour = np.array([200, 60, 30], dtype=np.uint8)  # one colour: any crop of it is that colour, exactly
    img = Image.fromarray(np.broadcast_to(colour, (20, 24, 3)).copy())
    seen = set()
    for seed in range(4):
        out = aug(img, rng=random.Random(seed), return_decisions=True)
        for kind in ("global", "local"):
            for crop, d in zip(out[f"{kind}_crops"], out["decisions"][kind]):
                want = colour[d["channel_order"]]
                want = np.where(d["channel_invert"], 255 - want, want).astype(np.uint8)
                size = crop.shape[-1]
                expected = TF.normalize(TF.to_tensor(Image.fromarray(np.broadcast_to(want, (size, size, 3)).copy())),
                                        aug.cfg.mean, aug.cfg.std)
                assert torch.equal(crop, expected)
                seen.add(tuple(want))
    assert len(seen) > 4  # the crops of the same image came out in different colours


def _aug():
    return MultiCropAugmentation(AugmentConfig(global_crops_size=28, local_crops_size=14, local_crops_number=2))


def _stream(data, start_batch=0, shuffle_buffer=8, **kw):
    return MultiCropStream(data, _aug(), batch_size=4, mask_generator=MaskingGenerator(2, min_num_patches=1),
                           seed=3, shuffle_buffer=shuffle_buffer, start_batch=start_batch, **kw)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_stream_over_shards_and_folder(tmp_path):
    write_shards(tmp_path / "shards", n_shards=2, per_shard=6)
    write_shards(tmp_path / "png", n_shards=1, per_shard=3, ext="png")
    kind, units = resolve_sources(str(tmp_path / "shards"))
    assert kind == "tar" and len(units) == 2
    batches = _take(make_loader(_stream(str(tmp_path / "shards"))), 5)  # 20 samples > 12: wraps to a new pass
    b = batches[0]
    assert b["global_crops"].shape == (8, 3, 28, 28) and b["local_crops"].shape == (8, 3, 14, 14)
    assert b["masks"].shape == (8, 4) and len(b["keys"]) == 4
    keys = [k for x in batches for k in x["keys"]]
    assert len(set(keys)) == 12  # every sample seen (the shuffle buffer mixes consecutive passes)
    assert len(_take(make_loader(_stream(str(tmp_path / "png" / "lvd-000000.tar"))), 1)[0]["keys"]) == 4
    # an image folder
    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        random_image(rng).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    assert resolve_sources(str(tmp_path / "folder"))[0] == "files"
    assert _take(make_loader(_stream(str(tmp_path / "folder"))), 2)[1]["global_crops"].shape[0] == 8
    # glob pattern
    assert resolve_sources(str(tmp_path / "shards" / "lvd-*.tar"))[1] == units


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_skips_consumed_batches_exactly(tmp_path, workers):
    write_shards(tmp_path / "s", n_shards=3, per_shard=5)
    full = _take(make_loader(_stream(str(tmp_path / "s")), workers), 6)
    resumed = _take(make_loader(_stream(str(tmp_path / "s"), start_batch=3), workers), 3)
    for a, b in zip(full[3:], resumed):
        assert a["keys"] == b["keys"] and a["batch_index"] == b["batch_index"]
        assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["masks"], b["masks"])
        assert torch.equal(a["local_crops"], b["local_crops"])


def test_loader_workers_capped_at_usable_cpus_without_changing_batches(tmp_path):
    """More workers than cores only add waiting processes (and torch's 'suggested max' warning): the loader starts
    at most the usable CPUs, and the batches are those of the requested count."""
    import warnings

    from curation.cluster.workers import usable_cpus

    write_shards(tmp_path / "s", n_shards=2, per_shard=6)
    many = usable_cpus() + 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's UserWarning about too many workers would fail here
        loader = make_loader(_stream(str(tmp_path / "s")), many)
        assert loader.num_workers == usable_cpus()
        got = _take(loader, 3)
    ref = _take(make_loader(_stream(str(tmp_path / "s")), 0), 3)
    assert [b["keys"] for b in got] == [b["keys"] for b in ref]


def test_stream_splits_by_rank(tmp_path):
    write_shards(tmp_path / "s", n_shards=4, per_shard=4)
    k0 = {k for b in _take(make_loader(_stream(str(tmp_path / "s"), rank=0, world_size=2, shuffle_buffer=1)), 2) for k in b["keys"]}
    k1 = {k for b in _take(make_loader(_stream(str(tmp_path / "s"), rank=1, world_size=2, shuffle_buffer=1)), 2) for k in b["keys"]}
    assert len(k0) == 8 and len(k1) == 8 and not (k0 & k1)  # one pass: each rank reads its own 2 shards


def test_global_sample_order_does_not_depend_on_world_size(tmp_path):
    """Rank r of N takes slice r of each global batch; the concatenated slices are the 1-process batch, crops
    included (per-sample augmentation seeds); a stream started after any number of samples continues the order."""
    write_shards(tmp_path / "s", n_shards=3, per_shard=5)
    one = _take(make_loader(MultiCropStream(str(tmp_path / "s"), _aug(), 8, MaskingGenerator(2, min_num_patches=1),
                                            seed=3, shuffle_buffer=4)), 4)
    ranks = [_take(make_loader(_stream(str(tmp_path / "s"), rank=r, world_size=2, shuffle_buffer=4), 2), 4)
             for r in range(2)]
    for step in range(4):
        assert ranks[0][step]["keys"] + ranks[1][step]["keys"] == one[step]["keys"]
        glob = torch.cat([ranks[r][step]["global_crops"].view(2, 4, 3, 28, 28) for r in range(2)], 1)
        assert torch.equal(glob.view(16, 3, 28, 28), one[step]["global_crops"])
    flat = [k for b in one for k in b["keys"]]
    assert sorted(set(flat[:15])) == sorted(set(flat)) and len(set(flat[:15])) == 15  # a permutation per pass
    # resumed after 12 samples (3 steps of 2 ranks x 2, say) on 2 ranks x 4 images
    later = [_take(make_loader(MultiCropStream(str(tmp_path / "s"), _aug(), 4, MaskingGenerator(2, min_num_patches=1),
                                               seed=3, shuffle_buffer=4, rank=r, world_size=2, start_sample=12)), 2)
             for r in range(2)]
    assert [k for step in range(2) for r in range(2) for k in later[r][step]["keys"]] == flat[12:28]


def test_data_bench_smoke(tmp_path):
    import json
    import subprocess
    import sys

    from lvd_train_testutils import REPO, subprocess_env

    out = tmp_path / "data.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "train_data_bench.py"), "--workers", "0", "1",
                        "--batch", "2", "--batches", "2", "--images", "8", "--src-size", "64x48",
                        "--global-size", "28", "--local-size", "14", "--local-crops", "2", "--out", str(out)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [x["workers"] for x in rows] == [0, 1]
    assert all(x["images_per_s"] > 0 and x["batch"] == 2 and x["crops"] == "2x28+2x14" for x in rows)


def test_gaussian_blur_matches_torchvision():
    import numpy as np
    from PIL import Image
    from torchvision.transforms import functional as TF

    from training.augment import gaussian_blur

    rng = np.random.default_rng(0)
    differing, total = 0, 0
    for h, w in ((224, 224), (98, 98), (31, 40)):
        for sigma in (0.1, 0.7, 1.3, 2.0):
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ref = np.asarray(TF.gaussian_blur(im, [9, 9], [sigma, sigma])).astype(int)
            got = np.asarray(gaussian_blur(im, 9, sigma)).astype(int)
            assert got.shape == ref.shape and np.abs(got - ref).max() <= 1  # float rounding at .5 only
            differing += int((got != ref).sum())
            total += ref.size
    # a pixel rounds differently only when its exact value lies within the two fp32 computations' difference of a
    # .5 boundary: 2 separable passes x 9 taps at magnitude 255 (rounding_tol), so the expected fraction of such
    # pixels is at most 2 x that tolerance per unit pixel step
    assert differing / total <= 2 * rounding_tol(255, n_terms=2 * 9, dtype=np.float32)
