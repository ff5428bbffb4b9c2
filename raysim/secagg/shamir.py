"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field Z_p, p = 2^31 - 1.

A secret is cut into 9 limbs of 30 bits (each below p); every limb gets its own random polynomial
of degree t - 1 and the same evaluation points, so one share is 9 field elements. With p < 2^31
every product fits in int64, which lets numpy evaluate all of a client's shares at once.
"""

from __future__ import annotations

import numpy as np

PRIME = (1 << 31) - 1
_LIMB_BITS = 30
_LIMBS = 9  # 9 x 30 = 270 bits >= 256


def _limbs(secret: bytes) -> np.ndarray:
    value = int.from_bytes(secret, "big")
    return np.array([(value >> (_LIMB_BITS * i)) & ((1 << _LIMB_BITS) - 1) for i in range(_LIMBS)], dtype=np.int64)


def _secret(limbs: np.ndarray) -> bytes:
    value = sum(int(limb) << (_LIMB_BITS * i) for i, limb in enumerate(limbs))
    return (value % (1 << 256)).to_bytes(32, "big")  # too few shares give garbage, not an error


def randomness_bytes(threshold: int) -> int:
    """Random bytes :func:`share` needs: the polynomials' coefficients above the constant term."""
    return 8 * _LIMBS * max(threshold - 1, 0)


def share(secret: bytes, threshold: int, points: list[int], randomness: bytes) -> dict[int, np.ndarray]:
    """Shares of a 32-byte ``secret`` at the non-zero ``points``; any ``threshold`` recover it.
    ``randomness`` (at least 8 * 9 * (threshold - 1) bytes, from a cryptographic source) draws the
    polynomials' other coefficients."""
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold {threshold} must be in [1, {len(points)}]")
    if len(secret) != 32:
        raise ValueError("secrets are 32 bytes")
    need = randomness_bytes(threshold)
    if len(randomness) < need:
        raise ValueError(f"need {need} random bytes, got {len(randomness)}")
    coefficients = np.frombuffer(randomness[:need], dtype=np.uint64).reshape(threshold - 1, _LIMBS) % np.uint64(PRIME)
    x = np.asarray(points, dtype=np.int64)[:, None]
    acc = np.zeros((len(points), _LIMBS), dtype=np.int64)
    for coefficient in coefficients[::-1].astype(np.int64):  # Horner, highest degree first
        acc = (acc + coefficient) % PRIME * x % PRIME
    acc = (acc + _limbs(secret)) % PRIME
    return {int(p): acc[i] for i, p in enumerate(points)}


def lagrange_at_zero(points: list[int]) -> np.ndarray:
    """Coefficients l_j with f(0) = sum_j l_j f(x_j) mod p, for polynomials of degree < len(points)."""
    out = []
    for j, xj in enumerate(points):
        num, den = 1, 1
        for m, xm in enumerate(points):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        out.append(num * pow(den, PRIME - 2, PRIME) % PRIME)
    return np.array(out, dtype=np.int64)


def reconstruct(shares: dict[int, np.ndarray], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the first ``threshold`` are used)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares)[:threshold]
    weights = lagrange_at_zero(points)
    limbs = np.zeros(_LIMBS, dtype=np.int64)
    for w, p in zip(weights, points):
        limbs = (limbs + w * shares[p] % PRIME) % PRIME
    return _secret(limbs)
