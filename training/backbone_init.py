"""Continued pretraining from a released backbone (``model.init_backbone``): the official DINOv2 files hold the
backbone only (the DINO / iBOT heads were never released), so the run starts its student and EMA teacher from the
file's backbone and its heads fresh.

* The file: an official DINOv2 backbone ``.pth`` (``model.init_backbone_arch`` names its architecture, else it is
  inferred from the tensor shapes) or an ``lvd export`` ``.pth`` with its ``.json`` sidecar
  (training/models/backbone_io.py reads both).
* Its architecture must be the configured one (``model.arch`` and overrides): every parameter shape is compared
  and a mismatch is one ``config error:`` line naming the first differing tensor. Only the position embedding
  may differ in grid (official files store 37 x 37 for 518 px): it is interpolated once to the configured grid
  (the backbone's own interpolation).
* Head warm-up (``model.init_backbone_frozen_iters = N``): for the first N iterations the backbone is not
  stepped (its gradients are dropped before the optimizer step, so its AdamW moments start when it is
  released), so random heads do not send their first, large gradients into the pretrained features.
* A resume loads the run's checkpoint over this initialisation as over any other.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .config import ConfigError

log = logging.getLogger("lvd.train")
__all__ = ["load_initial_backbone"]


@torch.no_grad()
def load_initial_backbone(backbone: nn.Module, path: str, arch: str | None = None) -> None:
    """Copy the backbone file at ``path`` into ``backbone`` (in place; see the module docstring)."""
    from pathlib import Path

    from .high_res import resize_pos_embed
    from .models.backbone_io import load_official_checkpoint

    if not Path(path).is_file():
        raise ConfigError(f"config error: model.init_backbone: {path} is not a file")
    try:
        with torch.random.fork_rng(devices=[]):  # building the file's model draws no numbers of the run's: its
            loaded = load_official_checkpoint(path, arch=arch)  # heads are those of a run without the file
    except (KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"config error: model.init_backbone: {path}: {str(e).splitlines()[0]}") from None
    resize_pos_embed(loaded, backbone.img_size)
    ours = backbone.state_dict()
    theirs = loaded.state_dict()
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if a is None or b is None or a.shape != b.shape:
            raise ConfigError(
                f"config error: model.init_backbone: {path} ({loaded.arch}) does not fit model.arch "
                f"{backbone.arch}: {name} is {None if b is None else list(b.shape)} in the file, "
                f"{None if a is None else list(a.shape)} here")
    backbone.load_state_dict(theirs, strict=True)
    log.info("backbone initialised from %s (%s)", path, loaded.arch)
