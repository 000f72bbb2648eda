"""DINOv2 multi-crop augmentation with explicit, seedable random decisions.

Per image: 2 global crops (224 px, scale 0.32-1.0) and 8 local crops (98 px, scale 0.05-0.32), bicubic
random-resized crops; horizontal flip p=0.5; colour jitter (brightness 0.4, contrast 0.4, saturation 0.2,
hue 0.1, in random order as torchvision does) with p=0.8; grayscale p=0.2; Gaussian blur (kernel 9,
sigma 0.1-2.0) with p=1.0 on global 1, 0.1 on global 2, 0.5 on local crops (the paper's intent; the reference
code swaps them by mistake); solarize (threshold 128) p=0.2 on global 2 only; ImageNet normalisation.
Beyond the reference, off by default: a random RGB channel order and per-channel inversion per crop
(``channel_permute_p``, ``channel_invert_p``), for data whose crops all share one colour that would otherwise be
the easiest thing to match them by.

Every random draw comes from a ``random.Random`` passed in (or seeded per sample by the data pipeline), so
a given (seed, sample position) always gives the same crops: this is what makes resume exact and lets the
tests count the decisions (``return_decisions=True``).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .config import CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["AugmentConfig", "ViewSpec", "MultiCropAugmentation", "IMAGENET_MEAN", "IMAGENET_STD"]


def gaussian_blur(img: Image.Image, kernel_size: int, sigma: float) -> Image.Image:
    """torchvision's ``gaussian_blur`` on a PIL image (a ``kernel_size`` Gaussian of ``sigma``, reflect padding,
    rounded back to uint8) as two float32 1-D passes in OpenCV: the 2-D kernel is the outer product of the 1-D one,
    so results agree up to float rounding (a few pixels in a million differ by 1) at about 1/15 of the time; the
    blur was the largest cost of the multi-crop augmentation."""
    import cv2

    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size)  # the same kernel values as torchvision computes
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = (k1 / k1.sum()).numpy().astype(np.float32)
    out = cv2.sepFilter2D(np.asarray(img, dtype=np.float32), -1, k1, k1, borderType=cv2.BORDER_REFLECT_101)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode=img.mode)


def recolour_channels(img: Image.Image, order: list[int] | None, invert: list[bool] | None) -> Image.Image:
    """``img`` (RGB) with its channels taken in ``order`` (output channel i is input channel ``order[i]``) and
    output channel i inverted (255 - v) where ``invert[i]``; ``None``: that step off. Exact on uint8."""
    if (order is None or order == [0, 1, 2]) and not (invert and any(invert)):
        return img
    a = np.asarray(img)
    if order is not None:
        a = a[..., order]
    if invert is not None and any(invert):
        a = np.where(np.asarray(invert, dtype=bool), 255 - a, a)
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), mode="RGB")


@dataclass
class ViewSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


class AugmentConfig(CropsConfig):
    """The trainer's ``crops`` section (:class:`training.config.CropsConfig`: sizes, scales and probabilities;
    ``blur_p`` is global 1, global 2, local; solarize applies to global 2 only) plus the fixed parts of the recipe.
    ``AugmentConfig(**cfg.crops.model_dump())`` is the augmentation a config describes."""

    blur_kernel_size: int = 9
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _rrc_params(rng: random.Random, width: int, height: int, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCropAugmentation:
    def __init__(self, cfg: AugmentConfig | None = None, **kwargs: Any):
        cfg = cfg or AugmentConfig(**kwargs)
        self.cfg = cfg
        g1 = ViewSpec(cfg.global_crops_size, tuple(cfg.global_crops_scale), cfg.blur_p[0], 0.0)
        g2 = ViewSpec(cfg.global_crops_size, tuple(cfg.global_crops_scale), cfg.blur_p[1], cfg.solarize_p)
        loc = ViewSpec(cfg.local_crops_size, tuple(cfg.local_crops_scale), cfg.blur_p[2], 0.0)
        self.global_specs = [g1, g2]
        self.local_spec = loc

    def draw(self, spec: ViewSpec, rng: random.Random, width: int, height: int) -> dict[str, Any]:
        """All random decisions of one view (drawn before any pixel work, so they can be counted cheaply)."""
        c = self.cfg
        d: dict[str, Any] = {"crop": _rrc_params(rng, width, height, spec.scale)}
        d["flip"] = rng.random() < c.flip_p
        d["jitter"] = rng.random() < c.color_jitter_p
        if d["jitter"]:
            order = list(range(4))
            rng.shuffle(order)
            d["jitter_order"] = order
            d["jitter_factors"] = (rng.uniform(max(0.0, 1 - c.brightness), 1 + c.brightness),
                                   rng.uniform(max(0.0, 1 - c.contrast), 1 + c.contrast),
                                   rng.uniform(max(0.0, 1 - c.saturation), 1 + c.saturation),
                                   rng.uniform(-c.hue, c.hue))
        d["grayscale"] = rng.random() < c.grayscale_p
        d["blur"] = rng.random() < spec.blur_p
        if d["blur"]:
            d["blur_sigma"] = rng.uniform(*c.blur_sigma)
        d["solarize"] = rng.random() < spec.solarize_p
        # the channel options draw only when on, so the crops of a config without them stay DINOv2's stream
        if c.channel_permute_p > 0:
            order = [0, 1, 2]
            if rng.random() < c.channel_permute_p:
                rng.shuffle(order)
            d["channel_order"] = order
        if c.channel_invert_p > 0:
            d["channel_invert"] = [rng.random() < c.channel_invert_p for _ in range(3)]
        return d

    def apply(self, img: Image.Image, spec: ViewSpec, d: dict[str, Any]) -> torch.Tensor:
        c = self.cfg
        i, j, h, w = d["crop"]
        out = TF.resized_crop(img, i, j, h, w, [spec.size, spec.size], interpolation=InterpolationMode.BICUBIC,
                              antialias=True)
        if d["flip"]:
            out = TF.hflip(out)
        out = recolour_channels(out, d.get("channel_order"), d.get("channel_invert"))
        if d["jitter"]:
            b, ct, s, hu = d["jitter_factors"]
            for op in d["jitter_order"]:
                if op == 0 and c.brightness > 0:
                    out = TF.adjust_brightness(out, b)
                elif op == 1 and c.contrast > 0:
                    out = TF.adjust_contrast(out, ct)
                elif op == 2 and c.saturation > 0:
                    out = TF.adjust_saturation(out, s)
                elif op == 3 and c.hue > 0:
                    out = TF.adjust_hue(out, hu)
        if d["grayscale"]:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        if d["blur"]:
            out = gaussian_blur(out, c.blur_kernel_size, d["blur_sigma"])
        if d["solarize"]:
            out = TF.solarize(out, 128)
        return TF.normalize(TF.to_tensor(out), c.mean, c.std)

    def view(self, img: Image.Image, spec: ViewSpec, rng: random.Random) -> tuple[torch.Tensor, dict[str, Any]]:
        d = self.draw(spec, rng, img.width, img.height)
        return self.apply(img, spec, d), d

    def draw_all(self, rng: random.Random, width: int, height: int) -> dict[str, list[dict[str, Any]]]:
        """The decisions ``__call__`` would take for an image of this size, without touching pixels."""
        return {"global": [self.draw(s, rng, width, height) for s in self.global_specs],
                "local": [self.draw(self.local_spec, rng, width, height) for _ in range(self.cfg.local_crops_number)]}

    def __call__(self, img: Image.Image, rng: random.Random | None = None, return_decisions: bool = False):
        rng = rng if rng is not None else random.Random()
        if img.mode != "RGB":
            img = img.convert("RGB")
        glob, loc, dec = [], [], {"global": [], "local": []}
        for spec in self.global_specs:
            t, d = self.view(img, spec, rng)
            glob.append(t)
            dec["global"].append(d)
        for _ in range(self.cfg.local_crops_number):
            t, d = self.view(img, self.local_spec, rng)
            loc.append(t)
            dec["local"].append(d)
        out = {"global_crops": glob, "local_crops": loc}
        if return_decisions:
            out["decisions"] = dec
        return out
