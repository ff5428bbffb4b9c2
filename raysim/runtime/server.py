"""Server: the Ray actor that owns the global adapter, samples clients and aggregates.

It puts the global adapter into the object store once per version (once per round), and receives
one partial sum per worker, never one message per client.
"""

from __future__ import annotations

import numpy as np
import ray

from raysim.methods import get as get_method
from raysim.methods.common import apply_step, lora_products, relative_aggregation_error, server_step
from raysim.privacy.central_dp import noisy_mean, poisson_clients

_SAMPLING_STREAM = 0x5A3
_NOISE_STREAM = 0xD9


@ray.remote(num_cpus=0)
class Server:
    def __init__(
        self, method: str, seed: int, num_clients: int, lr: float = 1.0, momentum: float = 0.0, central_dp: dict | None = None
    ):
        """``central_dp``: {noise_multiplier, clip_norm, sample_rate} for DP-FedAvg, or None."""
        self.method = get_method(method)
        self.central_dp = central_dp
        self.seed = seed
        self.num_clients = num_clients
        self.lr, self.momentum = lr, momentum
        self.momentum_buffer: dict[str, np.ndarray] | None = None
        self.state: dict[str, np.ndarray] = {}
        self.frozen_a: dict[str, np.ndarray] = {}
        self._broadcast_ref = None

    def initialize(self, initial_state: dict, frozen_a: dict) -> None:
        """Start from the adapter the workers built (same seed everywhere); A only for diagnostics."""
        self.state = {k: np.array(v) for k, v in initial_state.items()}
        self.frozen_a = {k: np.array(v) for k, v in frozen_a.items()}
        self._broadcast_ref = None

    def sample(self, round_idx: int, per_round: int, excluded: list[int] | tuple = ()) -> list[int]:
        """Clients for this round, drawn from (seed, round) alone: ``per_round`` of the clients not
        ``excluded`` without replacement, or under central DP each client with probability q."""
        rng = np.random.default_rng([self.seed, round_idx, _SAMPLING_STREAM])
        if self.central_dp:
            return poisson_clients(rng, self.num_clients, self.central_dp["sample_rate"])
        eligible = np.setdiff1d(np.arange(self.num_clients), np.asarray(excluded, dtype=np.int64))
        chosen = rng.choice(eligible, size=min(per_round, len(eligible)), replace=False)
        return sorted(int(c) for c in chosen)

    def broadcast(self) -> list:
        """A reference to the current global adapter (wrapped in a list so Ray does not resolve it)."""
        if self._broadcast_ref is None:
            self._broadcast_ref = ray.put(self.state)
        return [self._broadcast_ref]

    def aggregate(self, round_idx: int, weight_total: float, *payloads: dict) -> dict:
        """Sum the workers' partial sums, apply the method's server update, and report diagnostics.

        Under central DP the noise is added to the sum even when no client took part: that noisy
        release is what the accountant counts."""
        if not self.central_dp and (not payloads or weight_total <= 0):
            return {"aggregation_error": float("nan")}
        delta_sum = {k: sum((p["delta_sum"][k] for p in payloads), np.zeros_like(v)) for k, v in self.state.items()}
        if self.central_dp:
            dp = self.central_dp
            rng = np.random.default_rng([self.seed, round_idx, _NOISE_STREAM])
            expected_clients = dp["sample_rate"] * self.num_clients
            update = noisy_mean(delta_sum, dp["noise_multiplier"], dp["clip_norm"], expected_clients, rng)
        else:
            update = self.method.aggregate(delta_sum, weight_total)
        error = float("nan")
        if payloads and payloads[0]["product_sum"]:
            # The error of averaging itself: the clients' mean adapter, before the server optimizer.
            averaged = apply_step(self.state, update)
            mean_products = {k: sum(p["product_sum"][k] for p in payloads) / weight_total for k in payloads[0]["product_sum"]}
            error = relative_aggregation_error(mean_products, lora_products(averaged, self.frozen_a))
        step, self.momentum_buffer = server_step(update, self.momentum_buffer, self.lr, self.momentum)
        self.state = apply_step(self.state, step)
        self._broadcast_ref = None
        return {"aggregation_error": error}

    def global_state(self) -> dict:
        return self.state
