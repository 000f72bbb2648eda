"""DINOv2 losses: pure functions first, thin ``nn.Module`` wrappers (holding the centres) on top.

Conventions (same as the reference implementation):

* Rows are crop-major: ``[crop 1's B rows, crop 2's B rows, ...]``.
* DINO: mean cross-entropy over every (student view, teacher view) pair except a global view with itself
  (2 global + 8 local crops -> 2 + 16 = 18 pairs); the teacher's two global views are matched swapped against
  the student's global views. Each pair term is ``mean_b -sum_k p_t * log_softmax(s / student_temp)``.
* iBOT: each image contributes the mean over its masked patches; the sum is divided by the number of global
  crops (masked or not).
* KoLeo: fp32 whatever the input dtype, nearest neighbour by inner product among L2-normalised rows, excluding
  self; ``-mean(log(||x - x_nn + 1e-8|| + 1e-8))`` (``nn.PairwiseDistance(eps=1e-8)`` as in the reference).
* Centering / Sinkhorn-Knopp are distribution-aware: sums and row counts are all-reduced over ranks when
  ``torch.distributed`` is initialised, so several ranks give the single-process result on the global batch
  (ranks may hold different numbers of rows, e.g. masked patches, zero included).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "softmax_center",
    "sinkhorn_knopp",
    "update_center",
    "dino_multicrop_loss",
    "ibot_masked_loss",
    "koleo_loss",
    "DINOLoss",
    "iBOTPatchLoss",
]


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: Tensor) -> Tensor:
    if _dist_on():
        dist.all_reduce(t)
    return t


def _world_size() -> int:
    return dist.get_world_size() if _dist_on() else 1


@torch.no_grad()
def softmax_center(teacher_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """Teacher probabilities by centering: ``softmax((t - center) / temp)``, [B, K]."""
    return F.softmax((teacher_logits.float() - center.float()) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temp: float, n_iterations: int = 3) -> Tensor:
    """Teacher probabilities by Sinkhorn-Knopp normalisation (SwAV), [B, K]; rows sum to 1."""
    q = torch.exp(teacher_logits.float() / temp).t()  # K x B
    b = torch.tensor(q.shape[1], device=q.device, dtype=torch.float32)
    b = _all_reduce(b)  # batch size summed over ranks (supports uneven per-rank counts, e.g. masked patches)
    k = q.shape[0]
    sum_q = _all_reduce(torch.sum(q))
    q = q / sum_q
    for _ in range(n_iterations):
        sum_rows = _all_reduce(torch.sum(q, dim=1, keepdim=True))
        q = q / sum_rows / k
        q = q / torch.sum(q, dim=0, keepdim=True) / b
    q = q * b
    return q.t()


@torch.no_grad()
def update_center(center: Tensor, teacher_output: Tensor, momentum: float = 0.9) -> Tensor:
    """EMA of the global batch mean of the teacher logits (sums and row counts all-reduced across ranks, so
    uneven per-rank counts, e.g. of masked patches, give the global-batch mean); returns the new centre [1, K]."""
    batch_sum = _all_reduce(torch.sum(teacher_output.float(), dim=0, keepdim=True))
    if _world_size() > 1:
        count = _all_reduce(torch.tensor(float(teacher_output.shape[0]), device=batch_sum.device))
    else:
        count = teacher_output.shape[0]
    if float(count) == 0:
        return center.clone()
    return center * momentum + (batch_sum / count) * (1 - momentum)


def _pair_ce(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    lsm = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs * lsm).sum(dim=-1).mean()


def dino_multicrop_loss(
    student_global_logits: Tensor,
    student_local_logits: Tensor | None,
    teacher_global_probs: Tensor,
    student_temp: float = 0.1,
) -> Tensor:
    """Mean over (student view, teacher view) pairs, same global view excluded; see the module docstring."""
    n_g = 2
    t_views = teacher_global_probs.float().chunk(n_g)
    s_glob = student_global_logits.chunk(n_g)
    total = student_global_logits.new_zeros((), dtype=torch.float32)
    n_terms = 0
    # global student views against the other global teacher view (swapped)
    for i in range(n_g):
        for j in range(n_g):
            if i != j:
                total = total + _pair_ce(s_glob[i], t_views[j], student_temp)
                n_terms += 1
    if student_local_logits is not None and student_local_logits.numel() > 0:
        b = t_views[0].shape[0]
        lsm = F.log_softmax(student_local_logits.float() / student_temp, dim=-1)
        for s in lsm.split(b):
            for t in t_views:
                total = total - (t * s).sum(dim=-1).mean()
                n_terms += 1
    return total / n_terms


def ibot_masked_loss(
    student_patch_logits: Tensor,
    teacher_patch_probs: Tensor,
    masks: Tensor,
    student_temp: float = 0.1,
    masks_weight: Tensor | None = None,
) -> Tensor:
    """Masked-patch cross-entropy; rows in ``masks.nonzero()`` order; see the module docstring."""
    masks = masks.flatten(1) if masks.dim() > 2 else masks
    if masks_weight is None:
        masks_weight = (1.0 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    loss = torch.sum(teacher_patch_probs.float() * F.log_softmax(student_patch_logits.float() / student_temp, dim=-1), dim=-1)
    return -(loss * masks_weight.float()).sum() / masks.shape[0]


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimator loss on a batch [B, D], computed in fp32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), eps=eps, p=2, dim=-1)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-1.0)  # exclude self (cosine >= -1 for any other row)
            nn_idx = dots.argmax(dim=1)
        dist_ = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
        return -torch.log(dist_ + eps).mean()


# ---------------------------------------------------------------------- modules
class DINOLoss(nn.Module):
    """Holds the DINO centre; ``teacher_probs`` then ``forward``; ``update_center`` is an explicit step."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_logits: Tensor, temp: float, centering: str = "centering") -> Tensor:
        if centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, temp)
        return softmax_center(teacher_logits, self.center, temp)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        self.center.copy_(update_center(self.center, teacher_logits, self.center_momentum))

    def forward(self, student_global: Tensor, student_local: Tensor | None, teacher_global_probs: Tensor) -> Tensor:
        return dino_multicrop_loss(student_global, student_local, teacher_global_probs, self.student_temp)


class iBOTPatchLoss(DINOLoss):
    def forward(self, student_patch: Tensor, teacher_patch_probs: Tensor, masks: Tensor,  # type: ignore[override]
                masks_weight: Tensor | None = None) -> Tensor:
        return ibot_masked_loss(student_patch, teacher_patch_probs, masks, self.student_temp, masks_weight)
