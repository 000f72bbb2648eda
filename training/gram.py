"""Gram anchoring (DINOv3, config section ``gram``): keeps the patch features' similarity structure of an earlier
teacher while training continues, which DINOv3 introduced against the decay of dense features in long runs.

* Loss: per image, the Gram matrix ``G = F F^T`` of its L2-normalised patch features ``F`` [N, D] (cosine
  similarities of every pair of patches); the term is the mean squared difference between the student's and the
  Gram teacher's matrices over all images and entries. With ``remove_negative`` both matrices are clipped at 0
  first. The student's features are its global crops' normalised patch tokens from the step's own forward (with
  the iBOT masks, as DINOv3); the Gram teacher sees the same global crops unmasked, without gradients.
* Gram teacher: the ``gram_teacher`` role (training/roles.py), a snapshot of the EMA teacher's backbone taken at
  the start of iteration ``start_iter`` and refreshed every ``refresh_every`` iterations, at most ``max_refreshes``
  times (:func:`snapshot_due`). It is saved in checkpoints, so a resume continues with the same snapshot
  bit for bit; the schedule depends on the iteration only.
* Weight: 0 before ``start_iter``, then rising linearly to ``weight`` over ``weight_warmup_iters``
  (:func:`gram_weight`).
* Higher resolution (``img_size`` above the global crop size): the Gram teacher gets the global crops resized
  bicubically to ``img_size`` (the same crops upsampled, not crops taken again from the source image), and its
  patch-feature map is resized bicubically to the student's grid before its Gram matrix is taken.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gram_loss", "snapshot_due", "gram_weight", "build_gram_teacher", "gram_teacher_patches", "gram_term"]


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor,
              remove_negative: bool = False) -> torch.Tensor:
    """MSE between the per-image Gram matrices of L2-normalised patch features, both [B, N, D] (float32)."""
    s = F.normalize(student_patches.float(), dim=-1)
    t = F.normalize(teacher_patches.float(), dim=-1)
    s_sim = s @ s.transpose(-1, -2)
    t_sim = t @ t.transpose(-1, -2)
    if remove_negative:
        s_sim = s_sim.clamp_min(0.0)
        t_sim = t_sim.clamp_min(0.0)
    return F.mse_loss(s_sim, t_sim)


def snapshot_due(g, it: int) -> bool:
    """Whether the Gram teacher is (re)taken from the EMA teacher at the start of iteration ``it``."""
    if not g.enabled or it < g.start_iter:
        return False
    if it == g.start_iter:
        return True
    k, rem = divmod(it - g.start_iter, g.refresh_every) if g.refresh_every else (0, 1)
    return rem == 0 and 1 <= k <= g.max_refreshes


def gram_weight(g, it: int) -> float:
    if not g.enabled or it < g.start_iter:
        return 0.0
    if g.weight_warmup_iters:
        return g.weight * min(1.0, (it - g.start_iter + 1) / g.weight_warmup_iters)
    return g.weight


def build_gram_teacher(teacher: nn.ModuleDict) -> nn.ModuleDict:
    """The Gram teacher's module: a copy of the EMA teacher's backbone (its weights are set by each snapshot)."""
    return nn.ModuleDict({"backbone": copy.deepcopy(teacher["backbone"])})


def gram_teacher_patches(gram_teacher: nn.ModuleDict, gc: torch.Tensor, grid: int, img_size: int | None,
                         autocast) -> torch.Tensor:
    """The Gram teacher's normalised patch tokens [B, grid * grid, D] of the global crops ``gc`` (see the module
    docstring for ``img_size``)."""
    from .distributed import reshard

    with torch.no_grad():
        x = gc
        if img_size is not None and img_size != gc.shape[-1]:
            x = F.interpolate(gc, size=(img_size, img_size), mode="bicubic", align_corners=False)
        with autocast():
            patches = gram_teacher["backbone"].forward_features(x)["x_norm_patchtokens"]
        reshard(gram_teacher)
        b, n, d = patches.shape
        side = int(round(n ** 0.5))
        if side != grid:
            fmap = patches.float().transpose(1, 2).reshape(b, d, side, side)
            fmap = F.interpolate(fmap, size=(grid, grid), mode="bicubic", align_corners=False)
            patches = fmap.reshape(b, d, grid * grid).transpose(1, 2)
    return patches


def gram_term(g, gram_teacher: nn.ModuleDict, gc: torch.Tensor, student_patches: torch.Tensor,
              autocast) -> torch.Tensor:
    """The step's Gram loss (unweighted) for the student's global-crop patch tokens [B, N, D]."""
    grid = int(round(student_patches.shape[1] ** 0.5))
    target = gram_teacher_patches(gram_teacher, gc, grid, g.img_size, autocast)
    return gram_loss(student_patches, target, g.remove_negative)
