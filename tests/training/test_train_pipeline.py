"""pipelines/train.py on tar shards, then export and reload with the backbone loader."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from lvd_train_testutils import REPO, TINY_CFG, read_metrics, write_shards, write_yaml, subprocess_env

from training.checkpoint import find_latest_checkpoint, load_checkpoint
from training.export import main as export_main
from training.models.backbone_io import load_official_checkpoint
from training.models.vision_transformer import build_backbone


@pytest.mark.slow
def test_train_script_on_shards_then_export_and_reload(tmp_path):
    data = tmp_path / "shards"
    write_shards(data, n_shards=3, per_shard=8)
    cfg = copy.deepcopy(TINY_CFG)
    cfg["model"]["num_register_tokens"] = 4
    cfg_path = write_yaml(tmp_path / "train.yaml", cfg)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), "--config", str(cfg_path),
                        "--data", str(data), "--output", str(out), "--max-steps", "3", "optim.base_lr=0.001"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in rows] == [0, 1, 2]
    for x in rows:
        assert all(k in x for k in ("loss", "dino_loss", "koleo_loss", "lr", "wd", "momentum", "teacher_temp",
                                             "teacher_entropy", "teacher_marginal_entropy"))
    assert (out / "config.yaml").exists()
    ck_path = find_latest_checkpoint(out)
    assert ck_path.name == "checkpoint_00000003.pt"
    ck = load_checkpoint(ck_path)
    assert ck["iteration"] == 3 and ck["data_position"]["samples_consumed"] == 3 * 4
    for key in ("student", "teacher", "optimizer", "dino_center", "ibot_center", "rng"):
        assert key in ck

    exp = tmp_path / "export" / "backbone.pth"
    assert export_main([str(out), "-o", str(exp)]) == 0
    meta = json.loads(exp.with_suffix(".json").read_text())
    assert meta["arch"] == "vit_tiny_patch14" and meta["img_size"] == 28 and meta["num_register_tokens"] == 4
    model = load_official_checkpoint(exp).eval()
    sd = torch.load(exp, weights_only=True)
    assert "cls_token" in sd and "register_tokens" in sd and "blocks.1.ls2.gamma" in sd
    assert not any(k.startswith(("backbone.", "dino_head", "student", "teacher")) for k in sd)
    # identical to the checkpoint's teacher backbone
    ref = build_backbone("vit_tiny_patch14", img_size=28, embed_dim=48, depth=2, num_heads=3,
                         num_register_tokens=4).eval()
    ref.load_state_dict({k[len("backbone."):]: v for k, v in ck["teacher"].items() if k.startswith("backbone.")})
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.slow
def test_demo_config_runs_on_shards(tmp_path):
    data = tmp_path / "shards"
    write_shards(data, n_shards=2, per_shard=16)
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), "--config",
                        str(REPO / "pipelines" / "configs" / "train_demo.yaml"), "--data", str(data),
                        "--output", str(tmp_path / "out"), "--max-steps", "2", "--export", str(tmp_path / "b.pth")],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_metrics(tmp_path / "out" / "metrics.jsonl")) == 2
    assert load_official_checkpoint(tmp_path / "b.pth").embed_dim == 96
