"""Rank statistics the benches share (imported by the bench scripts beside it)."""

from __future__ import annotations

import numpy as np


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors (ties broken by position)."""
    ranks = [np.argsort(np.argsort(v)) for v in (x, y)]
    return float(np.corrcoef(*ranks)[0, 1])
