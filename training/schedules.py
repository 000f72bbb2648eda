"""Schedules, as the reference's ``CosineScheduler``: optional frozen prefix (value 0), linear warmup
``np.linspace(start_warmup_value, base, warmup_iters)``, then a half cosine from ``base`` to ``final`` over the
remaining iterations; past ``total_iters`` the final value.

* lr: warmup from 0 to ``base_lr * sqrt(total_batch / 1024)`` then cosine to ``min_lr``;
* last-layer lr: the lr schedule with the first ``freeze_last_layer_epochs`` epochs at 0;
* weight decay: cosine 0.04 -> 0.4; teacher momentum: cosine 0.992 -> 1.0;
* teacher temperature: linear 0.04 -> 0.07 over ``warmup_teacher_temp_epochs``, then constant.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["CosineScheduler", "scaled_lr", "build_schedules"]


class CosineScheduler:
    def __init__(self, base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup_value: float = 0.0, freeze_iters: int = 0):
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.total_iters = int(total_iters)
        freeze = np.zeros(max(int(freeze_iters), 0))
        warmup = np.linspace(start_warmup_value, base_value, max(int(warmup_iters), 0))
        n = max(self.total_iters - len(freeze) - len(warmup), 0)
        iters = np.arange(n)
        cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(n, 1)))
        self.schedule = np.concatenate((freeze, warmup, cos))[: self.total_iters]

    def __getitem__(self, it: int) -> float:
        if it >= len(self.schedule):
            return self.final_value
        return float(self.schedule[it])


def scaled_lr(base_lr: float, total_batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * total_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def build_schedules(*, lr: float, min_lr: float, epochs: float, iters_per_epoch: int, warmup_epochs: float,
                    weight_decay: float, weight_decay_end: float, momentum_teacher: float,
                    final_momentum_teacher: float, warmup_teacher_temp: float, teacher_temp: float,
                    warmup_teacher_temp_epochs: float, freeze_last_layer_epochs: float) -> dict[str, CosineScheduler]:
    total = int(round(epochs * iters_per_epoch))
    ep = lambda e: int(round(e * iters_per_epoch))  # noqa: E731
    tt_iters = ep(warmup_teacher_temp_epochs)
    return {
        "lr": CosineScheduler(lr, min_lr, total, warmup_iters=ep(warmup_epochs)),
        "last_layer_lr": CosineScheduler(lr, min_lr, total, warmup_iters=ep(warmup_epochs))
        if freeze_last_layer_epochs <= 0 else _frozen_prefix(lr, min_lr, total, ep(warmup_epochs), ep(freeze_last_layer_epochs)),
        "wd": CosineScheduler(weight_decay, weight_decay_end, total),
        "momentum": CosineScheduler(momentum_teacher, final_momentum_teacher, total),
        "teacher_temp": CosineScheduler(teacher_temp, teacher_temp, tt_iters, warmup_iters=tt_iters,
                                        start_warmup_value=warmup_teacher_temp),
    }


def _frozen_prefix(lr, min_lr, total, warmup, freeze) -> CosineScheduler:
    s = CosineScheduler(lr, min_lr, total, warmup_iters=warmup)
    s.schedule = s.schedule.copy()
    s.schedule[:freeze] = 0.0
    return s
