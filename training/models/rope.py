"""Axial 2-D rotary position embeddings (RoPE) as DINOv3 uses them, written for this project.

Layout (one attention head of width ``D``, ``D`` a multiple of 4):

* Patch centres on a ``h x w`` grid get coordinates in ``[-1, 1]``, each axis normalised by its own length:
  ``c_y = 2 (i + 0.5) / h - 1``, ``c_x = 2 (j + 0.5) / w - 1`` (so a 224 px and a 448 px image span the same range).
* ``D / 4`` periods ``base ** (4 k / D)`` for ``k = 0 .. D/4 - 1`` (base 100); angles ``2 pi c / period`` for the
  row coordinate then the column coordinate: ``D / 2`` angles per patch.
* "Rotate half" pairing: element ``m`` of the head is rotated with element ``m + D/2`` by angle ``m mod D/2``:
  ``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]`` and sin / cos repeated twice.
* Prefix tokens (class token, storage / register tokens) are not rotated; only the patch tokens are.
* Training-time augmentation of the coordinates (all optional; off in eval mode): ``shift`` adds one uniform
  ``[-s, s]`` offset per axis, ``jitter`` multiplies each axis by its own log-uniform factor in ``[1/J, J]``,
  ``rescale`` both axes by one log-uniform factor in ``[1/R, R]`` (DINOv3's pretraining configs: ``rescale 2``).
  One draw per forward pass, shared by the batch and by every block (as the reference draws it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["AxialRope", "apply_rope"]


class AxialRope(nn.Module):
    """``sin, cos`` tables (``[h * w, head_dim]`` each, float32) for a patch grid; see the module docstring."""

    def __init__(self, head_dim: int, base: float = 100.0, shift: float | None = None,
                 jitter: float | None = None, rescale: float | None = None):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
        for name, v, low in (("shift", shift, 0.0), ("jitter", jitter, 1.0), ("rescale", rescale, 1.0)):
            if v is not None and not (math.isfinite(v) and v >= low):
                raise ValueError(f"rope {name} must be a finite number >= {low}, got {v}")
        self.head_dim, self.base = head_dim, float(base)
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        n = head_dim // 4
        periods = self.base ** (4.0 * torch.arange(n, dtype=torch.float32) / head_dim)
        self.register_buffer("periods", periods, persistent=False)

    def coords(self, h: int, w: int) -> Tensor:
        """``[h * w, 2]`` (row, column) coordinates in ``[-1, 1]``, augmented in training mode."""
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
        grid = 2.0 * grid - 1.0
        if self.training:
            if self.shift is not None:
                grid = grid + torch.empty(2).uniform_(-self.shift, self.shift)
            if self.jitter is not None:
                j = math.log(self.jitter)
                grid = grid * torch.empty(2).uniform_(-j, j).exp()
            if self.rescale is not None:
                r = math.log(self.rescale)
                grid = grid * torch.empty(1).uniform_(-r, r).exp()
        return grid

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        c = self.coords(h, w).to(self.periods.device)
        angles = (2 * math.pi * c[:, :, None] / self.periods).flatten(1)  # [hw, D/2]: row angles, column angles
        angles = torch.cat((angles, angles), dim=-1)  # [hw, D]: the rotate-half layout
        return angles.sin(), angles.cos()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor], num_prefix: int) -> Tensor:
    """Rotate the patch tokens of ``x`` (``[B, heads, N, D]``, the first ``num_prefix`` tokens left as they are).
    The rotation is computed in float32 (the tables' dtype) and cast back to ``x``'s dtype."""
    sin, cos = rope
    prefix, patches = x[:, :, :num_prefix], x[:, :, num_prefix:]
    a, b = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat((-b, a), dim=-1) * sin
    return torch.cat((prefix, rotated.to(x.dtype)), dim=2)
