"""High-resolution adaptation phase (config section ``high_res``): the paper raises the resolution to 518 x 518 for
a short period at the end of pretraining.

``high_res.iterations = N`` makes the last N iterations of the run (``total - N .. total``) the phase; its crops are
``high_res.global_crops_size`` / ``high_res.local_crops_size`` (the block masks follow the new global grid). When
the loop reaches iteration ``total - N`` it writes a checkpoint (unless one was just written), then

* interpolates the position embeddings of every role of the student's shape (students, EMA teachers, the Gram
  teacher; training/roles.py) **once** to the new global grid
  (the backbone's own interpolation, so the ``_reg4`` settings apply): from then on the stored grid is the high-res
  one and the global crops use it as is;
* drops the AdamW moments of the resized ``pos_embed`` (they belonged to the old grid; they restart);
* reads the data with the phase's crop sizes, from the same position in the sample order.

The schedules (lr, weight decay, teacher momentum and temperature, last-layer freeze) simply continue: the phase
is their final part. A checkpoint written after the switch holds the high-res grid (its ``backbone`` info says
so); resuming from it resizes the freshly built models before loading. The phase needs full (unsharded) parameters
to resize: single process or ``distributed.strategy: ddp_allreduce``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig

log = logging.getLogger("lvd.high_res")
__all__ = ["phase_start", "phase_config", "in_phase", "resize_pos_embed", "enter_high_res", "check_supported"]


def phase_start(cfg: TrainConfig) -> int | None:
    """First iteration of the high-resolution phase (None without one)."""
    return cfg.total_iters - cfg.high_res.iterations if cfg.high_res.iterations else None


def phase_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the phase's crop sizes (for the data stream)."""
    hr = cfg.high_res
    crops = cfg.crops.model_copy(update={"global_crops_size": hr.global_crops_size,
                                         "local_crops_size": hr.local_crops_size or cfg.crops.local_crops_size})
    return cfg.model_copy(update={"crops": crops})


def in_phase(cfg: TrainConfig, checkpoint: Path) -> bool:
    """Whether a checkpoint was written inside the phase (after the switch), from its name alone."""
    from .checkpoint import _PAT

    start = phase_start(cfg)
    m = _PAT.match(Path(checkpoint).name)
    return start is not None and m is not None and int(m.group(1)) > start


def check_supported(trainer) -> None:
    if phase_start(trainer.cfg) is not None and trainer.strategy == "fsdp":
        raise ConfigError("config error: high_res: the phase resizes full parameters; with several processes set "
                          "distributed.strategy=ddp_allreduce")


@torch.no_grad()
def resize_pos_embed(backbone, img_size: int) -> None:
    """Interpolate ``backbone.pos_embed`` in place (same Parameter object) to the grid of ``img_size``.  A RoPE
    backbone stores no position embedding (its rotations follow the input's grid): only its size changes."""
    if backbone.pos_embed is None:
        backbone.img_size = img_size
        return
    grid = img_size // backbone.patch_size
    if backbone.pos_embed.shape[1] == 1 + grid * grid:
        return
    probe = torch.zeros(1, 1 + grid * grid, backbone.embed_dim, dtype=backbone.pos_embed.dtype)
    new = backbone.interpolate_pos_encoding(probe, img_size, img_size)
    backbone.pos_embed.data = new.detach().clone().contiguous()
    backbone.img_size = img_size


def enter_high_res(trainer) -> None:
    """Switch a :class:`~training.train.Trainer` to the phase (see the module docstring)."""
    size = trainer.cfg.high_res.global_crops_size
    for role in trainer.roles:  # every role of the student's shape: students, their EMAs, the Gram teacher
        if role.student_shaped:
            resize_pos_embed(role.module["backbone"], size)
    for name, opt in trainer.optimizers.items():
        pos_embed = trainer.roles[name]["backbone"].pos_embed
        if pos_embed is not None:
            opt.state.pop(pos_embed, None)
    for info in trainer.backbone_infos.values():
        info["kwargs"]["img_size"] = size
    trainer.high_res = True
    log.info("high-resolution phase: position embeddings interpolated to %d px (%d x %d grid)", size,
             size // trainer.cfg.model.patch_size, size // trainer.cfg.model.patch_size)
