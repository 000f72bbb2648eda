"""Warn when the DINO teacher collapses (it says nothing about the image any more), from the two monitors every
pretraining step logs (training/objective.py ``teacher_entropies``, in nats, K = ``head.n_prototypes``; a
``mode: distill`` step logs none, its targets come from a frozen teacher, so this watch stays silent there):

* **uniform**: the per-image entropy of the teacher's targets stays within ln(10/9) of ln K, i.e. each image's
  target spreads over more than 90% of the prototypes. Centering has removed everything the images share and
  what is left differs too little between images for the temperature. The DINO loss then sits at ln K and its
  gradient carries no information about the image.
* **one prototype**: the entropy of the batch-mean target stays below ln 2: the whole batch is sent to one or two
  prototypes.

A healthy run is sharp per image and spread over the batch (on the learning bench: about 1 and 3 nats for
K = 512). Either collapse lasting ``patience`` iterations is logged once, with what usually helps: found on the
learning bench (BENCHMARKS.md), where small images that differ little at initialisation collapsed to uniform
with DINOv2's teacher temperature and learning rate.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["CollapseWatch"]

_ADVICE = {
    "uniform": "every image gets (nearly) the uniform target: the DINO loss carries no signal. Usually helps: a "
               "sharper teacher (teacher.teacher_temp / warmup_teacher_temp, e.g. 0.01-0.02), a lower "
               "optim.base_lr, milder augmentations where the data's views differ more than its images",
    "one_prototype": "the whole batch is sent to one or two prototypes. Usually helps: a lower optim.base_lr, "
                     "a higher teacher temperature, loss.centering: sinkhorn_knopp",
}


class CollapseWatch:
    """Feed it each training metrics row (``update``); it returns a warning text the first time a collapse has
    lasted ``patience`` consecutive iterations (one text per kind per run), else None."""

    def __init__(self, n_prototypes: int, patience: int = 200):
        self.log_k = math.log(n_prototypes)
        self.patience = patience
        self.since: dict[str, int | None] = {"uniform": None, "one_prototype": None}
        self.warned: set[str] = set()

    def kinds(self, row: dict[str, Any]) -> set[str]:
        """The collapses this row shows (empty without the monitors, e.g. ``mode: distill``)."""
        out = set()
        h, hm = row.get("teacher_entropy"), row.get("teacher_marginal_entropy")
        if h is not None and h >= self.log_k - math.log(10 / 9):
            out.add("uniform")
        if hm is not None and hm < math.log(2):
            out.add("one_prototype")
        return out

    def update(self, row: dict[str, Any]) -> str | None:
        it = int(row["iteration"])
        now = self.kinds(row)
        message = None
        for kind in self.since:
            if kind not in now:
                self.since[kind] = None
                continue
            if self.since[kind] is None:
                self.since[kind] = it
            if it - self.since[kind] + 1 >= self.patience and kind not in self.warned:
                self.warned.add(kind)
                message = (f"the DINO teacher has collapsed ({kind.replace('_', ' ')}) since iteration "
                           f"{self.since[kind]}: {_ADVICE[kind]} (teacher entropy {row['teacher_entropy']:.3f}, "
                           f"of the batch mean {row['teacher_marginal_entropy']:.3f}, ln K = {self.log_k:.3f} nats)")
        return message
