"""Projection heads: the DINO head (also used for iBOT, shared by default, or a separate instance).

DINOHead = MLP (in -> 2048 -> 2048 -> 256, GELU, 3 layers) -> L2 normalisation -> weight-normalised prototype
layer (256 -> K, K = 65,536 by default, no bias).

Decision: the prototype layer uses an explicit weight normalisation with the norm ``g`` fixed to 1 (a buffer,
never trained; the reference sets ``weight_g`` to 1): ``W = weight_v / ||weight_v||_row``. Its parameter is
``last_layer.weight_v``; ``is_last_layer_param`` names it for the first-epoch freeze.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear", "is_last_layer_param"]


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are L2-normalised (weight norm with g fixed to 1)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.register_buffer("weight_g", torch.ones(out_dim, 1), persistent=False)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def is_last_layer_param(name: str) -> bool:
    return "last_layer" in name
