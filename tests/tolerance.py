"""Numeric tolerances that follow from floating-point arithmetic (every float comparison in tests/ uses them).

Derivation (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sections 2.2, 3.1): with the unit
roundoff ``u = eps / 2`` of the dtype, a computed sum of ``n`` terms (a dot product, a matrix product with inner
dimension ``n``, a mean over ``n`` values, a gradient accumulated over ``n`` rows) satisfies

    |fl(sum x_i) - sum x_i| <= gamma_{n-1} * sum |x_i|,      gamma_k = k u / (1 - k u) ~= k u.

Two evaluations of the same value that differ only in rounding (another summation order, another kernel
blocking or vector width on another CPU, a sum split over ranks and all-reduced) therefore differ by at most
``2 gamma_{n-1} sum|x_i| <= n * eps * M`` where ``M`` bounds the terms' scale. When ``depth`` such reductions are
chained (layers of a network, training steps) and each stage is well conditioned (normalised layers, Adam steps
whose size is ~lr whatever the gradient's), first-order propagation adds the stages' bounds:

    atol = depth * n_terms * eps(dtype) * magnitude

* ``dtype``: the lowest precision the compared values went through (float32 for model code, bfloat16 under
  mixed precision, float64 for NumPy / Python arithmetic on doubles).
* ``n_terms``: the length of the longest reduction behind a value (state it at the call site).
* ``magnitude``: the scale of the terms; by default the largest ``|expected|`` of the whole tensor (the tensor's
  magnitude, not each element's: an element near zero gets the same absolute slack as the largest one, since
  its rounding errors come from terms of the tensor's scale).
* ``depth``: the number of chained reductions (1 unless stated).

The bound is the worst case (linear in ``n``, not the statistical ``sqrt(n)``), so it holds on any CPU, BLAS and
thread count; tests that use it also check that the effect they detect is far larger than it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

__all__ = ["eps", "rounding_tol", "assert_close", "approx"]

_NP = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is float:
        return torch.float64
    return _NP[np.dtype(dtype)]


def eps(dtype: Any = torch.float32) -> float:
    """Machine epsilon (the spacing of floats at 1.0) of a torch / NumPy dtype, or ``float`` (float64)."""
    return float(torch.finfo(_torch_dtype(dtype)).eps)


def rounding_tol(magnitude: float, n_terms: int = 1, dtype: Any = torch.float32, depth: int = 1) -> float:
    """``depth * n_terms * eps(dtype) * magnitude``: the largest difference rounding alone can make (see the
    module docstring)."""
    return float(depth) * max(int(n_terms), 1) * eps(dtype) * float(magnitude)


def _dtype_of(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.dtype
    if isinstance(x, np.ndarray) or isinstance(x, np.generic):
        return x.dtype
    return float


def _magnitude(x: Any) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().double().abs().max()) if x.numel() else 0.0
    a = np.abs(np.asarray(x, dtype=np.float64))
    return float(a.max()) if a.size else 0.0


def assert_close(actual: Any, expected: Any, *, n_terms: int = 1, dtype: Any = None, depth: int = 1,
                 magnitude: float | None = None, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` (tensors, arrays or numbers; equal shapes, or a scalar) within
    ``rounding_tol``; ``dtype`` defaults to the lower precision of the two, ``magnitude`` to max |expected|."""
    if dtype is None:
        dtypes = [_torch_dtype(_dtype_of(actual)), _torch_dtype(_dtype_of(expected))]
        dtypes = [d for d in dtypes if d.is_floating_point] or [torch.float64]
        dtype = max(dtypes, key=lambda d: torch.finfo(d).eps)
    mag = _magnitude(expected) if magnitude is None else magnitude
    atol = rounding_tol(mag, n_terms, dtype, depth)
    a = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    e = expected.detach().double().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected,
                                                                                                          np.float64)
    np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=(msg or "") +
                               f" (tolerance {atol:.3g} = {depth} x {n_terms} terms x eps {eps(dtype):.3g} "
                               f"x magnitude {mag:.3g})")


def approx(expected: float, *, n_terms: int = 1, dtype: Any = float, depth: int = 1,
           magnitude: float | None = None):
    """``pytest.approx`` with the ``rounding_tol`` of a scalar (magnitude: |expected| unless given)."""
    mag = abs(float(expected)) if magnitude is None else magnitude
    return pytest.approx(expected, rel=0, abs=rounding_tol(mag, n_terms, dtype, depth))
