"""Schedules, parameter groups, EMA, NaN guard, config validation."""
import copy
import math
import subprocess
import sys

import pytest
import torch
from lvd_train_testutils import REPO, TINY_CFG, synthetic_batch

from tests.tolerance import approx, assert_close, rounding_tol
from training.config import ConfigError, load_config
from training.heads import DINOHead
from training.optim import apply_schedules, build_optimizer, get_param_groups, param_multipliers
from training.schedules import CosineScheduler, build_schedules, scaled_lr
from training.train import NonFiniteLossError, Trainer, check_finite, ema_update
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
    # tokens and position embedding: layer 0, weight-decayed as the reference's (only biases, norms and LayerScale
    # gammas are exempt); tokens_without_decay exempts them too
    tokens = ("backbone.cls_token", "backbone.pos_embed", "backbone.mask_token", "backbone.register_tokens")
    for n in tokens:
        assert mult[n]["lr_multiplier"] == approx(top, **f64) and mult[n]["wd_multiplier"] == 1.0
        assert param_multipliers(n, depth, lwd, 0.2, tokens_without_decay=True)["wd_multiplier"] == 0.0
    assert param_multipliers("backbone.blocks.0.mlp.fc1.weight", depth, lwd, 0.2, True)["wd_multiplier"] == 1.0
    assert mult["dino_head.last_layer.weight_g"] == {"lr_multiplier": 1.0, "wd_multiplier": 1.0,
                                                     "is_last_layer": True}
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


def test_head_weight_norm_trains_g_initialised_to_one():
    """The prototype layer as the reference's ``weight_norm`` Linear: W = g * v / ||v||_row, g [K, 1] a parameter
    initialised to 1 that receives gradients; checked against the formula in float64."""
    torch.manual_seed(0)
    h = DINOHead(10, out_dim=7, hidden_dim=16, bottleneck_dim=4)
    assert [n for n, _ in h.named_parameters() if "last_layer" in n] == ["last_layer.weight_v", "last_layer.weight_g"]
    assert torch.equal(h.last_layer.weight_g, torch.ones(7, 1))
    with torch.no_grad():
        h.last_layer.weight_g.copy_(torch.rand(7, 1) + 0.5)
    x = torch.randn(3, 10)
    out = h(x)
    out.square().sum().backward()
    assert h.last_layer.weight_g.grad is not None and h.last_layer.weight_g.grad.abs().sum() > 0
    v, g = h.last_layer.weight_v.double(), h.last_layer.weight_g.double()
    z = torch.nn.functional.normalize(h.mlp.double()(x.double()), dim=-1)
    ref = z @ (g * v / v.norm(dim=1, keepdim=True)).t()
    # fp32: the MLP (3 layers, up to 16 terms), a normalisation and the 4-term prototype dot products
    assert_close(out.detach().double(), ref, n_terms=16, dtype=torch.float32, depth=6, magnitude=float(g.detach().max()))
    assert len(h.mlp) == 5  # Linear GELU Linear GELU Linear
    # a state dict written while g was fixed to 1 (no weight_g) loads with g = 1
    old = {k: v for k, v in h.state_dict().items() if k != "last_layer.weight_g"}
    h2 = DINOHead(10, out_dim=7, hidden_dim=16, bottleneck_dim=4)
    with torch.no_grad():
        h2.last_layer.weight_g.fill_(3.0)
    h2.load_state_dict(old)
    assert torch.equal(h2.last_layer.weight_g, torch.ones(7, 1))


def test_adamw_steps_of_frozen_prototypes_and_decayed_tokens_match_a_float64_loop():
    """Three trainer steps against a float64 AdamW loop over the same (clipped) gradients, lr and weight decay:
    the prototype layer, frozen for the first two (lr 0, as the reference: the optimizer still steps it), keeps
    its weights bit-equal, and its moments and step count include the frozen iterations, so its first trained step
    is the step of that history, not a fresh Adam step; the tokens and the position embedding are weight-decayed
    (the reference's groups)."""
    cfg = load_config(raw={**copy.deepcopy(TINY_CFG), "device": "cpu"})  # prototypes frozen for 2 iterations
    trainer = Trainer(cfg)
    opt = trainer.optimizer
    names = {n: (g, p) for g in opt.param_groups for n, p in zip(g["names"], g["params"])}
    watched = ["dino_head.last_layer.weight_v", "dino_head.last_layer.weight_g", "backbone.pos_embed",
               "backbone.cls_token", "backbone.mask_token"]
    assert all(names[n][0]["wd_multiplier"] == 1.0 for n in watched)
    seen = []  # per step and watched parameter: lr, wd and the gradient the optimizer applies
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        {n: (names[n][0]["lr"], names[n][0]["weight_decay"], names[n][1].grad.detach().double().clone())
         for n in watched}))
    start = {n: names[n][1].detach().double().clone() for n in watched}
    frozen = [n for n in watched if "last_layer" in n]
    for it in range(3):
        before = {n: names[n][1].detach().clone() for n in frozen}
        trainer.train_step(synthetic_batch(cfg, seed=it), it)
        if it < 2:
            assert all(names[n][0]["lr"] == 0.0 and torch.equal(names[n][1], before[n]) for n in frozen)
    assert seen[2][frozen[0]][0] > 0 and seen[1]["backbone.pos_embed"][0] > 0
    b1, b2 = cfg.optim.betas
    for n in watched:
        p = names[n][1]
        assert int(opt.state[p]["step"]) == 3
        w, m, v = start[n].clone(), torch.zeros_like(start[n]), torch.zeros_like(start[n])
        for t, step in enumerate(seen, start=1):
            lr, wd, g = step[n]
            w = w * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
        # float32 AdamW: a few elementwise roundings per step at the weight's scale (Adam's update ~lr)
        mag = float(w.abs().max())
        assert_close(p.detach().double(), w, n_terms=1, dtype=torch.float32, depth=8 * 3, magnitude=mag, msg=n)
        if n in frozen:  # a fresh Adam step (no history) moves every coordinate by the full lr: far outside
            lr, wd, g = seen[2][n]
            fresh = start[n] * (1 - lr * wd) - lr * g.sign()
            assert (fresh - w).abs().max() > 100 * rounding_tol(mag, 1, torch.float32, 24)
        else:  # without the decay the tokens would end elsewhere, far outside the bound
            w0, m, v = start[n].clone(), torch.zeros_like(w), torch.zeros_like(w)
            for t, (lr, wd, g) in enumerate((st[n] for st in seen), start=1):
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                w0 = w0 - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
            assert (w0 - w).abs().max() > 10 * rounding_tol(mag, 1, torch.float32, 24), n


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


def test_checkpoint_written_before_weight_g_was_trained_resumes(tmp_path):
    """A checkpoint without the prototype layer's weight_g (it was a fixed buffer): the models load with g = 1, the
    optimizer state of every other parameter is matched by name, weight_g starts without state."""
    from training.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(raw={**copy.deepcopy(TINY_CFG), "device": "cpu"})
    tr = Trainer(cfg)
    for it in range(3):
        tr.train_step(synthetic_batch(cfg, seed=it), it)
    tr.save(tmp_path, 3, {})
    ck = load_checkpoint(tmp_path / "checkpoints" / "checkpoint_00000003.pt")
    g = "dino_head.last_layer.weight_g"
    for role in ("student", "teacher"):
        del ck[role][g]
    osd = ck["optimizer"]
    names = [n for grp in osd["param_groups"] for n in grp["names"]]
    drop = names.index(g)
    keep = [i for i in range(len(names)) if i != drop]
    new_index = {old: new for new, old in enumerate(keep)}
    osd["state"] = {new_index[i]: st for i, st in osd["state"].items() if i != drop}
    for grp in osd["param_groups"]:
        pairs = [(n, i) for n, i in zip(grp["names"], grp["params"]) if i != drop]
        grp["names"], grp["params"] = [n for n, _ in pairs], [new_index[i] for _, i in pairs]
    ck.pop("format")
    save_checkpoint(tmp_path / "old", ck)
    fresh = Trainer(cfg)
    fresh.load(tmp_path / "old" / "checkpoints" / "checkpoint_00000003.pt")
    assert torch.equal(fresh.student["dino_head"].last_layer.weight_g, torch.ones(128, 1))
    assert fresh.student["dino_head"].last_layer.weight_g not in fresh.optimizer.state
    mine = dict(fresh.student.named_parameters())
    theirs = dict(tr.student.named_parameters())
    for n in ("dino_head.last_layer.weight_v", "backbone.pos_embed"):
        assert torch.equal(fresh.optimizer.state[mine[n]]["exp_avg"], tr.optimizer.state[theirs[n]]["exp_avg"]), n
