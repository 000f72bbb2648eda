"""Distillation (``mode: distill``, training/distill.py): a frozen teacher, a smaller student trained with the same
losses, no masking / drop path, iBOT on the two global crops, the student's EMA exported."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lvd_train_testutils import TINY_CFG, write_digits, write_shards

from tests.tolerance import approx, assert_close

from training.checkpoint import export_backbone, load_checkpoint
from training.config import ConfigError, load_config
from training.distill import load_teacher
from training.evaluate import evaluate_backbone
from training.models.backbone_io import load_official_checkpoint, save_backbone
from training.models.vision_transformer import build_backbone
from training.train import Trainer, build_stream, train


def _random_feature_teacher(path):
    """A frozen "pretrained" teacher whose CLS token carries image information: random weights at full LayerScale
    (1.0, not 1e-5) and no position embeddings; k-NN on digits well above chance (a student at init sits near it)."""
    torch.manual_seed(0)
    t = build_backbone("vit_tiny_patch14", embed_dim=192, depth=1, num_heads=3, img_size=28, patch_size=4,
                       init_values=1.0).eval()
    with torch.no_grad():
        t.pos_embed.zero_()
    save_backbone(t, path)  # the `lvd export` layout (.pth + .json)
    return t


@pytest.mark.slow
def test_distilled_student_knn_approaches_the_teachers(tmp_path):
    write_digits(tmp_path, 28, {"ssl": 800, "knn_train": 300, "knn_val": 300})
    teacher = _random_feature_teacher(tmp_path / "teacher.pth")
    teacher_knn = evaluate_backbone(teacher, tmp_path / "knn_train", tmp_path / "knn_val", 28, 20, 0.07, False, 128,
                                    1.0, "cpu")["knn_top1"]  # k=20, T=0.07 as the run's evaluations
    cfg = load_config(raw={
        "mode": "distill", "distill": {"teacher": str(tmp_path / "teacher.pth")},
        "model": {"arch": "vit_tiny_patch14", "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3,
                  "drop_path_rate": 0.2},  # removed by mode distill
        "head": {"n_prototypes": 256, "hidden_dim": 128, "bottleneck_dim": 32},
        "teacher": {"momentum_teacher": 0.9, "final_momentum_teacher": 0.99, "warmup_teacher_temp_epochs": 0},
        "optim": {"epochs": 1, "iters_per_epoch": 40, "batch_size_per_gpu": 32, "base_lr": 0.003,
                  "lr_scaling": "none", "warmup_epochs": 0.1, "freeze_last_layer_epochs": 0, "layerwise_decay": 1.0,
                  "min_lr": 1e-4},
        "crops": {"global_crops_size": 28, "local_crops_number": 2, "local_crops_size": 12},
        "data": {"shuffle_buffer": 128, "num_workers": 0},
        "eval": {"train_dir": str(tmp_path / "knn_train"), "val_dir": str(tmp_path / "knn_val"), "at_start": True,
                 "center_crop_ratio": 1.0, "linear_probe": False},
        "checkpoint": {"period_iters": 1000}, "progress_bar": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and steady on a loaded machine
    try:
        summary = train(cfg, str(tmp_path / "ssl"), tmp_path / "out")
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["knn_top1"] for r in rows if r["type"] == "eval"]
    train_rows = [r for r in rows if r["type"] == "train"]
    init, student = evals[0], evals[-1]
    msg = f"k-NN top-1 on digits: teacher {teacher_knn:.3f}, student at init {init:.3f}, distilled {student:.3f}"
    print(msg)
    # thresholds from the sampling noise of k-NN accuracies on the n_val validation digits: the difference of two
    # has a standard deviation of at most sqrt(2 x 0.25 / n_val) (0.041 for 300); 3 of those are not noise
    noise = 3 * math.sqrt(2 * 0.25 / next(r["n_val"] for r in rows if r["type"] == "eval"))
    assert teacher_knn >= init + noise, msg  # the teacher has something to teach
    # the student closes at least half the gap and ends within sampling noise of the teacher
    assert student >= init + 0.5 * (teacher_knn - init) and student >= teacher_knn - noise, msg
    # no masking; the teacher had no heads: one DINO head trained alongside (its own loss term)
    assert all(r["n_masked_patches"] == 0 and "distill_head_loss" in r and "ibot_loss" in r for r in train_rows)
    # the exported model is the student's EMA (the checkpoint's "teacher"), with the student's architecture
    ck = load_checkpoint(next((tmp_path / "out" / "checkpoints").iterdir()))
    exported = load_official_checkpoint(export_backbone(tmp_path / "out", tmp_path / "student.pth"))
    assert exported.embed_dim == 48 and exported.depth == 2
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ck["teacher"]["backbone." + k]), k
    assert not torch.equal(ck["teacher"]["backbone.blocks.0.attn.qkv.weight"],
                           ck["student"]["backbone.blocks.0.attn.qkv.weight"])
    assert summary["eval"]["knn_top1"] == student


def _tiny(**over):
    raw = copy.deepcopy(TINY_CFG)
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(raw=raw)


def test_distill_step_freezes_the_teacher_and_applies_ibot_on_every_global_patch(tmp_path):
    """Teacher = an lvd training checkpoint with its heads (separate iBOT head); one step by hand."""
    write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    pre = Trainer(_tiny(head={"ibot_separate_head": True, "ibot_n_prototypes": 96}))
    pre.save(tmp_path / "pre", 0, {})
    cfg = _tiny(mode="distill", distill={"teacher": str(tmp_path / "pre" / "checkpoints" / "checkpoint_00000000.pt")},
                model={"embed_dim": 24, "num_heads": 2, "drop_path_rate": 0.3},
                head={"ibot_separate_head": True, "ibot_n_prototypes": 96},
                loss={"centering": "centering", "koleo_weight": 0.0})
    tr = Trainer(cfg)
    t = tr.distill_teacher
    assert set(t) == {"backbone", "dino_head", "ibot_head"} and "distill_head" not in tr.student
    for name in ("dino_head", "ibot_head"):  # the checkpoint's EMA-teacher heads
        for k, v in t[name].state_dict().items():
            assert torch.equal(v, pre.teacher[name].state_dict()[k]), (name, k)
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    assert all(b.drop_path == 0.0 for b in tr.student["backbone"].blocks)
    frozen = {k: v.clone() for k, v in t.state_dict().items()}
    batch = next(iter(build_stream(cfg, str(tmp_path / "shards"))))
    assert int(batch["n_masked_patches"]) == 0 and not batch["masks"].any()

    # the iBOT term by hand: every patch of both global crops, teacher probabilities softmax(logits / T) (the centre
    # starts at 0), student log-softmax at 0.1, mean over patches then over images
    gc = batch["global_crops"]
    temp = tr.sched["teacher_temp"][0]
    with torch.no_grad():
        tp = t["ibot_head"](t["backbone"].forward_features(gc)["x_norm_patchtokens"])
        sp = tr.student["ibot_head"](tr.student["backbone"].forward_features(gc)["x_norm_patchtokens"])
        by_hand = -(F.softmax(tp / temp, -1) * F.log_softmax(sp / 0.1, -1)).sum(-1).mean(1).mean(0)
    row = tr.train_step(batch, 0)
    n_terms = gc.shape[0] * sp.shape[1] * 96  # summed products per image, accumulated in float32
    assert row["ibot_loss"] == approx(by_hand.item(), n_terms=n_terms, dtype=torch.float32)
    for k, v in t.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # the teacher never moves
    # the student's EMA (what gets exported) follows the student with the scheduled momentum (step 1: lr > 0)
    before = tr.teacher["backbone"].blocks[0].attn.qkv.weight.clone()
    row = tr.train_step(batch, 1)
    stu, ema = tr.student["backbone"].blocks[0].attn.qkv.weight, tr.teacher["backbone"].blocks[0].attn.qkv.weight
    m = row["momentum"]
    assert not torch.equal(stu, before)
    # two products and a sum in float32, at the weights' scale
    assert_close(ema, m * before + (1 - m) * stu, n_terms=2, dtype=torch.float32, depth=2,
                 magnitude=stu.abs().max().item())


def test_reference_training_checkpoint_gives_backbone_and_heads(tmp_path):
    """A reference DINOv2 training checkpoint: ``model`` holds ``teacher.backbone.*`` / ``teacher.dino_head.*`` (with
    the weight-norm ``weight_g``); an official backbone file has no heads."""
    tr = Trainer(_tiny(model={"embed_dim": 192}))  # a standard width (vit_tiny): the architecture is inferred
    with torch.no_grad():  # a trained weight-norm g (the reference trains it): loaded, not dropped
        tr.teacher["dino_head"].last_layer.weight_g.copy_(torch.rand(128, 1) + 0.5)
    sd = {f"teacher.{k}": v for k, v in tr.teacher.state_dict().items()}
    assert "teacher.dino_head.last_layer.weight_g" in sd
    sd.update({f"student.{k}": v for k, v in tr.student.state_dict().items()})
    torch.save({"model": sd, "iteration": 10}, tmp_path / "model_0000009.rank_0.pth")
    t = load_teacher(tmp_path / "model_0000009.rank_0.pth")
    assert set(t) == {"backbone", "dino_head"}
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = tr.teacher["dino_head"](tr.teacher["backbone"](x))
        assert torch.equal(t["dino_head"](t["backbone"](x)), ref)
    # an official backbone-only file (no sidecar, no heads): the architecture from the shapes, heads trained alongside
    torch.save(tr.teacher["backbone"].state_dict(), tmp_path / "dinov2_vitt14_pretrain.pth")
    t = load_teacher(tmp_path / "dinov2_vitt14_pretrain.pth")
    assert set(t) == {"backbone"} and t["backbone"].arch == "vit_tiny_patch14" and t["backbone"].depth == 2
    with torch.no_grad():
        assert torch.equal(t["backbone"](x), tr.teacher["backbone"](x))


def test_distill_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="distill.teacher"):
        _tiny(mode="distill")
    _random_feature_teacher(tmp_path / "t.pth")  # patch 4, no heads
    with pytest.raises(ConfigError, match="patch size"):
        Trainer(_tiny(mode="distill", distill={"teacher": str(tmp_path / "t.pth")}))
    with pytest.raises(ConfigError, match="ibot_separate_head=false"):
        Trainer(_tiny(mode="distill", distill={"teacher": str(tmp_path / "t.pth")}, model={"patch_size": 4},
                      crops={"global_crops_size": 28, "local_crops_size": 12}, head={"ibot_separate_head": True}))
    pre = Trainer(_tiny())  # heads with 128 prototypes
    pre.save(tmp_path / "pre", 0, {})
    with pytest.raises(ConfigError, match=r"head.n_prototypes \(64\) must equal the teacher's DINO head prototypes"):
        Trainer(_tiny(mode="distill", distill={"teacher": str(tmp_path / "pre")}, head={"n_prototypes": 64}))


def test_cli_stops_with_one_line_when_the_teacher_does_not_fit(tmp_path, capsys):
    from lvd_train_testutils import REPO, write_shards
    from training.cli import main

    pre = Trainer(_tiny())  # heads with 128 prototypes
    pre.save(tmp_path / "pre", 0, {})
    write_shards(tmp_path / "data", n_shards=1, per_shard=4)  # readable data: the teacher check is what must fail
    rc = main(["--config", str(REPO / "pipelines" / "configs" / "train_demo.yaml"), "--data", str(tmp_path / "data"),
               "--output", str(tmp_path / "out"), "mode=distill", f"distill.teacher={tmp_path / 'pre'}",
               "head.n_prototypes=64", "model.arch=vit_tiny_patch14", "model.embed_dim=48", "model.depth=1",
               "model.num_heads=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("config error: distill: head.n_prototypes (64)") and "\n" not in err, err


def test_two_students_distilled_in_one_job_and_each_exported(tmp_path):
    """distill.students: one frozen-teacher forward per batch gives the targets of the configured student and of a
    further, wider one; each has its own optimizer and EMA, both in the checkpoint and both exported by --export."""
    import subprocess
    import sys

    from lvd_train_testutils import REPO, subprocess_env, write_yaml

    from training.train import Trainer as T

    write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    _random_feature_teacher(tmp_path / "teacher.pth")
    raw = copy.deepcopy(TINY_CFG)
    raw.update({"mode": "distill", "distill": {"teacher": str(tmp_path / "teacher.pth"), "students": {
        "b": {"arch": "vit_tiny_patch14", "patch_size": 4, "embed_dim": 72, "depth": 1, "num_heads": 3}}},
        "device": "cpu"})
    raw["model"].update({"patch_size": 4})
    raw["crops"].update({"local_crops_size": 12})
    raw["optim"].update({"epochs": 1, "iters_per_epoch": 3})
    raw["checkpoint"] = {"period_iters": 3, "keep_last": 1}
    tr = T(load_config(raw=raw))
    calls = []
    t_bb = tr.distill_teacher["backbone"]
    t_forward = t_bb.forward_features
    t_bb.forward_features = lambda *a, **k: (calls.append(1), t_forward(*a, **k))[1]  # counts the calls
    assert set(tr.optimizers) == {"student", "student_b"}
    assert tr.roles["student_b"]["backbone"].embed_dim == 72
    batch = next(iter(build_stream(tr.cfg, str(tmp_path / "shards"))))
    before = {k: v.clone() for k, v in tr.roles["teacher_b"].state_dict().items()}
    row = tr.train_step(batch, 1)
    assert len(calls) == 1  # one teacher forward for both students
    assert {"loss", "dino_loss", "distill_head_loss", "b/loss", "b/dino_loss"} <= set(row)
    assert "b/distill_head_loss" not in row  # the head trained alongside lives in the first student only
    assert "grad_norm_b/backbone" in row
    assert not torch.equal(tr.roles["teacher_b"].state_dict()["backbone.cls_token"], before["backbone.cls_token"])

    cfg_path = write_yaml(tmp_path / "cfg.yaml", raw)
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), "--config", str(cfg_path), "--data",
                        str(tmp_path / "shards"), "--output", str(tmp_path / "out"), "--export",
                        str(tmp_path / "s.pth")], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "out" / "checkpoints" / "checkpoint_00000003.pt")
    assert {"student", "teacher", "student_b", "teacher_b", "optimizer", "optimizer_b"} <= set(ck)
    assert "distill_teacher" not in ck  # frozen: read from its file again on resume
    for path, role, dim in ((tmp_path / "s.pth", "teacher", 48), (tmp_path / "s_b.pth", "teacher_b", 72)):
        exported = load_official_checkpoint(path)
        assert exported.embed_dim == dim
        for k, v in exported.state_dict().items():
            assert torch.equal(v, ck[role]["backbone." + k]), (role, k)
    # lvd export --role: one of them later; a role the checkpoint lacks is one line
    from training.export import main as export_main

    assert export_main([str(tmp_path / "out"), "-o", str(tmp_path / "b.pth"), "--role", "teacher_b"]) == 0
    b_sd = torch.load(tmp_path / "b.pth", weights_only=True)
    assert torch.equal(b_sd["cls_token"], ck["teacher_b"]["backbone.cls_token"])
    assert export_main([str(tmp_path / "out"), "-o", str(tmp_path / "c.pth"), "--role", "teacher_c"]) == 2


def test_further_students_config_errors_are_one_line():
    cases = [({"distill": {"students": {"b": {"arch": "vit_base_patch14"}}}}, "needs mode distill"),
             ({"mode": "distill", "distill": {"teacher": "t.pth", "students": {"b-1": {}}}}, "letters, digits"),
             ({"mode": "distill", "distill": {"teacher": "t.pth", "students": {"b": {"patch_size": 16}}}},
              "distill.students.b.patch_size"),
             ({"mode": "distill", "distill": {"teacher": "t.pth"}, "gram": {"enabled": True}}, "gram anchoring")]
    for raw, expect in cases:
        with pytest.raises(ConfigError) as e:
            load_config(raw=raw)
        assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
