"""Projection heads: the DINO head (also used for iBOT, shared by default, or a separate instance).

DINOHead = MLP (in -> 2048 -> 2048 -> 256, GELU, 3 layers) -> L2 normalisation -> weight-normalised prototype
layer (256 -> K, K = 65,536 by default, no bias).

The prototype layer is weight-normalised as the reference's (``nn.utils.weight_norm`` on a bias-free Linear, then
``weight_g`` filled with 1): ``W = weight_g * weight_v / ||weight_v||_row``, with ``weight_g`` [K, 1] initialised
to 1 and trained like ``weight_v`` (both in the last-layer group of the first-epoch freeze, both weight-decayed).
``is_last_layer_param`` names them. A state dict without ``weight_g`` (older lvd checkpoints, whose g was fixed
to 1) loads with g = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear", "is_last_layer_param"]


class WeightNormLinear(nn.Module):
    """Linear layer without bias, weight-normalised per row: ``W = weight_g * weight_v / ||weight_v||_row``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight_v" in state_dict and prefix + "weight_g" not in state_dict:
            state_dict[prefix + "weight_g"] = torch.ones_like(self.weight_g)  # written when g was fixed to 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
