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


# Orders 2, 3, ...: where Zhu & Wang's bound for a Poisson-subsampled mechanism holds.
INTEGER_ORDERS_FROM_2 = list(range(2, 64))


def poisson_subsampled_rdp(sample_rate: float, rdp: np.ndarray) -> np.ndarray:
    """The RDP at orders 2, 3, ... of a mechanism run on a Poisson sample at ``sample_rate``, from
    its RDP ``rdp`` at the same orders: the general upper bound of Zhu & Wang (ICML 2019,
    Theorem 6), which holds for any mechanism, not only the Gaussian:

        (1/(a-1)) log[(1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^eps(2)
                      + 3 sum_{j=3..a} C(a,j) q^j (1-q)^(a-j) e^((j-1) eps(j))]

    Computed in log space: e^((j-1) eps(j)) overflows a float for the orders that matter."""
    rdp = np.asarray(rdp, dtype=np.float64)
    q = float(sample_rate)
    if q >= 1.0:
        return rdp.copy()
    log_q, log_1q = math.log(q), math.log1p(-q)
    out = np.empty_like(rdp)
    for i in range(len(rdp)):
        a = i + 2
        terms = [(a - 1) * log_1q + math.log(a * q - q + 1), _log_comb(a, 2) + 2 * log_q + (a - 2) * log_1q + rdp[0]]
        terms += [math.log(3) + _log_comb(a, j) + j * log_q + (a - j) * log_1q + (j - 1) * rdp[j - 2] for j in range(3, a + 1)]
        out[i] = float(np.logaddexp.reduce(terms)) / (a - 1)
    return out


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon for ``delta``) of a composition whose RDP at orders 2, 3, ... is ``rdp``: Opacus'
    conversion (Balle et al. 2020), the one the other privacy modes report."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    with _quiet():
        eps, _ = rdp_analysis.get_privacy_spent(orders=INTEGER_ORDERS_FROM_2, rdp=np.asarray(rdp), delta=delta)
    return float(eps)
