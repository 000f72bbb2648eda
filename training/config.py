"""Trainer configuration: pydantic models (unknown keys, wrong types and impossible values are rejected).

Defaults are the reference DINOv2 values (``ssl_default_config.yaml`` with patch 14 / 98-px local crops);
``pipelines/configs/train_vitl.yaml`` spells out the ViT-L/14 recipe and ``train_demo.yaml`` a CPU-sized run.
An "epoch" is ``optim.iters_per_epoch`` iterations (the reference's OFFICIAL_EPOCH_LENGTH = 1250).
Loading, ``key.path=value`` overrides and the one-line ``config error:`` messages are curation's
(:mod:`curation.config_base`), so both commands read and report configs the same way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from curation.config_base import (ConfigError, ConfigModel, Precision, apply_overrides, parse_override,
                                  read_yaml_mapping, validate_config)

from .models.vision_transformer import ARCHS

__all__ = ["TrainConfig", "ConfigError", "load_config", "apply_overrides"]


class _Strict(ConfigModel):
    """Unknown keys are refused (the shared base); values are converted where pydantic can (a YAML list fills a
    tuple field, an int a float one)."""

    model_config = ConfigDict(validate_assignment=True)


class ModelConfig(_Strict):
    arch: str = "vit_large_patch14"
    patch_size: int = Field(14, gt=0)
    img_size: int | None = Field(None, gt=0, description="stored pos-embed grid; default = global crop size")
    drop_path_rate: float = Field(0.3, ge=0, lt=1)
    layerscale: float = Field(1e-5, gt=0)
    ffn_layer: Literal["mlp", "swiglu", "swiglufused"] | None = None
    num_register_tokens: int | None = Field(None, ge=0)
    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    mlp_ratio: float | None = Field(None, gt=0)
    packed_attention: bool | Literal["auto"] = Field(
        False, description="student crop groups through each block in one packed pass (block-diagonal attention); "
                           "auto: on CUDA only. See training/models/vision_transformer.py")
    compile: bool = Field(False, description="torch.compile each transformer block of student and teacher "
                                             "(first steps are slow while it compiles)")
    init_backbone: str | None = Field(None, description="start student and teacher backbones from this file: an "
                                      "official DINOv2 backbone .pth or an `lvd export` .pth (+ .json); heads start "
                                      "fresh (training/backbone_init.py)")
    init_backbone_arch: str | None = Field(None, description="architecture of an official .pth without sidecar "
                                           "(default: inferred from the tensor shapes)")
    init_backbone_frozen_iters: int = Field(0, ge=0, description="head warm-up: the backbone is not stepped for "
                                            "this many first iterations (only the heads learn)")
    rope_rescale: float | None = Field(None, ge=1, description="RoPE archs (*_patch16_rope_reg4): coordinate "
                                       "rescale factor R in training (log-uniform in [1/R, R]); None: the arch's (2)")
    rope_jitter: float | None = Field(None, ge=1, description="RoPE archs: per-axis coordinate jitter factor in "
                                      "training; None: the arch's (off)")
    rope_shift: float | None = Field(None, ge=0, description="RoPE archs: coordinate shift in training (units of "
                                     "the [-1, 1] grid); None: the arch's (off)")
    mask_token_std: float | None = Field(None, ge=0, description="init std of the iBOT mask token; None: 0.02 for "
                                         "the RoPE archs (a zero token there can reach the heads as an exact zero "
                                         "vector, whose L2-normalisation gradient is 1e12), 0 (the references') "
                                         "for learned position embeddings")

    @model_validator(mode="before")
    @classmethod
    def _arch_patch_size(cls, data: Any):
        """An architecture that names its patch size (the patch-16 RoPE ones) gives it unless the config does."""
        if isinstance(data, dict) and "patch_size" not in data and data.get("arch") in ARCHS \
                and "patch_size" in ARCHS[data["arch"]]:
            data = {**data, "patch_size": ARCHS[data["arch"]]["patch_size"]}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; known: {', '.join(sorted(ARCHS))}")
        dim = self.embed_dim or ARCHS[self.arch]["embed_dim"]
        heads = self.num_heads or ARCHS[self.arch]["num_heads"]
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        if self.init_backbone_arch is not None and self.init_backbone_arch not in ARCHS:
            raise ValueError(f"unknown init_backbone_arch {self.init_backbone_arch!r}")
        if self.init_backbone_frozen_iters and not self.init_backbone:
            raise ValueError("init_backbone_frozen_iters needs init_backbone (a head warm-up on a pretrained "
                             "backbone)")
        rope = ARCHS[self.arch].get("pos_embed_type") == "rope"
        if rope and (dim // heads) % 4:
            raise ValueError(f"RoPE arch {self.arch}: head width {dim // heads} must be divisible by 4")
        if not rope and any(v is not None for v in (self.rope_rescale, self.rope_jitter, self.rope_shift)):
            raise ValueError(f"model.rope_* apply to the RoPE archs (*_patch16_rope_reg4), not {self.arch}")
        return self

    def build_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"patch_size": self.patch_size, "drop_path_rate": self.drop_path_rate,
                              "init_values": self.layerscale}
        for k in ("ffn_layer", "num_register_tokens", "embed_dim", "depth", "num_heads", "mlp_ratio",
                  "rope_rescale", "rope_jitter", "rope_shift", "mask_token_std"):
            v = getattr(self, k)
            if v is not None:
                kw[k] = v
        if self.packed_attention is not False:  # default: kwargs (and checkpoint metadata) as before
            kw["packed_attention"] = self.packed_attention
        return kw


class HeadConfig(_Strict):
    n_prototypes: int = Field(65536, gt=0)
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    nlayers: int = Field(3, ge=1)
    ibot_separate_head: bool = False
    ibot_n_prototypes: int = Field(65536, gt=0)
    ibot_hidden_dim: int = Field(2048, gt=0)
    ibot_bottleneck_dim: int = Field(256, gt=0)


class LossConfig(_Strict):
    dino_weight: float = Field(1.0, ge=0)
    ibot_weight: float = Field(1.0, ge=0)
    koleo_weight: float = Field(0.1, ge=0)
    student_temp: float = Field(0.1, gt=0)
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    center_momentum: float = Field(0.9, ge=0, le=1)


class TeacherConfig(_Strict):
    momentum_teacher: float = Field(0.992, ge=0, le=1)
    final_momentum_teacher: float = Field(1.0, ge=0, le=1)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp_epochs: float = Field(30, ge=0)


class OptimConfig(_Strict):
    epochs: float = Field(100, gt=0)
    iters_per_epoch: int = Field(1250, gt=0)
    batch_size_per_gpu: int = Field(64, gt=0)
    base_lr: float = Field(0.004, gt=0)
    lr_scaling: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(10, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    layerwise_decay: float = Field(0.9, gt=0, le=1)
    patch_embed_lr_mult: float = Field(0.2, ge=0)
    clip_grad: float = Field(3.0, ge=0, description="0 disables clipping")
    freeze_last_layer_epochs: float = Field(1, ge=0)
    tokens_without_decay: bool = Field(
        False, description="also exempt cls/mask/register tokens and pos_embed from weight decay (DINO v1 / timm "
                           "convention: they are offsets, decay only shrinks them); false: decayed, as the reference")
    betas: tuple[float, float] = (0.9, 0.999)
    fused_adamw: bool | Literal["auto"] = Field(
        "auto", description="torch's fused AdamW kernel (one launch for all parameters); auto: on CUDA")
    max_grad_norm: float = Field(1e6, ge=0, description="stop (no checkpoint) when a module's pre-clip gradient "
                                 "norm exceeds this; 0: off. See training/divergence.py")
    max_weight_norm: float = Field(1e6, ge=0, description="stop (no checkpoint) when the student's weight norm "
                                   "exceeds this; 0: off")

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must lie in [0, 1)")
        return self


def _range(v: tuple[float, float], name: str, lo: float = 0.0, hi: float = 1.0) -> None:
    if not (lo <= v[0] <= v[1] <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= min <= max <= {hi}, got {list(v)}")


class CropsConfig(_Strict):
    global_crops_size: int = Field(224, gt=0)
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = Field(8, ge=0)
    local_crops_size: int = Field(98, gt=0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    flip_p: float = Field(0.5, ge=0, le=1)
    color_jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = Field(0.2, ge=0, le=1)
    channel_permute_p: float = Field(
        0.0, ge=0, le=1,
        description="per crop, with this probability, its RGB channels in a uniformly random order (not in DINOv2, "
                    "whose colour jitter keeps an image's colour class: where every crop of an image shares one "
                    "colour - a random ink, a tinted photo - matching crops by colour is a shortcut; a different "
                    "channel order per crop makes the colour differ between the views). 0: off, no random draw")
    channel_invert_p: float = Field(
        0.0, ge=0, le=1,
        description="per crop, each RGB channel inverted (255 - v) independently with this probability (not in "
                    "DINOv2; with channel_permute_p it leaves a crop's colour only its distance from mid-grey per "
                    "channel to share, and it turns light-on-dark into dark-on-light). 0: off, no random draw")

    @model_validator(mode="after")
    def _check(self):
        _range(self.global_crops_scale, "global_crops_scale")
        _range(self.local_crops_scale, "local_crops_scale")
        if not all(0 <= p <= 1 for p in self.blur_p):
            raise ValueError("blur_p values must lie in [0, 1]")
        return self


class MaskingConfig(_Strict):
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = Field(0.5, ge=0, le=1)
    min_num_patches: int = Field(4, ge=1)
    min_aspect: float = Field(0.3, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self):
        _range(self.mask_ratio_min_max, "mask_ratio_min_max")
        return self


class DataConfig(_Strict):
    shuffle_buffer: int = Field(1000, ge=1, description="window of the global block shuffle (training/data.py)")
    num_workers: int = Field(4, ge=0)
    log_sample_keys: bool = Field(False, description="write each step's global batch keys (in order) to "
                                                     "metrics.jsonl as sample_keys (audits, exact-resume checks)")


class EvalConfig(_Strict):
    train_dir: str | None = None
    val_dir: str | None = None
    period_iters: int = Field(0, ge=0, description="0: only at the end (when eval dirs are set)")
    at_start: bool = False
    img_size: int | None = Field(None, gt=0, description="default: global crop size")
    center_crop_ratio: float = Field(0.875, gt=0, le=1)
    knn_k: int = Field(20, gt=0)
    knn_temp: float = Field(0.07, gt=0)
    linear_probe: bool = True
    batch_size: int = Field(128, gt=0)


class CheckpointConfig(_Strict):
    period_iters: int = Field(1250, gt=0)
    keep_last: int = Field(3, ge=1)


class PrecisionPolicyConfig(_Strict):
    """FSDP2 ``MixedPrecisionPolicy`` of one group of wrapped modules: the dtype parameters are all-gathered in
    (and the forward computes in) and the dtype gradients are reduce-scattered in. The sharded parameters, the
    gradients the optimizer sees, the optimizer state and the EMA stay fp32."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"


class MixedPrecisionConfig(_Strict):
    """Per wrapped module, as the paper (backbone communicated in bf16, heads in fp32 for stability):
    ``backbone`` applies to every transformer block and the backbone root (patch embedding, tokens, final norm;
    its output is cast back to fp32), ``heads`` to the DINO / iBOT heads. FSDP strategy only."""
    backbone: PrecisionPolicyConfig = PrecisionPolicyConfig()
    heads: PrecisionPolicyConfig = PrecisionPolicyConfig()


class DistributedConfig(_Strict):
    """Multi-process runs (torchrun / Ray Train); ignored on one process. See training/distributed.py."""
    strategy: Literal["auto", "fsdp", "ddp_allreduce"] = Field(
        "auto", description="auto: fsdp (FSDP2 sharding) on several processes; ddp_allreduce: full replicas")
    mixed_precision: MixedPrecisionConfig = Field(
        MixedPrecisionConfig(), description="FSDP2 mixed precision per module group (default: all fp32); "
                                            "e.g. backbone: {param_dtype: bf16, reduce_dtype: bf16}")


class DistillConfig(_Strict):
    """``mode: distill`` (training/distill.py): a frozen, larger pretrained teacher and the configured (smaller)
    model as the student; the student's EMA is the run's "teacher" in checkpoints, evaluation and export."""
    teacher: str | None = Field(None, description="the frozen teacher: an `lvd export` .pth (+ .json), an official "
                                "DINOv2 backbone .pth, an lvd training checkpoint (file or output dir: its EMA teacher "
                                "with heads) or a reference DINOv2 training checkpoint (teacher.backbone/heads keys)")
    teacher_arch: str | None = Field(None, description="architecture of an official .pth without sidecar "
                                                       "(default: inferred from the tensor shapes)")
    students: dict[str, ModelConfig] = Field(
        default_factory=dict, description="further students distilled in the same job from the same teacher "
        "forward, by name: each a model section (e.g. {b: {arch: vit_base_patch14}}), with its own optimizer and "
        "EMA, exported as teacher_<name>")

    @model_validator(mode="after")
    def _check(self):
        if self.teacher_arch is not None and self.teacher_arch not in ARCHS:
            raise ValueError(f"unknown teacher_arch {self.teacher_arch!r}; known: {', '.join(sorted(ARCHS))}")
        for name in self.students:
            if not name.isidentifier():
                raise ValueError(f"student name {name!r}: letters, digits and underscores only")
        return self


class GramConfig(_Strict):
    """Gram anchoring (DINOv3; training/gram.py): the student's patch-similarity matrices are pulled towards those
    of the Gram teacher, a snapshot of the EMA teacher taken at ``start_iter`` and refreshed every
    ``refresh_every`` iterations at most ``max_refreshes`` times (DINOv3's 7B: from ~1M, every 10k, 3 times)."""
    enabled: bool = False
    weight: float = Field(1.0, ge=0, description="loss weight (after the warm-up)")
    weight_warmup_iters: int = Field(0, ge=0, description="the weight rises linearly from 0 over this many "
                                     "iterations after start_iter")
    start_iter: int = Field(0, ge=0, description="first snapshot of the EMA teacher; the loss applies from here")
    refresh_every: int = Field(0, ge=0, description="iterations between refreshes of the snapshot; 0: never")
    max_refreshes: int = Field(0, ge=0, description="refreshes after the first snapshot, at most")
    remove_negative: bool = Field(False, description="clip both similarity matrices at 0 (negative similarities "
                                  "carry no anchoring)")
    img_size: int | None = Field(None, gt=0, description="the Gram teacher's input size: the global crops resized "
                                 "(bicubic) to it, its patch features resized (bicubic) back to the student's grid; "
                                 "default: the global crop size")


class HighResConfig(_Strict):
    """The final high-resolution phase (training/high_res.py): the last ``iterations`` iterations of the schedules
    run at these crop sizes; position embeddings are interpolated once to the new global grid when it starts."""
    iterations: int = Field(0, ge=0, description="0: no high-resolution phase")
    global_crops_size: int = Field(518, gt=0)
    local_crops_size: int | None = Field(None, gt=0, description="default: crops.local_crops_size")


class TrainConfig(_Strict):
    model: ModelConfig = ModelConfig()
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    teacher: TeacherConfig = TeacherConfig()
    optim: OptimConfig = OptimConfig()
    crops: CropsConfig = CropsConfig()
    masking: MaskingConfig = MaskingConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    mode: Literal["pretrain", "distill"] = "pretrain"
    distill: DistillConfig = DistillConfig()
    high_res: HighResConfig = HighResConfig()
    gram: GramConfig = GramConfig()
    seed: int = 0
    max_steps: int | None = Field(None, ge=0, description="stop after this iteration (default: epochs * iters)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "auto"
    deterministic: bool = False
    log_every: int = Field(10, ge=1)
    progress_bar: bool = True

    @model_validator(mode="after")
    def _check(self):
        p = self.model.patch_size
        for name, size in (("crops.global_crops_size", self.crops.global_crops_size),
                           ("crops.local_crops_size", self.crops.local_crops_size)):
            if size % p:
                raise ValueError(f"{name} ({size}) must be a multiple of model.patch_size ({p})")
        hr = self.high_res
        if hr.iterations:
            for name, size in (("high_res.global_crops_size", hr.global_crops_size),
                               ("high_res.local_crops_size", hr.local_crops_size or self.crops.local_crops_size)):
                if size % p:
                    raise ValueError(f"{name} ({size}) must be a multiple of model.patch_size ({p})")
            if hr.iterations >= self.total_iters:
                raise ValueError(f"high_res.iterations ({hr.iterations}) must be below the run's "
                                 f"{self.total_iters} iterations (it is their final part)")
        if self.mode == "distill" and not self.distill.teacher:
            raise ValueError("mode distill needs distill.teacher (the frozen teacher's checkpoint)")
        for name, m in self.distill.students.items():
            for key, size in (("global_crops_size", self.crops.global_crops_size),
                              ("local_crops_size", self.crops.local_crops_size)):
                if size % m.patch_size:
                    raise ValueError(f"crops.{key} ({size}) must be a multiple of distill.students.{name}"
                                     f".patch_size ({m.patch_size})")
        if self.distill.students and self.mode != "distill":
            raise ValueError("distill.students needs mode distill (several students of one frozen teacher)")
        if self.gram.enabled and self.mode == "distill":
            raise ValueError("gram anchoring applies to pretraining (mode pretrain)")
        if self.gram.img_size is not None and self.gram.img_size % p:
            raise ValueError(f"gram.img_size ({self.gram.img_size}) must be a multiple of model.patch_size ({p})")
        return self

    @property
    def total_iters(self) -> int:
        return int(round(self.optim.epochs * self.optim.iters_per_epoch))


ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "ffn_layer", "num_register_tokens")


def _reset_arch_dims(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """An override naming another ``model.arch`` brings that architecture's dims: the config file's explicit
    ``model.{embed_dim,depth,...}`` described the file's architecture and are dropped, unless overridden too."""
    keys = dict((".".join(path), value) for path, value in map(parse_override, overrides))
    model = data.get("model")
    if "model.arch" not in keys or not isinstance(model, dict):
        return data
    if keys["model.arch"] == model.get("arch"):
        return data
    dropped = [k for k in ARCH_KEYS if k in model and f"model.{k}" not in keys]
    if dropped:
        logging.getLogger("lvd.train").info(
            "model.arch=%s replaces %s: its dims apply (dropped the config's %s)", keys["model.arch"],
            model.get("arch"), ", ".join(f"model.{k}={model[k]}" for k in dropped))
    return {**data, "model": {k: v for k, v in model.items() if k not in dropped}}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> TrainConfig:
    """The YAML file at `path` (if any), its top-level sections replaced by `raw`'s, then `overrides`
    (``key.path=value``); raises ConfigError with one line naming every bad key path."""
    data = read_yaml_mapping(path) if path is not None else {}
    if raw:
        data = {**data, **raw}
    overrides = list(overrides or [])
    return validate_config(TrainConfig, apply_overrides(_reset_arch_dims(data, overrides), overrides))
