"""Central (user-level) DP: DP-FedAvg (McMahan et al., ICLR 2018).

Each sampled client clips its whole update (all sent tensors together) to L2 norm ``clip_norm``;
the server adds Gaussian noise of std ``noise_multiplier * clip_norm`` to the sum and divides by
the *expected* number of clients (the fixed-denominator estimator), so one client changes the
released average by at most clip_norm / expected_clients whatever the others do. Clients are
sampled independently with rate q = per_round / num (Poisson), the sampling the accountant assumes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:  # the server imports this module and has no use for torch
    import torch


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all tensors together, accumulated in float64."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """(update scaled to L2 norm at most ``clip_norm`` over all tensors, its norm before)."""
    norm = update_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: t * factor for k, t in update.items()}, norm


def noisy_mean(
    update_sum: Mapping[str, np.ndarray],
    noise_multiplier: float,
    clip_norm: float,
    expected_clients: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """(sum + N(0, (noise_multiplier * clip_norm)^2 I)) / expected_clients, tensor by tensor."""
    std = noise_multiplier * clip_norm
    return {
        k: ((v + rng.normal(0.0, std, size=v.shape)) / expected_clients).astype(v.dtype)
        for k, v in sorted(update_sum.items())
    }


def poisson_clients(rng: np.random.Generator, num_clients: int, rate: float) -> list[int]:
    """Each client independently with probability ``rate``."""
    chosen = np.flatnonzero(rng.random(num_clients) < rate)
    return [int(c) for c in chosen]
