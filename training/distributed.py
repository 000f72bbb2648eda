"""Multi-process helpers for the trainer: process group, FSDP2 sharding, EMA on shards, batch slicing.

Strategies (``distributed.strategy`` in the config):

* ``fsdp`` (``auto`` picks it when world_size > 1): every role of training/roles.py but the frozen ones (student,
  EMA teacher, Gram teacher, further students) is wrapped with FSDP2
  (``torch.distributed.fsdp.fully_shard``): every transformer block, then the backbone as its root; each head is
  its own root. Parameters become ``DTensor`` shards (dim 0, over all ranks); gradients are reduce-scattered
  (averaged) after backward. The roles are sharded by the same calls on modules of the same shapes, so
  rank r holds the same slice of each teacher / student parameter and the EMA update is a local ``foreach`` over
  ``DTensor.to_local()`` shards, with no communication. Works with gloo on CPU and NCCL on GPU.
  Mixed precision (``distributed.mixed_precision``, as the paper: backbone in bf16, heads in fp32): one FSDP2
  ``MixedPrecisionPolicy`` per wrapped module; parameters are all-gathered in ``param_dtype`` and the forward
  computes in it, gradients are reduce-scattered in ``reduce_dtype`` and land fp32 on the fp32 shards, which the
  optimizer and the EMA update. bf16 all-gather / reduce-scatter work on gloo (torch 2.14) as on NCCL.
* ``ddp_allreduce``: every rank keeps full replicas; gradients are averaged with one all_reduce per module
  (flattened) after backward. Kept for debugging and for setups where FSDP2 is not wanted.

The backbone is called through ``forward_features`` (not ``forward``), so that method is registered with
``register_fsdp_forward_method`` (FSDP2 unshards parameters in forward hooks, which only ``__call__`` runs).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger("lvd.train")

__all__ = ["DistInfo", "init_distributed", "resolve_strategy", "broadcast_module", "shard_trees", "reshard",
           "local_tensor", "precision_policies",
           "ema_update", "allreduce_gradients", "clip_grad_norm", "all_reduce_mean", "all_reduce_sum",
           "shard_batch", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created_group: bool = False  # we initialised the process group (and destroy it at the end)


def init_distributed() -> DistInfo:
    """Join the process group: an existing one (Ray Train, a test harness), else one from the torchrun
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; NCCL when CUDA is available, else gloo)."""
    created = False
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized() and world_env > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank, world, local_rank, created)


def resolve_strategy(strategy: str, world: int) -> str:
    """``single`` on one process; ``auto`` -> ``fsdp`` on several."""
    if world <= 1:
        return "single"
    return "fsdp" if strategy == "auto" else strategy


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (before sharding)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


# ---------------------------------------------------------------------- FSDP2
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def precision_policies(mixed_precision: Any = None) -> dict[str, Any]:
    """``MixedPrecisionPolicy`` for the ``backbone`` (every block and the backbone root) and the ``heads``, from
    the config's ``distributed.mixed_precision`` (None: fp32 throughout, FSDP2's default).

    A module computing in bf16 casts its floating-point inputs to bf16 (``cast_forward_inputs``); the backbone's
    outputs are cast back to fp32 (``output_dtype``), so heads and losses receive fp32 tokens."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    out = {}
    for group in ("backbone", "heads"):
        pol = getattr(mixed_precision, group, None)
        param, reduce = (_DTYPES[pol.param_dtype], _DTYPES[pol.reduce_dtype]) if pol is not None else (None, None)
        if param in (None, torch.float32) and reduce in (None, torch.float32):
            out[group] = MixedPrecisionPolicy()
            continue
        out[group] = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce,
                                          output_dtype=torch.float32 if group == "backbone" else None)
    return out


def _fully_shard_tree(model: nn.ModuleDict, policies: dict[str, Any]) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    backbone = model["backbone"]
    for block in backbone.blocks:
        # blocks return their tokens in the parameters' dtype (the next block / the root's norm computes in it)
        fully_shard(block, mp_policy=_without_output_cast(policies["backbone"]))
    fully_shard(backbone, mp_policy=policies["backbone"])
    register_fsdp_forward_method(backbone, "forward_features")
    for name, head in model.items():
        if name != "backbone":
            fully_shard(head, mp_policy=policies["heads"])


def _without_output_cast(policy: Any) -> Any:
    return replace(policy, output_dtype=None)


def shard_trees(models: list[nn.ModuleDict], mixed_precision: Any = None) -> None:
    """FSDP2-wrap models of the same architecture identically (in place: the roles of training/roles.py), with the
    mixed-precision policies of ``precision_policies(mixed_precision)``; see the module docstring."""
    # forward_features returns views (CLS / patch slices of the normed tokens); FSDP2 warns that an in-place op
    # on them would skip its pre-backward hook. The losses only use them out of place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policies = precision_policies(mixed_precision)
    for model in models:
        _fully_shard_tree(model, policies)


def reshard(module: nn.Module) -> None:
    """Free the unsharded parameters of every FSDP2 root below ``module``. FSDP2 keeps a root's parameters
    unsharded after forward (for the backward that normally follows); the teacher has no backward."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter (same names), on the local
    shards when sharded (teacher and student shard identically, so no communication)."""
    reshard(teacher)
    reshard(student)
    t_params = dict(teacher.named_parameters())
    tl, sl = [], []
    for name, sp in student.named_parameters():
        tl.append(local_tensor(t_params[name]))
        sl.append(local_tensor(sp.detach()))
    torch._foreach_mul_(tl, momentum)
    torch._foreach_add_(tl, sl, alpha=1.0 - momentum)


# ---------------------------------------------------------------------- replicated data parallel
@torch.no_grad()
def allreduce_gradients(params: list[Tensor], world: int) -> None:
    """Average gradients over ranks with one flattened all_reduce. A parameter without a gradient on some rank
    counts as zeros there; one without a gradient on every rank keeps ``grad = None`` (the optimizer skips it,
    as on one process)."""
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    grads = []
    for p, n in zip(params, has.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` over (possibly sharded) parameters; the norm is the global one (DTensor reductions
    communicate across shards) and is returned as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------- metrics / batch helpers
def all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_mean(values: dict[str, Tensor]) -> dict[str, float]:
    """Mean over ranks of scalar tensors (one all_reduce), as floats; same keys on every rank required."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {k: float(v.detach()) for k, v in values.items()}
    keys = sorted(values)
    buf = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(buf)
    buf /= dist.get_world_size()
    return {k: float(x) for k, x in zip(keys, buf.tolist())}


def shard_batch(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s share of a collated global batch (crop-major rows: each crop's block of B images is cut
    into ``world`` equal slices); mask indices and weights are recomputed for the slice."""
    b = int(batch["batch_size"]) if "batch_size" in batch else batch["global_crops"].shape[0] // 2
    if b % world:
        raise ValueError(f"global batch {b} is not divisible by {world} ranks")
    per = b // world

    def rows(x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return x
        n_crops = x.shape[0] // b
        return torch.cat([x[c * b + rank * per: c * b + (rank + 1) * per] for c in range(n_crops)])

    masks = rows(batch["masks"])
    mask_indices = masks.flatten().nonzero().flatten()
    masks_weight = (1.0 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    out = dict(batch)
    out.update({"global_crops": rows(batch["global_crops"]), "local_crops": rows(batch["local_crops"]),
                "masks": masks, "mask_indices": mask_indices, "masks_weight": masks_weight,
                "n_masked_patches": int(mask_indices.numel()), "batch_size": per})
    if "keys" in batch:
        out["keys"] = list(batch["keys"])[rank * per:(rank + 1) * per]
    return out

