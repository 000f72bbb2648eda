"""The models of one run, by role: what sharding, checkpoints, the EMA, the high-resolution phase and export iterate.

A role is a name, a ``ModuleDict`` (``backbone`` and heads) and a kind:

* ``student``: trained, with its own AdamW (``student``; further students of a multi-student distillation are
  ``student_<name>``, see training/distill.py);
* ``ema``: follows a student by the scheduled EMA (``teacher`` follows ``student``, ``teacher_<name>`` follows
  ``student_<name>``): the model evaluations, ``lvd export`` and ``--export`` use;
* ``snapshot``: a copy of another role taken on a schedule (``gram_teacher``: the EMA teacher's backbone, refreshed
  by training/gram.py);
* ``frozen``: loaded from a file and never changed (``distill_teacher``), so it is neither sharded nor checkpointed
  (a resume loads the file again).

Every role but the frozen ones has the student's architecture: they are FSDP2-sharded by the same calls (rank r
holds the same slice of each, so the EMA and the snapshots are local copies), saved in checkpoints under their
role name (single file and DCP), and resized by the high-resolution phase. Adding a role is one ``add`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from .distributed import broadcast_module, ema_update, local_tensor, reshard, shard_trees

__all__ = ["Role", "ModelRoles", "optimizer_key", "copy_weights"]

Kind = Literal["student", "ema", "snapshot", "frozen"]


@dataclass
class Role:
    name: str
    module: nn.ModuleDict
    kind: Kind
    source: str | None = None  # ema / snapshot: the role it follows

    @property
    def saved(self) -> bool:
        """Part of checkpoints (a frozen role is reloaded from its file)."""
        return self.kind != "frozen"

    @property
    def student_shaped(self) -> bool:
        """Sharded like the student and resized with it by the high-resolution phase."""
        return self.kind != "frozen"


def optimizer_key(student: str) -> str:
    """The checkpoint key of a student role's optimizer state (``optimizer`` for ``student``)."""
    return "optimizer" if student == "student" else f"optimizer_{student[len('student_'):]}"


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """``dst``'s parameters and buffers = ``src``'s of the same names, on the local shards (no communication:
    roles shard identically)."""
    reshard(dst)
    reshard(src)
    s = {**dict(src.named_parameters()), **dict(src.named_buffers())}
    for name, t in list(dst.named_parameters()) + list(dst.named_buffers()):
        local_tensor(t).copy_(local_tensor(s[name].detach()))


class ModelRoles:
    """The run's roles in the order they were added (see the module docstring)."""

    def __init__(self) -> None:
        self._roles: dict[str, Role] = {}

    def add(self, name: str, module: nn.ModuleDict, kind: Kind, source: str | None = None) -> nn.ModuleDict:
        if name in self._roles:
            raise ValueError(f"role {name!r} exists")
        if (kind in ("ema", "snapshot")) != (source is not None) or (source is not None and source not in self):
            raise ValueError(f"role {name!r}: an ema / snapshot role names an existing source, others none")
        if kind != "student":
            for p in module.parameters():
                p.requires_grad_(False)
        self._roles[name] = Role(name, module, kind, source)
        return module

    def __getitem__(self, name: str) -> nn.ModuleDict:
        return self._roles[name].module

    def __contains__(self, name: str) -> bool:
        return name in self._roles

    def __iter__(self) -> Iterator[Role]:
        return iter(list(self._roles.values()))

    def of_kind(self, *kinds: Kind) -> list[Role]:
        return [r for r in self._roles.values() if r.kind in kinds]

    def saved(self) -> list[Role]:
        return [r for r in self._roles.values() if r.saved]

    def ema_of(self, student: str) -> str:
        """The name of the EMA role that follows ``student``."""
        return next(r.name for r in self._roles.values() if r.kind == "ema" and r.source == student)

    # ------------------------------------------------------------------ placement
    def to(self, device: torch.device) -> None:
        for r in self._roles.values():
            r.module.to(device)

    def broadcast(self) -> None:
        """Rank 0's weights of every role to every rank (before sharding; a frozen role is read from its file by
        every rank)."""
        for r in self._roles.values():
            if r.kind != "frozen":
                broadcast_module(r.module)

    def shard(self, mixed_precision=None) -> None:
        """FSDP2-shard every student-shaped role by the same calls and check that each follower's shards match
        its source's (see training/distributed.py)."""
        shard_trees([r.module for r in self._roles.values() if r.student_shaped], mixed_precision)
        for r in self._roles.values():
            if r.source is None:
                continue
            src = dict(self[r.source].named_parameters())
            for name, p in r.module.named_parameters():
                if local_tensor(p).shape != local_tensor(src[name]).shape:
                    raise RuntimeError(f"{r.name} and {r.source} shards differ for {name}")

    def set_modes(self) -> None:
        for r in self._roles.values():
            r.module.train(r.kind == "student")

    # ------------------------------------------------------------------ updates
    def update_emas(self, momentum: float) -> None:
        for r in self.of_kind("ema"):
            ema_update(r.module, self[r.source], momentum)

    def snapshot(self, name: str) -> None:
        """Copy role ``name``'s source into it."""
        copy_weights(self[name], self[self._roles[name].source])
