"""Attacks on a malicious client's message, applied to its summable tensors after its method
built them, as the client would before sending:

- ``sign_flip``: the update negated (Damaskinos et al., ICML 2018; Fang et al., USENIX Security
  2020 use it as the baseline Byzantine update);
- ``scale``: the update boosted by ``attack.scale`` (model replacement, Bagdasaryan et al.,
  AISTATS 2020: a factor of about n / eta cancels the averaging of n clients);
- ``gaussian``: the update replaced by N(0, attack.noise_std^2) noise (Blanchard et al., NeurIPS
  2017's Gaussian Byzantine workers), drawn from (seed, round, client).

Under secure aggregation a malicious client also skips ``server.aggregator: norm_bound``'s
clipping, which each client then applies to itself; without it the server clips every update
(raysim.runtime.host)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

_NOISE_STREAM = 0x6A55


def poisoned_update(kind: str, update: Mapping[str, torch.Tensor], scale: float, noise_std: float, seed: int, round_idx: int, client: int) -> dict[str, torch.Tensor]:
    if kind == "sign_flip":
        return {k: -v for k, v in update.items()}
    if kind == "scale":
        return {k: v * scale for k, v in update.items()}
    if kind == "gaussian":
        state = np.random.SeedSequence([seed, round_idx, client, _NOISE_STREAM]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) & 0x7FFFFFFFFFFFFFFF)
        return {k: (torch.randn(v.shape, generator=generator, dtype=torch.float32) * noise_std).to(v.dtype).to(v.device) for k, v in sorted(update.items())}
    raise ValueError(f"attack.kind: '{kind}' is not an update attack")
