"""Image embedders for the embed stage: any timm model, our trainer's exported backbone, or a fixed pixel function.

``build_embedder(cfg.embed)`` returns an :class:`Embedder` with two halves:

* ``preprocess(image) -> uint8 tensor [3, S, S]``: resize the short side to ``img_size`` (bicubic) and take the
  centre crop.  It is plain, picklable CPU work, run inside DataLoader worker processes; the result stays uint8 so
  the host-to-device copy is 4x smaller than float32.
* ``embed(batch_uint8) -> float32 numpy [B, D]``: on the model's device, scale to [0, 1], normalise with the
  model's mean/std (ImageNet for our models and timm ViTs), run the backbone (bf16 autocast on CUDA, fp32 on CPU),
  pool, L2-normalise.

Pooling (``embed.pooling``): ``cls`` = the class token (for models without one, timm's own head pooling);
``mean`` = the mean of the patch tokens (spatial mean of a CNN's feature map); ``both`` = the two, each
L2-normalised, concatenated (the DINOv2 linear-probe feature), then L2-normalised again so cosine similarity
weights the halves equally.

Models (``embed.model``):

* a timm model name, built with ``pretrained=False`` (no hub access, ever) and weights from ``embed.checkpoint``;
  ViTs get ``img_size`` (and DINOv2-style ViTs ``dynamic_img_size=True``, whose default grid is 518 px).  A
  checkpoint in another layout (an official DINOv2 file for a ``*_dinov2`` timm model) goes through the timm
  module's ``checkpoint_filter_fn``, which renames keys and resamples position embeddings.
* ``lvd``: a backbone exported by our trainer (``backbone.pth`` + ``backbone.json`` sidecar) or an official DINOv2
  backbone file (architecture inferred from the tensors), loaded by
  :func:`training.models.backbone_io.load_official_checkpoint`; position embeddings are interpolated to
  the crop size.
* ``pixels``: a fixed function of pixels with known behaviour, for tests and the demo (random-weight ViTs map
  every image to nearly the same vector).  See :class:`PixelDescriptor`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device is 'cuda' but no CUDA device is visible")
    return torch.device(device)


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then crop the central size x size square."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if scale > 0.5 else 3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


class Preprocess:
    """PIL RGB image -> uint8 CHW tensor of img_size x img_size (picklable: it runs in DataLoader workers)."""

    def __init__(self, img_size: int):
        self.img_size = img_size

    def __call__(self, im: Image.Image) -> torch.Tensor:
        im = resize_center_crop(im, self.img_size)
        arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class PixelDescriptor(nn.Module):
    """A fixed, weight-free descriptor of pixels for tests and the demo, whose quality is measured there
    (precision@4 of sample-based retrieval on the demo corpus, tests/curation/test_retrieve.py):

    * a joint RGB colour histogram of the centre crop (``bins`` levels per channel), square-rooted (Hellinger) and
      L2-normalised: robust to layout changes, sharp on small hue differences;
    * plus, at weight ``thumb_weight``, a ``grid`` x ``grid`` colour thumbnail (channel-mean-free detail and the
      channel means), L2-normalised: coarse layout.

    Chosen by measurement on the demo corpus: a thumbnail alone gets ~0.6-0.8 precision@4 (sibling anchors of a
    concept differ mostly in hue), the histogram ~1.0 / 0.97 on the two anchor sets."""

    def __init__(self, bins: int = 12, grid: int = 4, thumb_weight: float = 0.5):
        super().__init__()
        self.bins, self.grid, self.thumb_weight = bins, grid, thumb_weight
        self.num_features = bins ** 3 + 3 * grid * grid + 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: float [B, 3, S, S] in [0, 1]
        b = self.bins
        q = (x * 255.0).round().clamp(0, 255).long() * b // 256  # [B, 3, S, S] bin per channel
        idx = (q[:, 0] * b * b + q[:, 1] * b + q[:, 2]).flatten(1)
        hist = torch.zeros(x.shape[0], b ** 3, device=x.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        hist = F.normalize(hist.sqrt(), dim=1)
        t = F.adaptive_avg_pool2d(x, self.grid)
        means = t.mean(dim=(2, 3))
        thumb = torch.cat([(t - means[:, :, None, None]).flatten(1), means * 2.0 * self.grid], dim=1)
        return torch.cat([hist, self.thumb_weight * F.normalize(thumb, dim=1)], dim=1)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _is_dinov2_name(name: str) -> bool:
    return "dinov2" in name or "reg4" in name or "patch14" in name


def _build_timm(name: str, img_size: int, checkpoint: Path | None) -> nn.Module:
    import sys

    import timm

    attempts = []
    if _is_dinov2_name(name):
        attempts.append(dict(img_size=img_size, dynamic_img_size=True))
    attempts += [dict(img_size=img_size), {}]
    last_err = None
    model = None
    for kw in attempts:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
            break
        except TypeError as err:  # models without img_size / dynamic_img_size (CNNs)
            last_err = err
    if model is None:
        raise last_err
    if checkpoint is not None:
        sd = _load_state_dict(Path(checkpoint))
        module = sys.modules.get(type(model).__module__)
        filt = getattr(module, "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                sd = filt(sd, model)
            except Exception:  # noqa: BLE001 - a checkpoint already in the model's own layout
                pass
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
        res = model.load_state_dict(sd, strict=False)
        missing = [k for k in res.missing_keys if not k.startswith(("head", "fc.", "classifier"))]
        if missing or res.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {checkpoint} does not fit timm model {name!r}: missing {missing[:8]}, "
                f"unexpected {res.unexpected_keys[:8]}"
            )
    return model


class Embedder:
    def __init__(self, model: nn.Module, kind: str, img_size: int, pooling: str, device: torch.device,
                 precision: str = "auto", mean=IMAGENET_MEAN, std=IMAGENET_STD, num_prefix_tokens: int = 1):
        self.model = model.eval().to(device)
        self.kind = kind  # "timm", "lvd" or "pixels"
        self.img_size = img_size
        self.pooling = pooling
        self.device = device
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        self.precision = precision
        self.num_prefix_tokens = num_prefix_tokens
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.preprocess = Preprocess(img_size)
        for p in self.model.parameters():
            p.requires_grad_(False)
        with torch.inference_mode():
            self.dim = int(self._forward(torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8)).shape[1])

    # ---------------------------------------------------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "pixels":
            return self.model(x / 255.0)
        x = (x - self.mean) / self.std
        m = self.model
        if self.kind == "lvd":
            out = m.forward_features(x)
            cls, patch = out["x_norm_clstoken"], out["x_norm_patchtokens"]
            return self._pool(cls, patch.mean(dim=1))
        feats = m.forward_features(x)
        if feats.ndim == 3:  # token sequence (ViT-like)
            npt = getattr(m, "num_prefix_tokens", self.num_prefix_tokens)
            has_cls = getattr(m, "cls_token", None) is not None
            cls = feats[:, 0] if has_cls else m.forward_head(feats, pre_logits=True)
            patch = feats[:, npt:].mean(dim=1)
            return self._pool(cls, patch)
        if feats.ndim == 4:  # CNN feature map
            return self._pool(m.forward_head(feats, pre_logits=True), feats.mean(dim=(2, 3)))
        return feats

    def _pool(self, cls: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return cls
        if self.pooling == "mean":
            return mean
        return torch.cat([F.normalize(cls.float(), dim=1), F.normalize(mean.float(), dim=1)], dim=1)

    def _forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.to(self.device, non_blocking=True).float()
        if self.precision == "bf16" and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                f = self._features(x)
        else:
            f = self._features(x)
        return F.normalize(f.float(), dim=1)

    @torch.inference_mode()
    def embed(self, x_uint8: torch.Tensor) -> np.ndarray:
        """uint8 [B, 3, S, S] -> L2-normalised float32 [B, D] (numpy)."""
        if x_uint8.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._forward(x_uint8).cpu().numpy().astype(np.float32, copy=False)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed(torch.stack([self.preprocess(im) for im in images]))


def build_embedder(cfg, device: str | None = None) -> Embedder:
    """Build the embedder an EmbedConfig describes (see the module docstring)."""
    dev = resolve_device(device or cfg.device)
    precision = getattr(cfg, "precision", "auto")
    name = cfg.model
    if name == "pixels":
        return Embedder(PixelDescriptor(getattr(cfg, "pixel_bins", 12)), "pixels", cfg.img_size, "cls", dev, "fp32")
    if name == "lvd":
        if cfg.checkpoint is None:
            raise ValueError("embed.model 'lvd' needs embed.checkpoint: a backbone exported by `lvd export` "
                             "(backbone.pth + backbone.json) or an official DINOv2 backbone file")
        from training.models.backbone_io import load_official_checkpoint

        model = load_official_checkpoint(cfg.checkpoint)
        return Embedder(model, "lvd", cfg.img_size, cfg.pooling, dev, precision,
                        num_prefix_tokens=1 + getattr(model, "num_register_tokens", 0))
    model = _build_timm(name, cfg.img_size, cfg.checkpoint)
    data_cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(data_cfg.get("mean", IMAGENET_MEAN))
    std = tuple(data_cfg.get("std", IMAGENET_STD))
    return Embedder(model, "timm", cfg.img_size, cfg.pooling, dev, precision, mean, std)


_CACHE: dict[str, Embedder] = {}


def cached_embedder(cfg) -> Embedder:
    """One embedder per config per process: Ray reuses worker processes across unit tasks, so a ViT-H is built
    and moved to the GPU once per worker, not once per shard."""
    key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_embedder(cfg)
    return _CACHE[key]


def describe(emb: Embedder) -> dict[str, Any]:
    return {"kind": emb.kind, "dim": emb.dim, "device": str(emb.device), "precision": emb.precision,
            "img_size": emb.img_size, "pooling": emb.pooling}
