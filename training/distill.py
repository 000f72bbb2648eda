"""Distillation (``mode: distill``): how DINOv2 produced its smaller models (paper section 5, "Distillation").

A frozen, larger pretrained teacher gives the targets; the configured (smaller) model is the student and is trained
with the same losses. As the paper describes:

* the teacher is frozen (``requires_grad=False``, eval mode, never updated);
* a spare EMA of the student is kept (scheduled momentum, as the EMA teacher of pretraining) and is the model that
  checkpoints call ``teacher``: it is what ``lvd export``, the evaluations and ``--export`` use;
* masking and stochastic depth are removed (the student's drop-path rate is set to 0, no masks are drawn);
* the iBOT loss is applied on the two global crops: every patch token of the student's two (unmasked) global crops
  against the teacher's patch token at the same position.

Teacher sources (``distill.teacher``): an ``lvd export`` backbone (``.pth`` + ``.json`` sidecar) or an official
DINOv2 backbone ``.pth`` (``distill.teacher_arch`` names its architecture, else it is inferred from the shapes);
an lvd training checkpoint (``checkpoint_*.pt``, a DCP checkpoint directory or a training output directory: its EMA
teacher, backbone *and* heads); a reference DINOv2 training checkpoint (``teacher.backbone.*``,
``teacher.dino_head.*``, ``teacher.ibot_head.*`` keys, optionally under ``model``; the heads' weight-norm ``weight_g``
is loaded as ours).

Heads: with the teacher's DINO (and iBOT) heads, the teacher's probabilities come from them; their prototype counts
must equal the student's (``head.n_prototypes``, ``head.ibot_n_prototypes``). Without heads, one DINO head on the
teacher's width is trained alongside: ``distill_head`` (in the student, so in the optimizer and checkpoints) learns
by the DINO loss between the teacher's CLS tokens of the two global crops (swapped, as pretraining's global pairs)
against the probabilities of its EMA (``distill_head`` of the student's EMA), which are also the student's DINO and
iBOT targets (so ``head.ibot_separate_head`` must be false there). Gradients of that term reach only ``distill_head``
(the teacher's features are constants).

Several students (``distill.students: {name: model section}``): every further student is the role
``student_<name>`` with its own AdamW (same schedules) and EMA ``teacher_<name>`` (training/roles.py); the one
teacher forward per batch gives the targets of all of them (the head trained alongside, when there is one, lives
in the first student and its EMA gives everyone's targets). The students' losses are summed for one backward
(their parameters are disjoint, so each gets exactly its own gradients); each is clipped per module and stepped
by its own optimizer. ``--export OUT.pth`` writes ``OUT_<name>.pth`` for each, ``lvd export --role
teacher_<name>`` one of them.
"""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .heads import DINOHead
from .distributed import reshard
from .losses import dino_multicrop_loss
from .objective import head_logits, student_terms, teacher_probs

log = logging.getLogger("lvd.distill")
__all__ = ["load_teacher", "build_distill_teacher", "distill_forward_losses", "head_from_state"]


def head_from_state(sd: dict[str, torch.Tensor]) -> DINOHead:
    """A :class:`DINOHead` shaped as the state dict ``sd`` (``mlp.*``, ``last_layer.weight_v``), loaded strictly."""
    linears = sorted({int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and k.endswith(".weight")})
    if linears:
        first, last = sd[f"mlp.{linears[0]}.weight"], sd[f"mlp.{linears[-1]}.weight"]
        in_dim, hidden, bottleneck = first.shape[1], first.shape[0], last.shape[0]
    else:  # nlayers 1: mlp is a single Linear
        in_dim, hidden, bottleneck = sd["mlp.weight"].shape[1], 1, sd["mlp.weight"].shape[0]
    head = DINOHead(in_dim, sd["last_layer.weight_v"].shape[0], hidden, bottleneck, max(len(linears), 1))
    head.load_state_dict(sd, strict=True)
    return head


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_teacher(path: str | Path, arch: str | None = None) -> nn.ModuleDict:
    """The frozen teacher as a ModuleDict: ``backbone`` and, when the checkpoint has them, ``dino_head`` /
    ``ibot_head`` (see the module docstring for the accepted files)."""
    from .checkpoint import FORMAT, backbone_from_state, find_latest_checkpoint, load_checkpoint
    from .models.backbone_io import backbone_from_official_state, sidecar_path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"distill.teacher: {p} does not exist")
    if p.is_dir() and not (p / ".metadata").is_file():  # a training output dir: its newest checkpoint
        latest = find_latest_checkpoint(p) or find_latest_checkpoint(p.parent)  # OUT or OUT/checkpoints
        if latest is None:
            raise FileNotFoundError(f"distill.teacher: no training checkpoint under {p}")
        p = latest
    if p.is_dir():
        ck = load_checkpoint(p)
    else:
        try:  # backbone files and reference checkpoints hold tensors only
            ck = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # an lvd training checkpoint (it also holds the RNG states)
            ck = load_checkpoint(p)
        if not isinstance(ck, dict):
            raise ValueError(f"distill.teacher: {p} holds no state dict")
    modules: dict[str, nn.Module] = {}
    if ck.get("format") == FORMAT:  # lvd training checkpoint: the EMA teacher with its heads
        state = ck["teacher"]
        modules["backbone"] = backbone_from_state(ck["backbone"], state)
    else:
        sd = ck["model"] if isinstance(ck.get("model"), dict) else ck
        if any(k.startswith("teacher.backbone.") for k in sd):  # reference training checkpoint
            state = _sub(sd, "teacher.")
            modules["backbone"] = backbone_from_official_state(_sub(state, "backbone."), arch=arch)
        else:  # a backbone file (lvd export, with its sidecar, or official)
            state = {}
            side = sidecar_path(p)
            meta = json.loads(side.read_text()) if side.is_file() else None
            modules["backbone"] = backbone_from_official_state(sd, meta, arch=arch)
    for name in ("dino_head", "ibot_head"):
        head = _sub(state, name + ".")
        if head:
            modules[name] = head_from_state(head)
    teacher = nn.ModuleDict(modules)
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    return teacher.eval()


def _fail(msg: str):
    raise ConfigError(f"config error: distill: {msg}")


def _prototypes(head: DINOHead) -> int:
    return head.last_layer.weight_v.shape[0]


def build_distill_teacher(cfg, student: nn.ModuleDict, student_ema: nn.ModuleDict) -> nn.ModuleDict:
    """Load the frozen teacher for ``cfg`` and adapt the student (no drop path; a ``distill_head`` trained alongside
    when the teacher has no heads, its EMA copied into ``student_ema``). Raises ``ConfigError`` (one line) when the
    teacher's heads do not fit the student's."""
    teacher = load_teacher(cfg.distill.teacher, cfg.distill.teacher_arch)
    student["backbone"].set_drop_path(0.0)
    tp, sp = teacher["backbone"].patch_size, cfg.model.patch_size
    if tp != sp and cfg.loss.ibot_weight > 0:
        _fail(f"the teacher's patch size ({tp}) differs from model.patch_size ({sp}): the iBOT loss pairs their "
              f"patch tokens (or set loss.ibot_weight=0)")
    h = cfg.head
    if "dino_head" in teacher:
        if _prototypes(teacher["dino_head"]) != h.n_prototypes:
            _fail(f"head.n_prototypes ({h.n_prototypes}) must equal the teacher's DINO head prototypes "
                  f"({_prototypes(teacher['dino_head'])})")
        t_ibot = teacher["ibot_head"] if "ibot_head" in teacher else teacher["dino_head"]
        s_ibot = ("head.ibot_n_prototypes", h.ibot_n_prototypes) if "ibot_head" in student \
            else ("head.n_prototypes", h.n_prototypes)  # the student's iBOT logits come from its DINO head
        if cfg.loss.ibot_weight > 0 and _prototypes(t_ibot) != s_ibot[1]:
            _fail(f"{s_ibot[0]} ({s_ibot[1]}) must equal the teacher's iBOT prototypes ({_prototypes(t_ibot)}); "
                  f"see head.ibot_separate_head / head.ibot_n_prototypes")
    else:
        if "ibot_head" in student:
            _fail("a teacher without heads trains one DINO head alongside, which also gives the iBOT targets; set "
                  "head.ibot_separate_head=false")
        head = DINOHead(teacher["backbone"].embed_dim, h.n_prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers)
        student["distill_head"] = head
        ema = DINOHead(teacher["backbone"].embed_dim, h.n_prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers)
        ema.load_state_dict(head.state_dict())
        for prm in ema.parameters():
            prm.requires_grad_(False)
        student_ema["distill_head"] = ema
    log.info("distill: frozen teacher %s (%s, heads: %s)", cfg.distill.teacher, teacher["backbone"].arch,
             ", ".join(k for k in teacher if k != "backbone") or "trained alongside")
    return teacher


def distill_forward_losses(trainer, batch: dict[str, Any], teacher_temp: float) -> dict[str, torch.Tensor]:
    """One distillation step's loss terms (see the module docstring); the counterpart of ``objective.forward_losses``.
    One forward of the frozen teacher gives the targets of every student role: the terms of ``student`` keep
    their names (``loss`` its total), those of ``student_<name>`` are ``<name>/dino``, ..., ``<name>/loss``."""
    cfg, device, roles = trainer.cfg, trainer.device, trainer.roles
    teacher, ema = roles["distill_teacher"], roles["teacher"]
    gc = batch["global_crops"].to(device, non_blocking=True)
    lc = batch["local_crops"].to(device, non_blocking=True)
    do_ibot = cfg.loss.ibot_weight > 0
    # targets: the teacher's heads, or the EMA of the head trained alongside
    t_heads = teacher if "dino_head" in teacher else nn.ModuleDict({"dino_head": ema["distill_head"]})
    with torch.no_grad(), trainer.autocast():
        t = teacher["backbone"].forward_features(gc)
        t_cls = t["x_norm_clstoken"]
        t_patch = t["x_norm_patchtokens"].flatten(0, 1) if do_ibot else None
        (t_cls_logits,), t_patch_logits = head_logits(t_heads, [t_cls], t_patch)
        reshard(t_heads)  # the EMA head trained alongside is FSDP2-sharded with the student's EMA: no backward
        dino_probs, ibot_probs = teacher_probs(trainer.dino_loss, trainer.ibot_loss, t_cls_logits, t_patch_logits,
                                               teacher_temp, cfg.loss.centering)

    out: dict[str, torch.Tensor] = {}
    for role in roles.of_kind("student"):
        student = role.module
        terms, _ = student_terms(cfg, student, gc, lc, dino_probs, ibot_probs, trainer.autocast)  # no masks
        if "distill_head" in student:  # the teacher-side head trained alongside: global pairs only
            with trainer.autocast():
                alongside_logits = student["distill_head"](t_cls)
            terms["distill_head"] = dino_multicrop_loss(alongside_logits, None, dino_probs, cfg.loss.student_temp)
            terms["loss"] = terms["loss"] + terms["distill_head"]
        prefix = "" if role.name == "student" else role.name[len("student_"):] + "/"
        out.update({prefix + k: v for k, v in terms.items()})
    return out
