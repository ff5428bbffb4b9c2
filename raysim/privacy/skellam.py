"""Distributed DP inside secure aggregation: the distributed Skellam mechanism (Agarwal, Kairouz
and Liu, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021).

Each client, on its clipped update x (L2 norm at most c, d values):

1. pads x to d' = 2^ceil(log2 d) values and rotates it, x <- H D x / sqrt(d'), D a diagonal of
   random signs drawn from (seed, round) and the same for every client (the server undoes it).
   The rotation spreads x's norm over all coordinates, so that each is small and wraps rarely;
2. scales it by gamma and rounds it to integers at random (unbiased), drawing again until its L2
   norm is at most Delta_2 (conditional randomized rounding, Kairouz, Liu and Steinke, ICML 2021):
   that bounds what one client can move the integer sum by;
3. adds Skellam noise Sk(mu/m, mu/m) = Poisson(mu/m) - Poisson(mu/m) to each coordinate and wraps
   the result into Z_(2^b), the ring secure aggregation sums in.

Poisson variables add, so the sum of n >= m clients' inputs carries Sk(n mu/m, n mu/m): at least
the noise mu the accounting assumes. The server re-centres the unmasked sum in
[-2^(b-1), 2^(b-1)), divides it by gamma and rotates it back; it never sees a sum without noise.
Honest clients refuse to unmask a round with fewer than m senders (raysim.secagg.protocol.unmask),
so dropouts can lower the noise to the planned floor and no further.

Privacy is per client, and two numbers hold against two adversaries (docs/PRIVACY.md):

- **the server** draws the sample and SecAgg tells it who sent, so subsampling does not amplify
  against it. Neighbours: one client's update replaced by zeros, its noise share kept (it takes
  part either way, and the server knows it does). The sum then shifts by one client's rounded
  vector under at least mu of noise: the paper's RDP bound for the multi-dimensional Skellam
  mechanism, unamplified, composed over the rounds the client's input was unmasked in
  (:func:`server_epsilon`).
- **an observer of the released adapters only** does not know who took part: the same bound,
  amplified by the Poisson sampling of clients (Zhu & Wang's general bound,
  raysim.privacy.accounting.poisson_subsampled_rdp), which holds for add/remove neighbours. The
  target's own noise share is given to the adversary, so that removing the target removes a
  known quantity and leaves its update under the others' noise, mu (m - 1) / m
  (:func:`observer_epsilon`).

RDP is the tightest bound justified here: the mechanism is multi-dimensional and integer-valued,
with no closed-form privacy loss distribution; the conversion to epsilon is Opacus'.
No Ray, no torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from raysim.privacy.accounting import INTEGER_ORDERS_FROM_2, poisson_subsampled_rdp, rdp_epsilon
from raysim.secagg.encoding import ring_mask

_ROTATION_STREAM = 0x4AD
# The scale keeps each coordinate of the sum within this many standard deviations of the ring's
# half-range (the paper's and TFF's choice of gamma): a wrap is then a 1e-4 event per coordinate.
K_STDDEVS = 4.0
# Conditional rounding accepts a rounding with probability at least 1 - beta; TFF's default.
DEFAULT_BETA = math.exp(-0.5)
# Poisson(lambda) is drawn as a 64-bit integer; the ring's width keeps lambda far below that.
MAX_RING_BITS = 32
# The scaled clip norm gamma * c is kept below 2^24: the rounding's slack in Delta_2 (at least
# gamma * c) then stays far above float64's error on a squared norm of (gamma * c)^2, so the norm
# check of conditional rounding is exact enough. It only binds for wide rings with little noise,
# where the quantization step 1/gamma is already below 1e-7 of c.
MAX_SCALED_CLIP = 2.0**24
_MAX_ROUNDING_TRIES = 1000


def padded_length(dim: int) -> int:
    """The power of two the Hadamard transform needs."""
    return 1 << max(0, (dim - 1).bit_length())


def hadamard(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform H x / sqrt(n) of a vector of length n = 2^p (its
    own inverse), in p butterfly passes."""
    n = len(x)
    h = np.asarray(x, dtype=np.float64)
    step = 1
    while step < n:
        pairs = h.reshape(n // (2 * step), 2, step)
        h = np.stack([pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]], axis=1).reshape(n)
        step *= 2
    return h / math.sqrt(n)


def rotation_signs(length: int, seed: int, round_idx: int) -> np.ndarray:
    """The round's random signs D, drawn from (seed, round): public, the same for every client."""
    rng = np.random.default_rng([seed, round_idx, _ROTATION_STREAM])
    return rng.integers(0, 2, size=length).astype(np.float64) * 2 - 1


def rotate(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """H D x / sqrt(d') of ``x`` padded with zeros to len(signs)."""
    padded = np.zeros(len(signs))
    padded[: len(x)] = x
    return hadamard(padded * signs)


def unrotate(y: np.ndarray, signs: np.ndarray, dim: int) -> np.ndarray:
    """The inverse of :func:`rotate`: D H y / sqrt(d'), its first ``dim`` values."""
    return (hadamard(y) * signs)[:dim]


def l2_bound(scaled_clip: float, padded: int, beta: float) -> float:
    """Delta_2: the norm conditional rounding enforces on a vector of norm ``scaled_clip`` in
    ``padded`` dimensions, the smaller of its two bounds (Kairouz, Liu and Steinke 2021, eq. 2; the
    Skellam paper's eq. 5): sqrt(min{(gc + sqrt d)^2, (gc)^2 + d/4 + sqrt(2 log(1/beta)) (gc + sqrt(d)/2)}).
    Randomized rounding meets the second with probability at least 1 - beta."""
    d = float(padded)
    return math.sqrt(
        min((scaled_clip + math.sqrt(d)) ** 2, scaled_clip**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (scaled_clip + math.sqrt(d) / 2))
    )


def conditional_round(x: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Each value rounded down or up at random (up with probability its fractional part), drawn
    again until the L2 norm is at most ``bound``."""
    low = np.floor(x)
    fraction = x - low
    for _ in range(_MAX_ROUNDING_TRIES):
        rounded = low + (rng.random(x.shape) < fraction)
        if float(rounded @ rounded) <= bound * bound:
            return rounded.astype(np.int64)
    raise RuntimeError(f"conditional rounding found no rounding of norm <= {bound:g} in {_MAX_ROUNDING_TRIES} draws")


@dataclass(frozen=True)
class SkellamPlan:
    """The mechanism's parameters, fixed for a run. ``mu``: the Poisson parameter (each side) of the
    noise on each coordinate of the sum when ``min_clients`` clients send, in the scaled integer
    domain; each client adds a 1/min_clients share of it."""

    dim: int
    clip_norm: float
    scale: float
    mu: float
    min_clients: int
    ring_bits: int
    sample_rate: float
    beta: float = DEFAULT_BETA

    @property
    def padded(self) -> int:
        return padded_length(self.dim)

    @property
    def l2_sensitivity(self) -> float:
        return l2_bound(self.scale * self.clip_norm, self.padded, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        """An integer vector's L1 norm is at most its squared L2 norm, and at most sqrt(d') times it."""
        d2 = self.l2_sensitivity
        return min(math.sqrt(self.padded) * d2, d2 * d2)

    @property
    def noise_std(self) -> float:
        """The standard deviation of the sum's noise per coordinate, in the update's own units, at
        ``min_clients`` senders (Sk(mu, mu) has variance 2 mu)."""
        return math.sqrt(2 * self.mu) / self.scale

    @property
    def noise_multiplier(self) -> float:
        """noise_std / clip_norm: comparable with central DP's noise multiplier."""
        return self.noise_std / self.clip_norm


def encode(update: np.ndarray, plan: SkellamPlan, signs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One client's input to the secure sum: its update (of L2 norm at most clip_norm) rotated,
    scaled, rounded, noised and wrapped into Z_(2^b); uint64, of length plan.padded."""
    values = update.astype(np.float64)
    norm = float(np.linalg.norm(values))
    if norm > plan.clip_norm * (1 + 1e-6):
        raise ValueError(f"the update's norm {norm:g} is above the clip norm {plan.clip_norm:g}: clip it first")
    if norm > plan.clip_norm:  # clipped in float32, a hair above: exactly within it in float64
        values *= plan.clip_norm / norm * (1 - 1e-12)
    rounded = conditional_round(rotate(values, signs) * plan.scale, plan.l2_sensitivity, rng)
    share = plan.mu / plan.min_clients
    noised = rounded + rng.poisson(share, rounded.shape) - rng.poisson(share, rounded.shape)
    return noised.astype(np.uint64) & ring_mask(plan.ring_bits)


def decode_sum(total: np.ndarray, plan: SkellamPlan, signs: np.ndarray) -> np.ndarray:
    """The noised sum of the clients' updates (float64, plan.dim values) from the sum of their
    inputs mod 2^b."""
    k = plan.ring_bits
    signed = (np.asarray(total, dtype=np.uint64) & ring_mask(k)).astype(np.int64)
    signed = np.where(signed >= 1 << (k - 1), signed - (1 << k), signed)
    return unrotate(signed.astype(np.float64) / plan.scale, signs, plan.dim)


def skellam_rdp(orders: np.ndarray, l2: float, l1: float, mu: float) -> np.ndarray:
    """The Skellam paper's bound on the RDP, at integer orders a, of adding Sk(mu, mu) to each
    coordinate of an integer vector whose change has L2 norm at most ``l2`` and L1 norm at most
    ``l1``: a l2^2 / (4 mu) + min(((2a - 1) l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu)). Its first
    term is the Gaussian mechanism's at the same variance 2 mu."""
    a = np.asarray(orders, dtype=np.float64)
    return a * l2**2 / (4 * mu) + np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))


def participation_rdp(plan: SkellamPlan) -> np.ndarray:
    """The RDP at orders 2, 3, ... of one unmasked round a client's input was in, against the
    server (unamplified, the client's own noise share counted: it is private from the server)."""
    return skellam_rdp(np.array(INTEGER_ORDERS_FROM_2), plan.l2_sensitivity, plan.l1_sensitivity, plan.mu)


def round_rdp(plan: SkellamPlan) -> np.ndarray:
    """One round's RDP at orders 2, 3, ... against an observer of the released adapters: the
    Skellam bound under the other senders' noise, mu (m - 1) / m, amplified by the Poisson
    sampling of clients at plan.sample_rate."""
    others = plan.mu * (plan.min_clients - 1) / plan.min_clients
    rdp = skellam_rdp(np.array(INTEGER_ORDERS_FROM_2), plan.l2_sensitivity, plan.l1_sensitivity, others)
    return poisson_subsampled_rdp(plan.sample_rate, rdp)


def observer_epsilon(plan: SkellamPlan, rounds: int, delta: float) -> float:
    """The epsilon (for ``delta``) of ``rounds`` released rounds against an observer of the
    adapters, composed in RDP; 0 for none."""
    return rdp_epsilon(rounds * round_rdp(plan), delta) if rounds > 0 else 0.0


def server_epsilon(plan: SkellamPlan, participations: int, delta: float) -> float:
    """The epsilon (for ``delta``) against the server of a client whose input was in
    ``participations`` unmasked sums, composed in RDP; 0 for none."""
    return rdp_epsilon(participations * participation_rdp(plan), delta) if participations > 0 else 0.0


def choose_scale(clip_norm: float, padded: int, ring_bits: int, noise_multiplier: float, clients: float, min_clients: int) -> float:
    """gamma: the largest scale (up to MAX_SCALED_CLIP / c) at which a coordinate of the sum of
    ``clients`` inputs stays within K_STDDEVS standard deviations of the ring's half-range 2^(b-1). Its variance, scaled: the
    signal's worst case (all updates aligned, spread by the rotation) (n gamma c)^2 / d', the
    noise's n / m x (gamma sigma c)^2, and the rounding's at most n / 4."""
    room = (2.0 ** (ring_bits - 1) / K_STDDEVS) ** 2 - clients / 4
    per_unit = (clients * clip_norm) ** 2 / padded + clients / min_clients * (noise_multiplier * clip_norm) ** 2
    if room <= 0:
        raise ValueError(f"a {ring_bits}-bit ring cannot hold the rounding error of {clients:g} clients")
    return min(math.sqrt(room / per_unit), MAX_SCALED_CLIP / clip_norm)


def plan_skellam(
    dim: int,
    clip_norm: float,
    ring_bits: int,
    sample_rate: float,
    clients: float,
    min_clients: int,
    rounds: int,
    delta: float,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    adversary: str = "server",
    participations: int | None = None,
) -> SkellamPlan:
    """The plan: the noise of ``noise_multiplier`` x clip_norm, or the least noise whose epsilon
    is at most ``target_epsilon`` against ``adversary``: the server, over ``participations``
    unmasked rounds of one client (default: every round), or an observer of the adapters, over
    ``rounds`` rounds; the scale for ``ring_bits`` and ``clients`` senders (the count to expect),
    found together (the scale depends on the noise, the noise's epsilon a little on the scale's
    rounding). ValueError if the target cannot be reached."""
    padded = padded_length(dim)

    def plan_for(z: float, scale: float) -> SkellamPlan:
        return SkellamPlan(dim, clip_norm, scale, (z * clip_norm * scale) ** 2 / 2, min_clients, ring_bits, sample_rate)

    if noise_multiplier is not None:
        return plan_for(noise_multiplier, choose_scale(clip_norm, padded, ring_bits, noise_multiplier, clients, min_clients))
    assert target_epsilon is not None
    spent = functools.partial(server_epsilon, participations=participations or rounds) if adversary == "server" else functools.partial(observer_epsilon, rounds=rounds)
    z = 1.0
    for _ in range(3):  # the scale for the noise, then the noise for the scale: settles at once
        scale = choose_scale(clip_norm, padded, ring_bits, z, clients, min_clients)
        z = _solve_noise(functools.partial(_epsilon_at, plan_for, scale, spent, delta), target_epsilon)
    return plan_for(z, scale)  # the pair whose epsilon was checked


def _epsilon_at(plan_for, scale: float, spent, delta: float, noise_multiplier: float) -> float:
    return spent(plan_for(noise_multiplier, scale), delta=delta)


def _solve_noise(eps_at, target: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose epsilon is at most ``target``; epsilon falls as
    the noise grows."""
    low, high = 0.0, 1.0
    while eps_at(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError("the privacy budget is too low")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if eps_at(mid) <= target else (mid, high)
    return high
