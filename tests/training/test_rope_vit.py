"""The RoPE ViTs (``*_patch16_rope_reg4``) against timm's DINOv3 definitions (``vit_small_patch16_dinov3``) built
with random weights (never downloaded): the same state dict gives the same features, at 224 px and at a
rectangular resolution; and the rotary embeddings' own properties (relative positions, training-only
augmentation)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.tolerance import assert_close
from training.models.rope import AxialRope, apply_rope
from training.models.vision_transformer import build_backbone

timm = pytest.importorskip("timm", reason="timm (with its vit_*_patch16_dinov3 definitions) is not installed")

DIM, HEADS, DEPTH = 64, 2, 2  # head width 32: 8 periods per axis


def timm_to_lvd(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's Eva (DINOv3) key names -> this project's (official DINOv2 names): ``reg_token`` ->
    ``register_tokens``, ``gamma_1/2`` -> ``ls1/ls2.gamma``; timm's ``q_bias`` / ``v_bias`` (``_qkvb`` variants,
    the key bias is zero) -> one ``qkv.bias``. The rest have the same names."""
    out = {}
    for k, v in sd.items():
        if k == "reg_token":
            out["register_tokens"] = v
        elif k.endswith(".gamma_1") or k.endswith(".gamma_2"):
            out[k[: -len("gamma_1")] + ("ls1.gamma" if k.endswith("1") else "ls2.gamma")] = v
        elif k.endswith(".attn.q_bias"):
            out[k[: -len("q_bias")] + "qkv.bias"] = torch.cat((v, torch.zeros_like(v), sd[k[:-6] + "v_bias"]))
        elif k.endswith(".attn.v_bias") or k.endswith(".attn.k_bias"):
            continue
        else:
            out[k] = v
    return out


def _pair():
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_dinov3", pretrained=False, embed_dim=DIM, num_heads=HEADS,
                            depth=DEPTH, num_classes=0).eval()
    with torch.no_grad():  # every weight random and O(1) in effect (LayerScale 1e-5 would hide the blocks)
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "gamma" in name or "norm" in name else 0.1) +
                    (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    ours = build_backbone("vit_small_patch16_rope_reg4", embed_dim=DIM, num_heads=HEADS, depth=DEPTH).eval()
    missing, unexpected = ours.load_state_dict(timm_to_lvd(ref.state_dict()), strict=False)
    assert missing == ["mask_token"] and unexpected == []  # mask_token: iBOT's, timm's inference model has none
    return ref, ours


@pytest.mark.parametrize("hw", [(224, 224), (160, 288)])
def test_rope_vit_matches_timm_dinov3_on_the_same_weights(hw):
    ref, ours = _pair()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        expected = ref.forward_features(x)  # [B, 1 + 4 + N, D], final norm applied
        out = ours.forward_features(x)
    got = torch.cat((out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]), dim=1)
    assert got.shape == expected.shape == (2, 1 + 4 + (hw[0] // 16) * (hw[1] // 16), DIM)
    # Both sides run the same float32 operations in possibly different orders (fused vs split rotation, SDPA
    # kernels): per block a K-term dot product (K = the widest contraction, the MLP's 4 * DIM), softmax over
    # N tokens and a LayerNorm over DIM; the output is LayerNorm'd (magnitude ~ |gamma| + |beta|).
    n_tokens = expected.shape[1]
    assert_close(got, expected, n_terms=4 * DIM + n_tokens + DIM, depth=DEPTH + 1)
    assert torch.isfinite(got).all() and got.std() > 0.1  # not a vacuous match


def test_rope_rotation_depends_only_on_relative_position():
    rope = AxialRope(32).eval().double()
    rope.periods = rope.periods.double()
    sin, cos = rope(4, 6)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def dot(i, j):  # q at patch i, k at patch j (flat grid indices)
        qi = apply_rope(q, (sin[i:i + 1], cos[i:i + 1]), 0)
        kj = apply_rope(k, (sin[j:j + 1], cos[j:j + 1]), 0)
        return float((qi * kj).sum())

    # (0,0)-(1,2) and (2,3)-(3,5): the same offset on the grid -> the same score; another offset -> another
    # The tables are built from float32 coordinates: each of the 32 angles (|angle| <= 2 pi) carries float32
    # rounding, times |q| |k|; the rest runs in float64.
    mag = float(q.norm() * k.norm()) * 2 * math.pi
    assert_close(torch.tensor(dot(0 * 6 + 0, 1 * 6 + 2)), torch.tensor(dot(2 * 6 + 3, 3 * 6 + 5)), n_terms=32 * 2,
                 dtype=torch.float32, magnitude=mag)
    assert abs(dot(0, 8) - dot(0, 9)) > 1e-6
    # a rotation keeps norms; prefix tokens are left exactly as they are
    x = torch.randn(2, 3, 5 + 24, 32, dtype=torch.float64)
    y = apply_rope(x, (sin, cos), 5)
    assert torch.equal(y[:, :, :5], x[:, :, :5])
    assert_close(y.norm(dim=-1), x.norm(dim=-1), n_terms=32 * 3)


def test_rope_periods_and_coordinates_follow_base_100_and_unit_square():
    rope = AxialRope(32, base=100.0).eval()
    assert_close(rope.periods, torch.tensor([100.0 ** (4 * k / 32) for k in range(8)]), n_terms=4)
    c = rope.coords(2, 4)
    assert_close(c[:, 0], torch.tensor([-0.5] * 4 + [0.5] * 4), n_terms=2)
    assert_close(c[:, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75] * 2), n_terms=2)
    sin, cos = rope(2, 4)  # angle of the first row frequency at patch (0, 0): 2 pi (-0.5) / 1 = -pi; its float32
    # rounding (a few ulps of pi) moves sin by as much (|d sin / d angle| <= 1)
    assert_close(sin[0, 0], torch.tensor(math.sin(-math.pi)), n_terms=4, magnitude=math.pi)
    assert_close(sin[0, 8], torch.tensor(math.sin(2 * math.pi * -0.75)), n_terms=4, magnitude=math.pi)


def test_rope_coordinate_augmentation_acts_in_training_only():
    rope = AxialRope(32, rescale=2.0, jitter=1.5, shift=0.1)
    rope.eval()
    assert torch.equal(rope(3, 3)[0], rope(3, 3)[0])
    rope.train()
    torch.manual_seed(1)
    a = rope.coords(3, 3)
    b = rope.coords(3, 3)
    assert not torch.equal(a, b)
    plain = AxialRope(32).eval().coords(3, 3)
    scale = (a - a.mean(0)).abs().amax(0) / (plain - plain.mean(0)).abs().amax(0)  # per-axis factor drawn
    assert ((scale >= 1 / 3.0 - 1e-6) & (scale <= 3.0 + 1e-6)).all()  # jitter 1.5 x rescale 2 at most
    with pytest.raises(ValueError, match="jitter"):
        AxialRope(32, jitter=0.5)


def test_rope_vit_trains_a_step_on_crop_groups_of_two_sizes():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny_patch16_rope_reg4", embed_dim=48, num_heads=2, depth=1, drop_path_rate=0.5,
                           packed_attention=True).train()
    assert model.pos_embed is None and model.rope.rescale == 2.0
    outs = model.forward_features([torch.randn(4, 3, 64, 64), torch.randn(4, 3, 32, 32)])
    assert [o["x_norm_patchtokens"].shape[1] for o in outs] == [16, 4]
    w = torch.randn(48)  # a random read-out (a plain sum of LayerNorm outputs has no gradient)
    sum((o["x_norm_clstoken"] * w).sum() for o in outs).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_trainer_runs_a_rope_arch_from_config_and_exports_a_loadable_backbone(tmp_path):
    import copy

    from lvd_train_testutils import TINY_CFG, write_shards
    from training.checkpoint import export_backbone, find_latest_checkpoint, load_checkpoint
    from training.config import load_config
    from training.models.backbone_io import load_official_checkpoint
    from training.train import train

    raw = copy.deepcopy(TINY_CFG)
    raw["model"] = {"arch": "vit_tiny_patch16_rope_reg4", "embed_dim": 48, "depth": 2, "num_heads": 3,
                    "drop_path_rate": 0.1, "rope_rescale": 1.5, "layerscale": 1.0}
    raw["crops"] = {"global_crops_size": 32, "local_crops_number": 2, "local_crops_size": 16}
    raw["optim"]["epochs"] = 1
    cfg = load_config(raw=raw)
    assert cfg.model.patch_size == 16  # the arch's, since the config names none
    write_shards(tmp_path / "shards")
    summary = train(cfg, str(tmp_path / "shards"), tmp_path / "out")
    assert summary["iterations"] == 4
    ck = load_checkpoint(find_latest_checkpoint(tmp_path / "out"))
    assert "backbone.pos_embed" not in ck["student"] and "backbone.register_tokens" in ck["student"]
    assert ck["backbone"]["kwargs"]["rope_rescale"] == 1.5
    path = export_backbone(ck, tmp_path / "backbone.pth")
    model = load_official_checkpoint(path).eval()
    assert model.rope is not None and model.rope.rescale == 1.5 and model.patch_size == 16
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 48, 64))["x_norm_patchtokens"].shape == (1, 12, 48)


def test_rope_masked_tokens_are_not_the_zero_vector_at_init():
    # Without a position embedding a masked patch token is the mask token itself; a zero one stays exactly zero
    # through every block whose attention branch stochastic depth skips (the FFN maps zero to zero at init), and
    # the iBOT head's L2-normalisation of an exact zero has gradient 1 / eps = 1e12.
    torch.manual_seed(0)
    model = build_backbone("vit_tiny_patch16_rope_reg4", embed_dim=48, num_heads=3, depth=1)
    masks = torch.ones(2, 4, dtype=torch.bool)
    tokens = model.prepare_tokens_with_masks(torch.randn(2, 3, 32, 32), masks)[:, 1 + 4:]
    assert (tokens.std(dim=-1) > 1e-3).all()  # LayerNorm's sqrt(eps) = 1e-3: well above it
    ref = build_backbone("vit_tiny_patch16_rope_reg4", embed_dim=48, num_heads=3, depth=1, mask_token_std=0.0)
    assert torch.count_nonzero(ref.mask_token) == 0  # the references' zeros, on request
    learned = build_backbone("vit_tiny_patch14", embed_dim=48, num_heads=3, depth=1)
    assert torch.count_nonzero(learned.mask_token) == 0  # DINOv2 (position embedding added to it): unchanged


def test_rope_coordinate_jitter_trains_with_finite_bounded_gradients(tmp_path):
    # The tiny trainer run with model.rope_jitter on and DINOv3's LayerScale 1e-5: its first step's gradient
    # norm was ~3e11 (an image whose masked tokens skipped both blocks' attention, see the test above; the
    # jitter's extra random draw is what put that skip on step 1). Every step's gradient norm must stay finite
    # and under the trainer's own divergence bound.
    import copy
    import math

    from lvd_train_testutils import TINY_CFG, read_metrics, write_shards
    from training.config import load_config
    from training.train import train

    raw = copy.deepcopy(TINY_CFG)
    raw["model"] = {"arch": "vit_tiny_patch16_rope_reg4", "embed_dim": 48, "depth": 2, "num_heads": 3,
                    "drop_path_rate": 0.1, "rope_jitter": 1.5}
    raw["crops"] = {"global_crops_size": 32, "local_crops_number": 2, "local_crops_size": 16}
    raw["optim"]["epochs"] = 1
    raw["checkpoint"] = {"period_iters": 100, "keep_last": 1}
    cfg = load_config(raw=raw)
    write_shards(tmp_path / "shards")
    assert train(cfg, str(tmp_path / "shards"), tmp_path / "out")["iterations"] == 4
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    norms = [v for r in rows for k, v in r.items() if k.startswith("grad_norm_")]
    assert len(norms) >= 4 * 2 and all(math.isfinite(v) and v < cfg.optim.max_grad_norm for v in norms)
