"""Math shared by the LoRA-family methods: averaging adapter deltas, the server optimizer, and
LoRA product diagnostics.

An adapter state is a dict ``name -> array`` using the parameter names of the PEFT model, so a
LoRA module ``m`` contributes ``m.lora_A.<adapter>.weight`` (r x d_in) and
``m.lora_B.<adapter>.weight`` (d_out x r); its weight update is ``scaling * B @ A``.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Mapping

import numpy as np

LORA_A, LORA_B = ".lora_A.", ".lora_B."
BASE_LAYER = ".base_layer."  # PEFT's name for the adapted layer's own weights: <module>.base_layer.weight


def is_lora_a(name: str) -> bool:
    return LORA_A in name


def is_lora_tensor(name: str) -> bool:
    return LORA_A in name or LORA_B in name


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A name, B name) for every LoRA module in ``names``."""
    names = set(names)
    pairs = {}
    for a in sorted(n for n in names if LORA_A in n):
        b = a.replace(LORA_A, LORA_B)
        if b in names:
            pairs[a.split(LORA_A)[0]] = (a, b)
    return pairs


_CLIENT_STREAM = 0xC1


def seeded_lora_a(name: str, shape: tuple[int, ...], seed: int, round_idx: int = 0, client: int | None = None) -> np.ndarray:
    """A LoRA A matrix (float32) drawn from (seed, parameter name) alone, identical in every
    process; ``round_idx`` > 0 draws a fresh one for that round (FLoRA restarts LoRA every round),
    and ``client`` one of that client's own.

    Same distribution as PEFT's default (Kaiming-uniform with a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))).
    """
    key = [seed, zlib.crc32(name.encode())] + ([round_idx] if round_idx else []) + ([_CLIENT_STREAM, client] if client is not None else [])
    rng = np.random.default_rng(key)
    bound = 1.0 / float(np.sqrt(shape[-1]))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def mean_delta(delta_sum: Mapping[str, np.ndarray], total_weight: float) -> dict[str, np.ndarray]:
    """FedAvg's update (McMahan et al., 2017): (sum_i w_i * delta_i) / (sum_i w_i), tensor by tensor."""
    return {k: v / total_weight for k, v in delta_sum.items()}


def server_step(
    update: Mapping[str, np.ndarray], buffer: Mapping[str, np.ndarray] | None, lr: float, momentum: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The server optimizer (FedAvgM; Hsu et al., 2019, and Reddi et al., ICLR 2021): returns
    (step, new buffer) with buffer = momentum * buffer + update and step = lr * buffer.

    lr=1, momentum=0 is plain FedAvg. Momentum averages the round updates over time, which damps
    the swing that a small, label-skewed sample of clients gives each round. The step is linear in
    the update, so FFA-LoRA's aggregation stays exact.
    """
    new_buffer = {k: (momentum * buffer[k] if buffer else 0) + u for k, u in update.items()}
    return {k: lr * b for k, b in new_buffer.items()}, new_buffer


def apply_step(state: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v + step[k]).astype(v.dtype) for k, v in state.items()}


def lora_products(state: Mapping[str, np.ndarray], a_override: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Module prefix -> B @ A (unscaled), taking A from ``a_override`` when it is not in ``state``."""
    a_override = a_override or {}
    names = set(state) | set(a_override)
    out = {}
    for prefix, (a, b) in lora_pairs(names).items():
        a_mat = state[a] if a in state else a_override[a]
        out[prefix] = state[b] @ a_mat
    return out


_SKETCH_STREAM = 0x5C


def sketch_matrix(prefix: str, d_in: int, columns: int, seed: int, round_idx: int) -> np.ndarray | None:
    """The aggregation-error diagnostic's random sketch of module ``prefix`` in one round: a
    d_in x ``columns`` Gaussian with entries N(0, 1/columns), the same in every process; None for
    ``columns=0`` (exact products).

    For any M, E||M S||_F^2 = ||M||_F^2, and ||M S||_F^2 / ||M||_F^2 has standard deviation at most
    sqrt(2 / columns) (equality for rank one), so each sketched norm is off by a relative standard
    deviation of at most 1/sqrt(2 columns), and the error (a ratio of two norms) by at most about
    1/sqrt(columns): 18% at 32 columns in the worst case, less over many modules. It costs
    (d_out + d_in) r columns per client instead of d_out d_in r, and a worker sends d_out x columns
    per module instead of d_out x d_in."""
    if columns == 0:
        return None
    rng = np.random.default_rng([seed, round_idx, zlib.crc32(prefix.encode()), _SKETCH_STREAM])
    return (rng.standard_normal((d_in, columns)) / np.sqrt(columns)).astype(np.float32)


def relative_aggregation_error(
    mean_of_products: Mapping[str, np.ndarray], product_of_means: Mapping[str, np.ndarray]
) -> float:
    """|| mean_i(B_i A_i) - B_avg A_avg ||_F / || mean_i(B_i A_i) ||_F over all LoRA modules.

    Zero means the server's averaged adapter reproduces the average of the clients' updates
    (what FFA-LoRA guarantees); plain LoRA's FedAvg of A and B separately does not (FedIT).
    """
    num = sum(float(np.sum((mean_of_products[k] - product_of_means[k]) ** 2)) for k in mean_of_products)
    den = sum(float(np.sum(mean_of_products[k] ** 2)) for k in mean_of_products)
    return float(np.sqrt(num / den)) if den > 0 else 0.0
