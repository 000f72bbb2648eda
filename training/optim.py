"""AdamW parameter groups as in the reference (``get_params_groups_with_decay`` + fuse by multipliers).

For each parameter (names as in the student ``ModuleDict``: ``backbone.*``, ``dino_head.*``, ``ibot_head.*``):

* lr multiplier = ``layerwise_decay ** (depth + 1 - layer_id)`` with layer_id 0 for ``cls_token``,
  ``pos_embed``, ``register_tokens``, ``mask_token`` and ``patch_embed.*``, ``i + 1`` for ``blocks.i.*`` and
  ``depth + 1`` for everything else (final norm, heads -> multiplier 1); times ``patch_embed_lr_mult`` (0.2)
  for ``patch_embed.*``;
* weight-decay multiplier 0 for biases, norms and LayerScale gammas, else 1 (as the reference's
  ``dinov2/utils/param_groups.py``: the tokens, the position embedding and the prototype layer's ``weight_g`` are
  decayed); ``tokens_without_decay=True`` (``optim.tokens_without_decay``) also exempts ``cls_token``,
  ``pos_embed``, ``mask_token`` and ``register_tokens``, the DINO v1 / timm convention: those are learned offsets,
  not weights whose scale the normalisations undo, so decay only pulls them towards zero;
* ``is_last_layer`` for the heads' prototype layers (frozen for the first epoch: their lr is 0 then, and the
  optimizer still steps them, so their moments and step count include the frozen iterations as the reference's).

Groups are fused by (lr multiplier, wd multiplier, is_last_layer); the loop sets ``lr`` and ``weight_decay`` of
each group from the schedules times the multipliers.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["param_multipliers", "get_param_groups", "build_optimizer", "apply_schedules"]

_NO_LAYER = ("cls_token", "pos_embed", "register_tokens", "mask_token")


def param_multipliers(name: str, depth: int, layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2,
                      tokens_without_decay: bool = False) -> dict[str, Any]:
    is_backbone = name.startswith("backbone.")
    short = name[len("backbone."):] if is_backbone else name
    layer_id = depth + 1
    if is_backbone:
        if short in _NO_LAYER or short.startswith("patch_embed."):
            layer_id = 0
        elif short.startswith("blocks."):
            layer_id = int(short.split(".")[1]) + 1
    lr_mult = layerwise_decay ** (depth + 1 - layer_id)
    if is_backbone and short.startswith("patch_embed."):
        lr_mult *= patch_embed_lr_mult
    no_wd = name.endswith(".bias") or "norm" in name or name.endswith(".gamma")
    if tokens_without_decay and is_backbone and short in _NO_LAYER:
        no_wd = True
    return {"lr_multiplier": lr_mult, "wd_multiplier": 0.0 if no_wd else 1.0, "is_last_layer": "last_layer" in name}


def get_param_groups(model: nn.Module, depth: int, layerwise_decay: float = 0.9,
                     patch_embed_lr_mult: float = 0.2, tokens_without_decay: bool = False) -> list[dict[str, Any]]:
    fused: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = param_multipliers(name, depth, layerwise_decay, patch_embed_lr_mult, tokens_without_decay)
        key = (m["lr_multiplier"], m["wd_multiplier"], m["is_last_layer"])
        g = fused.setdefault(key, {**m, "params": [], "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return list(fused.values())


def build_optimizer(groups: Iterable[dict[str, Any]], betas=(0.9, 0.999), fused: bool = False) -> torch.optim.AdamW:
    """AdamW whose lr / weight decay are set per group every iteration by :func:`apply_schedules`; ``fused``: the
    single-kernel implementation (CUDA; on CPU torch also has one)."""
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), weight_decay=0.0, fused=fused or None)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
        g["weight_decay"] = wd * g["wd_multiplier"]
