"""Bit codes of perceptual hashes (pHash, PCA hash): distances between packed codes."""

from __future__ import annotations

import numpy as np


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between rows of two packed code arrays (uint8, one row per image)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(1)
