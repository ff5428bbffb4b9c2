"""Local (sample-level) DP: each virtual client trains with DP-SGD (Abadi et al., CCS 2016) on its
own shard, as in the FFA-LoRA paper's private experiments.

Per-sample clipping and noise come from Opacus. One set of Opacus hooks and one DPOptimizer wrap
a worker's resident model and are shared by all its clients; what is per client (its noise
multiplier, sampling rate, noise generator and accountant) is set before its local steps.
Batches are Poisson samples of the client's shard with rate q = batch_size / examples (expected
batch size = batch_size), the sampling Opacus' accountants assume.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from raysim.privacy.accounting import solve_noise_multiplier

if TYPE_CHECKING:  # the driver plans noise with this module and has no use for torch
    import torch
    import torch.nn as nn

# Clients' sampling rates are rounded up to this geometric grid before solving for noise, so a
# thousand clients of different sizes need a few dozen solves; rounding q up is conservative.
_RATE_GRID_STEP = 1.1


def sample_rate(examples: int, batch_size: int) -> float:
    return min(1.0, batch_size / examples)


def poisson_batch(rng: np.random.Generator, examples: int, rate: float) -> np.ndarray:
    """Each example independently with probability ``rate`` (may be empty)."""
    return np.flatnonzero(rng.random(examples) < rate)


def _grid_rate(rate: float) -> float:
    return min(1.0, _RATE_GRID_STEP ** math.ceil(math.log(rate) / math.log(_RATE_GRID_STEP) - 1e-9))


def plan_noise(
    client_sizes: Sequence[int], batch_size: int, steps: int, target_epsilon: float, delta: float, accountant: str
) -> list[float]:
    """Each client's noise multiplier, so that ``steps`` DP-SGD steps at its sampling rate spend at
    most ``target_epsilon``. ValueError if some client cannot reach it."""
    solved: dict[float, float] = {}
    sigmas = []
    for n in client_sizes:
        rate = _grid_rate(sample_rate(n, batch_size))
        if rate not in solved:
            solved[rate] = solve_noise_multiplier(target_epsilon, delta, rate, steps, accountant)
        sigmas.append(solved[rate])
    return sigmas


class DPSGD:
    """Opacus DP-SGD over a resident model: ``loss`` to compute the loss, ``optimizer`` to step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, grad_sample_mode: str = "hooks"):
        from opacus.grad_sample.utils import prepare_module
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        from raysim.losses import ExampleLoss

        # Opacus' backward hooks also fire where no input needs a gradient (frozen embeddings):
        # harmless, and torch would warn at every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        ghost = grad_sample_mode == "ghost"
        extra = {"max_grad_norm": max_grad_norm} if ghost else {}
        # Hooks on the model's trainable layers (no wrapper module): the model must be in train mode.
        self.hooks = prepare_module(model, grad_sample_mode, wrap_model=False, batch_first=True, loss_reduction="mean", **extra)
        optimizer_class = DPOptimizerFastGradientClipping if ghost else DPOptimizer
        self.optimizer = optimizer_class(
            optimizer, noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="mean"
        )
        criterion = ExampleLoss()
        self.loss = DPLossFastGradientClipping(self.hooks, self.optimizer, criterion, "mean") if ghost else criterion

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A block without per-sample gradients: a backward pass that is not a client's DP-SGD
        step (Fed-SB's initialisation on the public split)."""
        self.hooks.disable_hooks()
        try:
            yield
        finally:
            self.hooks.enable_hooks()

    def set_client(self, noise_multiplier: float, expected_batch_size: float, generator: torch.Generator) -> None:
        """Noise, normalisation and noise generator for the next client's steps."""
        self.optimizer.noise_multiplier = noise_multiplier
        self.optimizer.expected_batch_size = expected_batch_size
        self.optimizer.generator = generator
