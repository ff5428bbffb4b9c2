"""Fixed-point encoding of float vectors into the ring Z_(2^k), where masked sums are taken.

A value is clipped to [-c, c], mapped to [0, 2^bits - 1] and rounded stochastically (unbiased).
Summing n encodings needs k >= bits + ceil(log2 n) bits so the sum cannot wrap; k is at most 64,
the width of the arrays that carry it.
"""

from __future__ import annotations

import math

import numpy as np

MAX_RING_BITS = 64


def ring_bits(bits: int, num_clients: int) -> int:
    """The smallest k for which the sum of ``num_clients`` encodings cannot overflow Z_(2^k).
    ValueError if that needs more than 64 bits."""
    k = bits + max(1, math.ceil(math.log2(max(num_clients, 2))))
    if k > MAX_RING_BITS:
        raise ValueError(
            f"{num_clients} clients x {bits}-bit values need a {k}-bit ring, more than {MAX_RING_BITS}; lower the bits"
        )
    return k


def ring_mask(k: int) -> np.uint64:
    return np.uint64((1 << k) - 1) if k < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def encode(values: np.ndarray, clip: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip], scale to [0, 2^bits - 1], round stochastically; uint64."""
    scaled = (np.clip(values.astype(np.float64), -clip, clip) + clip) * (_levels(bits) / (2 * clip))
    low = np.floor(scaled)
    return (low + (rng.random(scaled.shape) < (scaled - low))).astype(np.uint64)


def decode_sum(total: np.ndarray, count: int, clip: float, bits: int) -> np.ndarray:
    """The float sum of ``count`` encoded vectors from their (unwrapped) integer sum."""
    return total.astype(np.float64) * (2 * clip / _levels(bits)) - count * clip


def sum_error_bound(count: int, clip: float, bits: int) -> float:
    """Largest possible |decoded sum - sum of the clipped values| per coordinate: each value is
    off by less than one quantization step, 2c / (2^bits - 1)."""
    return count * 2 * clip / _levels(bits)


def encode_update(update: np.ndarray, weight: float, clip: float, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One client's input to the secure sum: its update scaled by its weight in (0, 1], then the
    weight itself (on [-1, 1], so a weight of 1 is exact), so that the server learns the weighted
    sum and the sum of weights and nothing per client. Also returns how many values were clipped."""
    scaled = update.astype(np.float64) * weight
    clipped = int(np.count_nonzero(np.abs(scaled) > clip))
    return np.concatenate([encode(scaled, clip, bits, rng), encode(np.array([weight]), 1.0, bits, rng)]), clipped


def decode_update_sum(total: np.ndarray, count: int, clip: float, bits: int) -> tuple[np.ndarray, float]:
    """(weighted sum of the updates, sum of the weights) from the sum of ``count`` encode_update inputs."""
    return decode_sum(total[:-1], count, clip, bits), float(decode_sum(total[-1:], count, 1.0, bits)[0])
