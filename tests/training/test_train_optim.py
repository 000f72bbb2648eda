"""Schedules, parameter groups, EMA, NaN guard, config validation."""
import math
import subprocess
import sys

import pytest
import torch
from lvd_train_testutils import REPO

from tests.tolerance import approx, assert_close, rounding_tol
from training.config import ConfigError, load_config
from training.heads import DINOHead
from training.optim import apply_schedules, build_optimizer, get_param_groups, param_multipliers
from training.schedules import CosineScheduler, build_schedules, scaled_lr
from training.train import NonFiniteLossError, check_finite, ema_update
from training.models.vision_transformer import build_backbone


def test_schedules_reference_values():
    ipe = 10
    s = build_schedules(lr=1.0, min_lr=0.0, epochs=10, iters_per_epoch=ipe, warmup_epochs=2, weight_decay=0.04,
                        weight_decay_end=0.4, momentum_teacher=0.992, final_momentum_teacher=1.0,
                        warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                        freeze_last_layer_epochs=1)
    total = 100
    # float64 schedules (np.linspace, cos) at the scale of their values (<= 1): a few roundings each
    f64 = {"dtype": float, "depth": 4, "magnitude": 1.0}
    # lr: linear warmup 0 -> 1 over 20 iterations (np.linspace endpoints), then half cosine to min_lr
    assert s["lr"][0] == 0.0 and s["lr"][19] == approx(1.0, **f64)
    assert s["lr"][10] == approx(10 / 19, **f64)
    assert s["lr"][20] == approx(1.0, **f64)
    assert s["lr"][20 + 40] == approx(0.5 * (1 + math.cos(math.pi * 40 / 80)), **f64)
    assert s["lr"][total] == 0.0 and s["lr"][10 ** 6] == 0.0
    # weight decay cosine 0.04 -> 0.4, momentum 0.992 -> 1.0
    assert s["wd"][0] == approx(0.04, **f64) and s["wd"][50] == approx(0.22, **f64) and s["wd"][total] == 0.4
    assert s["momentum"][0] == approx(0.992, **f64) and s["momentum"][50] == approx(0.996, **f64)
    assert s["momentum"][total + 5] == 1.0
    mono = [s["momentum"][i] for i in range(total)]
    assert all(a <= b + rounding_tol(**f64) for a, b in zip(mono, mono[1:]))
    # teacher temperature: linear 0.04 -> 0.07 over 3 epochs, then constant
    assert s["teacher_temp"][0] == approx(0.04, **f64) and s["teacher_temp"][29] == approx(0.07, **f64)
    assert s["teacher_temp"][15] == approx(0.04 + 0.03 * 15 / 29, **f64)
    assert s["teacher_temp"][30] == 0.07 and s["teacher_temp"][99] == 0.07
    # last layer frozen during the first epoch, then follows lr
    assert all(s["last_layer_lr"][i] == 0.0 for i in range(ipe))
    assert all(s["last_layer_lr"][i] == s["lr"][i] for i in range(ipe, total))


def test_lr_scaling_and_cosine_scheduler():
    f64 = {"dtype": float, "depth": 2}  # a division and a square root
    assert scaled_lr(0.004, 1024) == approx(0.004, **f64)
    assert scaled_lr(0.004, 256) == approx(0.002, **f64)
    assert scaled_lr(0.004, 4096) == approx(0.008, **f64)
    c = CosineScheduler(1.0, 0.0, 10, warmup_iters=0, freeze_iters=2)
    assert c[0] == c[1] == 0.0 and c[2] == 1.0


def _student(depth=3):
    return torch.nn.ModuleDict({"backbone": build_backbone("vit_tiny_patch14", depth=depth, img_size=28,
                                                           num_register_tokens=2),
                                "dino_head": DINOHead(192, 16, 32, 8)})


def test_param_groups_decay_and_lr_multipliers():
    depth, lwd = 3, 0.9
    st = _student(depth)
    mult = {n: param_multipliers(n, depth, lwd, 0.2) for n, _ in st.named_parameters()}
    f64 = {"dtype": float, "depth": depth + 2}  # lwd ** k and a product: at most depth + 2 float64 roundings
    top = lwd ** (depth + 1)
    # tokens and position embedding: layer 0, no weight decay
    for n in ("backbone.cls_token", "backbone.pos_embed", "backbone.mask_token", "backbone.register_tokens"):
        assert mult[n]["lr_multiplier"] == approx(top, **f64) and mult[n]["wd_multiplier"] == 0.0
    assert mult["backbone.patch_embed.proj.weight"]["lr_multiplier"] == approx(0.2 * top, **f64)
    assert mult["backbone.patch_embed.proj.weight"]["wd_multiplier"] == 1.0
    assert mult["backbone.patch_embed.proj.bias"]["wd_multiplier"] == 0.0
    for i in range(depth):
        assert mult[f"backbone.blocks.{i}.attn.qkv.weight"]["lr_multiplier"] == approx(lwd ** (depth - i), **f64)
        assert mult[f"backbone.blocks.{i}.attn.qkv.weight"]["wd_multiplier"] == 1.0
        assert mult[f"backbone.blocks.{i}.mlp.fc1.weight"]["wd_multiplier"] == 1.0
        for n in ("attn.qkv.bias", "mlp.fc2.bias", "norm1.weight", "norm2.bias", "ls1.gamma", "ls2.gamma"):
            assert mult[f"backbone.blocks.{i}.{n}"]["wd_multiplier"] == 0.0, n
    assert mult["backbone.norm.weight"] == {"lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False}
    assert mult["dino_head.mlp.0.weight"] == {"lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False}
    assert mult["dino_head.mlp.0.bias"]["wd_multiplier"] == 0.0
    assert mult["dino_head.last_layer.weight_v"]["is_last_layer"]
    groups = get_param_groups(st, depth, lwd, 0.2)
    assert sum(len(g["params"]) for g in groups) == len(list(st.parameters()))
    opt = build_optimizer(groups)
    assert opt.defaults["betas"] == (0.9, 0.999)
    apply_schedules(opt, lr=0.1, wd=0.04, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == approx(0.0 if g["is_last_layer"] else 0.1 * g["lr_multiplier"], **f64)
        assert g["weight_decay"] == approx(0.04 * g["wd_multiplier"], **f64)


def test_head_weight_norm_fixed_g():
    h = DINOHead(10, out_dim=7, hidden_dim=16, bottleneck_dim=4)
    assert [n for n, _ in h.named_parameters() if "last_layer" in n] == ["last_layer.weight_v"]
    w = h.last_layer.weight
    assert_close(w.norm(dim=1), torch.ones(7), n_terms=4, depth=2)  # normalise, then the norm, over 4 values
    x = torch.randn(3, 10)
    z = torch.nn.functional.normalize(h.mlp(x), dim=-1)
    # unit rows against unit rows: dots of 4 terms bounded by 1
    assert_close(h(x), z @ w.t(), n_terms=4, depth=2, magnitude=1.0)
    assert len(h.mlp) == 5  # Linear GELU Linear GELU Linear


def test_ema_update():
    torch.manual_seed(0)
    s, t = _student(1), _student(1)
    before = {n: p.detach().clone() for n, p in t.named_parameters()}
    ema_update(t, s, 0.9)
    sp = dict(s.named_parameters())
    for n, p in t.named_parameters():  # two products and a sum, here and in the foreach kernels
        assert_close(p, 0.9 * before[n] + 0.1 * sp[n], n_terms=2, depth=2, msg=n)
    ema_update(t, s, 1.0)
    for n, p in t.named_parameters():
        assert_close(p, 0.9 * before[n] + 0.1 * sp[n], n_terms=2, depth=2, msg=n)


def test_fused_adamw_steps_like_the_default():
    torch.manual_seed(0)
    ref, fused_model = _student(1), _student(1)
    fused_model.load_state_dict(ref.state_dict())
    opts = []
    for model, fused in ((ref, False), (fused_model, True)):
        opt = build_optimizer(get_param_groups(model, 1, 0.9, 0.2), fused=fused)
        assert all(g.get("fused") is (True if fused else None) for g in opt.param_groups)
        apply_schedules(opt, 1e-3, 0.04, 1e-3)
        opts.append(opt)
    x = torch.randn(2, 3, 28, 28)
    for model, opt in zip((ref, fused_model), opts):
        for _ in range(2):
            opt.zero_grad()
            model["dino_head"](model["backbone"](x)).square().mean().backward()
            opt.step()
    # AdamW's elementwise arithmetic rounds differently in the fused kernel; the second step's gradients then come
    # from weights that differ by that rounding, so the bound is the one of a training step: reductions of up to
    # 4 x 192 terms (the MLP), chained over 1 block x (attention, MLP) + 3 head layers + the prototype layer,
    # per step; at the weight's scale (or, for a weight near zero, the ~lr-sized updates: 2 steps x 1e-3)
    for (n, a), b in zip(ref.named_parameters(), fused_model.parameters()):
        assert_close(b, a, n_terms=4 * 192, depth=2 * (2 + 3 + 1), magnitude=max(float(a.abs().max()), 2e-3), msg=n)


def test_nan_guard_names_the_term():
    terms = {"dino": torch.tensor(1.0), "ibot": torch.tensor(float("nan")), "loss": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLossError, match="ibot"):
        check_finite(terms, 7)
    check_finite({"dino": torch.tensor(1.0), "loss": torch.tensor(1.0)}, 0)


def test_config_validation_one_line_errors(tmp_path):
    for cfg in ("train_demo.yaml", "train_vitl.yaml"):
        load_config(REPO / "pipelines" / "configs" / cfg)
    vitl = load_config(REPO / "pipelines" / "configs" / "train_vitl.yaml")
    assert vitl.crops.local_crops_size == 98 and vitl.model.arch == "vit_large_patch14"
    assert vitl.optim.layerwise_decay == 0.9 and vitl.loss.koleo_weight == 0.1
    cases = [
        (["optim.base_lrr=1"], "optim.base_lrr: unknown key"),
        (["optim.base_lr=fast"], "optim.base_lr"),
        (["optim.base_lr=-1"], "optim.base_lr"),
        (["crops.global_crops_size=100"], "multiple of model.patch_size"),
        (["crops.local_crops_scale=[0.5, 0.1]"], "local_crops_scale"),
        (["model.arch=vit_huge"], "unknown arch"),
        (["loss.centering=foo"], "loss.centering"),
    ]
    for ov, expect in cases:
        with pytest.raises(ConfigError) as e:
            load_config(REPO / "pipelines" / "configs" / "train_demo.yaml", ov)
        msg = str(e.value)
        assert expect in msg and "\n" not in msg and msg.startswith("config error:"), msg
    # the script fails before any work, with the one line on stderr
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), "--config",
                        str(REPO / "pipelines" / "configs" / "train_demo.yaml"), "--data", str(tmp_path / "none"),
                        "--output", str(tmp_path / "out"), "optim.warmup_epochs=abc"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "optim.warmup_epochs" in r.stderr
    assert not (tmp_path / "out").exists()
