"""The backbone file format: what ``lvd export`` writes and the curation embedder reads, and the official DINOv2
backbone files.

Parameter names follow the official DINOv2 backbone files exactly, so an official
``dinov2_vits14_pretrain.pth`` loads with ``load_state_dict(strict=True)`` into
``build_backbone("vit_small_patch14", img_size=518)`` (:func:`official_key_list`)::

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

``save_backbone(model, "backbone.pth")`` writes

* ``backbone.pth``: a plain ``torch.save``-d state dict with exactly the official key names above
  (no prefixes, no head parameters, fp32 tensors), loadable into the official DINOv2 code as well;
* ``backbone.json`` (sidecar, same stem): ``{"arch": "vit_small_patch14", "img_size": 224,
  "patch_size": 14, "num_register_tokens": 0, "embed_dim": 384, "depth": 12, "num_heads": 6,
  "ffn_layer": "mlp", "overrides": {...}}``; ``overrides`` holds the keyword arguments that were given
  to :func:`~training.models.vision_transformer.build_backbone` beyond the named architecture (e.g. a tiny test
  model's depth), except the runtime options (drop path, packed attention).

``load_official_checkpoint(path, arch=None, img_size=None)`` reads such a pair, or an official ``.pth``
without a sidecar (then ``arch`` names the architecture; when it is missing too the architecture is inferred
from the tensor shapes: width, depth, FFN type, register count, position-embedding grid).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .vision_transformer import ARCHS, VisionTransformer, build_backbone

__all__ = ["save_backbone", "load_official_checkpoint", "backbone_from_official_state", "backbone_metadata",
           "sidecar_path", "official_key_list", "infer_arch"]


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
        if "pos_embed" in sd:
            grid = int(round(math.sqrt(sd["pos_embed"].shape[1] - 1)))
            img_size = meta.get("img_size") or grid * patch
        else:  # RoPE backbones store no position grid: any size works, the sidecar's is kept
            img_size = meta.get("img_size") or 224
    model = build_backbone(arch, img_size=img_size, **kwargs)
    missing_unexpected = model.load_state_dict(sd, strict=strict)
    if not strict and (missing_unexpected.missing_keys or missing_unexpected.unexpected_keys):
        warnings.warn(f"backbone load: {missing_unexpected}")
    return model
