"""Gram anchoring (training/gram.py): the loss against a float64 loop, the refresh schedule, the higher-resolution
Gram teacher, and a run with refreshes resumed from a checkpoint bit-equal to the uninterrupted run."""
import copy

import pytest
import torch
import torch.nn.functional as F
from lvd_train_testutils import TINY_CFG, read_metrics, shards_and_config

from tests.tolerance import approx
from training.checkpoint import load_checkpoint
from training.config import ConfigError, load_config
from training.gram import gram_loss, gram_teacher_patches, gram_weight, snapshot_due
from training.models.vision_transformer import build_backbone
from training.train import train


def _loop_gram_loss(s, t, remove_negative):
    """The Gram MSE written out in float64 Python arithmetic, image by image and pair by pair."""
    b, n, _ = s.shape
    total = 0.0
    for i in range(b):
        su = [[v / sum(w * w for w in x) ** 0.5 for v in x] for x in s[i].double().tolist()]
        tu = [[v / sum(w * w for w in x) ** 0.5 for v in x] for x in t[i].double().tolist()]
        for j in range(n):
            for k in range(n):
                a = sum(p * q for p, q in zip(su[j], su[k]))
                c = sum(p * q for p, q in zip(tu[j], tu[k]))
                if remove_negative:
                    a, c = max(a, 0.0), max(c, 0.0)
                total += (a - c) ** 2
    return total / (b * n * n)


@pytest.mark.parametrize("remove_negative", [False, True])
def test_gram_loss_matches_a_float64_loop(remove_negative):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    got = float(gram_loss(s, t, remove_negative))
    want = _loop_gram_loss(s, t, remove_negative)
    # fp32: a normalisation and 8-term dot products (similarities <= 1), squared differences, a 75-term mean
    assert got == approx(want, n_terms=75, dtype=torch.float32, depth=4, magnitude=4.0)
    assert got > 0.01  # random features: a value ~100 times the bound
    assert float(gram_loss(s, s.clone(), remove_negative)) == 0.0
    # the clipping changes the value (random features have negative similarities)
    assert _loop_gram_loss(s, t, True) != approx(_loop_gram_loss(s, t, False), dtype=float, magnitude=1.0)


def test_refresh_schedule_and_weight():
    cfg = load_config(raw={"gram": {"enabled": True, "start_iter": 10, "refresh_every": 5, "max_refreshes": 2,
                                    "weight": 2.0, "weight_warmup_iters": 4}})
    g = cfg.gram
    assert [it for it in range(40) if snapshot_due(g, it)] == [10, 15, 20]
    assert [gram_weight(g, it) for it in (0, 9, 10, 11, 13, 30)] == [0.0, 0.0, 0.5, 1.0, 2.0, 2.0]
    once = g.model_copy(update={"refresh_every": 0, "max_refreshes": 3})
    assert [it for it in range(40) if snapshot_due(once, it)] == [10]
    assert not any(snapshot_due(g.model_copy(update={"enabled": False}), it) for it in range(40))
    with pytest.raises(ConfigError, match="gram.img_size"):
        load_config(raw={"gram": {"enabled": True, "img_size": 230}})


def test_higher_resolution_gram_teacher_is_resized_bicubically_to_the_student_grid():
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_patch14", embed_dim=48, depth=1, num_heads=3, img_size=28).eval()
    gt = torch.nn.ModuleDict({"backbone": bb})
    gc = torch.randn(2, 3, 28, 28)
    same = gram_teacher_patches(gt, gc, 2, None, torch.no_grad)
    with torch.no_grad():
        assert torch.equal(same, bb.forward_features(gc)["x_norm_patchtokens"])
        hi = gram_teacher_patches(gt, gc, 2, 56, torch.no_grad)
        up = F.interpolate(gc, size=(56, 56), mode="bicubic", align_corners=False)
        fmap = bb.forward_features(up)["x_norm_patchtokens"].transpose(1, 2).reshape(2, 48, 4, 4)
        want = F.interpolate(fmap, size=(2, 2), mode="bicubic", align_corners=False).reshape(2, 48, 4).transpose(1, 2)
    assert hi.shape == (2, 4, 48)
    assert torch.equal(hi, want)


def _gram_cfg():
    cfg = copy.deepcopy(TINY_CFG)
    cfg["deterministic"] = True
    cfg["device"] = "cpu"
    cfg["checkpoint"] = {"period_iters": 2, "keep_last": 10}
    # snapshots at the start of iterations 2 and 4, none at 6 (at most one refresh); the weight warms up
    cfg["gram"] = {"enabled": True, "start_iter": 2, "refresh_every": 2, "max_refreshes": 1, "weight": 1.0,
                   "weight_warmup_iters": 2, "img_size": 42}
    return cfg


def test_gram_teacher_refresh_and_resume_bit_equal_to_the_uninterrupted_run(tmp_path):
    data, _ = shards_and_config(tmp_path, _gram_cfg())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = tmp_path / "ref"
        train(load_config(raw=_gram_cfg()), str(data), ref)  # 8 iterations
        stop = tmp_path / "stop"
        train(load_config(raw={**_gram_cfg(), "max_steps": 3}), str(data), stop)  # checkpoint 2, then stops at 3
        (stop / "checkpoints" / "checkpoint_00000003.pt").unlink()  # resume from 2: before the refresh at 4
        train(load_config(raw=_gram_cfg()), str(data), stop)
    finally:
        torch.set_num_threads(threads)
    ck = {i: load_checkpoint(ref / "checkpoints" / f"checkpoint_{i:08d}.pt") for i in (2, 4, 6, 8)}
    teacher_bb = {i: {k[9:]: v for k, v in ck[i]["teacher"].items() if k.startswith("backbone.")} for i in ck}
    gram_bb = {i: {k[9:]: v for k, v in ck[i]["gram_teacher"].items()} for i in ck}
    for k in teacher_bb[2]:  # the snapshot taken at iteration 2 is the teacher after 2, then after 4, then kept
        assert torch.equal(gram_bb[4][k], teacher_bb[2][k]) and torch.equal(gram_bb[6][k], teacher_bb[4][k])
        assert torch.equal(gram_bb[8][k], teacher_bb[4][k])
    assert not torch.equal(teacher_bb[6]["pos_embed"], teacher_bb[4]["pos_embed"])
    rows = read_metrics(ref / "metrics.jsonl")
    assert [r["gram_weight"] for r in rows] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert "gram_loss" not in rows[1] and all(r["gram_loss"] > 0 for r in rows[2:])
    # the resumed run: every metric and every tensor of the final checkpoint bit-equal
    resumed = read_metrics(stop / "metrics.jsonl")
    keys = ("loss", "dino_loss", "ibot_loss", "koleo_loss", "gram_loss")
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in rows]
    end = load_checkpoint(stop / "checkpoints" / "checkpoint_00000008.pt")
    for role in ("student", "teacher", "gram_teacher"):
        for k, v in ck[8][role].items():
            assert torch.equal(end[role][k], v), (role, k)
