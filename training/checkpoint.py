"""Training checkpoints under ``OUTPUT/checkpoints/`` (N = completed iterations), in two layouts:

* single process: ``checkpoint_NNNNNNNN.pt``, one ``torch.save``-d dict (below);
* several processes: ``checkpoint_NNNNNNNN/``, a ``torch.distributed.checkpoint`` (DCP) directory: the state
  dicts of the roles and optimizers (from ``get_state_dict``: FQN keys, each shard written by
  the rank holding it, so FSDP2 shards are never gathered), plus ``meta.pt`` (rank 0: everything else of the
  dict below) and ``rng_rank{r}.pt`` (every rank's RNG state). All ranks write into ``.checkpoint_NNNNNNNN.tmp/``
  which rank 0 renames once every rank is done: a directory with the final name is complete. DCP reshards on
  load, so a checkpoint written by R ranks resumes on any number of ranks (one included), and
  ``load_checkpoint`` / ``export_backbone`` read it as the single-process dict (full tensors) without any
  process group. The multi-process directories need a filesystem shared by the ranks.

The single-process checkpoint is one ``torch.save``-d dict::

    {"format": "lvd-dinov2-train/1", "iteration": int, "student": state_dict, "teacher": state_dict,
     "optimizer": state_dict, "dino_center": Tensor, "ibot_center": Tensor,
     "data_position": {"batches_consumed", "samples_consumed", "batch_size_per_rank", "world_size"},
     "rng": {"python", "numpy", "torch", "cuda"}, "config": dict, "backbone": {"arch", "kwargs"}}

``student``/``teacher`` are ``ModuleDict`` state dicts (``backbone.*``, ``dino_head.*``, ``ibot_head.*``); every
saved role of training/roles.py has its own key the same way (``gram_teacher``, ``student_<name>`` /
``teacher_<name>`` with ``optimizer_<name>``), and ``roles`` lists the role and optimizer keys the file holds.
Writes go to a temporary name then ``os.replace`` (atomic on POSIX), made durable against a power loss by
``curation.pipeline.storage.durable_replace`` (the files flushed before the rename, the folder's new entry after it); only
the newest ``keep_last`` are kept.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.pipeline.storage import durable_replace, fsync_path  # one durable rename for run outputs and checkpoints

__all__ = ["checkpoint_dir", "save_checkpoint", "save_distributed_checkpoint", "find_latest_checkpoint",
           "load_checkpoint", "load_checkpoint_meta", "load_training_state", "rng_state", "set_rng_state",
           "export_backbone", "backbone_from_state", "remove_stale_temporaries"]

_PAT = re.compile(r"^checkpoint_(\d{8,})(\.pt)?$")
_TMP = re.compile(r"^(checkpoint_\d{8,}\.pt\.tmp\d+|\.checkpoint_\d{8,}\.tmp)$")  # left by a killed save
_MODEL_KEYS = ("student", "teacher", "optimizer")  # what checkpoints without a "roles" list hold
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
    found = []
    for p in d.iterdir():
        m = _PAT.match(p.name)
        if m and (p.is_dir() != bool(m.group(2))):  # .pt files, directories without a suffix
            found.append((int(m.group(1)), p.stat().st_mtime, p))
    return [p for *_, p in sorted(found)]


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files / directories of saves that never completed (a run killed while writing a
    checkpoint); called by rank 0 at the start of a run, when no save of this run is in flight."""
    d = checkpoint_dir(output_dir)
    stale = sorted(p for p in d.iterdir() if _TMP.match(p.name)) if d.is_dir() else []
    for p in stale:
        _remove(p)
    return stale


def _save_flushed(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    fsync_path(path)


def save_checkpoint(output_dir: str | os.PathLike, state: dict[str, Any], keep_last: int = 3) -> Path:
    d = checkpoint_dir(output_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    path = d / f"checkpoint_{int(state['iteration']):08d}.pt"
    tmp = d / (path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    durable_replace(tmp, path)  # the file flushed, renamed, and the folder's new entry flushed (power loss)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        _remove(old)
    return path


def save_distributed_checkpoint(output_dir: str | os.PathLike, app_state: dict[str, Any], meta: dict[str, Any],
                                rng: dict[str, Any], keep_last: int = 3) -> Path:
    """Collective (every rank calls it): DCP-save ``app_state`` (``student``/``teacher``/``optimizer`` state
    dicts from ``get_state_dict``), ``meta`` (rank 0) and this rank's ``rng``; atomic by directory rename."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    d = checkpoint_dir(output_dir)
    name = f"checkpoint_{int(meta['iteration']):08d}"
    tmp, final = d / f".{name}.tmp", d / name
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a killed run
        tmp.mkdir()
    dist.barrier()
    _save_flushed(rng, tmp / f"rng_rank{rank}.pt")
    dcp.save(app_state, checkpoint_id=str(tmp))  # DCP's file writer flushes its own files (sync_files)
    if rank == 0:
        _save_flushed({"format": FORMAT, **meta}, tmp / "meta.pt")
    dist.barrier()  # every rank's files are written and flushed
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        durable_replace(tmp, final)  # the folder's entries flushed, renamed, the parent's new entry flushed
        for old in list_checkpoints(output_dir)[:-keep_last]:
            _remove(old)
    dist.barrier()
    return final


def load_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Everything but the model / optimizer state: cheap for a directory checkpoint (a full load for a file)."""
    p = Path(path)
    if not p.is_dir():
        return load_checkpoint(p)
    if not (p / ".metadata").is_file():
        raise ValueError(f"{p} is not a complete distributed checkpoint (no .metadata)")
    meta = torch.load(p / "meta.pt", map_location="cpu", weights_only=False)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{p} is not an lvd training checkpoint")
    return meta


def load_rng(path: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s RNG state from a directory (DCP) checkpoint (``None`` when it has none for that rank)."""
    f = Path(path) / f"rng_rank{rank}.pt"
    return torch.load(f, weights_only=False) if f.exists() else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The single-process checkpoint dict; a directory (DCP) checkpoint is read with full (unsharded) tensors,
    no process group needed; its ``optimizer`` is keyed by parameter name and ``rng`` is rank 0's."""
    p = Path(path)
    if p.is_dir():
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        ck = load_checkpoint_meta(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck.update(_load_state_dict_from_keys(set(model_keys(ck)), checkpoint_id=str(p)))
        ck["rng"] = load_rng(p, 0)
        return ck
    ck = torch.load(p, map_location=map_location, weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lvd training checkpoint")
    return ck


def _named_optimizer_state(optimizer: torch.optim.Optimizer, osd: dict[str, Any]) -> dict[str, Any]:
    """A plain (index-keyed) optimizer state dict re-keyed by parameter names (the groups' ``names``)."""
    names = [n for g in optimizer.param_groups for n in g["names"]]
    groups = []
    for g in osd["param_groups"]:
        groups.append({**g, "params": [names[i] for i in g["params"]]})
    return {"state": {names[i]: st for i, st in osd["state"].items()}, "param_groups": groups}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, osd: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(osd)``; when the parameters differ from the saved ones (a checkpoint written
    before a parameter was added, e.g. the prototype layer's ``weight_g``), the saved state is matched by parameter
    name (the groups' ``names``) and parameters the checkpoint has none for start without state."""
    saved = [n for g in osd["param_groups"] for n in g.get("names", [])]
    current = [n for g in optimizer.param_groups for n in g["names"]]
    if saved == current or len(saved) != sum(len(g["params"]) for g in osd["param_groups"]):
        optimizer.load_state_dict(osd)
        return
    index = {n: i for i, n in enumerate(current)}
    mine = optimizer.state_dict()
    mine["state"] = {index[saved[i]]: st for i, st in osd["state"].items() if saved[i] in index}
    optimizer.load_state_dict(mine)


def _drop_unsaved_state(optimizer: torch.optim.Optimizer, saved_names: set[str]) -> None:
    """Forget optimizer state of parameters the checkpoint had none for (``get_state_dict`` initialised it)."""
    for g in optimizer.param_groups:
        for name, p in zip(g["names"], g["params"]):
            if name not in saved_names:
                optimizer.state.pop(p, None)


def model_keys(ck: dict[str, Any]) -> tuple[str, ...]:
    """The keys of a checkpoint dict (or its meta) that hold model / optimizer state."""
    return tuple(ck.get("roles", _MODEL_KEYS))


def load_training_state(path: str | os.PathLike, models: dict[str, torch.nn.Module],
                        optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict[str, Any]:
    """Load model and optimizer state from either layout into (possibly FSDP2-sharded) modules, on any number
    of ranks (collective when a process group exists): ``models`` by checkpoint key (the roles), ``optimizers``
    by checkpoint key as (the model it steps, the optimizer). Returns the checkpoint's meta dict (no tensors of
    the models) with ``rng``: this rank's saved RNG state (rank 0's for a single-process file), or None."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    p = Path(path)
    if p.is_dir():
        import torch.distributed.checkpoint as dcp

        saved = dcp.FileSystemReader(str(p)).read_metadata().state_dict_metadata
        _check_keys(p, {k.split(".", 1)[0] for k in saved}, models, optimizers)
        state: dict[str, Any] = {k: get_model_state_dict(m) for k, m in models.items()}
        for k, (model, opt) in optimizers.items():
            osd = get_optimizer_state_dict(model, opt)  # initialises optimizer state for every parameter
            # parameters that had no optimizer step yet when saved (the mask token before any masked batch, a
            # backbone during a head warm-up) have no state in the checkpoint: they get none (as before the save)
            osd["state"] = {fqn: st for fqn, st in osd["state"].items()
                            if all(f"{k}.state.{fqn}.{s}" in saved for s in st)}
            state[k] = osd
        with warnings.catch_warnings():  # one process without a process group: DCP warns that it loads locally
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(p))
        for k, m in models.items():
            set_model_state_dict(m, state[k])
        for k, (model, opt) in optimizers.items():
            set_optimizer_state_dict(model, opt, state[k], options=StateDictOptions(strict=False))
            _drop_unsaved_state(opt, set(state[k]["state"]))
        import torch.distributed as dist

        meta = load_checkpoint_meta(p)
        meta["rng"] = load_rng(p, dist.get_rank() if dist.is_initialized() else 0)
        return meta
    ck = load_checkpoint(p)
    _check_keys(p, set(ck), models, optimizers)
    sharded = any(hasattr(t, "to_local") for m in models.values() for t in m.parameters())
    if not sharded:
        for k, m in models.items():
            m.load_state_dict(ck[k])
        for k, (_, opt) in optimizers.items():
            _load_optimizer_state(opt, ck[k])
    else:  # a single-process checkpoint resumed on several ranks: full state dicts, sharded on load
        full = StateDictOptions(full_state_dict=True)
        for k, m in models.items():
            set_model_state_dict(m, ck[k], options=full)
        for k, (model, opt) in optimizers.items():
            named = _named_optimizer_state(opt, ck[k])
            set_optimizer_state_dict(model, opt, named, options=StateDictOptions(full_state_dict=True, strict=False))
            _drop_unsaved_state(opt, set(named["state"]))
    return {k: v for k, v in ck.items() if k not in model_keys(ck)}


def _check_keys(path: Path, present: set[str], models: dict, optimizers: dict) -> None:
    missing = sorted(k for k in (*models, *optimizers) if k not in present)
    if missing:
        raise ValueError(f"{path}: the checkpoint holds no {', '.join(missing)} (was it written by a run with "
                         f"another configuration of models?)")


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest readable checkpoint (a truncated newest file, e.g. from a full disk, falls back to the previous)."""
    for p in reversed(list_checkpoints(output_dir)):
        try:
            load_checkpoint_meta(p)
            return p
        except Exception:
            continue
    return None


def export_backbone(checkpoint: str | os.PathLike | dict[str, Any], out_path: str | os.PathLike,
                    which: str = "teacher") -> Path:
    """Write the backbone of role ``which`` (``teacher``: the EMA teacher; ``student``, ``teacher_<name>``, ...)
    of a training checkpoint in the official DINOv2 layout + sidecar."""
    from .models.backbone_io import save_backbone

    if not isinstance(checkpoint, dict):
        p = Path(checkpoint)
        if p.is_dir():
            latest = find_latest_checkpoint(p) or find_latest_checkpoint(p.parent)
            if latest is None:
                raise FileNotFoundError(f"no training checkpoint under {p}")
            p = latest
        checkpoint = load_checkpoint(p)
    if which not in checkpoint:
        raise ValueError(f"the checkpoint has no model {which!r}; it holds "
                         f"{', '.join(k for k in model_keys(checkpoint) if not k.startswith('optimizer'))}")
    info = checkpoint.get("backbones", {}).get(which, checkpoint["backbone"])
    return save_backbone(backbone_from_state(info, checkpoint[which]), out_path)


def backbone_from_state(info: dict[str, Any], model_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The backbone a checkpoint's ``backbone`` info describes (``arch`` + build kwargs), loaded strictly with the
    ``backbone.*`` weights of a student / teacher state dict (no drop path: for export and evaluation)."""
    from .models.vision_transformer import build_backbone

    kwargs = dict(info["kwargs"])
    kwargs.pop("drop_path_rate", None)
    model = build_backbone(info["arch"], **kwargs)
    model.load_state_dict({k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")},
                          strict=True)
    return model
