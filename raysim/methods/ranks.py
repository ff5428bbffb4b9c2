"""Per-client LoRA ranks (``clients.ranks``): which rank each virtual client trains.

Heterogeneous federations (FLoRA, Wang et al. NeurIPS 2024; HetLoRA, Cho et al. EMNLP 2024) give
weak devices small adapters and strong ones large. A rank list is cycled over the client ids, as
FLoRA's experiments assign ``[64, 32, 16, 16, 8, 8, 4, 4, 4, 4]``; a tier mix ``{rank: fraction}``
gives each rank that share of the clients (largest remainders get the leftover clients), shuffled
by the run's seed alone. No Ray, no torch.

On the resident model, built once at the largest rank, a client of rank r uses the first r rank
slots of every LoRA module: rows of A, columns of B (:func:`rank_slices`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from raysim.methods.common import LORA_A, LORA_B

_RANK_STREAM = 0x4A7


def parse_ranks(value: Any) -> list[int] | dict[int, float]:
    """``clients.ranks`` as a list of ranks or a {rank: fraction} mix; ValueError saying what is wrong."""
    if isinstance(value, Mapping):
        mix: dict[int, float] = {}
        for key, fraction in value.items():
            try:
                rank = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"tier '{key}' is not a rank (an integer)") from None
            if rank < 1:
                raise ValueError(f"tier {rank} must be a rank >= 1")
            if not isinstance(fraction, (int, float)) or fraction < 0:
                raise ValueError(f"tier {rank}: fraction {fraction!r} must be a number >= 0")
            mix[rank] = float(fraction)
        if not mix or abs(sum(mix.values()) - 1) > 1e-6:
            raise ValueError(f"the tier fractions sum to {sum(mix.values()):g}, not 1")
        return mix
    if isinstance(value, (list, tuple)) and value:
        ranks = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ValueError(f"{item!r} is not a rank (an integer >= 1)")
            ranks.append(int(item))
        return ranks
    raise ValueError("must be a list of ranks, e.g. [16, 8, 4], or a tier mix, e.g. {16: 0.2, 8: 0.3, 4: 0.5}")


def largest_rank(value: Any) -> int:
    parsed = parse_ranks(value)
    return max(r for r in parsed if not isinstance(parsed, dict) or parsed[r] > 0)


def client_ranks(value: Any, num_clients: int, seed: int) -> tuple[int, ...]:
    """Each client's rank, by client id, from ``clients.ranks``."""
    parsed = parse_ranks(value)
    if isinstance(parsed, list):
        return tuple(parsed[c % len(parsed)] for c in range(num_clients))
    tiers = sorted(parsed, reverse=True)
    exact = [parsed[r] * num_clients for r in tiers]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(tiers)), key=lambda i: (counts[i] - exact[i], -tiers[i]))[: num_clients - sum(counts)]:
        counts[i] += 1
    ranks = np.repeat(tiers, counts)
    return tuple(int(r) for r in np.random.default_rng([seed, _RANK_STREAM]).permutation(ranks))


def rank_slices(name: str, rank: int) -> tuple[slice, ...] | None:
    """The part of LoRA tensor ``name`` a client of ``rank`` uses: A's first rows, B's first
    columns; None for other tensors (the head), which every client uses whole."""
    if LORA_A in name:
        return (slice(0, rank),)
    if LORA_B in name:
        return (slice(None), slice(0, rank))
    return None


def truncated(values: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """``values`` (arrays or tensors) with every LoRA tensor cut to its first ``rank`` slots (its own shape)."""
    out = {}
    for name, value in values.items():
        cut = rank_slices(name, rank)
        out[name] = value if cut is None else value[cut]
    return out


def padded(values: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`truncated`: each tensor zero-padded to the shape of ``like``'s."""
    out = {}
    for name, value in values.items():
        full = np.zeros_like(like[name])
        full[tuple(slice(0, n) for n in value.shape)] = value
        out[name] = full
    return out


def nbytes_at_rank(values: Mapping[str, Any], rank: int) -> int:
    """Bytes of ``values`` on the wire when a client of ``rank`` sends only its slots."""
    total = 0
    for name, value in values.items():
        cut = rank_slices(name, rank)
        part = value if cut is None else value[cut]
        total += int(part.numel() * part.element_size()) if hasattr(part, "numel") else int(part.nbytes)
    return total
