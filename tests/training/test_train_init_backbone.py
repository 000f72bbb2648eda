"""Continued pretraining from a released backbone (``model.init_backbone``, training/backbone_init.py): an
official-format file (no heads, 518-px-style bigger grid) starts student and teacher, heads start fresh, the head
warm-up keeps the backbone fixed, and a resume continues bit-equal to the uninterrupted run."""
import copy

import pytest
import torch
from lvd_train_testutils import TINY_CFG, shards_and_config

from tests.tolerance import assert_close
from training.checkpoint import load_checkpoint
from training.config import ConfigError, load_config
from training.high_res import resize_pos_embed
from training.models.vision_transformer import build_backbone
from training.train import Trainer, train


def _official_file(path):
    """A backbone in the official file layout (plain state dict, official key names, no sidecar) whose
    position-embedding grid (56 px: 4 x 4) is bigger than the run's (28 px: 2 x 2), as the official 518-px files."""
    torch.manual_seed(123)
    bb = build_backbone("vit_tiny_patch14", depth=2, img_size=56, init_values=1.0)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not an initialisation the run could reproduce
    torch.save(bb.state_dict(), path)
    return bb


def _cfg(path, **model):
    raw = copy.deepcopy(TINY_CFG)
    raw["model"].update({"embed_dim": 192, "init_backbone": str(path), "init_backbone_frozen_iters": 2, **model})
    raw.update({"deterministic": True, "device": "cpu"})
    raw["checkpoint"] = {"period_iters": 2, "keep_last": 10}
    raw["optim"].update({"epochs": 1})  # 4 iterations; the prototype freeze (2) and the head warm-up (2) end at 2
    return raw


def test_init_from_official_backbone_warm_up_then_resume(tmp_path):
    official = _official_file(tmp_path / "dinov2_vitt14_pretrain.pth")
    want = copy.deepcopy(official)
    resize_pos_embed(want, 28)
    want_sd = want.state_dict()
    data, _ = shards_and_config(tmp_path, _cfg(tmp_path / "dinov2_vitt14_pretrain.pth"))

    # at the start: both backbones are the file's (position embedding resized), the heads are the fresh ones
    tr = Trainer(load_config(raw=_cfg(tmp_path / "dinov2_vitt14_pretrain.pth")))
    plain_raw = _cfg("x")
    for k in ("init_backbone", "init_backbone_frozen_iters"):
        plain_raw["model"].pop(k)
    plain = Trainer(load_config(raw=plain_raw))
    for role in ("student", "teacher"):
        for k, v in tr.roles[role]["backbone"].state_dict().items():
            assert torch.equal(v, want_sd[k]), (role, k)
        for k, v in tr.roles[role]["dino_head"].state_dict().items():
            assert torch.equal(v, plain.roles[role]["dino_head"].state_dict()[k]), k
    del tr, plain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(raw=_cfg(tmp_path / "dinov2_vitt14_pretrain.pth"))
        train(cfg, str(data), tmp_path / "ref")
        train(load_config(raw={**_cfg(tmp_path / "dinov2_vitt14_pretrain.pth"), "max_steps": 2}), str(data),
              tmp_path / "resumed")
        train(cfg, str(data), tmp_path / "resumed")
    finally:
        torch.set_num_threads(threads)
    ck2 = load_checkpoint(tmp_path / "ref" / "checkpoints" / "checkpoint_00000002.pt")
    ck4 = load_checkpoint(tmp_path / "ref" / "checkpoints" / "checkpoint_00000004.pt")
    # the head warm-up: after 2 iterations the student's backbone is the file's, bit for bit, the heads moved;
    # the EMA of an unchanged student moves by rounding only (m x + (1 - m) x: two products and a sum per step)
    for k, v in want_sd.items():
        assert torch.equal(ck2["student"]["backbone." + k], v), k
        assert_close(ck2["teacher"]["backbone." + k], v, n_terms=2, dtype=torch.float32, depth=2 * 2, msg=k)
    ck0_head = Trainer(load_config(raw=_cfg(tmp_path / "dinov2_vitt14_pretrain.pth"))).student["dino_head"]
    assert not torch.equal(ck2["student"]["dino_head.mlp.0.weight"], ck0_head.mlp[0].weight.detach())
    assert not torch.equal(ck4["student"]["backbone.blocks.0.attn.qkv.weight"], want_sd["blocks.0.attn.qkv.weight"])
    # resumed from iteration 2 (after the warm-up): every tensor of the end bit-equal to the uninterrupted run
    end = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "checkpoint_00000004.pt")
    for role in ("student", "teacher"):
        for k, v in ck4[role].items():
            assert torch.equal(end[role][k], v), (role, k)


def test_init_backbone_of_another_architecture_is_one_config_error(tmp_path):
    _official_file(tmp_path / "b.pth")
    with pytest.raises(ConfigError) as e:
        Trainer(load_config(raw=_cfg(tmp_path / "b.pth", depth=3)))
    msg = str(e.value)
    assert "model.init_backbone" in msg and "blocks.2" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="is not a file"):
        Trainer(load_config(raw=_cfg(tmp_path / "missing.pth")))
    with pytest.raises(ConfigError, match="init_backbone_frozen_iters needs init_backbone"):
        load_config(raw={"model": {"init_backbone_frozen_iters": 3}})
