"""The SSCD copy-detection descriptor (Pizzi et al., CVPR 2022), and a fixed pixel descriptor for tests and the demo.

SSCD ``sscd_disc_mixup``: a torchvision ResNet-50 trunk whose ``avgpool`` is GeM pooling with p = 3 (clamp 1e-6)
and whose ``fc`` is the Linear(2048, 512) projection, followed by L2 normalisation.  :func:`load_sscd` loads the
official files:

* ``sscd_disc_mixup.torchscript.pt`` - a standalone TorchScript module (``torch.jit.load``);
* ``sscd_disc_mixup.torchvision.pt`` - a state dict of that torchvision ResNet-50 (keys ``conv1.weight`` ...
  ``fc.weight`` [512, 2048]; a ``backbone.`` or ``module.`` prefix, as saved from SSCD's ``Model`` wrapper or DDP,
  is accepted).  GeM has no parameter (p is fixed), so the state dict holds none for it.

Both give a module mapping a normalised image batch (N, 3, H, W) to (N, 512) unit vectors.  Preprocessing
(:func:`sscd_transform`): ``square320`` resizes to 320 x 320 ignoring the aspect ratio (batchable, the GPU
default, as the SSCD authors recommend for copy detection) or ``short288`` resizes the shorter side to 288 keeping
the aspect (variable sizes, so batch 1); both with ImageNet mean/std.

:func:`pixel_descriptor` is a fixed function of the pixels (no weights) used when ``sscd.descriptor: pixels``.
Licence: the SSCD code and the model files it releases (facebookresearch/sscd-copy-detection, whose README links
every ``.torchvision.pt`` / ``.torchscript.pt`` file) are under the MIT licence: the repository moved from
CC-BY-NC 4.0 to MIT in 2022 (its README's "License" section and LICENSE file).  The weights were trained on the
DISC2021 images, whose own terms are a separate matter.  This module is our own code, written from the paper and
the file layouts above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSCD_DIM = 512


class GeM(nn.Module):
    """Generalised-mean pooling over H x W with a fixed p (SSCD's GlobalGeMPool2d): (N, C, H, W) -> (N, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).clamp(min=self.eps)
        # the power mean in fp32: under bf16 autocast x**3 loses too much precision
        return x.float().pow(self.p).mean(dim=2).pow(1.0 / self.p)


class SSCDResNet50(nn.Module):
    """torchvision ResNet-50 with GeM(p=3) pooling, fc 2048 -> 512 and L2 normalisation."""

    def __init__(self, dims: int = SSCD_DIM, p: float = 3.0):
        super().__init__()
        import torchvision

        self.backbone = torchvision.models.resnet50(weights=None, num_classes=dims)
        self.backbone.avgpool = GeM(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x).float(), dim=1)


def build_sscd_random(seed: int = 0) -> SSCDResNet50:
    """An SSCD-architecture model with deterministic random weights (tests, benchmarks); leaves the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SSCDResNet50()
    return model.eval()


def _strip_prefixes(state: dict) -> dict:
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_sscd(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load ``*.torchscript.pt`` (TorchScript) or ``*.torchvision.pt`` (state dict) into an eval-mode module."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SSCD weights not found: {path}")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except RuntimeError as jit_err:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{path}: neither a TorchScript module ({jit_err}) nor a state dict ({err})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        state = _strip_prefixes(state)
        fc = state.get("fc.weight")
        if fc is None or tuple(fc.shape)[1] != 2048:
            raise ValueError(f"{path}: not a torchvision ResNet-50 SSCD state dict (no fc.weight [dims, 2048])")
        model = SSCDResNet50(dims=fc.shape[0])
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("avgpool.")]
        if missing or unexpected:
            raise ValueError(f"{path}: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model = model.to(device)
    return model.eval()


def sscd_transform(mode: str = "square320"):
    """PIL RGB image -> normalised float tensor (3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def apply(im: Image.Image) -> torch.Tensor:
        if mode == "square320":
            im = im.resize((320, 320), Image.Resampling.BILINEAR, reducing_gap=None)
        elif mode == "short288":
            w, h = im.size
            s = 288 / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
        else:
            raise ValueError(f"unknown SSCD preprocessing {mode!r}")
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - mean) / std

    return apply


# ---------------------------------------------------------------------------------------------------------------
# the pixel descriptor

PIXEL_GRID = 24  # cells per side of the centre region
PIXEL_CENTRE = 0.85  # the central 85% x 85% of the image (drops borders that crops remove, and corner overlays)
PIXEL_SIGMA = 3.0  # Gaussian sigma (cells) of the low-pass that is subtracted


def pixel_descriptor(im: Image.Image, grid: int = PIXEL_GRID, centre: float = PIXEL_CENTRE,
                     sigma: float = PIXEL_SIGMA) -> np.ndarray:
    """A fixed, weight-free copy descriptor: the flip-symmetrised, high-passed colour thumbnail of the centre.

    Steps: take the central `centre` fraction of each side; area-resize it to `grid` x `grid` (JPEG noise, resizing
    and small text average out); average it with its horizontal mirror (a horizontal flip gives the same vector);
    subtract a Gaussian low-pass (sigma `sigma` cells) per channel, which removes brightness shifts and the smooth
    gradients that make unrelated images look alike; L2-normalise (a flat image gives the zero vector, similar to
    nothing).  float32 of length 3 * grid**2.

    Measured on the demo corpus (tests/curation/test_sscd.py): resize, JPEG, colour, flip and text copies >= 0.93,
    crops of 85-95% area >= 0.64, evaluation-set copies >= 0.89, unrelated pool/eval pairs <= 0.45; siblings of one
    periodic-pattern anchor (random phase, +-7% frequency) can reach 0.9: a crop shifts the phase just as much,
    so no shift-tolerant pixel function separates those two."""
    from scipy.ndimage import gaussian_filter

    w, h = im.size
    mx, my = (1 - centre) / 2 * w, (1 - centre) / 2 * h
    box = (mx, my, w - mx, h - my)
    small = im.convert("RGB").resize((grid * 4, grid * 4), Image.Resampling.BOX, box=box)
    small = small.resize((grid, grid), Image.Resampling.BOX)
    x = np.asarray(small, dtype=np.float32) / 255.0
    x = 0.5 * (x + x[:, ::-1])
    x = x - gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest")
    v = x.ravel()
    n = float(np.linalg.norm(v))
    return (v / n if n > 1e-3 else np.zeros_like(v)).astype(np.float32)
