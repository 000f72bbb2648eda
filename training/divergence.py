"""Stop a diverging run before it writes a checkpoint (a checkpoint of exploded weights could never resume).

Two bounds, checked every iteration (``optim.max_grad_norm`` and ``optim.max_weight_norm``, 0 turns one off):
the gradient norm of each module before clipping (checked before the optimizer step, so an exploded gradient is
never applied) and the L2 norm of all student weights after the step. The defaults (1e6 both) sit orders of
magnitude above healthy runs: a ViT-g student with its heads has a weight norm of about 1e3 at initialisation and
pre-clip gradient norms of 1e-1..1e2 (clipped at 3.0), while a run at ``optim.base_lr=1e30`` reaches ~1e29 after
one step. Non-finite norms always stop the run. Norms of sharded (FSDP2) parameters are the global ones.
"""
from __future__ import annotations

import math

import torch

__all__ = ["DivergenceError", "weight_norm", "grad_norm", "check_grad_norms", "check_weight_norm",
           "check_resumed_weights"]


class DivergenceError(FloatingPointError):
    """Training diverged; the message names the quantity, its value, the bound and the config key."""


def _total_norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    norm = torch.nn.utils.get_total_norm([t.detach() for t in tensors])
    if hasattr(norm, "full_tensor"):  # DTensor shards: the global norm (a collective)
        norm = norm.full_tensor()
    return float(norm)


def weight_norm(params: list[torch.Tensor]) -> float:
    return _total_norm(params)


def grad_norm(params: list[torch.Tensor]) -> float:
    return _total_norm([p.grad for p in params if p.grad is not None])


def _describe(what: str, value: float, bound: float, key: str) -> str | None:
    """None when ``value`` is within ``bound``, else the text naming the norm, its value and the bound."""
    if math.isfinite(value) and not (bound > 0 and value > bound):
        return None
    shown = f"{value:.3g}" if math.isfinite(value) else f"{value} (non-finite values, or beyond float32 range)"
    return f"{what} is {shown} (bound {key}={bound:g})"


def _raise_diverged(problem: str | None, key: str, iteration: int) -> None:
    if problem is not None:
        raise DivergenceError(f"training diverged at iteration {iteration + 1}: {problem}; stopping without saving "
                              f"a checkpoint. Lower optim.base_lr (or raise {key} if this norm is expected)")


def check_grad_norms(norms: dict[str, float], bound: float, iteration: int) -> None:
    """``norms``: pre-clip gradient norm per module (``backbone``, ``dino_head``, ...)."""
    for name, value in norms.items():
        _raise_diverged(_describe(f"the {name} gradient norm", value, bound, "optim.max_grad_norm"),
                        "optim.max_grad_norm", iteration)


def check_weight_norm(value: float, bound: float, iteration: int) -> None:
    _raise_diverged(_describe("the student weight norm", value, bound, "optim.max_weight_norm"),
                    "optim.max_weight_norm", iteration)


def check_resumed_weights(value: float, bound: float, checkpoint: str) -> None:
    """A checkpoint written without this guard (or with a higher bound) may hold diverged weights."""
    problem = _describe("the student weight norm", value, bound, "optim.max_weight_norm")
    if problem is not None:
        raise DivergenceError(f"checkpoint {checkpoint} holds diverged weights: {problem}. Delete it to resume "
                              f"from the one before, or start in a new --output with a lower optim.base_lr")
