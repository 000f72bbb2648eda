"""DINOv2-style Vision Transformer backbone (patch 14), and DINOv3-style ones (patch 16, rotary position
embeddings, 4 storage tokens), written for this project: the model, the named architectures (:data:`ARCHS`) and
:func:`build_backbone`.

Layers: ``training.models.layers``; packed multi-crop attention: ``training.models.packing``; the backbone file
format (official key names, ``lvd export``'s sidecar, loading official checkpoints): ``training.models.backbone_io``.

Decisions written down here:

* Position embeddings are interpolated like the reference (bicubic) from the stored grid ``M`` to the crop's grid;
  a crop whose grid equals the stored one uses them as is. Plain models: ``scale_factor = (grid + 0.1) / M``, no
  antialias; ``_reg4`` models (as the reference hub builds them): ``size = grid``, antialias on.
* ``pos_embed_type="rope"`` (the ``*_patch16_rope_reg4`` architectures): no stored position embeddings; each
  attention layer rotates the patch tokens' queries and keys by their grid position (``training.models.rope``:
  base 100, coordinates normalised to [-1, 1] per axis, so any resolution works without interpolation; coordinate
  shift / jitter / rescale augmentation in training mode only). Class and storage tokens are not rotated. These
  models never pack crop groups (each group's tables differ by grid); ``packed_attention`` is ignored for them.
  The DINOv3 layout also has no qkv bias and LayerNorm eps 1e-5.
* A list of crop groups goes through the blocks packed into one sequence (block-diagonal attention, see
  ``packing``) when ``packed_attention=True``, or ``"auto"`` and the inputs are on CUDA; a single tensor input is
  never packed. The model caches the block-diagonal masks per (group sizes, device) and owns the compiled
  FlexAttention functions its blocks share (:class:`~training.models.packing.FlexKernels`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, PatchEmbed
from .packing import HAS_FLEX_ATTENTION, FlexKernels, PackedLayout, block_diagonal_mask
from .rope import AxialRope

__all__ = ["VisionTransformer", "build_backbone", "ARCHS"]


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
        pos_embed_type: str = "learned",
        rope_base: float = 100.0,
        rope_shift: float | None = None,
        rope_jitter: float | None = None,
        rope_rescale: float | None = None,
        norm_eps: float = 1e-6,
        mask_token_std: float | None = None,
    ):
        super().__init__()
        if mask_token_std is not None and not (math.isfinite(mask_token_std) and mask_token_std >= 0):
            raise ValueError(f"mask_token_std must be a finite number >= 0, got {mask_token_std}")
        self.mask_token_std = mask_token_std
        if pos_embed_type not in ("learned", "rope"):
            raise ValueError(f"pos_embed_type must be 'learned' or 'rope', got {pos_embed_type!r}")
        if packed_attention not in (True, False, "auto"):
            raise ValueError(f"packed_attention must be True, False or 'auto', got {packed_attention!r}")
        self.packed_attention = packed_attention
        self._mask_cache: dict[tuple, Any] = {}  # block-diagonal masks per layout (_packed_mask_fn)
        self.flex_kernels = FlexKernels()  # the compiled FlexAttention functions, shared by the blocks
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
        self.pos_embed_type = pos_embed_type
        if pos_embed_type == "rope":
            self.pos_embed = None
            self.rope = AxialRope(embed_dim // num_heads, rope_base, rope_shift, rope_jitter, rope_rescale)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
            self.rope = None
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(Block(embed_dim, num_heads, mlp_ratio, ffn_layer, init_values, drop_path_rate,
                                     qkv_bias, proj_bias, ffn_bias, kernels=self.flex_kernels, norm_eps=norm_eps,
                                     num_prefix_tokens=1 + num_register_tokens))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # set by build_backbone; used by backbone_io.save_backbone's sidecar
        self.arch: str | None = None
        self.build_overrides: dict[str, Any] = {}
        self.init_weights()

    def init_weights(self) -> None:
        # DINOv2 gives the class / register tokens std 1e-6 (its position embeddings set their scale); DINOv3's
        # RoPE models have no position embedding on them and use std 0.02 (a token of ~1e-6 going into
        # LayerNorm gets gradients ~1e6 times its size).
        token_std = 1e-6
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            token_std = 0.02
        nn.init.normal_(self.cls_token, std=token_std)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=token_std)
        # The mask token: zeros in both references. With a learned position embedding a masked token is
        # mask + position, never zero. Without one (RoPE), a masked token is exactly the zero vector; at init
        # (zero biases) the FFN maps zero to zero, so the token stays zero through every block whose attention
        # branch stochastic depth skipped for its image, and a shallow model skips all of them for some image
        # every few steps (depth 2, batch 8, drop path 0.1: one image in eight per block). The iBOT head then
        # L2-normalises an exact zero, whose gradient is 1 / eps = 1e12: the step's gradient norm explodes (and
        # with LayerScale 1e-5 a ~1e-5 token gets LayerNorm's 1 / sqrt(eps) = 1e3 amplification). So RoPE models
        # start their mask token at std 0.02, as their class and storage tokens; ``mask_token_std=0`` restores
        # the references' zeros.
        mask_std = self.mask_token_std if self.mask_token_std is not None else (0.0 if self.pos_embed is not None
                                                                                else 0.02)
        if mask_std > 0:
            nn.init.normal_(self.mask_token, std=mask_std)
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
        if self.pos_embed is not None:
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
                ropes = [self.rope_tables(xi) for xi in x]
                for blk in self.blocks:
                    tokens = [blk(t, rope=r) for t, r in zip(tokens, ropes)]
            return [self._outputs(t, m) for t, m in zip(tokens, masks)]
        rope = self.rope_tables(x)
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x, rope=rope)
        return self._outputs(x, masks)

    def rope_tables(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The rotary ``(sin, cos)`` tables for image batch ``x``'s patch grid (one augmentation draw), or None."""
        if self.rope is None:
            return None
        return self.rope(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)["x_norm_clstoken"])

    # ------------------------------------------------------------------ packing
    def uses_packing(self, tokens: Sequence[Tensor]) -> bool:
        """Whether a list of token groups goes through the blocks packed (see the module docstring)."""
        if len(tokens) < 2 or self.packed_attention is False or self.rope is not None:
            return False
        return self.packed_attention is True or tokens[0].device.type == "cuda"

    def _packed_mask_fn(self, device: torch.device):
        flex = device.type == "cuda" and HAS_FLEX_ATTENTION

        @torch.compiler.disable  # a cache lookup (and, rarely, a mask build): eager under torch.compile
        def mask_for(sizes: tuple[tuple[int, int], ...]):
            key = (sizes, str(device), flex)
            if key not in self._mask_cache:
                if len(self._mask_cache) >= 16:  # a handful of layouts per run (full, drop-path subset)
                    self._mask_cache.pop(next(iter(self._mask_cache)))
                self._mask_cache[key] = block_diagonal_mask(sizes, device, flex, self.flex_kernels)
            return self._mask_cache[key]

        return mask_for


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


# DINOv3's layout (as its ViT-S/B/L 16 backbones are defined): patch 16, rotary position embeddings of base 100,
# 4 storage tokens, no qkv bias, LayerNorm eps 1e-5, LayerScale 1e-5; coordinate rescale augmentation of factor 2
# in training (DINOv3's pretraining configs).
for _size, _dims in (("tiny", ARCHS["vit_tiny_patch14"]), ("small", ARCHS["vit_small_patch14"]),
                     ("base", ARCHS["vit_base_patch14"]), ("large", ARCHS["vit_large_patch14"])):
    ARCHS[f"vit_{_size}_patch16_rope_reg4"] = dict(
        _dims, patch_size=16, pos_embed_type="rope", rope_base=100.0, rope_rescale=2.0, num_register_tokens=4,
        qkv_bias=False, norm_eps=1e-5)


def build_backbone(name: str, **overrides: Any) -> VisionTransformer:
    """Build a named backbone (``vit_{tiny,small,base,large,giant2}_patch14[_reg4]``,
    ``vit_{tiny,small,base,large}_patch16_rope_reg4``); keyword overrides win.

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
