"""The transformer's layers: patch embedding, attention, FFNs (MLP, SwiGLU), LayerScale, the block, and
stochastic depth.

Parameter names follow the official DINOv2 backbone files (see ``backbone_io``).

* Attention is ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU), or
  FlexAttention for a packed sequence's ``BlockMask`` (``packing``).
* Efficient stochastic depth: in training each residual branch runs on a random subset of
  ``max(int(B * (1 - p)), 1)`` samples and its output is added back scaled by ``B / kept`` (the reference's
  ``drop_add_residual_stochastic_depth``); the same rate in every block ("uniform" drop path). On a packed
  sequence it stays per image: each block draws, per group, the same random subsets as the unpacked path (same
  RNG calls, same order), runs the branch on the packed tokens of the kept images only (with their own
  block-diagonal mask) and adds it back scaled by ``B_group / kept``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packing import FlexKernels, PackedLayout, is_block_mask
from .rope import apply_rope

__all__ = ["PatchEmbed", "LayerScale", "Attention", "Mlp", "SwiGLUFFN", "swiglu_hidden", "Block"]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # B D h w
        return x.flatten(2).transpose(1, 2)  # B N D


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma



class Attention(nn.Module):
    """Multi-head self-attention; ``kernels``: the model's FlexAttention functions (shared by its blocks);
    ``num_prefix_tokens``: the leading tokens (class, registers) that rotary embeddings leave unrotated."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 kernels: FlexKernels | None = None, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        assert dim % num_heads == 0, "embed_dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.kernels = kernels if kernels is not None else FlexKernels()

    def forward(self, x: Tensor, attn_mask=None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``attn_mask``: None, a boolean ``[N, N]`` mask (True = may attend) or a FlexAttention ``BlockMask``;
        ``rope``: rotary ``(sin, cos)`` tables for the patch tokens (``training.models.rope``), or None."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope, self.num_prefix_tokens), apply_rope(k, rope, self.num_prefix_tokens)
        if is_block_mask(attn_mask):
            x = self.kernels.attention(x.device)(q, k, v, block_mask=attn_mask)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of the reference's fused SwiGLU FFN: 2/3 of the MLP width, rounded up to a multiple of 8."""
    hidden = int(dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        init_values: float | None = 1e-5,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        kernels: FlexKernels | None = None,
        norm_eps: float = 1e-6,
        num_prefix_tokens: int = 1,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, kernels=kernels,
                              num_prefix_tokens=num_prefix_tokens)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, swiglu_hidden(dim, mlp_ratio), bias=ffn_bias)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r} (expected 'mlp', 'swiglu' or 'swiglufused')")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    def _attn_branch(self, x: Tensor, attn_mask=None, rope=None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), attn_mask, rope))

    def _ffn_branch(self, x: Tensor, attn_mask=None) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, packed: PackedLayout | None = None, rope: tuple[Tensor, Tensor] | None = None
                ) -> Tensor:
        """``x``: ``[B, N, D]``, or a packed ``[1, T, D]`` sequence laid out as ``packed`` says; ``rope``: rotary
        tables for ``x``'s patch grid (unpacked inputs only)."""
        drop = self.training and self.drop_path > 0.0
        if rope is not None:
            assert packed is None, "rotary embeddings are applied per crop group, not on a packed sequence"
            attn = lambda t, m=None: self._attn_branch(t, m, rope)  # noqa: E731
            if drop:
                x = _drop_add_residual(x, attn, self.drop_path)
                return _drop_add_residual(x, self._ffn_branch, self.drop_path)
            x = x + attn(x)
            return x + self._ffn_branch(x)
        if packed is not None:
            if drop:
                return _packed_drop_path(x, packed, self._attn_branch, self._ffn_branch, self.drop_path)
            x = x + self._attn_branch(x, packed.mask)
            return x + self._ffn_branch(x)
        if drop:
            x = _drop_add_residual(x, self._attn_branch, self.drop_path)
            x = _drop_add_residual(x, self._ffn_branch, self.drop_path)
        else:
            x = x + self._attn_branch(x)
            x = x + self._ffn_branch(x)
        return x


def _drop_add_residual(x: Tensor, branch, p: float) -> Tensor:
    """Efficient stochastic depth: run ``branch`` on a random subset of the batch, add it scaled by B/kept."""
    b = x.shape[0]
    kept = max(int(b * (1.0 - p)), 1)
    idx = torch.randperm(b, device=x.device)[:kept]
    residual = branch(x[idx])
    out = torch.index_add(x.flatten(1), 0, idx, residual.to(x.dtype).flatten(1), alpha=b / kept)
    return out.view_as(x)


def _packed_drop_path(x: Tensor, packed: PackedLayout, attn_branch, ffn_branch, p: float) -> Tensor:
    """Efficient stochastic depth on a packed sequence, per image: per group the same random subsets as
    :func:`_drop_add_residual` draws on the unpacked groups (same calls, same order), each branch run once on the
    packed tokens of the kept images and added back scaled by ``B_group / kept``."""
    picks = []
    for b, _ in packed.sizes:  # the unpacked path draws attn then ffn subsets group by group
        kept = max(int(b * (1.0 - p)), 1)
        picks.append([torch.randperm(b, device=x.device)[:kept] for _ in range(2)])
    for which, branch in enumerate((attn_branch, ffn_branch)):
        toks = [(off + pick[which][:, None] * n + torch.arange(n, device=x.device)).flatten()
                for (_, n), off, pick in zip(packed.sizes, packed.offsets, picks)]
        sub = PackedLayout([(pick[which].numel(), n) for (_, n), pick in zip(packed.sizes, picks)], packed.mask_fn)
        residual = branch(x[:, torch.cat(toks)], sub.mask).to(x.dtype)
        out = x.clone()
        for tok, res, (b, _), pick in zip(toks, residual.split([t.numel() for t in toks], dim=1), packed.sizes, picks):
            out.index_add_(1, tok, res, alpha=b / pick[which].numel())  # as _drop_add_residual: fp32 alpha
        x = out
    return x
