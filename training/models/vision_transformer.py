"""DINOv2-style Vision Transformer backbone (patch 14), written for this project.

Parameter names follow the official DINOv2 backbone files exactly, so an official
``dinov2_vits14_pretrain.pth`` loads with ``load_state_dict(strict=True)`` into
``build_backbone("vit_small_patch14", img_size=518)``::

    cls_token                [1, 1, D]
    pos_embed                [1, 1 + (img_size // 14) ** 2, D]      (518 px -> 1 + 37 * 37)
    register_tokens          [1, R, D]                              (only when R > 0, the ``_reg4`` models)
    mask_token               [1, D]
    patch_embed.proj.weight / .bias
    blocks.N.norm1.weight / .bias
    blocks.N.attn.qkv.weight / .bias
    blocks.N.attn.proj.weight / .bias
    blocks.N.ls1.gamma
    blocks.N.norm2.weight / .bias
    blocks.N.mlp.fc1.* / blocks.N.mlp.fc2.*       (plain MLP FFN)
    blocks.N.mlp.w12.* / blocks.N.mlp.w3.*        (SwiGLU FFN, ViT-g/14)
    blocks.N.ls2.gamma
    norm.weight / norm.bias

Export format (what ``lvd export`` writes and what the curation embedder reads)
-------------------------------------------------------------------------------
``save_backbone(model, "backbone.pth")`` writes

* ``backbone.pth``: a plain ``torch.save``-d state dict with exactly the official key names above
  (no prefixes, no head parameters, fp32 tensors), loadable into the official DINOv2 code as well;
* ``backbone.json`` (sidecar, same stem): ``{"arch": "vit_small_patch14", "img_size": 224,
  "patch_size": 14, "num_register_tokens": 0, "embed_dim": 384, "depth": 12, "num_heads": 6,
  "ffn_layer": "mlp", "overrides": {...}}``; ``overrides`` holds the keyword arguments that were given
  to :func:`build_backbone` beyond the named architecture (e.g. a tiny test model's depth).

``load_official_checkpoint(path, arch=None, img_size=None)`` reads such a pair, or an official ``.pth``
without a sidecar (then ``arch`` names the architecture; when it is missing too the architecture is inferred
from the tensor shapes: width, depth, FFN type, register count, position-embedding grid).

Decisions written down here:

* Position embeddings are interpolated like the reference (bicubic) from the stored grid ``M`` to the crop's grid;
  a crop whose grid equals the stored one uses them as is. Plain models: ``scale_factor = (grid + 0.1) / M``, no
  antialias; ``_reg4`` models (as the reference hub builds them): ``size = grid``, antialias on.
* Efficient stochastic depth: in training each residual branch runs on a random subset of
  ``max(int(B * (1 - p)), 1)`` samples and its output is added back scaled by ``B / kept`` (the reference's
  ``drop_add_residual_stochastic_depth``); the same rate in every block ("uniform" drop path).
* Attention is ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
* Packed multi-crop attention (``packed_attention=True``, or ``"auto"``: only for CUDA inputs): for a list of
  crop groups (e.g. 2B global crops of 1+R+256 tokens and 8B local crops of 1+R+49 tokens) every image's tokens
  are concatenated into one sequence ``[1, T, D]`` and each block runs once on it. LayerNorm, the linear layers,
  the FFN and LayerScale are per token; attention gets a block-diagonal mask (token i may attend to token j iff
  both belong to the same image), so the result equals the per-group forward. The mask is a FlexAttention
  ``BlockMask`` (document-id ``mask_mod``) used with a compiled ``flex_attention`` on CUDA; on CPU (FlexAttention
  has no CPU backward in this torch, and eager it materialises the scores anyway) it is a boolean ``[T, T]`` mask
  for ``scaled_dot_product_attention``. Masks are cached per (group sizes, device). Stochastic depth stays per
  image: each block draws, per group, the same random subsets as the unpacked path (same RNG calls, same order),
  runs the branch on the packed tokens of the kept images only (with their own block-diagonal mask) and adds it
  back scaled by ``B_group / kept``. A single tensor input is never packed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # FlexAttention (torch >= 2.5)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: packed attention uses the boolean-mask SDPA path
    BlockMask = create_block_mask = flex_attention = None

__all__ = [
    "VisionTransformer",
    "build_backbone",
    "ARCHS",
    "save_backbone",
    "load_official_checkpoint",
    "load_backbone",
    "backbone_from_official_state",
    "sidecar_path",
    "official_key_list",
    "PackedLayout",
    "block_diagonal_mask",
]


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
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, "embed_dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, attn_mask: Tensor | BlockMask | None = None) -> Tensor:
        """``attn_mask``: None, a boolean ``[N, N]`` mask (True = may attend) or a FlexAttention ``BlockMask``."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and BlockMask is not None and isinstance(attn_mask, BlockMask):
            x = _flex_attention_fn(x.device)(qkv[0], qkv[1], qkv[2], block_mask=attn_mask)
        else:
            x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


_COMPILED: dict[str, Any] = {}


def _flex_attention_fn(device: torch.device):
    """``flex_attention``, compiled on CUDA (eager it materialises the whole score matrix)."""
    if device.type != "cuda":
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def _create_block_mask_fn(device: torch.device):
    """``create_block_mask``, compiled on CUDA so that the dense [T, T] mask is never materialised."""
    if device.type != "cuda":
        return create_block_mask
    if "block_mask" not in _COMPILED:
        _COMPILED["block_mask"] = torch.compile(create_block_mask)
    return _COMPILED["block_mask"]


def image_ids(sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> Tensor:
    """Image index of every token of a packed sequence; ``sizes`` = (images, tokens per image) per group."""
    lengths = torch.tensor([n for b, n in sizes for _ in range(b)], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device=device, dtype=torch.int32)


def block_diagonal_mask(sizes: Sequence[tuple[int, int]], device: torch.device | str, flex: bool):
    """The packed sequence's attention mask: a FlexAttention ``BlockMask`` (``flex``) or a boolean [T, T] tensor."""
    device = torch.device(device)
    ids = image_ids(sizes, device)
    if not flex:
        return ids[:, None] == ids[None, :]
    total = ids.numel()

    def same_image(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    return _create_block_mask_fn(device)(same_image, None, None, total, total, device=device)


class PackedLayout:
    """How crop groups lie in a packed ``[1, T, D]`` sequence (group-major, image-major, token order kept).

    ``sizes`` holds (images, tokens per image) per group; ``mask`` is the block-diagonal attention mask, built
    once per layout by ``mask_fn(sizes)`` (the model's cache)."""

    def __init__(self, sizes: Sequence[tuple[int, int]], mask_fn):
        self.sizes = tuple((int(b), int(n)) for b, n in sizes)
        self.mask_fn = mask_fn
        self._mask = None

    @property
    def mask(self):
        if self._mask is None:
            self._mask = self.mask_fn(self.sizes)
        return self._mask

    @property
    def offsets(self) -> list[int]:
        out, o = [], 0
        for b, n in self.sizes:
            out.append(o)
            o += b * n
        return out

    def pack(self, groups: Sequence[Tensor]) -> Tensor:
        return torch.cat([g.reshape(1, -1, g.shape[-1]) for g in groups], dim=1)

    def unpack(self, x: Tensor) -> list[Tensor]:
        parts = x.split([b * n for b, n in self.sizes], dim=1)
        return [p.reshape(b, n, x.shape[-1]) for p, (b, n) in zip(parts, self.sizes)]


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
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, swiglu_hidden(dim, mlp_ratio), bias=ffn_bias)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r} (expected 'mlp', 'swiglu' or 'swiglufused')")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    def _attn_branch(self, x: Tensor, attn_mask=None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), attn_mask))

    def _ffn_branch(self, x: Tensor, attn_mask=None) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, packed: PackedLayout | None = None) -> Tensor:
        """``x``: ``[B, N, D]``, or a packed ``[1, T, D]`` sequence laid out as ``packed`` says."""
        drop = self.training and self.drop_path > 0.0
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


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        init_values: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        packed_attention: bool | str = False,
    ):
        super().__init__()
        if packed_attention not in (True, False, "auto"):
            raise ValueError(f"packed_attention must be True, False or 'auto', got {packed_attention!r}")
        self.packed_attention = packed_attention
        self._mask_cache: dict[tuple, Any] = {}
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.ffn_layer = ffn_layer
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(Block(embed_dim, num_heads, mlp_ratio, ffn_layer, init_values, drop_path_rate,
                                     qkv_bias, proj_bias, ffn_bias))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # set by build_backbone; used by save_backbone's sidecar
        self.arch: str | None = None
        self.build_overrides: dict[str, Any] = {}
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_drop_path(self, rate: float) -> None:
        for blk in self.blocks:
            blk.drop_path = rate

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        dtype = x.dtype
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and h == w:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = x.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        m = int(math.sqrt(n))
        assert m * m == n, "stored position embeddings must form a square grid"
        kwargs: dict[str, Any] = {}
        if self.interpolate_offset:
            kwargs["scale_factor"] = (float(h0 + self.interpolate_offset) / m, float(w0 + self.interpolate_offset) / m)
        else:
            kwargs["size"] = (h0, w0)
        patch_pos = F.interpolate(
            patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        assert patch_pos.shape[-2:] == (h0, w0)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        B, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x

    def _outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None):
        """Features of one batch (a dict) or of a list of batches with different crop sizes (a list of dicts)."""
        if isinstance(x, (list, tuple)):
            if masks is None:
                masks = [None] * len(x)
            assert len(masks) == len(x), "give one mask tensor (or None) per input batch"
            tokens = [self.prepare_tokens_with_masks(xi, mi) for xi, mi in zip(x, masks)]
            if self.uses_packing(tokens):
                layout = PackedLayout([t.shape[:2] for t in tokens], self._packed_mask_fn(tokens[0].device))
                seq = layout.pack(tokens)
                for blk in self.blocks:
                    seq = blk(seq, layout)
                tokens = layout.unpack(seq)
            else:
                for blk in self.blocks:
                    tokens = [blk(t) for t in tokens]
            return [self._outputs(t, m) for t, m in zip(tokens, masks)]
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._outputs(x, masks)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)["x_norm_clstoken"])

    # ------------------------------------------------------------------ packing
    def uses_packing(self, tokens: Sequence[Tensor]) -> bool:
        """Whether a list of token groups goes through the blocks packed (see the module docstring)."""
        if len(tokens) < 2 or self.packed_attention is False:
            return False
        return self.packed_attention is True or tokens[0].device.type == "cuda"

    def _packed_mask_fn(self, device: torch.device):
        flex = device.type == "cuda" and flex_attention is not None

        @torch.compiler.disable  # a cache lookup (and, rarely, a mask build): eager under torch.compile
        def mask_for(sizes: tuple[tuple[int, int], ...]):
            key = (sizes, str(device), flex)
            if key not in self._mask_cache:
                if len(self._mask_cache) >= 16:  # a handful of layouts per run (full, drop-path subset)
                    self._mask_cache.pop(next(iter(self._mask_cache)))
                self._mask_cache[key] = block_diagonal_mask(sizes, device, flex)
            return self._mask_cache[key]

        return mask_for

    def save_backbone(self, path: str | os.PathLike) -> None:
        save_backbone(self, path)


# ---------------------------------------------------------------------- architectures
ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch14": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch14": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2_patch14": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}
# The reference hub builds the registers models (``dinov2_vit*14_reg``) with ``interpolate_antialias=True,
# interpolate_offset=0.0`` (position embeddings resized to the exact target grid, antialiased when shrinking), the
# plain ones with the defaults (no antialias, offset 0.1): their features match the official ones only so.
for _name in list(ARCHS):
    ARCHS[_name + "_reg4"] = dict(ARCHS[_name], num_register_tokens=4, interpolate_antialias=True,
                                  interpolate_offset=0.0)


def build_backbone(name: str, **overrides: Any) -> VisionTransformer:
    """Build a named backbone (``vit_{tiny,small,base,large,giant2}_patch14[_reg4]``); keyword overrides win.

    ``img_size`` defaults to 224 (a 16x16 grid of stored position embeddings); give ``img_size=518`` to load the
    official pretrained files.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(ARCHS))}")
    kwargs: dict[str, Any] = dict(img_size=224, patch_size=14)
    kwargs.update(ARCHS[name])
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs)
    model.arch = name
    model.build_overrides = {k: v for k, v in overrides.items() if k != "img_size"}
    return model


def official_key_list(depth: int, ffn_layer: str = "mlp", num_register_tokens: int = 0) -> list[str]:
    """The state-dict keys of an official DINOv2 backbone file (order as the official files list them)."""
    keys = ["cls_token", "pos_embed"]
    if num_register_tokens:
        keys.append("register_tokens")
    keys += ["mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    ffn = ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    if ffn_layer != "mlp":
        ffn = ["mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"]
    for i in range(depth):
        p = f"blocks.{i}."
        keys += [p + k for k in ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                 "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias"]]
        keys += [p + k for k in ffn] + [p + "ls2.gamma"]
    return keys + ["norm.weight", "norm.bias"]


# ---------------------------------------------------------------------- export / import
def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


_RUNTIME_OPTIONS = ("drop_path_rate", "packed_attention")  # not part of the architecture: kept out of sidecars


def backbone_metadata(model: VisionTransformer) -> dict[str, Any]:
    return {
        "arch": model.arch,
        "img_size": model.img_size,
        "patch_size": model.patch_size,
        "num_register_tokens": model.num_register_tokens,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "ffn_layer": model.ffn_layer,
        "overrides": {k: v for k, v in model.build_overrides.items() if k not in _RUNTIME_OPTIONS},
    }


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_backbone(model: VisionTransformer, path: str | os.PathLike) -> Path:
    """Write ``path`` (official-layout fp32 state dict) and its JSON sidecar; returns the .pth path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_save(sd, path)
    meta = json.dumps(backbone_metadata(model), indent=2, sort_keys=True)
    side = sidecar_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(meta + "\n")
    os.replace(tmp, side)
    return path


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("module.", "backbone.", "teacher.backbone.", "student.backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def infer_arch(sd: dict[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """Guess the named architecture (and needed overrides) from an official-layout state dict."""
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    swiglu = "blocks.0.mlp.w12.weight" in sd
    patch = sd["patch_embed.proj.weight"].shape[-1]
    for name, spec in ARCHS.items():
        if name.endswith("_reg4"):
            continue
        if spec["embed_dim"] == dim:
            over: dict[str, Any] = {}
            if spec["depth"] != depth:
                over["depth"] = depth
            if swiglu != (spec.get("ffn_layer", "mlp") != "mlp"):
                over["ffn_layer"] = "swiglufused" if swiglu else "mlp"
            if patch != 14:
                over["patch_size"] = patch
            return (name + "_reg4" if regs == 4 else name), ({**over, "num_register_tokens": regs} if regs not in (0, 4) else over)
    raise ValueError(f"cannot infer the architecture of a checkpoint with embed_dim={dim}; pass arch=...")


def load_official_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    img_size: int | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    **overrides: Any,
) -> VisionTransformer:
    """Build a backbone and load a DINOv2 backbone file into it (strictly by default).

    Reads the JSON sidecar written by :func:`save_backbone` when present; otherwise ``arch`` (or shape inference)
    names the architecture and ``img_size`` defaults to the stored position-embedding grid times the patch size
    (518 for the official files).
    """
    path = Path(path)
    sd = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    side = sidecar_path(path)
    meta = json.loads(side.read_text()) if side.exists() else {}
    return backbone_from_official_state(sd, meta, arch, img_size, strict, **overrides)


def backbone_from_official_state(sd: dict[str, Tensor], meta: dict[str, Any] | None = None, arch: str | None = None,
                                 img_size: int | None = None, strict: bool = True,
                                 **overrides: Any) -> VisionTransformer:
    """:func:`load_official_checkpoint` on a state dict already in memory (``meta``: a sidecar's contents)."""
    sd = _strip_prefixes(dict(sd))
    meta = meta or {}
    kwargs: dict[str, Any] = {}
    if arch is None and meta.get("arch"):
        arch = meta["arch"]
        kwargs.update(meta.get("overrides", {}))
        kwargs["patch_size"] = meta.get("patch_size", 14)
    if arch is None:
        arch, inferred = infer_arch(sd)
        kwargs.update(inferred)
    kwargs.update(overrides)
    if img_size is None:
        patch = kwargs.get("patch_size", sd["patch_embed.proj.weight"].shape[-1])
        grid = int(round(math.sqrt(sd["pos_embed"].shape[1] - 1)))
        img_size = meta.get("img_size") or grid * patch
    model = build_backbone(arch, img_size=img_size, **kwargs)
    missing_unexpected = model.load_state_dict(sd, strict=strict)
    if not strict and (missing_unexpected.missing_keys or missing_unexpected.unexpected_keys):
        import warnings

        warnings.warn(f"backbone load: {missing_unexpected}")
    return model


load_backbone = load_official_checkpoint
