"""High-resolution adaptation phase (training/high_res.py): the last iterations at bigger crops, position embeddings
interpolated once at the switch, schedules continued, resumable inside the phase."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lvd_train_testutils import TINY_CFG, read_metrics, write_shards

from tests.tolerance import approx, assert_close

from training.checkpoint import find_latest_checkpoint, load_checkpoint
from training.config import ConfigError, load_config
from training.schedules import build_schedules
from training.train import train


def _cfg(**top):
    raw = copy.deepcopy(TINY_CFG)  # 8 iterations, 28 px global crops (2 x 2 grid), checkpoints every 2
    raw["high_res"] = {"iterations": 3, "global_crops_size": 42, "local_crops_size": 28}
    raw["checkpoint"] = {"period_iters": 2, "keep_last": 10}
    raw.update(top)
    return load_config(raw=raw)


@pytest.mark.slow
def test_high_res_phase_resizes_once_continues_the_schedules_and_resumes(tmp_path):
    write_shards(tmp_path / "shards")
    cfg = _cfg()
    summary = train(cfg, str(tmp_path / "shards"), tmp_path / "out")
    assert summary["iterations"] == 8
    ckdir = tmp_path / "out" / "checkpoints"
    # the phase starts at iteration 8 - 3 = 5 from a checkpoint written there (low resolution: 1 + 2 * 2 tokens)
    before = load_checkpoint(ckdir / "checkpoint_00000005.pt")
    assert before["student"]["backbone.pos_embed"].shape[1] == 1 + 4
    assert before["backbone"]["kwargs"]["img_size"] == 28
    after = load_checkpoint(ckdir / "checkpoint_00000006.pt")
    for which in ("student", "teacher"):
        assert after[which]["backbone.pos_embed"].shape[1] == 1 + 9  # 42 px / 14 = 3 x 3 grid, stored
    assert after["backbone"]["kwargs"]["img_size"] == 42
    # one step after the switch, the EMA teacher's grid is the bicubic resize of the switch checkpoint's (offset 0.1,
    # no antialias for the plain arch) moved by one EMA step towards the student: m * resized + (1 - m) * student
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")[5]["momentum"]
    old = before["teacher"]["backbone.pos_embed"]
    grid = old[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=(3.1 / 2, 3.1 / 2), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 9, -1)
    expected = m * torch.cat([old[:, :1], resized], 1) + (1 - m) * after["student"]["backbone.pos_embed"]
    scale = old.abs().max().item()
    # bicubic (4 x 4 taps) then the EMA (two products and a sum): 16 terms x 4 roundings at the grid's scale
    assert_close(after["teacher"]["backbone.pos_embed"], expected, n_terms=16, dtype=torch.float32, depth=4,
                 magnitude=scale)
    # the schedules continue through the phase (the phase is their final part)
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    o, t = cfg.optim, cfg.teacher
    sched = build_schedules(lr=o.base_lr, min_lr=o.min_lr, epochs=o.epochs, iters_per_epoch=o.iters_per_epoch,
                            warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay,
                            weight_decay_end=o.weight_decay_end, momentum_teacher=t.momentum_teacher,
                            final_momentum_teacher=t.final_momentum_teacher, warmup_teacher_temp=t.warmup_teacher_temp,
                            teacher_temp=t.teacher_temp, warmup_teacher_temp_epochs=t.warmup_teacher_temp_epochs,
                            freeze_last_layer_epochs=o.freeze_last_layer_epochs)
    assert [r["step"] for r in rows] == list(range(8))
    for r in rows:
        # the same float64 schedule arithmetic (a few roundings at the value's scale)
        assert r["lr"] == approx(sched["lr"][r["step"]], dtype=float, depth=4)
        assert r["momentum"] == sched["momentum"][r["step"]]
    # the exported backbone is the high-resolution one
    from training.checkpoint import export_backbone
    from training.models.backbone_io import load_official_checkpoint

    bb = load_official_checkpoint(export_backbone(tmp_path / "out", tmp_path / "bb.pth"))
    assert bb.img_size == 42 and bb.pos_embed.shape[1] == 10

    # stopped inside the phase and resumed there (the models are resized before loading): the same result
    train(_cfg(max_steps=7), str(tmp_path / "shards"), tmp_path / "split")  # stops inside the phase
    assert find_latest_checkpoint(tmp_path / "split").name == "checkpoint_00000007.pt"
    train(_cfg(), str(tmp_path / "shards"), tmp_path / "split")  # resumes at 7 with the 3 x 3 grid
    a = load_checkpoint(find_latest_checkpoint(tmp_path / "out"))
    b = load_checkpoint(find_latest_checkpoint(tmp_path / "split"))
    for which in ("student", "teacher"):
        for k, v in a[which].items():
            assert torch.equal(v, b[which][k]), (which, k)


def test_high_res_config_is_validated():
    with pytest.raises(ConfigError, match="high_res.global_crops_size"):
        _cfg(high_res={"iterations": 2, "global_crops_size": 50})
    with pytest.raises(ConfigError, match="high_res.iterations"):
        _cfg(high_res={"iterations": 8})


@pytest.mark.slow
def test_high_res_phase_resizes_every_role_and_resumes_them(tmp_path):
    """With Gram anchoring the Gram teacher is one more role the phase resizes (its snapshot keeps the new grid),
    and a run resumed inside the phase ends with every role bit-equal."""
    write_shards(tmp_path / "shards")
    gram = {"gram": {"enabled": True, "start_iter": 1}, "deterministic": True, "device": "cpu"}
    train(_cfg(**gram), str(tmp_path / "shards"), tmp_path / "out")
    ck = load_checkpoint(tmp_path / "out" / "checkpoints" / "checkpoint_00000006.pt")
    for which in ("student", "teacher", "gram_teacher"):
        assert ck[which]["backbone.pos_embed"].shape[1] == 1 + 9, which
    train(_cfg(max_steps=7, **gram), str(tmp_path / "shards"), tmp_path / "split")
    train(_cfg(**gram), str(tmp_path / "shards"), tmp_path / "split")
    a = load_checkpoint(find_latest_checkpoint(tmp_path / "out"))
    b = load_checkpoint(find_latest_checkpoint(tmp_path / "split"))
    for which in ("student", "teacher", "gram_teacher"):
        for k, v in a[which].items():
            assert torch.equal(v, b[which][k]), (which, k)


def test_resizing_a_rope_backbone_changes_only_its_size():
    """A RoPE backbone has no stored position embedding: the high-resolution phase and continued pretraining set its
    size and leave every weight as it was (its rotations follow the input's grid)."""
    from training.high_res import resize_pos_embed
    from training.models.vision_transformer import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_tiny_patch16_rope_reg4", img_size=64, depth=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resize_pos_embed(model, 96)
    assert model.img_size == 96 and model.pos_embed is None
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, model.embed_dim) and torch.isfinite(out).all()
