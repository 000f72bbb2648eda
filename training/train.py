"""DINOv2 pretraining: the step and the loop (run by ``lvd train`` / ``pipelines/train.py``, see training/cli.py).

One iteration (as the reference ``SSLMetaArch.forward_backward``; steps 1-3 are training/objective.py):

1. Teacher (EMA, eval mode: no drop-path; global crops only, no masks): CLS tokens -> DINO head; patch tokens at
   the student's masked positions -> iBOT head (the DINO head when shared). Probabilities by centering (centre
   momentum 0.9, updated after use, as an explicit step) or Sinkhorn-Knopp, at the scheduled teacher temperature.
2. Student (train mode, drop-path): global crops with masks and local crops through the backbone in one call
   (a list of batches); CLS tokens -> DINO head; masked patch tokens -> iBOT head.
3. Loss = dino_w * DINO (18 pairs) + ibot_w * iBOT + koleo_w * sum over the 2 global crops of KoLeo(pre-head CLS).
   A non-finite term stops the run with an error naming it.
4. Backward, gradient clip 3.0 per module (backbone, dino head, ibot head; as the reference), prototype layer
   frozen during ``freeze_last_layer_epochs`` (lr 0: unchanged, moments still accumulate), AdamW step with
   scheduled lr / wd per group,
   EMA update of the teacher with the scheduled momentum.

Several processes (``torchrun --nproc-per-node N pipelines/train.py ...``, or ``--ray-workers N`` for Ray Train,
see training/ray_launch.py): by default student and teacher are sharded with FSDP2 (``fully_shard`` per
transformer block, then the backbone; each head on its own), gradients are reduce-scattered, the gradient-clip
norm is the global one over shards, and the EMA runs on the local shards without communication;
``distributed.strategy=ddp_allreduce`` keeps full replicas and all-reduces gradients instead (training/
distributed.py). Centres, Sinkhorn-Knopp and the decision to run iBOT at all use global-batch sums and counts,
so N ranks with B images each compute the single-process step on the N * B images (up to float rounding), except
for what is per rank by design: KoLeo (within each rank's batch, as the reference) and drop-path randomness.
Logged losses are averaged over ranks. Each rank reads its slice of every global batch (one global sample order,
training/data.py: a resume on any number of ranks continues it exactly). Checkpoints of multi-process runs are
``torch.distributed.checkpoint`` directories (training/checkpoint.py), resumable on any number of ranks.
One iteration is ``Trainer.train_step(batch, it)``; ``train()`` is the loop around it: ``Trainer.resume()``, then
per iteration a batch, the step, its metrics row, and when due ``Trainer.evaluate(it)`` and
``Trainer.save_checkpoint(it, samples_consumed)``.
The models are roles (training/roles.py: ``student``, its EMA ``teacher``, and when configured ``gram_teacher``,
``distill_teacher`` and further ``student_<name>`` / ``teacher_<name>``); every student role has its own AdamW,
and sharding, checkpoints, the EMA and the high-resolution phase iterate the roles.
Variants: ``mode: distill`` takes the targets from a frozen pretrained teacher and keeps the student's EMA as the
run's teacher, for one or several students (training/distill.py); ``gram`` adds Gram anchoring to pretraining
(training/gram.py); ``model.init_backbone`` starts from a released backbone (training/backbone_init.py);
``high_res`` runs the last iterations at bigger crops (training/high_res.py).
Metrics: one JSON object per line in ``OUTPUT/metrics.jsonl`` (``"type": "train"`` per iteration,
``"type": "eval"``, and ``"type": "data"`` per (re)start: the data check of training/shard_check.py and the
parameter counts), plus a tqdm bar; a lasting collapse of the DINO teacher is logged (training/collapse.py);
``lvd plot OUTPUT`` draws them (training/plot.py). A run stops, without
saving, on a non-finite loss or exploding gradient / weight norms (training/divergence.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from .augment import AugmentConfig, MultiCropAugmentation
from .checkpoint import (backbone_from_state, find_latest_checkpoint, load_training_state,
                         remove_stale_temporaries, rng_state, save_checkpoint, save_distributed_checkpoint,
                         set_rng_state)
from . import high_res
from .collapse import CollapseWatch
from .config import TrainConfig
from .data import MultiCropStream, make_loader
from . import gram
from .backbone_init import load_initial_backbone
from .distill import build_distill_teacher, distill_forward_losses
from .distributed import (DistInfo, all_reduce_mean, allreduce_gradients, clip_grad_norm, ema_update,
                          init_distributed, resolve_strategy)
from .divergence import check_grad_norms, check_resumed_weights, check_weight_norm, grad_norm, weight_norm
from .heads import DINOHead
from .losses import DINOLoss, iBOTPatchLoss
from .masking import MaskingGenerator
from .objective import DIAGNOSTICS, forward_losses
from .models.vision_transformer import build_backbone
from .optim import apply_schedules, build_optimizer, get_param_groups
from .roles import ModelRoles, optimizer_key
from .schedules import build_schedules, scaled_lr
from .shard_check import SourceReport, check_sources

log = logging.getLogger("lvd.train")
__all__ = ["train", "Trainer", "ResumePoint", "build_models", "build_stream", "ema_update", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    pass


# ---------------------------------------------------------------------- models
def build_models(cfg: TrainConfig, model_cfg=None) -> tuple[nn.ModuleDict, nn.ModuleDict, dict[str, Any]]:
    """A student (backbone and heads) of ``model_cfg`` (default ``cfg.model``), its teacher (an equal copy without
    gradients) and the backbone info checkpoints keep (``arch``, build kwargs)."""
    m = model_cfg or cfg.model
    kw = m.build_kwargs()
    kw["img_size"] = m.img_size or cfg.crops.global_crops_size
    backbone = build_backbone(m.arch, **kw)
    if m.init_backbone:
        load_initial_backbone(backbone, m.init_backbone, m.init_backbone_arch)
    dim = backbone.embed_dim
    h = cfg.head
    student = nn.ModuleDict({
        "backbone": backbone,
        "dino_head": DINOHead(dim, h.n_prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers),
    })
    if h.ibot_separate_head and cfg.loss.ibot_weight > 0:
        student["ibot_head"] = DINOHead(dim, h.ibot_n_prototypes, h.ibot_hidden_dim, h.ibot_bottleneck_dim, h.nlayers)
    teacher = nn.ModuleDict({k: _clone(v) for k, v in student.items()})
    teacher.load_state_dict(student.state_dict())
    teacher.backbone.set_drop_path(0.0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, {"arch": m.arch, "kwargs": kw}


def _clone(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


# ---------------------------------------------------------------------- one step
def check_finite(terms: dict[str, torch.Tensor | float], iteration: int) -> None:
    """Raise on a non-finite term (on several ranks: give the rank-averaged terms, so all ranks stop together)."""
    for name, v in terms.items():
        if name != "loss" and not math.isfinite(float(v)):
            raise NonFiniteLossError(
                f"non-finite {name} loss ({float(v)}) at iteration {iteration}: stopping. Lower the lr, check the "
                f"inputs (normalised?) or use fp32 (precision=fp32).")
    if not math.isfinite(float(terms["loss"])):
        raise NonFiniteLossError(f"non-finite total loss at iteration {iteration}: stopping.")


# ---------------------------------------------------------------------- metrics
class MetricsWriter:
    """``metrics.jsonl``: one JSON object per line (nothing written when disabled or without a path)."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path = path
        self.enabled = enabled and path is not None

    def truncate_after(self, iteration: int) -> None:
        """On a (re)start at ``iteration`` (0: no checkpoint) drop what the previous run wrote after its last
        checkpoint, which this run recomputes identically: rows of later iterations and, at ``iteration``
        itself, all but the train row and the periodic eval (which runs before the save); nothing of a run
        killed before its first checkpoint is kept."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a killed run
            at = int(row.get("iteration", 0))
            if at < iteration or (at == iteration > 0 and row.get("type") in ("train", "eval")):
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------- data
def build_stream(cfg: TrainConfig, data: str | list[str], rank: int = 0, world: int = 1,
                 start_batch: int = 0, start_sample: int | None = None) -> MultiCropStream:
    """The multi-crop, masked batch stream of this rank as the config describes it (augmentations of
    DINOv2's recipe, block masks on the global crops)."""
    c = cfg.crops
    augment = MultiCropAugmentation(AugmentConfig(**c.model_dump()))
    grid = c.global_crops_size // cfg.model.patch_size
    mask_gen = MaskingGenerator(grid, min_num_patches=cfg.masking.min_num_patches, min_aspect=cfg.masking.min_aspect)
    return MultiCropStream(data, augment, cfg.optim.batch_size_per_gpu, mask_gen,
                           tuple(cfg.masking.mask_ratio_min_max),
                           0.0 if cfg.mode == "distill" else cfg.masking.mask_probability, seed=cfg.seed,
                           rank=rank, world_size=world, shuffle_buffer=cfg.data.shuffle_buffer,
                           start_batch=start_batch, start_sample=start_sample)


# ---------------------------------------------------------------------- trainer
class ResumePoint(NamedTuple):
    """Where a run starts: the iteration, the global samples consumed before it, the RNG states to restore (None:
    a fresh run, or one resumed on another number of ranks)."""

    iteration: int
    samples_consumed: int
    rng: dict[str, Any] | None


class Trainer:
    """Models, losses, optimizer and schedules of one run, on this process's share of the ranks.

    ``train_step(batch, it)`` is one iteration on this rank's batch (see the module docstring); it returns the
    metrics row (loss terms averaged over ranks, which for equal per-rank batches is the global-batch loss).
    ``load`` / ``save`` read and write checkpoints (collective on several ranks). With an ``output_dir`` (what
    :func:`train` gives) the run's own steps: ``resume()`` from the newest checkpoint there, ``batches(...)``,
    ``evaluate(iteration)`` (a metrics row) and ``save_checkpoint(iteration, samples_consumed)``; metrics go to
    ``output_dir/metrics.jsonl`` (rank 0).
    """

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None,
                 output_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        self.dist = d = dist_info or DistInfo()
        self.rank, self.world = d.rank, d.world
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl" if self.output_dir else None,
                                     enabled=self.rank == 0)
        if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
            self.device = torch.device("cuda", d.local_rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        use_bf16 = self.device.type == "cuda" and cfg.precision in ("auto", "bf16")
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = False
        # bf16 autocast around the forward passes; parameters, gradients, optimizer state and the EMA stay fp32
        # (under FSDP2 shards are all-gathered / reduce-scattered in the dtypes of distributed.mixed_precision)
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (and rank 0's are broadcast)
        student, teacher, info = build_models(cfg)
        self.high_res = False  # inside the high-resolution phase (training/high_res.py)
        # every model of the run by role (training/roles.py): sharding, checkpoints, EMA, high-res and export
        # iterate them
        self.roles = roles = ModelRoles()
        roles.add("student", student, "student")
        roles.add("teacher", teacher, "ema", source="student")
        self.backbone_infos = {"student": info, "teacher": info}
        if cfg.mode == "distill":  # the frozen teacher (``teacher`` is then the student's EMA); further students
            frozen = build_distill_teacher(cfg, student, teacher)
            for name, model_cfg in cfg.distill.students.items():
                s, t, inf = build_models(cfg, model_cfg)
                s["backbone"].set_drop_path(0.0)
                roles.add(f"student_{name}", s, "student")
                roles.add(f"teacher_{name}", t, "ema", source=f"student_{name}")
                self.backbone_infos.update({f"student_{name}": inf, f"teacher_{name}": inf})
            roles.add("distill_teacher", frozen, "frozen")
        if cfg.gram.enabled:
            roles.add("gram_teacher", gram.build_gram_teacher(teacher), "snapshot", source="teacher")
        roles.to(self.device)
        self.strategy = resolve_strategy(cfg.distributed.strategy, self.world)
        if self.world > 1:
            roles.broadcast()
            torch.manual_seed(cfg.seed + self.rank)  # drop-path differs per rank
        if self.strategy == "fsdp":
            roles.shard(cfg.distributed.mixed_precision)
        elif cfg.distributed.mixed_precision != type(cfg.distributed.mixed_precision)():
            log.warning("distributed.mixed_precision applies to FSDP only; strategy %s trains in fp32 "
                        "(plus bf16 autocast on CUDA)", self.strategy)
        if cfg.model.compile:  # per block (after sharding, so FSDP2's hooks stay outside the compiled graphs)
            for role in roles:
                if role.student_shaped:
                    for block in role.module["backbone"].blocks:
                        block.compile()
        roles.set_modes()
        h = cfg.head
        self.dino_loss = DINOLoss(h.n_prototypes, cfg.loss.student_temp, cfg.loss.center_momentum).to(self.device)
        ibot_dim = h.ibot_n_prototypes if "ibot_head" in student else h.n_prototypes
        self.ibot_loss = iBOTPatchLoss(ibot_dim, cfg.loss.student_temp, cfg.loss.center_momentum).to(self.device)

        o, tc = cfg.optim, cfg.teacher
        fused = o.fused_adamw is True or (o.fused_adamw == "auto" and self.device.type == "cuda")
        self.optimizers = {}  # per student role
        for role in roles.of_kind("student"):
            m = role.module
            groups = get_param_groups(m, m["backbone"].depth, o.layerwise_decay, o.patch_embed_lr_mult,
                                      o.tokens_without_decay)
            self.optimizers[role.name] = build_optimizer(groups, o.betas, fused=fused)
        self.batch_size = o.batch_size_per_gpu
        lr = scaled_lr(o.base_lr, self.batch_size * self.world, o.lr_scaling)
        self.sched = build_schedules(
            lr=lr, min_lr=o.min_lr, epochs=o.epochs, iters_per_epoch=o.iters_per_epoch,
            warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
            momentum_teacher=tc.momentum_teacher, final_momentum_teacher=tc.final_momentum_teacher,
            warmup_teacher_temp=tc.warmup_teacher_temp, teacher_temp=tc.teacher_temp,
            warmup_teacher_temp_epochs=tc.warmup_teacher_temp_epochs,
            freeze_last_layer_epochs=o.freeze_last_layer_epochs)
        # per module of every student (clipped separately, as the reference); further students' under "<name>/"
        self.params_by_module = {}
        for role in roles.of_kind("student"):
            prefix = "" if role.name == "student" else role.name[len("student_"):] + "/"
            for k, m in role.module.items():
                self.params_by_module[prefix + k] = [p for p in m.parameters() if p.requires_grad]
        self.all_params = [p for ps in self.params_by_module.values() for p in ps]
        # head warm-up on a pretrained backbone (training/backbone_init.py): (iterations, backbone parameters) per
        # student whose model section asks for one
        model_cfgs = {"student": cfg.model, **{f"student_{n}": m for n, m in cfg.distill.students.items()}}
        self.backbone_warmups = [(model_cfgs[r.name].init_backbone_frozen_iters,
                                  [p for p in r.module["backbone"].parameters() if p.requires_grad])
                                 for r in roles.of_kind("student") if model_cfgs[r.name].init_backbone_frozen_iters]

    # the roles the loop and the tests use most
    student = property(lambda self: self.roles["student"])
    teacher = property(lambda self: self.roles["teacher"])
    distill_teacher = property(lambda self: self.roles["distill_teacher"] if "distill_teacher" in self.roles
                               else None)
    optimizer = property(lambda self: self.optimizers["student"])
    backbone_info = property(lambda self: self.backbone_infos["teacher"])

    # ------------------------------------------------------------------ one iteration
    def train_step(self, batch: dict[str, Any], it: int) -> dict[str, Any]:
        cfg, sched = self.cfg, self.sched
        lr_it, wd_it, mom_it = sched["lr"][it], sched["wd"][it], sched["momentum"][it]
        ll_lr, temp_it = sched["last_layer_lr"][it], sched["teacher_temp"][it]
        for opt in self.optimizers.values():
            apply_schedules(opt, lr_it, wd_it, ll_lr)
            opt.zero_grad(set_to_none=True)
        g_w = gram.gram_weight(cfg.gram, it)
        if gram.snapshot_due(cfg.gram, it):  # from the EMA teacher after ``it`` iterations (training/gram.py)
            self.roles.snapshot("gram_teacher")
        if self.distill_teacher is not None:
            terms = distill_forward_losses(self, batch, temp_it)
        else:
            terms = forward_losses(self.student, self.teacher, self.dino_loss, self.ibot_loss, batch, cfg, temp_it,
                                   self.device, self.autocast,
                                   self.roles["gram_teacher"] if g_w > 0 else None, g_w)
        values = all_reduce_mean(terms)  # global-batch loss values; every rank sees the same
        check_finite(values, it)
        sum(v for k, v in terms.items() if k == "loss" or k.endswith("/loss")).backward()  # every student's
        if self.strategy == "ddp_allreduce":
            allreduce_gradients(self.all_params, self.world)
        grad_norms = {}
        if cfg.optim.clip_grad > 0:  # per module, as the reference; the global norm over shards
            for name, ps in self.params_by_module.items():
                grad_norms[name] = clip_grad_norm(ps, cfg.optim.clip_grad)
        elif cfg.optim.max_grad_norm > 0:
            grad_norms = {name: grad_norm(ps) for name, ps in self.params_by_module.items()}
        check_grad_norms(grad_norms, cfg.optim.max_grad_norm, it)  # before the step: never apply an exploded one
        for n_iters, params in self.backbone_warmups:  # head warm-up on a pretrained backbone: not stepped at all
            if it < n_iters:
                for p in params:
                    p.grad = None
        # during the freeze the prototype layers' lr is 0 (schedules): AdamW's update and its decoupled weight decay
        # are both multiplied by the lr, so they stay exactly as they are while their moments and step count
        # advance, as the reference's
        for opt in self.optimizers.values():
            opt.step()
        w_norm = {}
        if cfg.optim.max_weight_norm > 0:
            w_norm["weight_norm"] = weight_norm(self.all_params)
            check_weight_norm(w_norm["weight_norm"], cfg.optim.max_weight_norm, it)
        self.roles.update_emas(mom_it)
        extra = {"gram_weight": g_w} if cfg.gram.enabled else {}
        return {"type": "train", "step": it, "iteration": it + 1, "epoch": it / cfg.optim.iters_per_epoch,
                **{k if k.endswith("loss") or k in DIAGNOSTICS else f"{k}_loss": v for k, v in values.items()},
                **extra,
                "lr": lr_it, "wd": wd_it, "momentum": mom_it, "teacher_temp": temp_it,
                "n_masked_patches": int(batch["n_masked_patches"]),
                **{f"grad_norm_{k}": v for k, v in grad_norms.items()}, **w_norm,
                "undecodable_samples": int(batch.get("n_undecodable", 0))}

    # ------------------------------------------------------------------ state
    def full_state_dict(self, which: str = "teacher") -> dict[str, torch.Tensor]:
        """Unsharded CPU state dict of a role (``teacher``, ``student``, ...; collective when sharded; full on rank
        0 only)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model = self.roles[which]
        if self.strategy != "fsdp":
            return {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _state_keys(self) -> tuple[dict[str, nn.Module], dict[str, tuple[nn.Module, torch.optim.Optimizer]]]:
        """Checkpoint key -> model of every saved role, and -> (student, optimizer) of every optimizer."""
        models = {r.name: r.module for r in self.roles.saved()}
        optims = {optimizer_key(n): (self.roles[n], opt) for n, opt in self.optimizers.items()}
        return models, optims

    def save(self, out: Path, iteration: int, data_position: dict[str, Any]) -> None:
        models, optims = self._state_keys()
        meta = {"iteration": iteration, "dino_center": self.dino_loss.center.cpu(),
                "ibot_center": self.ibot_loss.center.cpu(), "data_position": data_position,
                "config": self.cfg.model_dump(mode="json"), "backbone": self.backbone_info,
                "backbones": {k: self.backbone_infos[k] for k in models if k in self.backbone_infos},
                "roles": [*models, *optims], "world_size": self.world, "strategy": self.strategy}
        keep = self.cfg.checkpoint.keep_last
        if self.world == 1:
            save_checkpoint(out, {**meta, **{k: m.state_dict() for k, m in models.items()},
                                  **{k: opt.state_dict() for k, (_, opt) in optims.items()}, "rng": rng_state()},
                            keep_last=keep)
            return
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        app_state = {k: get_model_state_dict(m) for k, m in models.items()}
        app_state.update({k: get_optimizer_state_dict(m, opt) for k, (m, opt) in optims.items()})
        save_distributed_checkpoint(out, app_state, meta, rng_state(), keep_last=keep)

    def load(self, path: Path) -> dict[str, Any]:
        """Restore models, optimizers and centres from either checkpoint layout (any writer world size); returns
        the checkpoint's meta dict."""
        meta = load_training_state(path, *self._state_keys())
        self.dino_loss.center.copy_(meta["dino_center"].to(self.device))
        self.ibot_loss.center.copy_(meta["ibot_center"].to(self.device))
        return meta

    # ------------------------------------------------------------------ the run in output_dir
    def resume(self) -> ResumePoint:
        """Restore the newest checkpoint in the output dir (rank 0's choice: every rank resumes from the same one),
        entering the high-resolution phase first when the checkpoint is inside it; a fresh run starts at 0."""
        latest = find_latest_checkpoint(self.output_dir)
        if self.world > 1:
            box = [str(latest) if latest is not None else None]
            dist.broadcast_object_list(box, 0)
            latest = Path(box[0]) if box[0] is not None else None
        if latest is None:
            return ResumePoint(0, 0, None)
        cfg = self.cfg
        if high_res.in_phase(cfg, latest):
            high_res.enter_high_res(self)  # the checkpoint holds the high-resolution grid
        meta = self.load(latest)
        if cfg.optim.max_weight_norm > 0:
            check_resumed_weights(weight_norm(self.all_params), cfg.optim.max_weight_norm, str(latest))
        iteration = int(meta["iteration"])
        pos = meta["data_position"]
        # the global sample order depends on the data and the seed only (training/data.py): continue exactly
        # after the samples consumed, whatever the number of ranks that consumed them
        samples = int(pos.get("samples_consumed", iteration * self.batch_size * self.world))
        if pos.get("sample_order") != SAMPLE_ORDER:
            log.warning("checkpoint from an older sample order: the data position is approximate")
        rng = None
        if pos.get("world_size", 1) == self.world:
            rng = meta["rng"]  # restored right before the loop (the loader draws a seed)
        else:  # per-rank RNG streams (drop-path) cannot be mapped to other ranks: they restart from the seed
            log.info("checkpoint written by %s rank(s), resumed on %d: data continues exactly at sample %d",
                     pos.get("world_size", 1), self.world, samples)
        log.info("resumed from %s at iteration %d", latest, iteration)
        return ResumePoint(iteration, samples, rng)

    def batches(self, data: str | list[str], samples_consumed: int):
        """This rank's batches of the current phase (the high-resolution one's crops once entered), continuing
        the global sample order exactly after ``samples_consumed`` samples (training/data.py)."""
        cfg = high_res.phase_config(self.cfg) if self.high_res else self.cfg
        stream = build_stream(cfg, data, rank=self.rank, world=self.world, start_sample=samples_consumed)
        return iter(make_loader(stream, self.cfg.data.num_workers))

    def evaluate(self, iteration: int) -> dict[str, Any] | None:
        """k-NN / linear probe of the teacher backbone on ``eval.train_dir`` (None without one); rank 0 writes
        and returns the ``"type": "eval"`` row, the other ranks return None (collective when sharded)."""
        e = self.cfg.eval
        if not e.train_dir:
            return None
        from .evaluate import evaluate_backbone

        backbone = self.teacher["backbone"]
        if self.strategy == "fsdp":  # gather the sharded teacher (collective), evaluate a full copy on rank 0
            full = self.full_state_dict("teacher")
            if self.rank != 0:
                return None
            backbone = backbone_from_state(self.backbone_info, full).to(self.device).eval()
        elif self.rank != 0:
            return None
        res = evaluate_backbone(backbone, e.train_dir, e.val_dir, e.img_size or self.cfg.crops.global_crops_size,
                                e.knn_k, e.knn_temp, e.linear_probe, e.batch_size, e.center_crop_ratio, self.device)
        row = {"type": "eval", "iteration": iteration, **res}
        self.metrics.write(row)
        log.info("eval at iteration %d: %s", iteration, res)
        return row

    def save_checkpoint(self, iteration: int, samples_consumed: int) -> None:
        """Checkpoint the state after ``iteration`` iterations into the output dir, with the data position."""
        self.save(self.output_dir, iteration, {
            "batches_consumed": iteration, "samples_consumed": samples_consumed,
            "batch_size_per_rank": self.batch_size, "world_size": self.world, "sample_order": SAMPLE_ORDER})


SAMPLE_ORDER = "global-block-shuffle"  # data_position["sample_order"] of checkpoints with training/data.py's order


def _global_keys(keys: list[str], world: int) -> list[str]:
    """The global batch's sample keys in global order (rank 0's slice first; collective on several ranks)."""
    if world == 1:
        return list(keys)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, list(keys))
    return [k for p in parts for k in p]


def _log_start(trainer: Trainer, source: SourceReport, start_iter: int) -> None:
    """The dataset and model sizes in the log, and the data check as the ``"type": "data"`` metrics row."""
    if trainer.rank != 0:
        return
    log.info("%s", source.summary())
    for unit, reason in list(source.bad_units.items())[:20]:
        log.warning("skipped unreadable %s: %s", unit, reason)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in trainer.student.items()}
    bb = trainer.student["backbone"]
    heads = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items() if k != "backbone")
    log.info("model: %s (embed_dim %d, depth %d, %d heads) %.2fM params; heads %s; student %.2fM params, teacher "
             "the same (EMA)", trainer.cfg.model.arch, bb.embed_dim, bb.depth, bb.num_heads,
             counts["backbone"] / 1e6, heads, sum(counts.values()) / 1e6)
    trainer.metrics.write({"type": "data", "iteration": start_iter, **source.row(),
                   "params": counts, "global_batch": trainer.batch_size * trainer.world})


class _Throughput:
    """Logs the training speed once, over the first iterations after the first (which includes warm-up)."""

    def __init__(self, start_iter: int, images_per_iter: int, over: int = 10):
        self.start, self.images, self.over = start_iter, images_per_iter, over
        self.t1: float | None = None

    def step(self, it: int) -> None:
        done = it - self.start
        if done == 1:
            self.t1 = time.time()
        elif self.t1 is not None and done == 1 + self.over:
            rate = self.over / max(time.time() - self.t1, 1e-9)
            log.info("throughput: %.3g it/s, %.3g img/s (global batch %d; iterations %d-%d)", rate,
                     rate * self.images, self.images, self.start + 2, it)
            self.t1 = None


class _ProgressBar:
    """A tqdm bar (when ``enabled``) whose postfix shows loss and lr every ``log_every`` iterations."""

    def __init__(self, enabled: bool, total_iters: int, start_iter: int, log_every: int):
        self.total, self.log_every, self.bar = total_iters, log_every, None
        if enabled:
            from tqdm import tqdm

            # in a log (ray job logs, CI, a file) every redraw becomes a line: redraw at most every 10 s there
            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", dynamic_ncols=True,
                            mininterval=0.1 if interactive else 10.0)

    def update(self, it: int, row: dict[str, Any]) -> None:
        """Iteration ``it`` (counted from 1) is done; ``row`` its metrics."""
        if self.bar is None:
            return
        if it % self.log_every == 0 or it == self.total:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
        self.bar.update(1)  # redraws (with the postfix) at most every mininterval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig, data: str | list[str], output_dir: str | os.PathLike) -> dict[str, Any]:
    """Train (resuming from the newest checkpoint in ``output_dir`` when there is one); returns a summary.

    Joins an existing process group (Ray Train, tests) or creates one from the torchrun environment."""
    info = init_distributed()
    try:
        return _train(cfg, data, Path(output_dir), info)
    finally:
        if info.created_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, data: str | list[str], out: Path, info: DistInfo) -> dict[str, Any]:
    # before creating anything: bad --data fails fast (DataError, one line), a one-class eval folder too
    source = check_sources(data)
    if cfg.eval.train_dir:
        from .evaluate import check_eval_folders

        check_eval_folders(cfg.eval.train_dir, cfg.eval.val_dir)
    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for p in remove_stale_temporaries(out):
            log.info("removed %s, left by an interrupted checkpoint save", p)
    trainer = Trainer(cfg, info, out)
    high_res.check_supported(trainer)
    rank, world = trainer.rank, trainer.world
    if world > 1:
        log.info("rank %d/%d: strategy %s on %s", rank, world, trainer.strategy, trainer.device)
    images_per_iter = trainer.batch_size * world
    total_iters = cfg.total_iters if cfg.max_steps is None else min(cfg.max_steps, cfg.total_iters)
    hr_start = high_res.phase_start(cfg)

    start = trainer.resume()
    trainer.metrics.truncate_after(start.iteration)
    _log_start(trainer, source, start.iteration)
    if rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    last_eval = trainer.evaluate(0) if cfg.eval.at_start and start.iteration == 0 else None

    it, samples = start.iteration, start.samples_consumed
    bar = _ProgressBar(rank == 0 and cfg.progress_bar, total_iters, it, cfg.log_every)
    throughput = _Throughput(it, images_per_iter, over=min(10, total_iters - it - 1))
    collapse = CollapseWatch(cfg.head.n_prototypes)
    last_row: dict[str, Any] = {}
    t0 = time.time()
    batches = trainer.batches(source.readable, samples)
    if start.rng is not None:
        set_rng_state(start.rng)
    try:
        while it < total_iters:
            if it == hr_start and not trainer.high_res:  # the high-resolution phase starts here
                if it % cfg.checkpoint.period_iters and it > start.iteration:
                    trainer.save_checkpoint(it, samples)  # the checkpoint the phase starts from
                high_res.enter_high_res(trainer)
                batches = trainer.batches(source.readable, samples)
            batch = next(batches)
            row = trainer.train_step(batch, it)
            row["time"] = time.time() - t0
            if cfg.data.log_sample_keys:
                row["sample_keys"] = _global_keys(batch["keys"], world)
            trainer.metrics.write(row)
            if rank == 0 and (warning := collapse.update(row)):
                log.warning(warning)
            last_row = row
            it += 1
            samples += images_per_iter
            throughput.step(it)
            bar.update(it, row)
            if cfg.eval.period_iters and it % cfg.eval.period_iters == 0 and it < total_iters:
                last_eval = trainer.evaluate(it)
            if it % cfg.checkpoint.period_iters == 0 or it == total_iters:
                trainer.save_checkpoint(it, samples)
    finally:
        bar.close()
    if it > start.iteration or last_eval is None:
        last_eval = trainer.evaluate(it)
    return {"iterations": it, "last": last_row, "eval": last_eval, "output_dir": str(out), "world_size": world,
            "rank": rank, "strategy": trainer.strategy}
