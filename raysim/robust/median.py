"""Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, "Byzantine-robust distributed
learning: towards optimal statistical rates", ICML 2018, Option II of Algorithm 1): each
coordinate of the aggregate is the median of the clients' values of that coordinate. Client
weights play no part, as in the paper; an even count takes the mean of the two middle values."""

from __future__ import annotations

import numpy as np


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    if updates.ndim != 2 or len(updates) == 0:
        raise ValueError(f"updates: need an (n, d) matrix with n >= 1, got shape {updates.shape}")
    return np.median(updates, axis=0)
