"""Privacy accounting: the epsilon of a composition of subsampled Gaussian mechanisms, and the
noise multiplier that reaches a target epsilon.

A history is Opacus' own form, a list of ``(noise_multiplier, sample_rate, steps)``: what
``opacus.accountants.RDPAccountant.history`` holds. Epsilon is computed exactly as Opacus' RDP and
PRV accountants compute it; for RDP the per-step Renyi divergence of each (sample rate, noise)
pair is cached, because a client's pair never changes and Opacus would recompute it (~70 ms) at
every query. Opacus is imported on first use, so a run without DP never pays its import (~1 s).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from functools import lru_cache
from typing import Iterable

import numpy as np

# Opacus' RDPAccountant.DEFAULT_ALPHAS (a test checks they stay equal).
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
# Solving needs many evaluations; integer orders are ~9x cheaper and give an epsilon at least as
# large, so a noise multiplier solved on them is conservative under the full set of orders.
_INTEGER_ORDERS = [a for a in RDP_ORDERS if float(a).is_integer()]


@lru_cache(maxsize=65536)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    return rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)


@contextlib.contextmanager
def _quiet():
    """Opacus warns when the best RDP order is at the end of its range (the bound is then a little
    loose, never wrong), which a search over noise levels hits routinely; its PRV code takes
    log(1 - q), which numpy flags at q = 1 although the result is handled."""
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """(epsilon for ``delta``) spent by ``history``; 0 for an empty history."""
    history = [(sigma, q, steps) for sigma, q, steps in history if steps > 0]
    if not history:
        return 0.0
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if accountant == "rdp":
        total = sum(steps * _rdp_per_step(q, sigma) for sigma, q, steps in history)
        with _quiet():
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


def solve_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier (within Opacus' tolerance) whose epsilon after ``steps`` steps
    at ``sample_rate`` is at most ``target_epsilon``. ValueError if no noise is large enough."""
    from opacus.accountants.utils import get_noise_multiplier

    kwargs = {"alphas": _INTEGER_ORDERS} if accountant == "rdp" else {}
    with _quiet():
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            **kwargs,
        )
    if not math.isfinite(sigma):
        raise ValueError("The privacy budget is too low.")
    return float(sigma)
