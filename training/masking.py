"""iBOT block-wise masks and the multi-crop collate.

Mask generator (iBOT / DINOv2): repeatedly place random rectangles (area between ``min_num_patches`` and the
remaining budget, aspect ratio log-uniform in [0.3, 1/0.3]) until the target count is reached or no rectangle
adds a patch. ``max_num_patches`` = half the grid (the reference's choice).

Collate: of the 2B global crops, ``int(2B * mask_probability)`` (half by default) are masked with ratios
stratified in [0.1, 0.5] (crop i draws its ratio uniformly in the i-th of n equal sub-intervals); the rest get
all-False masks; the list is shuffled. All randomness comes from a ``random.Random`` given by the caller.
"""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["MaskingGenerator", "collate_multicrop"]


class MaskingGenerator:
    def __init__(
        self,
        input_size: int | tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = int(0.5 * self.num_patches) if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask: np.ndarray, max_mask_patches: int, rng: random.Random) -> int:
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                num_masked = int(mask[top : top + h, left : left + w].sum())
                if 0 < h * w - num_masked <= max_mask_patches:
                    region = mask[top : top + h, left : left + w]
                    delta += int((~region).sum())
                    region[:] = True
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        rng = rng if rng is not None else random.Random()
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def collate_multicrop(
    samples: Sequence[dict[str, Any]],
    mask_generator: MaskingGenerator,
    rng: random.Random,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
) -> dict[str, Any]:
    """Stack per-image crop lists into one batch dict (crop-major) with iBOT masks."""
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
    if n_local:
        local_crops = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
    else:
        local_crops = torch.empty(0, *global_crops.shape[1:2], 0, 0)
    b = global_crops.shape[0]
    n_tokens = mask_generator.num_patches
    n_masked = int(b * mask_probability)
    probs = np.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked + 1)
    masks = []
    for i in range(n_masked):
        ratio = rng.uniform(float(probs[i]), float(probs[i + 1]))
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * ratio), rng)))
    for _ in range(n_masked, b):
        masks.append(torch.from_numpy(mask_generator(0, rng)))
    rng.shuffle(masks)
    collated = torch.stack(masks).flatten(1)
    mask_indices = collated.flatten().nonzero().flatten()
    masks_weight = (1.0 / collated.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated)[collated]
    out = {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": collated,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": int(mask_indices.numel()),
        "batch_size": len(samples),
    }
    if "key" in samples[0]:
        out["keys"] = [s["key"] for s in samples]
    return out
