"""Privacy accounting: the epsilon of a composition of Poisson-subsampled Gaussian mechanisms
(add/remove neighbours), and the noise multiplier that reaches a target epsilon.

A history is Opacus' own form, a list of ``(noise_multiplier, sample_rate, steps)``. Three
accountants, all upper bounds on the true epsilon:

- ``pld`` (the default): the privacy loss distribution of Google's ``dp-accounting`` (Koskela et
  al. 2020; Doroshenko et al. 2022), pessimistic discretisation, connect-the-dots: the tightest of
  the three, within 0.01% of exact at the grid used here (tests check it against Microsoft's
  ``prv-accountant``). pfl-research defaults to it too.
- ``prv``: Opacus' PRV accountant (Gopi et al. 2021), which adds its error bound (0.01) on top.
- ``rdp``: Renyi DP (Mironov 2017) as Opacus computes it: 12-20% above ``pld`` at raysim's
  settings (docs/PRIVACY.md), kept for comparison with earlier runs and papers.

Results are cached by (noise, rate, steps): a client's pair never changes, and a worker asks for
its clients' epsilon every round. Opacus and dp-accounting are imported on first use, so a run
without DP never pays their import.
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


def epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "pld") -> float:
    """(epsilon for ``delta``) spent by ``history``; 0 for an empty history."""
    history = [(float(sigma), float(q), int(steps)) for sigma, q, steps in history if steps > 0]
    if not history:
        return 0.0
    if accountant == "pld" and min(sigma for sigma, _, _ in history) >= PLD_MIN_NOISE:
        return _pld_epsilon(tuple(_merged(history)), float(delta))
    if accountant == "pld":  # epsilon in the hundreds: RDP's bound, where the PLD's grid would not fit in memory
        accountant = "rdp"
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


def solve_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld") -> float:
    """The smallest noise multiplier (within Opacus' tolerance; 0.1% for ``pld``) whose epsilon
    after ``steps`` steps at ``sample_rate`` is at most ``target_epsilon``. ValueError if no noise
    is large enough."""
    if accountant == "pld":
        return _solve_pld(float(target_epsilon), float(delta), float(sample_rate), int(steps))
    return _solve_opacus(target_epsilon, delta, sample_rate, steps, accountant)


@lru_cache(maxsize=4096)
def _solve_pld(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Bisection between half and all of the RDP solution: RDP's epsilon is never below PLD's, so
    the noise it needs is enough (PLD's was 8-10% less wherever measured); about 10 PLD
    evaluations (20-120 ms each) then find the least."""

    def spent(sigma: float) -> float:
        return _pld_epsilon(((sigma, sample_rate, steps),), delta)

    high = _solve_opacus(target_epsilon, delta, sample_rate, steps, "rdp")
    low = high / 2
    while spent(high) > target_epsilon:  # RDP solved to a tolerance
        low, high = high, high * 1.01
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= target_epsilon else (mid, high)
    return high


def _solve_opacus(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
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


# The PLD's grid of privacy-loss values: pessimistic rounding keeps epsilon an upper bound at any
# interval; 1e-3 is within 0.04% of 1e-4's value at raysim's settings, 10x faster (~50 ms).
PLD_DISCRETIZATION = 1e-3
# Below this noise multiplier the privacy loss spans ~1/sigma^2 (over 1e6 grid points at 1e-3):
# ``pld`` then reports RDP's bound, an upper bound too; epsilon there is in the hundreds.
PLD_MIN_NOISE = 0.05


def _merged(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Steps of the same (noise, rate) added up, in first-seen order: one self-composition each."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


@lru_cache(maxsize=4096)
def _pld_step(noise_multiplier: float, sample_rate: float):
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        noise_multiplier, sampling_prob=sample_rate, value_discretization_interval=PLD_DISCRETIZATION, use_connect_dots=True
    )


@lru_cache(maxsize=65536)
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """The PLD accountant's epsilon of a merged history (add/remove neighbours: dp-accounting takes
    the worse of adding and removing an example)."""
    composed = None
    for sigma, q, steps in history:
        part = _pld_step(sigma, q).self_compose(steps)
        composed = part if composed is None else composed.compose(part)
    assert composed is not None
    return float(composed.get_epsilon_for_delta(delta))


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


def resolve_accountant(accountant: str) -> str:
    """privacy.accountant's ``auto``: the tightest valid accountant, ``pld``."""
    return "pld" if accountant == "auto" else accountant
