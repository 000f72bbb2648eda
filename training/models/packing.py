"""Packed multi-crop attention: several crop groups through each transformer block as one sequence.

For a list of crop groups (e.g. 2B global crops of 1+R+256 tokens and 8B local crops of 1+R+49 tokens) every
image's tokens are concatenated into one sequence ``[1, T, D]`` (:class:`PackedLayout`: group-major, image-major,
token order kept) and each block runs once on it. LayerNorm, the linear layers, the FFN and LayerScale are per
token; attention gets a block-diagonal mask (:func:`block_diagonal_mask`: token i may attend to token j iff both
belong to the same image), so the result equals the per-group forward.

The mask is a FlexAttention ``BlockMask`` (document-id ``mask_mod``) used with a compiled ``flex_attention`` on
CUDA; on CPU (FlexAttention has no CPU backward in this torch, and eager it materialises the scores anyway) it is
a boolean ``[T, T]`` mask for ``scaled_dot_product_attention``. The compiled FlexAttention functions of a model
live in its :class:`FlexKernels`; the model caches the masks per (group sizes, device)
(``VisionTransformer._packed_mask_fn``). Stochastic depth on a packed sequence: ``layers._packed_drop_path``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

try:  # FlexAttention (torch >= 2.5)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: packed attention uses the boolean-mask SDPA path
    BlockMask = create_block_mask = flex_attention = None

HAS_FLEX_ATTENTION = flex_attention is not None

__all__ = ["HAS_FLEX_ATTENTION", "FlexKernels", "PackedLayout", "block_diagonal_mask", "image_ids", "is_block_mask"]


class FlexKernels:
    """The FlexAttention functions one model calls: on CUDA compiled on first use and kept here (eager,
    ``flex_attention`` materialises the whole score matrix and ``create_block_mask`` the dense [T, T] mask); on
    other devices the eager ones. A model's blocks share one instance; a copy (``copy.deepcopy``, pickle) starts
    empty and compiles its own."""

    def __init__(self) -> None:
        self._compiled: dict[str, Callable] = {}

    def __reduce__(self):
        return (FlexKernels, ())

    def _kernel(self, eager: Callable, device: torch.device, **compile_kwargs: Any) -> Callable:
        if device.type != "cuda":
            return eager
        name = eager.__name__
        if name not in self._compiled:
            self._compiled[name] = torch.compile(eager, **compile_kwargs)
        return self._compiled[name]

    def attention(self, device: torch.device) -> Callable:
        """``flex_attention`` for inputs on ``device``."""
        return self._kernel(flex_attention, device, dynamic=False)

    def block_mask(self, device: torch.device) -> Callable:
        """``create_block_mask`` for masks on ``device``."""
        return self._kernel(create_block_mask, device)


def is_block_mask(mask: Any) -> bool:
    """Whether an attention mask is a FlexAttention ``BlockMask`` (else None or a boolean tensor)."""
    return HAS_FLEX_ATTENTION and isinstance(mask, BlockMask)


def image_ids(sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> Tensor:
    """Image index of every token of a packed sequence; ``sizes`` = (images, tokens per image) per group."""
    lengths = torch.tensor([n for b, n in sizes for _ in range(b)], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device=device, dtype=torch.int32)


def block_diagonal_mask(sizes: Sequence[tuple[int, int]], device: torch.device | str, flex: bool,
                        kernels: FlexKernels | None = None):
    """The packed sequence's attention mask: a FlexAttention ``BlockMask`` (``flex``) or a boolean [T, T] tensor.

    ``kernels``: the model's :class:`FlexKernels` (whose compiled ``create_block_mask`` builds the ``BlockMask`` on
    CUDA); without, a fresh one."""
    device = torch.device(device)
    ids = image_ids(sizes, device)
    if not flex:
        return ids[:, None] == ids[None, :]
    total = ids.numel()

    def same_image(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    return (kernels or FlexKernels()).block_mask(device)(same_image, None, None, total, total, device=device)


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
