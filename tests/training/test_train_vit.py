"""Backbone: official key layout, strict save/reload, variants, interpolation, masks, stochastic depth."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tolerance import assert_close
from training.models.backbone_io import load_official_checkpoint, save_backbone
from training.models.vision_transformer import build_backbone


def official_keys(depth, swiglu=False, registers=False):
    """The key list of the official dinov2_vit*14[_reg4]_pretrain.pth files, written out by hand."""
    keys = ["cls_token", "pos_embed"] + (["register_tokens"] if registers else []) + [
        "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [b + "norm1.weight", b + "norm1.bias", b + "attn.qkv.weight", b + "attn.qkv.bias",
                 b + "attn.proj.weight", b + "attn.proj.bias", b + "ls1.gamma", b + "norm2.weight", b + "norm2.bias"]
        if swiglu:
            keys += [b + "mlp.w12.weight", b + "mlp.w12.bias", b + "mlp.w3.weight", b + "mlp.w3.bias"]
        else:
            keys += [b + "mlp.fc1.weight", b + "mlp.fc1.bias", b + "mlp.fc2.weight", b + "mlp.fc2.bias"]
        keys.append(b + "ls2.gamma")
    return keys + ["norm.weight", "norm.bias"]


def _randomise(model):
    # LayerScale starts at 1e-5; make every block matter so that equality checks mean something
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.fill_(0.5)
            if n in ("mask_token", "register_tokens"):
                p.normal_()


def test_vit_small_official_layout_shapes():
    m = build_backbone("vit_small_patch14", img_size=518)
    sd = m.state_dict()
    assert list(sd) == official_keys(12)
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert sd["cls_token"].shape == (1, 1, 384)
    assert sd["mask_token"].shape == (1, 384)
    assert sd["patch_embed.proj.weight"].shape == (384, 3, 14, 14)
    assert sd["blocks.11.mlp.fc1.weight"].shape == (1536, 384)
    assert sd["blocks.11.ls2.gamma"].shape == (384,)
    assert not any(k.startswith("head") for k in sd)


@pytest.mark.parametrize("name,depth,swiglu,regs", [
    ("vit_small_patch14", 12, False, False),
    ("vit_small_patch14_reg4", 12, False, True),
    ("vit_tiny_patch14", 3, True, False),
])
def test_save_reload_strict_identical_features(tmp_path, name, depth, swiglu, regs):
    over = {"depth": depth} if name.startswith("vit_tiny") else {}
    if swiglu:
        over["ffn_layer"] = "swiglufused"
    torch.manual_seed(0)
    m = build_backbone(name, img_size=518 if not name.startswith("vit_tiny") else 224, **over).eval()
    _randomise(m)
    assert list(m.state_dict()) == official_keys(depth, swiglu, regs)
    path = save_backbone(m, tmp_path / "backbone.pth")
    side = json.loads((tmp_path / "backbone.json").read_text())
    assert side["arch"] == name and side["patch_size"] == 14
    assert side["num_register_tokens"] == (4 if regs else 0)
    # the .pth is a plain state dict with exactly the official keys
    raw = torch.load(path, weights_only=True)
    assert list(raw) == official_keys(depth, swiglu, regs)
    m2 = load_official_checkpoint(path).eval()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        a, b = m.forward_features(x, masks), m2.forward_features(x, masks)
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(a[k], b[k]), k
    assert a["x_norm_regtokens"].shape[1] == (4 if regs else 0)


def test_official_file_without_sidecar_loads_with_arch_name(tmp_path):
    torch.manual_seed(1)
    m = build_backbone("vit_small_patch14_reg4", img_size=518).eval()
    _randomise(m)
    p = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(m.state_dict(), p)  # as the official files: a bare state dict
    for kwargs in ({"arch": "vit_small_patch14_reg4"}, {}):  # named, or inferred from shapes
        m2 = load_official_checkpoint(p, **kwargs).eval()
        assert m2.img_size == 518 and m2.num_register_tokens == 4
        x = torch.randn(1, 3, 42, 42)
        with torch.no_grad():
            assert torch.equal(m(x), m2(x))
    m3 = build_backbone("vit_small_patch14_reg4", img_size=518)
    m3.load_state_dict(torch.load(p, weights_only=True), strict=True)


def test_giant2_swiglu_hidden_width():
    m = build_backbone("vit_giant2_patch14", depth=1, img_size=28)
    hidden = int(1536 * 4.0)
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    assert hidden == 4096
    assert m.blocks[0].mlp.w12.weight.shape == (2 * hidden, 1536)
    assert m.blocks[0].mlp.w3.weight.shape == (1536, hidden)
    assert list(m.state_dict()) == official_keys(1, swiglu=True)
    for name, dim, depth, heads in [("vit_base_patch14", 768, 12, 12), ("vit_large_patch14", 1024, 24, 16)]:
        b = build_backbone(name, depth=1, img_size=28)
        assert b.embed_dim == dim and b.num_heads == heads


def test_pos_embed_interpolation_to_other_sizes():
    m = build_backbone("vit_tiny_patch14", depth=1, img_size=518).eval()
    x = torch.randn(1, 3, 224, 224)
    out = m.forward_features(x)
    assert out["x_norm_patchtokens"].shape == (1, 256, 192)
    # the same as an explicit bicubic resize of the stored 37x37 grid (reference: scale (16 + 0.1) / 37)
    tok = m.patch_embed(x)
    tok = torch.cat([m.cls_token, tok], 1)
    pe = m.interpolate_pos_encoding(tok, 224, 224)
    grid = m.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    exp = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, -1)
    # bicubic: 4 x 4 weighted terms per output value, at the stored grid's magnitude
    assert_close(pe[:, 1:], exp, n_terms=16, magnitude=float(grid.abs().max()))
    assert torch.equal(pe[:, :1], m.pos_embed[:, :1])
    # stored grid size: used unchanged
    assert torch.equal(m.interpolate_pos_encoding(torch.zeros(1, 1 + 37 * 37, 192), 518, 518), m.pos_embed)
    # several crop sizes in one call
    outs = m.forward_features([torch.randn(2, 3, 28, 28), torch.randn(3, 3, 42, 42)])
    assert [o["x_norm_patchtokens"].shape[:2] for o in outs] == [(2, 4), (3, 9)]
    assert m(torch.randn(2, 3, 70, 70)).shape == (2, 192)


def test_mask_token_replaces_masked_patches_before_pos_embed():
    m = build_backbone("vit_tiny_patch14", depth=1, img_size=28).eval()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 28, 28)
    masks = torch.tensor([[True, False, False, True], [False] * 4])
    tok = m.prepare_tokens_with_masks(x, masks)
    pe = m.pos_embed
    assert_close(tok[0, 1], m.mask_token[0] + pe[0, 1], n_terms=2)  # one addition
    assert_close(tok[0, 4], m.mask_token[0] + pe[0, 4], n_terms=2)
    # the patch embedding is a 3 x 14 x 14 = 588-term dot product per value (batched differently here), + pe
    emb = m.patch_embed(x[1:])[0]
    assert_close(tok[1, 1:], emb + pe[0, 1:], n_terms=3 * 14 * 14 + 1, magnitude=float(emb.abs().max() + pe.abs().max()))
    assert m.forward_features(x, masks)["masks"] is masks


def test_efficient_stochastic_depth_runs_branch_on_kept_subset():
    torch.manual_seed(0)
    m = build_backbone("vit_tiny_patch14", depth=2, img_size=28, drop_path_rate=0.5)
    seen = []
    m.blocks[0].attn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    x = torch.randn(8, 3, 28, 28)
    m.train()
    m(x)
    assert seen == [4]  # max(int(8 * 0.5), 1)
    seen.clear()
    m.eval()
    m(x)
    assert seen == [8]
    # the kept residuals are scaled by B / kept
    from training.models.layers import _drop_add_residual

    torch.manual_seed(3)
    y = torch.zeros(4, 2, 3)
    out = _drop_add_residual(y, lambda t: torch.ones_like(t), 0.5)
    assert sorted(out[:, 0, 0].tolist()) == [0.0, 0.0, 2.0, 2.0]


# ---------------------------------------------------------------------- position-embedding interpolation
def _keys_cubic(t, a):
    """Keys' cubic convolution kernel (a = -0.75: torch's plain bicubic; a = -0.5: the antialiased / PIL one)."""
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))


def _resample_matrix(n_in, n_out, scale, antialias):
    """[n_out, n_in] weights of a 1-D bicubic resize (half-pixel centres, ``scale`` = input step per output pixel).

    Plain (torch ``mode="bicubic"``, align_corners=False): source ``(i + 0.5) * scale - 0.5``, the 4 neighbours with
    a = -0.75, indices clamped to the border. Antialiased (PIL's resampling filter, which torch's ``antialias=True``
    follows): kernel with a = -0.5 stretched by ``max(scale, 1)``, taps inside the image only, weights normalised."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        if not antialias:
            src = (i + 0.5) * scale - 0.5
            x0 = math.floor(src)
            for j in range(x0 - 1, x0 + 3):
                w[i, min(max(j, 0), n_in - 1)] += _keys_cubic(src - j, -0.75)
        else:
            support = 2.0 * max(scale, 1.0)
            centre = (i + 0.5) * scale
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            taps = _keys_cubic((np.arange(lo, hi) - centre + 0.5) / max(scale, 1.0), -0.5)
            w[i, lo:hi] = taps / taps.sum()
    return w


def _reference_pos_embed(pos_embed, grid_h, grid_w, offset, antialias):
    """The reference ``interpolate_pos_encoding`` in float64: with an offset, torch uses ``scale = 1 / scale_factor
    = M / (grid + offset)``; without one, ``size = grid`` and ``scale = M / grid``."""
    pe = pos_embed.detach().double().numpy()[0]
    m = int(round(math.sqrt(pe.shape[0] - 1)))
    grid = pe[1:].reshape(m, m, -1)
    sh, sw = (m / (grid_h + offset), m / (grid_w + offset)) if offset else (m / grid_h, m / grid_w)
    wh, ww = _resample_matrix(m, grid_h, sh, antialias), _resample_matrix(m, grid_w, sw, antialias)
    out = np.einsum("ih,hwd,jw->ijd", wh, grid, ww).reshape(grid_h * grid_w, -1)
    return torch.from_numpy(np.concatenate([pe[:1], out]))[None], wh, ww


@pytest.mark.parametrize("arch,offset,antialias", [("vit_small_patch14", 0.1, False),
                                                   ("vit_small_patch14_reg4", 0.0, True)])
@pytest.mark.parametrize("hw", [(224, 224), (196, 308), (560, 560)], ids=["224", "196x308", "560"])
def test_pos_embed_interpolation_matches_the_reference_formula(arch, offset, antialias, hw):
    """The reference hub builds ``dinov2_vit*14_reg`` with antialias=True, interpolate_offset=0.0 and the plain
    models with antialias=False, offset 0.1; at any resolution other than the stored 518 px our backbone's position
    embeddings (and so its features) must be the reference's: shrinking (224), non-square, enlarging (560)."""
    torch.manual_seed(0)
    m = build_backbone(arch, depth=1, img_size=518).eval()
    assert (m.interpolate_offset, m.interpolate_antialias) == (offset, antialias)
    _randomise(m)
    h, w = hw
    gh, gw = h // 14, w // 14
    ref, wh, ww = _reference_pos_embed(m.pos_embed, gh, gw, offset, antialias)
    got = m.interpolate_pos_encoding(torch.zeros(1, 1 + gh * gw, m.embed_dim), h, w).double()
    # float32 rounding: each output sums taps_h * taps_w products of stored values (|v| <= max|pos_embed|)
    taps = int((wh != 0).sum(1).max() * (ww != 0).sum(1).max())
    tol = 4 * taps * torch.finfo(torch.float32).eps * m.pos_embed.abs().max().item()
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= tol
    if h == w == 224:  # features at (h, w) = those of the same weights whose stored grid is the reference's resize
        twin = build_backbone(arch, depth=1, img_size=h).eval()
        twin.load_state_dict({**m.state_dict(), "pos_embed": ref.float()}, strict=True)
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            a, b = m.forward_features(x), twin.forward_features(x)
        # LayerNorm outputs are O(1); the pos-embed difference (<= tol) passes through one block of embed_dim sums
        bound = 8 * m.embed_dim * torch.finfo(torch.float32).eps
        for k in ("x_norm_clstoken", "x_norm_patchtokens"):
            assert (a[k] - b[k]).abs().max().item() <= bound, k
