"""The pretraining objective of one step: the EMA teacher's targets and the student's weighted DINO + iBOT +
KoLeo loss terms (steps 1-3 of training/train.py's docstring), plus Gram anchoring (training/gram.py) when
configured; ``mode: distill`` has its counterpart in training/distill.py, which shares :func:`student_terms`,
:func:`head_logits` and :func:`teacher_probs`."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from .distributed import all_reduce_sum, reshard
from .losses import DINOLoss, dino_multicrop_loss, ibot_masked_loss, iBOTPatchLoss, koleo_loss

__all__ = ["forward_losses", "student_terms", "head_logits", "teacher_probs", "teacher_entropies", "DIAGNOSTICS"]

DIAGNOSTICS = ("teacher_entropy", "teacher_marginal_entropy")
"""Keys of a step's terms that are collapse monitors, not loss terms (logged under their own names)."""


@torch.no_grad()
def teacher_entropies(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two collapse monitors of the teacher's DINO targets ``probs`` [B, K] (this rank's rows), in nats:
    ``teacher_entropy``, the mean entropy of a row (ln K: every image gets the uniform target, a collapse to the
    uniform distribution), and ``teacher_marginal_entropy``, the entropy of the global batch's mean row (the row
    sums are all-reduced over ranks; near 0: every image gets the same prototype, a collapse to one dimension).
    A healthy teacher is sharp per image (low first) and spread over the batch (high second)."""
    def entropy(q: torch.Tensor) -> torch.Tensor:  # over the last dimension; 0 log 0 = 0
        return -(q * torch.log(q.clamp_min(1e-30))).sum(-1)

    p = probs.float()
    sums = all_reduce_sum(torch.cat([p.sum(0), p.new_tensor([p.shape[0]])]))  # row sums and row count, one call
    return {"teacher_entropy": entropy(p).mean(), "teacher_marginal_entropy": entropy(sums[:-1] / sums[-1])}


def head_logits(heads: nn.ModuleDict, cls: list[torch.Tensor], patches: torch.Tensor | None):
    """Run the DINO head on the CLS tokens (and the iBOT head on the patches; one pass when shared)."""
    n_cls = [c.shape[0] for c in cls]
    if patches is None:
        return list(heads["dino_head"](torch.cat(cls)).split(n_cls)), None
    if "ibot_head" in heads:
        return list(heads["dino_head"](torch.cat(cls)).split(n_cls)), heads["ibot_head"](patches)
    out = heads["dino_head"](torch.cat(cls + [patches]))
    parts = out.split(n_cls + [patches.shape[0]])
    return list(parts[:-1]), parts[-1]


def teacher_probs(dino_loss: DINOLoss, ibot_loss: iBOTPatchLoss, cls_logits: torch.Tensor,
                  patch_logits: torch.Tensor | None, temp: float, centering: str):
    """The teacher's DINO (and iBOT) probabilities at temperature ``temp``; with centering, the centres are
    updated after use."""
    cls_logits = cls_logits.float()
    dino_probs = dino_loss.teacher_probs(cls_logits, temp, centering)
    ibot_probs = None if patch_logits is None else ibot_loss.teacher_probs(patch_logits.float(), temp, centering)
    if centering == "centering":
        dino_loss.update_center(cls_logits)
        if patch_logits is not None:
            ibot_loss.update_center(patch_logits.float())
    return dino_probs, ibot_probs


def student_terms(cfg: TrainConfig, student: nn.ModuleDict, gc: torch.Tensor, lc: torch.Tensor,
                  dino_probs: torch.Tensor, ibot_probs: torch.Tensor | None, autocast, masks: torch.Tensor | None = None,
                  mask_idx: torch.Tensor | None = None, masks_weight: torch.Tensor | None = None):
    """A student's weighted DINO + iBOT + KoLeo terms against the teacher's probabilities (``loss`` their sum),
    and its global crops' features (a ``forward_features`` dict). ``masks`` / ``mask_idx``: the global crops'
    iBOT masks and the flat indices of the masked patches; None: no masking, and iBOT (when ``ibot_probs`` is
    given) on every patch of the global crops (distillation)."""
    n_local = lc.shape[0]
    do_ibot = ibot_probs is not None
    with autocast():
        inputs = [gc, lc] if n_local else [gc]
        outs = student["backbone"].forward_features(inputs, masks=[masks, None] if n_local else [masks])
        s_g = outs[0]
        s_g_cls = s_g["x_norm_clstoken"]
        cls = [s_g_cls] + ([outs[1]["x_norm_clstoken"]] if n_local else [])
        s_patch = None
        if do_ibot:
            s_patch = s_g["x_norm_patchtokens"].flatten(0, 1)
            s_patch = s_patch[mask_idx] if mask_idx is not None else s_patch
        cls_logits, s_patch_logits = head_logits(student, cls, s_patch)

    terms: dict[str, torch.Tensor] = {}
    st = cfg.loss.student_temp
    terms["dino"] = dino_multicrop_loss(cls_logits[0], cls_logits[1] if n_local else None, dino_probs, st)
    if cfg.loss.koleo_weight > 0:
        terms["koleo"] = sum(koleo_loss(c) for c in s_g_cls.chunk(2))
    if do_ibot:
        if masks is None:  # every patch of the global crops
            masks = torch.ones(gc.shape[0], s_g["x_norm_patchtokens"].shape[1], dtype=torch.bool, device=gc.device)
        terms["ibot"] = ibot_masked_loss(s_patch_logits, ibot_probs, masks, st, masks_weight)
    weights = {"dino": cfg.loss.dino_weight, "koleo": cfg.loss.koleo_weight, "ibot": cfg.loss.ibot_weight}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms, s_g


def forward_losses(student, teacher, dino_loss: DINOLoss, ibot_loss: iBOTPatchLoss, batch: dict[str, Any],
                   cfg: TrainConfig, teacher_temp: float, device: torch.device, autocast,
                   gram_teacher: nn.ModuleDict | None = None, gram_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """One pretraining step's loss terms (``dino``, ``ibot``, ``koleo``, with a Gram teacher and a weight above 0
    ``gram`` (training/gram.py); ``loss`` their weighted sum) and the teacher's collapse monitors
    (:data:`DIAGNOSTICS`) on this rank's ``batch``; the teacher's centres are updated."""
    gc = batch["global_crops"].to(device, non_blocking=True)
    lc = batch["local_crops"].to(device, non_blocking=True)
    # decided on the global batch: every rank runs the same modules and collectives (a rank without masked
    # patches contributes zero rows to the iBOT head, the Sinkhorn-Knopp sums and the centre)
    n_masked = int(batch["n_masked_patches"])
    if dist.is_initialized():  # on the device: NCCL reduces CUDA tensors only
        n_masked = int(all_reduce_sum(torch.tensor([float(n_masked)], device=device)).item())
    do_ibot = cfg.loss.ibot_weight > 0 and n_masked > 0
    masks = batch["masks"].to(device) if do_ibot else None
    mask_idx = batch["mask_indices"].to(device) if do_ibot else None

    with torch.no_grad(), autocast():
        t = teacher["backbone"].forward_features(gc)
        t_patch = t["x_norm_patchtokens"].flatten(0, 1)[mask_idx] if do_ibot else None
        (t_cls_logits,), t_patch_logits = head_logits(teacher, [t["x_norm_clstoken"]], t_patch)
        reshard(teacher)  # FSDP2 keeps roots unsharded after forward; the teacher has no backward
        dino_probs, ibot_probs = teacher_probs(dino_loss, ibot_loss, t_cls_logits, t_patch_logits, teacher_temp,
                                               cfg.loss.centering)

    terms, s_g = student_terms(cfg, student, gc, lc, dino_probs, ibot_probs, autocast, masks, mask_idx,
                               batch["masks_weight"].to(device) if do_ibot else None)
    if gram_teacher is not None and gram_weight > 0:
        from .gram import gram_term

        terms["gram"] = gram_term(cfg.gram, gram_teacher, gc, s_g["x_norm_patchtokens"], autocast)
        terms["loss"] = terms["loss"] + gram_weight * terms["gram"]
    terms.update(teacher_entropies(dino_probs))
    return terms
