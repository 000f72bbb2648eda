"""The published LVD-142M recipes as configs (pipelines/configs/train_vitg14_lvd142m.yaml, train_vitl14_lvd142m.yaml,
distill_vitl_from_vitg.yaml): they validate and hold the reference values (facebookresearch/dinov2
dinov2/configs/train/vitg14.yaml, vitl14.yaml over ssl_default_config.yaml, written out here by hand); the models are
built on the meta device only (no memory)."""
import pytest
import torch

from lvd_train_testutils import REPO

from tests.tolerance import approx

from training.config import load_config
from training.schedules import scaled_lr
from training.train import build_models

CONFIGS = REPO / "pipelines" / "configs"

# vitg14.yaml / vitl14.yaml: the keys each recipe sets (identical but for arch and batch size)
RECIPE = {
    ("head", "n_prototypes"): 131072, ("head", "bottleneck_dim"): 384, ("head", "ibot_separate_head"): True,
    ("head", "ibot_n_prototypes"): 131072, ("loss", "centering"): "sinkhorn_knopp",
    ("model", "patch_size"): 14, ("model", "drop_path_rate"): 0.4, ("model", "ffn_layer"): "swiglufused",
    ("teacher", "momentum_teacher"): 0.994, ("optim", "epochs"): 500, ("optim", "weight_decay_end"): 0.2,
    ("optim", "base_lr"): 2.0e-4, ("optim", "warmup_epochs"): 80, ("optim", "layerwise_decay"): 1.0,
    ("crops", "local_crops_size"): 98,
}
# ssl_default_config.yaml: what the recipes inherit
DEFAULTS = {
    ("head", "hidden_dim"): 2048, ("head", "nlayers"): 3, ("head", "ibot_bottleneck_dim"): 256,
    ("loss", "koleo_weight"): 0.1, ("loss", "dino_weight"): 1.0, ("loss", "ibot_weight"): 1.0,
    ("model", "layerscale"): 1.0e-5, ("teacher", "final_momentum_teacher"): 1.0, ("teacher", "teacher_temp"): 0.07,
    ("teacher", "warmup_teacher_temp"): 0.04, ("teacher", "warmup_teacher_temp_epochs"): 30,
    ("optim", "iters_per_epoch"): 1250, ("optim", "weight_decay"): 0.04, ("optim", "min_lr"): 1.0e-6,
    ("optim", "clip_grad"): 3.0, ("optim", "freeze_last_layer_epochs"): 1, ("optim", "lr_scaling"): "sqrt_wrt_1024",
    ("optim", "patch_embed_lr_mult"): 0.2, ("crops", "global_crops_size"): 224, ("crops", "local_crops_number"): 8,
    ("crops", "global_crops_scale"): (0.32, 1.0), ("crops", "local_crops_scale"): (0.05, 0.32),
    ("masking", "mask_probability"): 0.5, ("masking", "mask_ratio_min_max"): (0.1, 0.5),
}


@pytest.mark.parametrize("name,arch,batch", [("train_vitg14_lvd142m.yaml", "vit_giant2_patch14", 12),
                                             ("train_vitl14_lvd142m.yaml", "vit_large_patch14", 32)])
def test_lvd142m_recipe_configs_hold_the_reference_values(name, arch, batch):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.arch == arch and cfg.optim.batch_size_per_gpu == batch
    for (section, key), want in {**RECIPE, **DEFAULTS}.items():
        assert getattr(getattr(cfg, section), key) == want, (section, key)
    assert cfg.total_iters == 625_000
    assert cfg.high_res.iterations and cfg.high_res.global_crops_size == 518
    # the total batch of the paper's ViT-g run (3072) gives lr 2e-4 * sqrt(3)
    assert scaled_lr(cfg.optim.base_lr, 3072, cfg.optim.lr_scaling) == approx(2.0e-4 * 3 ** 0.5, dtype=float, depth=3)
    # build on the meta device: shapes only
    with torch.device("meta"):
        student, teacher, info = build_models(cfg)
    assert student["dino_head"].last_layer.weight_v.shape == (131072, 384)
    assert student["ibot_head"].last_layer.weight_v.shape == (131072, 256)
    assert "w12" in dict(student["backbone"].blocks[0].mlp.named_children())


def test_vitg14_backbone_has_the_official_parameter_count():
    """dinov2_vitg14 (518 px position grid, SwiGLU): 1,136,480,768 parameters."""
    cfg = load_config(CONFIGS / "train_vitg14_lvd142m.yaml", ["model.img_size=518"])
    with torch.device("meta"):
        student, _, _ = build_models(cfg)
    assert sum(p.numel() for p in student["backbone"].parameters()) == 1_136_480_768


def test_distill_config_validates():
    cfg = load_config(CONFIGS / "distill_vitl_from_vitg.yaml")
    assert cfg.mode == "distill" and cfg.distill.teacher
    assert cfg.model.arch == "vit_large_patch14" and cfg.model.drop_path_rate == 0.0
    assert cfg.masking.mask_probability == 0.0
    assert cfg.head.n_prototypes == cfg.head.ibot_n_prototypes == 131072  # the ViT-g recipe's heads
