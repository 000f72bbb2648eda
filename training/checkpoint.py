"""Training checkpoints: ``OUTPUT/checkpoints/checkpoint_NNNNNNNN.pt`` (N = completed iterations).

A checkpoint is one ``torch.save``-d dict::

    {"format": "lvd-dinov2-train/1", "iteration": int, "student": state_dict, "teacher": state_dict,
     "optimizer": state_dict, "dino_center": Tensor, "ibot_center": Tensor,
     "data_position": {"batches_consumed", "samples_consumed", "batch_size_per_rank", "world_size"},
     "rng": {"python", "numpy", "torch", "cuda"}, "config": dict, "backbone": {"arch", "kwargs"}}

``student``/``teacher`` are ``ModuleDict`` state dicts (``backbone.*``, ``dino_head.*``, ``ibot_head.*``).
Writes go to a temporary name then ``os.replace`` (atomic on POSIX); only the newest ``keep_last`` are kept.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["checkpoint_dir", "save_checkpoint", "find_latest_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "export_backbone"]

_PAT = re.compile(r"^checkpoint_(\d{8,})\.pt$")
FORMAT = "lvd-dinov2-train/1"


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # different GPU count on resume
            pass


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    d = checkpoint_dir(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _PAT.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(output_dir: str | os.PathLike, state: dict[str, Any], keep_last: int = 3) -> Path:
    d = checkpoint_dir(output_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    path = d / f"checkpoint_{int(state['iteration']):08d}.pt"
    tmp = d / (path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    ck = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lvd training checkpoint")
    return ck


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest readable checkpoint (a truncated newest file, e.g. from a full disk, falls back to the previous)."""
    for p in reversed(list_checkpoints(output_dir)):
        try:
            load_checkpoint(p)
            return p
        except Exception:
            continue
    return None


def export_backbone(checkpoint: str | os.PathLike | dict[str, Any], out_path: str | os.PathLike,
                    which: str = "teacher") -> Path:
    """Write the teacher (or student) backbone of a training checkpoint in the official DINOv2 layout + sidecar."""
    from .models.vision_transformer import build_backbone, save_backbone

    if not isinstance(checkpoint, dict):
        p = Path(checkpoint)
        if p.is_dir():
            latest = find_latest_checkpoint(p) or find_latest_checkpoint(p.parent)
            if latest is None:
                raise FileNotFoundError(f"no training checkpoint under {p}")
            p = latest
        checkpoint = load_checkpoint(p)
    info = checkpoint["backbone"]
    kwargs = dict(info["kwargs"])
    kwargs.pop("drop_path_rate", None)
    model = build_backbone(info["arch"], **kwargs)
    sd = {k[len("backbone."):]: v for k, v in checkpoint[which].items() if k.startswith("backbone.")}
    model.load_state_dict(sd, strict=True)
    return save_backbone(model, out_path)
