"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran, Bartlett, ICML 2018, Option I of
Algorithm 1, Definition 2): for each coordinate, drop the largest and the smallest beta fraction
of the clients' values and average the rest. The paper removes beta * m of each side for m
clients; beta * m is rounded down here, so beta = 0 is the plain mean. Unweighted, as defined."""

from __future__ import annotations

import numpy as np


def trimmed_count(n: int, beta: float) -> int:
    """Values dropped at each end of a coordinate: floor(beta * n), leaving at least one."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta: {beta} is not in [0, 0.5)")
    return min(int(np.floor(beta * n)), (n - 1) // 2)


def trimmed_mean(updates: np.ndarray, beta: float) -> np.ndarray:
    if updates.ndim != 2 or len(updates) == 0:
        raise ValueError(f"updates: need an (n, d) matrix with n >= 1, got shape {updates.shape}")
    b = trimmed_count(len(updates), beta)
    ordered = np.sort(updates, axis=0)
    return ordered[b : len(updates) - b].mean(axis=0)
