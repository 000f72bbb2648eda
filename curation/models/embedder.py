"""Image embedders: a model (or a fixed pixel function) with its preprocessing, for the embed stage (retrieval
embeddings) and the sscd stage (copy-detection descriptors).  Every image goes through one pipeline
(:mod:`curation.models.describe`); an :class:`Embedder` has two halves:

* ``preprocess(image) -> tensor``: plain, picklable CPU work run inside DataLoader worker processes.  For models
  the result stays uint8, so the host-to-device copy is 4x smaller than float32.
* ``embed(batch) -> float32 numpy [B, D]``: on the model's device, scale and normalise, run the model (bf16
  autocast on CUDA when the precision allows it, fp32 on CPU), pool, L2-normalise.

Retrieval embedders, :func:`build_embedder` from the ``embed`` settings (``embed.model``):

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

Their preprocessing resizes the short side to ``img_size`` (bicubic) and takes the centre crop; models normalise
with their mean/std (ImageNet for our models and timm ViTs).  Pooling (``embed.pooling``): ``cls`` = the class
token (for models without one, timm's own head pooling); ``mean`` = the mean of the patch tokens (spatial mean of a
CNN's feature map); ``both`` = the two, each L2-normalised, concatenated (the DINOv2 linear-probe feature), then
L2-normalised again so cosine similarity weights the halves equally.

Copy-detection descriptors, :func:`build_copy_embedder` from the ``sscd`` settings: the SSCD model
(:class:`SSCDEmbedder`, :mod:`curation.models.sscd`) or the fixed pixel descriptor (:class:`CopyPixelEmbedder`).
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from curation.cluster import gpu

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """An image embedder in two halves: ``preprocess`` (PIL image -> tensor; plain, picklable CPU work that runs in
    DataLoader workers) and :meth:`embed` (a batch of preprocessed images -> L2-normalised float32 rows, on
    ``device``, under bf16 autocast on CUDA when ``precision`` says so).  Subclasses give :meth:`_features`.

    ``uses_model``: whether the forward is model work (the CPU core split of :func:`curation.models.describe.loader_plan`
    gives a model the task's cores; a pixel function is decode-bound); ``max_batch``: the largest batch its
    preprocessed images can form (None: any); ``cpu_max_batch``: on CPU, the batch beyond which it gains nothing."""

    kind: str
    uses_model = True
    max_batch: int | None = None
    cpu_max_batch: int | None = None

    def __init__(self, model: nn.Module | None, preprocess, device: torch.device, precision: str = "auto",
                 img_size: int = 224):
        self.model = model.eval().to(device) if model is not None else None
        self.preprocess = preprocess
        self.device = device
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        self.precision = precision
        self.img_size = img_size
        for p in self.model.parameters() if self.model is not None else ():
            p.requires_grad_(False)

    @cached_property
    def dim(self) -> int:
        """Length of a vector (from a blank image, computed once when first asked)."""
        return int(self.embed_images([Image.new("RGB", (self.img_size, self.img_size))]).shape[1])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 255] on the device -> features [B, D] (normalised by :meth:`_forward`)."""
        raise NotImplementedError

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).float()
        bf16 = self.precision == "bf16" and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            f = self._features(x)
        return F.normalize(f.float(), dim=1)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """A batch of preprocessed images -> L2-normalised float32 [B, D] (numpy)."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._forward(batch).cpu().numpy().astype(np.float32, copy=False)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        xs = [self.preprocess(im) for im in images]
        return self.embed(torch.from_numpy(np.stack(xs)) if isinstance(xs[0], np.ndarray) else torch.stack(xs))


class BackboneEmbedder(Embedder):
    """A timm model or our trainer's backbone (``kind`` 'timm' or 'lvd'): uint8 centre crops, normalised with the
    model's mean/std on the device, pooled as ``pooling`` says."""

    def __init__(self, model: nn.Module, kind: str, img_size: int, pooling: str, device: torch.device,
                 precision: str = "auto", mean=IMAGENET_MEAN, std=IMAGENET_STD, num_prefix_tokens: int = 1):
        super().__init__(model, Preprocess(img_size), device, precision, img_size)
        self.kind = kind
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0

    def _features(self, x: torch.Tensor) -> torch.Tensor:
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


class PixelEmbedder(Embedder):
    """``embed.model: pixels``: :class:`PixelDescriptor` of the uint8 centre crop (fp32, on the CPU)."""

    kind = "pixels"
    uses_model = False

    def __init__(self, bins: int, img_size: int, device: torch.device):
        super().__init__(PixelDescriptor(bins), Preprocess(img_size), device, "fp32", img_size)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x / 255.0)


# On CPU, SSCD batches beyond this add memory, not speed (ResNet-50 at 320 px, 2 cores: batch 1 0.27, 4 0.70,
# 8 0.70 img/s)
CPU_BATCH = 8


class SSCDEmbedder(Embedder):
    """The SSCD copy-detection model (:mod:`curation.models.sscd`): uint8 images resized by
    :class:`~curation.models.sscd.SSCDPreprocess`, normalised on the device, channels-last on CUDA when asked.
    ``short288`` images differ in size, so they go one per batch; on CPU batches hold at most :data:`CPU_BATCH`."""

    kind = "sscd"
    cpu_max_batch = CPU_BATCH

    def __init__(self, model: nn.Module, preprocess: str, device: torch.device, precision: str = "auto",
                 channels_last: bool = False):
        from curation.models.sscd import SSCDPreprocess

        size = 320 if preprocess == "square320" else 288
        super().__init__(model, SSCDPreprocess(preprocess), device, precision, size)
        self.max_batch = 1 if preprocess == "short288" else None
        self.channels_last = channels_last and device.type == "cuda"
        if self.channels_last and not isinstance(self.model, torch.jit.ScriptModule):
            self.model = self.model.to(memory_format=torch.channels_last)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        from curation.models.sscd import sscd_normalise

        x = sscd_normalise(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


class CopyPixelEmbedder(Embedder):
    """``sscd.descriptor: pixels``: :func:`curation.models.sscd.pixel_descriptor`, computed whole in
    ``preprocess`` (in the DataLoader workers); the forward passes its unit rows through unchanged."""

    kind = "copy_pixels"
    uses_model = False

    def __init__(self):
        from curation.models.sscd import PIXEL_GRID, pixel_descriptor

        super().__init__(None, pixel_descriptor, torch.device("cpu"), "fp32", PIXEL_GRID)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.float()


def build_embedder(settings, device: str | None = None) -> Embedder:
    """Build the embedder the embed settings (an EmbedConfig) describe (see the module docstring)."""
    dev = torch.device(gpu.resolve(device or settings.device, "embed.device"))
    precision = getattr(settings, "precision", "auto")
    name = settings.model
    if name == "pixels":
        return PixelEmbedder(getattr(settings, "pixel_bins", 12), settings.img_size, dev)
    if name == "lvd":
        if settings.checkpoint is None:
            raise ValueError("embed.model 'lvd' needs embed.checkpoint: a backbone exported by `lvd export` "
                             "(backbone.pth + backbone.json) or an official DINOv2 backbone file")
        from training.models.backbone_io import load_official_checkpoint

        model = load_official_checkpoint(settings.checkpoint)
        return BackboneEmbedder(model, "lvd", settings.img_size, settings.pooling, dev, precision,
                                num_prefix_tokens=1 + getattr(model, "num_register_tokens", 0))
    model = _build_timm(name, settings.img_size, settings.checkpoint)
    data_cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(data_cfg.get("mean", IMAGENET_MEAN))
    std = tuple(data_cfg.get("std", IMAGENET_STD))
    return BackboneEmbedder(model, "timm", settings.img_size, settings.pooling, dev, precision, mean, std)


def build_copy_embedder(settings) -> Embedder:
    """Build the copy-detection descriptor the sscd settings (an SSCDConfig) describe: ``descriptor`` 'sscd' (the
    SSCD model from ``weights``; random weights, with a warning, when null) or 'pixels'."""
    if settings.descriptor == "pixels":
        return CopyPixelEmbedder()
    if settings.descriptor != "sscd":
        raise ValueError(f"unknown descriptor {settings.descriptor!r}")
    from curation.models.sscd import build_sscd_random, load_sscd

    dev = torch.device(gpu.resolve(settings.device, "sscd.device"))
    if settings.weights is None:
        warnings.warn("sscd.weights is null: random SSCD weights (meaningless descriptors; testing only)")
        model = build_sscd_random(0)
    else:
        model = load_sscd(settings.weights, dev)
    return SSCDEmbedder(model, settings.preprocess, dev, settings.precision, settings.channels_last)
