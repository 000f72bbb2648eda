"""Packed multi-crop attention (one pass over all crop groups, block-diagonal mask) and the throughput bench."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from lvd_train_testutils import REPO, TINY_CFG, read_metrics, synthetic_batch, tiny_tol, write_shards

from tests.tolerance import approx, assert_close, rounding_tol
from training.config import load_config
from training.models.backbone_io import backbone_metadata, official_key_list
from training.models.layers import Attention
from training.models.packing import block_diagonal_mask
from training.models.vision_transformer import build_backbone
from training.train import Trainer, train

sys.path.insert(0, str(REPO / "bench"))
import train_throughput as tt  # noqa: E402

OUT_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
VARIANTS = [dict(num_register_tokens=0, ffn_layer="mlp"), dict(num_register_tokens=4, ffn_layer="swiglufused")]


def _model(drop_path_rate=0.0, **kw):
    torch.manual_seed(0)
    m = build_backbone("vit_tiny_patch14", img_size=42, embed_dim=48, depth=2, num_heads=3,
                       drop_path_rate=drop_path_rate, **kw)
    for blk in m.blocks:  # LayerScale 1e-5 would hide any error in the branches
        blk.ls1.gamma.data.fill_(0.7)
        blk.ls2.gamma.data.fill_(0.7)
    return m


def _crops(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    glob = torch.randn(2 * b, 3, 42, 42, generator=g)  # 9 patches
    loc = torch.randn(4 * b, 3, 28, 28, generator=g)  # 4 patches
    masks = torch.rand(2 * b, 9, generator=g) < 0.4
    return [glob, loc], [masks, None]


def _run(m, packed, x, masks, seed=3):
    m.packed_attention = packed
    torch.manual_seed(seed)  # the same drop-path subsets on both paths
    return m.forward_features(x, masks)


# Tolerances (tests/tolerance.py). Packed and unpacked paths compute the same values with other reductions: the
# longest is the MLP's inner dimension 4 x 48 (the packed attention row, 8 x 10 + 16 x 5 = 160 tokens, is
# shorter); a forward chains 2 blocks x (attention, MLP) + their norms, 6 stages.
FP32 = {"n_terms": 4 * 48, "dtype": torch.float32, "depth": 2 * 2 + 2}
# bf16 autocast: the matmuls accumulate in fp32 and round their outputs to bf16, so a different summation order
# flips at most the last bf16 bit of a stage's output (eps(bf16) relative, whatever the reduction length); 2 blocks
# x (norm, qkv, attention, proj, norm, fc1, fc2) + final norm = 15 such stages.
BF16 = {"n_terms": 1, "dtype": torch.bfloat16, "depth": 2 * 7 + 1}


def _assert_outputs_close(a, b, tol):
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert torch.equal(da["masks"], db["masks"]) if da["masks"] is not None else db["masks"] is None
        for k in OUT_KEYS:
            assert da[k].shape == db[k].shape and da[k].dtype == db[k].dtype, k
            assert_close(da[k], db[k], **tol, msg=k)


@pytest.mark.parametrize("variant", VARIANTS, ids=["mlp", "reg4_swiglu"])
def test_packed_forward_equals_unpacked_fp32(variant):
    m = _model(**variant).eval()
    x, masks = _crops()
    tokens = [m.prepare_tokens_with_masks(xi, mi) for xi, mi in zip(x, masks)]
    with torch.no_grad():
        ref = _run(m, False, x, masks)
        assert m.uses_packing(tokens) is False and not m._mask_cache
        out = _run(m, True, x, masks)
        assert m.uses_packing(tokens) is True and len(m._mask_cache) == 1
    _assert_outputs_close(out, ref, FP32)
    assert out[0]["x_norm_regtokens"].shape[1] == variant["num_register_tokens"]
    # a single tensor is never packed
    m.packed_attention = True
    with torch.no_grad():
        single = m.forward_features(x[0], masks[0])
    assert_close(single["x_prenorm"], ref[0]["x_prenorm"], **FP32)


@pytest.mark.parametrize("variant", VARIANTS, ids=["mlp", "reg4_swiglu"])
def test_packed_forward_equals_unpacked_bf16_autocast(variant):
    m = _model(**variant).eval()
    x, masks = _crops()
    with torch.no_grad():
        fp32 = _run(m, False, x, masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = _run(m, False, x, masks)
            out = _run(m, True, x, masks)
    # autocast did run in bf16: further from fp32 than fp32 rounding can explain
    diff = (ref[0]["x_prenorm"].float() - fp32[0]["x_prenorm"]).abs().max()
    assert diff > rounding_tol(fp32[0]["x_prenorm"].abs().max(), **FP32)
    _assert_outputs_close(out, ref, BF16)


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train_drop_path"])
def test_packed_gradients_equal_unpacked_fp32(train_mode):
    grads, outs = {}, {}
    x, masks = _crops()
    for packed in (False, True):
        m = _model(drop_path_rate=0.4, **VARIANTS[1]).train(train_mode)
        out = _run(m, packed, x, masks)
        g = torch.Generator().manual_seed(7)
        loss = sum((o[k] * torch.randn(o[k].shape, generator=g)).sum() for o in out for k in OUT_KEYS)
        loss.backward()
        grads[packed] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        outs[packed] = out
    assert grads[True].keys() == grads[False].keys() and "blocks.1.mlp.w12.weight" in grads[True]
    for n, ref in grads[False].items():  # fp32 rounding only; the backward doubles the chain
        assert (grads[True][n] - ref).norm() <= rounding_tol(ref.norm(), **{**FP32, "depth": 2 * FP32["depth"]}), n
    _assert_outputs_close(outs[True], outs[False], FP32)


def test_packed_drop_path_is_per_image_and_active():
    """Train mode: the packed path draws the unpacked path's subsets (outputs equal under one seed), other seeds
    give other outputs, and dropped images keep their input (the branch runs on kept images only)."""
    m = _model(drop_path_rate=0.5).train()
    x, masks = _crops()
    with torch.no_grad():
        a = _run(m, True, x, masks, seed=3)
        b = _run(m, False, x, masks, seed=3)
        c = _run(m, True, x, masks, seed=4)
        m.eval()
        e = _run(m, True, x, masks)
    _assert_outputs_close(a, b, FP32)
    # other drop-path draws: outputs further apart than rounding can explain
    tol = rounding_tol(a[0]["x_prenorm"].abs().max(), **FP32)
    assert (a[0]["x_prenorm"] - c[0]["x_prenorm"]).abs().max() > tol
    assert (a[0]["x_prenorm"] - e[0]["x_prenorm"]).abs().max() > tol
    # one block, p = 0.5 on 8 global + 16 local images: exactly half the images of each group get each branch
    blk = m.blocks[0].train()
    from training.models.packing import PackedLayout

    tokens = [m.prepare_tokens_with_masks(xi, mi) for xi, mi in zip(x, masks)]
    calls = []
    orig = blk._ffn_branch
    blk._ffn_branch = lambda t, mask=None: (calls.append(t.shape), torch.zeros_like(orig(t)))[1]
    lay = PackedLayout([t.shape[:2] for t in tokens], m._packed_mask_fn(torch.device("cpu")))
    with torch.no_grad():
        blk(lay.pack(tokens), lay)
    assert calls == [torch.Size([1, 4 * 10 + 8 * 5, 48])]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_boolean_mask():
    """The CUDA path's FlexAttention BlockMask (document-id mask_mod) against the CPU boolean mask; FlexAttention
    runs eagerly on CPU without gradients."""
    sizes = ((3, 10), (5, 5), (2, 130))  # a document longer than one 128-token block
    total = sum(b * n for b, n in sizes)
    bool_mask = block_diagonal_mask(sizes, "cpu", flex=False)
    assert bool_mask.shape == (total, total) and bool_mask.sum() == sum(b * n * n for b, n in sizes)
    block_mask = block_diagonal_mask(sizes, "cpu", flex=True)
    attn = Attention(24, 3).eval()
    x = torch.randn(1, total, 24)
    with torch.no_grad():
        # qkv (24 terms), scores and the weighted sum over a row of `total` keys: 3 chained reductions
        assert_close(attn(x, block_mask), attn(x, bool_mask), n_terms=total, dtype=torch.float32, depth=3)


def test_flex_kernels_live_on_the_model():
    """The FlexAttention functions a model compiles are its own (shared by its blocks, no process-wide cache); a
    copy (the teacher is a deepcopy of the student, after which both compile separately) starts empty."""
    from training.models.packing import FlexKernels, flex_attention

    m = _model()
    assert all(blk.attn.kernels is m.flex_kernels for blk in m.blocks)
    cpu = torch.device("cpu")
    assert m.flex_kernels.attention(cpu) is flex_attention and not m.flex_kernels._compiled  # eager off CUDA
    m.flex_kernels._compiled["flex_attention"] = torch.compile(flex_attention, dynamic=False)  # as CUDA does
    twin = copy.deepcopy(m)
    assert twin.flex_kernels is not m.flex_kernels and not twin.flex_kernels._compiled
    assert all(blk.attn.kernels is twin.flex_kernels for blk in twin.blocks)
    assert "flex_attention" in m.flex_kernels._compiled and not FlexKernels()._compiled
    assert Attention(24, 3).kernels is not Attention(24, 3).kernels


def test_option_defaults_keys_and_config():
    m = build_backbone("vit_tiny_patch14", img_size=28, depth=2)
    assert m.packed_attention is False
    assert list(m.state_dict()) == official_key_list(2)
    m2 = build_backbone("vit_tiny_patch14", img_size=28, depth=2, packed_attention=True, num_register_tokens=4)
    assert list(m2.state_dict()) == official_key_list(2, num_register_tokens=4)
    assert "packed_attention" not in backbone_metadata(m2)["overrides"]  # a runtime option, not architecture
    auto = build_backbone("vit_tiny_patch14", img_size=28, depth=2, packed_attention="auto")
    t = [torch.zeros(2, 5, 192), torch.zeros(4, 2, 192)]
    assert auto.uses_packing(t) is False  # auto: CUDA only
    with pytest.raises(ValueError, match="packed_attention"):
        build_backbone("vit_tiny_patch14", depth=2, packed_attention="yes")
    assert "packed_attention" not in load_config(raw={}).model.build_kwargs()
    for v, want in (("true", True), ("auto", "auto"), ("false", None)):
        cfg = load_config(overrides=[f"model.packed_attention={v}"])
        assert cfg.model.build_kwargs().get("packed_attention") == want


def _tiny_cfg(packed, **model):
    raw = copy.deepcopy(TINY_CFG)
    raw["model"].update({"packed_attention": packed, "drop_path_rate": 0.3, **model})
    raw["device"] = "cpu"
    return load_config(raw=raw)


def test_trainer_step_packed_equals_unpacked():
    """One full training step (teacher, student with drop path, losses, clip, AdamW, EMA), fp32 on CPU."""
    rows, params = {}, {}
    for packed in (False, True):
        trainer = Trainer(_tiny_cfg(packed, num_register_tokens=4))
        assert trainer.student["backbone"].packed_attention is packed
        batch = synthetic_batch(trainer.cfg)
        torch.manual_seed(11)
        rows[packed] = trainer.train_step(batch, 2)  # past freeze_last_layer_epochs: every parameter updates
        params[packed] = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    tol = tiny_tol(1)  # TINY_CFG's model, one training step
    for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        assert math.isfinite(rows[True][k])
        assert rows[True][k] == approx(rows[False][k], **tol), k
    for k in params[False]:  # one AdamW step (~lr, at the weight's magnitude) from equal weights
        assert_close(params[True][k], params[False][k], **tol, msg=k)


def test_short_training_run_with_packed_attention(tmp_path):
    write_shards(tmp_path / "shards", n_shards=2, per_shard=6)
    cfg = _tiny_cfg(True)
    cfg.max_steps = 2
    summary = train(cfg, str(tmp_path / "shards"), tmp_path / "out")
    assert summary["iterations"] == 2
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


# ---------------------------------------------------------------------- FLOP counter and bench
def test_flop_counter_hand_computed():
    # one block, N = 5 tokens (1 + 2x2 patches of a 28 px crop), D = 48, MLP ratio 4:
    # linear 2 * 5 * (4 * 48^2 + 2 * 4 * 48^2) = 276480; attention 4 * 5^2 * 48 = 4800
    assert tt.block_forward_flops(5, 48, tt.ffn_weights(48)) == 281280
    # 2 images, 2 blocks, patch embedding 2 * 4 patches * 588 * 48 per image
    assert tt.backbone_forward_flops(2, 28, 48, 2) == 2 * 2 * 281280 + 2 * 2 * 4 * 588 * 48
    # drop path 0.5 on 2 images: the blocks see 1 image, the patch embedding both
    assert tt.backbone_forward_flops(2, 28, 48, 2, drop_path_rate=0.5) == 2 * 281280 + 2 * 2 * 4 * 588 * 48
    # head: 3 vectors, 48 -> 64 -> 64 -> 32 -> 128 prototypes
    assert tt.head_forward_flops(3, 48, 64, 32, 128, 3) == 2 * 3 * (48 * 64 + 64 * 64 + 64 * 32 + 32 * 128)
    f = tt.train_step_flops(1, 48, 2, n_local=2, global_size=28, local_size=14, n_masked=3, hidden_dim=64,
                            bottleneck_dim=32, n_prototypes=128)
    fwd = (tt.backbone_forward_flops(2, 28, 48, 2) + tt.backbone_forward_flops(2, 14, 48, 2)
           + tt.head_forward_flops(4 + 3, 48, 64, 32, 128))
    teacher = tt.backbone_forward_flops(2, 28, 48, 2) + tt.head_forward_flops(2 + 3, 48, 64, 32, 128)
    assert f == {"student_forward": fwd, "student": 3 * fwd, "teacher": teacher, "total": 3 * fwd + teacher}
    # SwiGLU: w12 (D -> 2H) + w3 (H -> D)
    assert tt.ffn_weights(1536, 4.0, "swiglufused") == 3 * 1536 * 4096


def test_flop_counter_against_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from training.heads import DINOHead

    m = build_backbone("vit_tiny_patch14", img_size=56, embed_dim=96, depth=2, num_heads=3,
                       num_register_tokens=4, ffn_layer="swiglufused").eval()
    head = DINOHead(96, 256, 128, 64, 3)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        head(m.forward_features(x)["x_norm_clstoken"])
    ours = (tt.backbone_forward_flops(3, 56, 96, 2, 4.0, "swiglufused", num_register_tokens=4)
            + tt.head_forward_flops(3, 96, 128, 64, 256, 3))
    assert abs(ours - fc.get_total_flops()) <= 0.1 * fc.get_total_flops()


def test_bench_smoke_on_cpu_without_ray_or_faiss(tmp_path):
    out = tmp_path / "bench.json"
    code = ("import sys; sys.modules['ray'] = None; sys.modules['faiss'] = None; "  # importing either fails
            f"sys.path.insert(0, {str(REPO / 'bench')!r}); import train_throughput as t; "
            f"sys.exit(t.main(sys.argv[1:]))")
    args = ["--device", "cpu", "--arch", "vit_tiny_patch14", "--batch", "2", "--steps", "2", "--warmup", "1",
            "--embed-dim", "48", "--depth", "2", "--global-size", "28", "--local-size", "14", "--local-crops", "2",
            "--n-prototypes", "128", "--peak-tflops", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120,
                       cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "optimised" in r.stdout and "naive" in r.stdout and "MFU" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(x["mode"], x["packed_attention"]) for x in rows] == [("optimised", True), ("naive", False)]
    for x in rows:
        assert x["device"] == "cpu" and x["batch"] == 2 and len(x["step_s_all"]) == 2
        assert x["images_per_s"] > 0 and math.isfinite(x["loss"]) and 0 < x["mfu"] < 1
        # float64: a division in the bench, a multiplication by 1e12 and one by step_s here
        assert x["model_flops_per_step"] == approx(x["tflops_per_s"] * 1e12 * x["step_s"], dtype=float, depth=3)
    assert "speedup_vs_naive" in rows[0]


# ---------------------------------------------------------------------- CUDA (FlexAttention, compiled)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS, ids=["mlp", "reg4_swiglu"])
def test_packed_equals_unpacked_on_cuda_bf16(variant):
    """Reference crop shapes (224 / 98 px: 1+R+256 and 1+R+49 tokens), compiled FlexAttention, bf16 autocast."""
    torch.manual_seed(0)
    m = build_backbone("vit_small_patch14", depth=2, **variant).cuda().eval()
    for blk in m.blocks:
        blk.ls1.gamma.data.fill_(0.5)
        blk.ls2.gamma.data.fill_(0.5)
    x = [torch.randn(8, 3, 224, 224, device="cuda"), torch.randn(32, 3, 98, 98, device="cuda")]
    masks = [torch.rand(8, 256, device="cuda") < 0.3, None]
    outs, grads = {}, {}
    for packed in (False, True):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = _run(m, packed, x, masks)
        sum(o["x_norm_patchtokens"].float().square().mean() + o["x_norm_clstoken"].float().sum() for o in out).backward()
        outs[packed] = out
        grads[packed] = {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
    assert m.uses_packing([t for t in x]) and any(k[2] for k in m._mask_cache)  # the FlexAttention path ran
    _assert_outputs_close(outs[True], outs[False], BF16)
    for n, g in grads[False].items():  # the backward doubles the chain of bf16 stages
        assert (grads[True][n] - g).norm() <= rounding_tol(g.norm(), **{**BF16, "depth": 2 * BF16["depth"]}), n
