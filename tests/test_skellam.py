"""Distributed DP's math (raysim.privacy.skellam, the subsampling bound in accounting): each piece
against an independent computation: scipy's Hadamard matrix and Skellam distribution, Opacus'
accountant for the Gaussian, a numpy replay of the paper's bound and of the composition (converted
by dp-accounting), and statistical tests of the decoded sum's noise and wraps over many draws."""

import math

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.linalg import hadamard as hadamard_matrix
from scipy.special import logsumexp
from scipy.stats import skellam as skellam_dist

from raysim.privacy import skellam
from raysim.privacy.accounting import INTEGER_ORDERS_FROM_2, poisson_subsampled_rdp, rdp_epsilon
from raysim.secagg.encoding import ring_mask

ORDERS = np.array(INTEGER_ORDERS_FROM_2)


def test_hadamard_is_scipys_matrix_normalised_and_its_own_inverse():
    x = np.random.default_rng(0).normal(size=64)
    np.testing.assert_allclose(skellam.hadamard(x), hadamard_matrix(64) @ x / 8, atol=1e-12)
    np.testing.assert_allclose(skellam.hadamard(skellam.hadamard(x)), x, atol=1e-12)


def test_rotation_keeps_the_norm_spreads_a_spike_and_comes_back():
    signs = skellam.rotation_signs(1024, seed=3, round_idx=2)
    x = np.zeros(1000)
    x[7] = 5.0
    y = skellam.rotate(x, signs)
    assert len(y) == 1024 and math.isclose(np.linalg.norm(y), 5.0)
    np.testing.assert_allclose(np.abs(y), 5.0 / 32)  # every coordinate gets an equal share
    np.testing.assert_allclose(skellam.unrotate(y, signs, 1000), x, atol=1e-12)
    assert not np.array_equal(signs, skellam.rotation_signs(1024, seed=3, round_idx=3))


def test_conditional_rounding_is_unbiased_and_within_its_bound():
    rng = np.random.default_rng(1)
    x = rng.normal(size=256) * 3
    bound = skellam.l2_bound(float(np.linalg.norm(x)), 256, skellam.DEFAULT_BETA)
    draws = np.stack([skellam.conditional_round(x, bound, rng) for _ in range(400)])
    assert (np.linalg.norm(draws, axis=1) <= bound).all()
    assert np.abs(draws.mean(axis=0) - x).max() < 0.15  # 400 draws of a value off by at most 1


def test_plain_randomized_rounding_meets_the_bound_with_probability_one_minus_beta():
    # The bound's claim (Kairouz, Liu, Steinke 2021): a first draw is within it w.p. >= 1 - beta.
    rng = np.random.default_rng(2)
    x = rng.uniform(-0.5, 0.5, size=4096) * 4
    bound = skellam.l2_bound(float(np.linalg.norm(x)), 4096, skellam.DEFAULT_BETA)
    low = np.floor(x)
    within = [np.linalg.norm(low + (rng.random(x.shape) < x - low)) <= bound for _ in range(500)]
    assert np.mean(within) >= 1 - skellam.DEFAULT_BETA - 0.05


def _exact_skellam_rdp(alpha, shift, mu):
    """The Renyi divergence of Sk(mu, mu) shifted by an integer from Sk(mu, mu), summed over the support."""
    k = np.arange(-int(40 * math.sqrt(mu) + 50 * shift + 200), int(40 * math.sqrt(mu) + 50 * shift + 200))
    lp, lq = skellam_dist.logpmf(k - shift, mu, mu), skellam_dist.logpmf(k, mu, mu)
    ok = np.isfinite(lp) & np.isfinite(lq)
    return float(logsumexp(alpha * lp[ok] + (1 - alpha) * lq[ok]) / (alpha - 1))


@pytest.mark.parametrize("mu", [2.0, 10.0, 1000.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_the_skellam_bound_holds_for_the_exact_divergence_and_is_tight_for_large_noise(mu, shift):
    orders = np.array([2, 5, 20])
    bound = skellam.skellam_rdp(orders, shift, shift, mu)
    exact = np.array([_exact_skellam_rdp(a, shift, mu) for a in orders])
    assert (bound >= exact * (1 - 1e-9)).all()
    if mu >= 1000:
        np.testing.assert_allclose(bound, exact, rtol=0.005)
        np.testing.assert_allclose(bound, orders * shift**2 / (2 * 2 * mu), rtol=0.005)  # the Gaussian's at variance 2 mu


def test_a_vector_shift_is_bounded_by_its_l2_and_l1_norms():
    shift, mu = [2, 1, 1], 8.0  # coordinates independent: the exact divergence is the sum of theirs
    exact = sum(_exact_skellam_rdp(4, s, mu) for s in shift)
    assert skellam.skellam_rdp(np.array([4]), math.sqrt(6), 4, mu)[0] >= exact


def _exact_subsampled_rdp(alpha, shift, mu, q):
    """Both directions of the divergence between (1 - q) P + q P_shift and P, P = Sk(mu, mu), in log space."""
    k = np.arange(-400, 400 + shift)
    lp, lp_shift = skellam_dist.logpmf(k, mu, mu), skellam_dist.logpmf(k - shift, mu, mu)
    ok = np.isfinite(lp) & np.isfinite(lp_shift)
    lp, lmix = lp[ok], np.logaddexp(math.log(1 - q) + lp[ok], math.log(q) + lp_shift[ok])
    forward = logsumexp(alpha * lmix + (1 - alpha) * lp) / (alpha - 1)
    backward = logsumexp(alpha * lp + (1 - alpha) * lmix) / (alpha - 1)
    return max(forward, backward)


@pytest.mark.parametrize("q", [0.05, 0.3])
def test_the_subsampling_bound_holds_for_the_exact_divergence_of_the_skellam_mixture(q):
    mu, shift = 6.0, 2
    bound = poisson_subsampled_rdp(q, skellam.skellam_rdp(ORDERS, shift, shift, mu))
    for a in (2, 3, 6, 12):
        assert bound[a - 2] >= _exact_subsampled_rdp(a, shift, mu, q) * (1 - 1e-9), a


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.1, 0.8), (0.5, 2.0)])
def test_the_subsampling_bound_is_at_least_opacus_exact_gaussian_and_equal_at_order_2(q, sigma):
    gaussian = ORDERS / (2 * sigma**2)
    bound = poisson_subsampled_rdp(q, gaussian)
    exact = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=INTEGER_ORDERS_FROM_2)
    assert (bound >= exact * (1 - 1e-9)).all()
    assert math.isclose(bound[0], math.log(1 - q**2 + q**2 * math.exp(1 / sigma**2)), rel_tol=1e-9)  # its closed form
    np.testing.assert_allclose(poisson_subsampled_rdp(1.0, gaussian), gaussian)


def _plan(**changes):
    values = dict(dim=300, clip_norm=1.0, scale=200.0, mu=4.0e5, min_clients=4, ring_bits=24, sample_rate=0.2)
    return skellam.SkellamPlan(**{**values, **changes})


def _paper_bound(a: int, d2: float, d1: float, mu: float) -> float:
    """The RDP bound of the multi-dimensional Skellam mechanism as Agarwal, Kairouz and Liu
    (NeurIPS 2021) state it, written out here apart from raysim's code."""
    return a * d2**2 / (4 * mu) + min(((2 * a - 1) * d2**2 + 6 * d1) / (16 * mu**2), 3 * d1 / (4 * mu))


def test_the_skellam_bound_is_the_papers_in_both_branches_of_its_minimum():
    """Little noise against a large L1 change makes 3 L1 / (4 mu) the smaller branch: a bound
    weakened there (halved, say) is caught, as is one weakened in the other branch."""
    for d2, d1, mu in [(1.0, 1.0, 0.5), (3.0, 9.0, 0.8), (200.0, 4500.0, 4.0e5)]:
        got = skellam.skellam_rdp(ORDERS, d2, d1, mu)
        want = [_paper_bound(a, d2, d1, mu) for a in ORDERS]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    low_noise = [a for a in ORDERS if 3 * 9.0 / (4 * 0.8) < ((2 * a - 1) * 9.0 + 54) / (16 * 0.8**2)]
    assert low_noise == list(ORDERS[1:])  # the 3 L1 / (4 mu) branch binds at every order from 3 there


def test_epsilon_is_an_independent_replay_of_the_bound_composed_over_rounds():
    """Against an observer: the Skellam bound under the other m - 1 senders' noise (the target's
    own share known to the adversary), amplified by Poisson sampling (Zhu & Wang, Theorem 6)."""
    plan = _plan()
    d2 = math.sqrt(min((200 + math.sqrt(512)) ** 2, 200**2 + 512 / 4 + math.sqrt(2 * 0.5) * (200 + math.sqrt(512) / 2)))
    d1 = min(math.sqrt(512) * d2, d2**2)
    q, mu, rounds = 0.2, 4.0e5 * 3 / 4, 7  # min_clients 4: three others' shares
    one = [_paper_bound(a, d2, d1, mu) for a in ORDERS]
    amplified = []
    for a in ORDERS:
        total = (1 - q) ** (a - 1) * (a * q - q + 1) + math.comb(a, 2) * q**2 * (1 - q) ** (a - 2) * math.exp(one[0])
        total += 3 * sum(math.comb(a, j) * q**j * (1 - q) ** (a - j) * math.exp((j - 1) * one[j - 2]) for j in range(3, a + 1))
        amplified.append(math.log(total) / (a - 1))
    rdp = rounds * np.array(amplified)
    # Balle et al. 2020's conversion, written out: min over orders of rdp + log((a-1)/a) - (log delta + log a)/(a-1).
    expected = min(r + math.log((a - 1) / a) - (math.log(1e-5) + math.log(a)) / (a - 1) for a, r in zip(ORDERS, rdp))
    assert math.isclose(skellam.observer_epsilon(plan, rounds, 1e-5), expected, rel_tol=1e-9)
    assert math.isclose(rdp_epsilon(rdp, 1e-5), expected, rel_tol=1e-9)
    assert math.isclose(compute_epsilon(ORDERS, rdp, 1e-5)[0], expected, rel_tol=1e-9)  # dp-accounting's conversion


@pytest.mark.parametrize("participations", [1, 3, 10])
def test_the_servers_epsilon_is_the_unamplified_bound_composed_over_a_clients_own_rounds(participations):
    """The server draws the sample and sees who sent: no amplification, the whole noise mu (the
    client's own share is private from the server), composed over the client's participations and
    converted by dp-accounting (an independent library)."""
    plan = _plan()
    d2, d1 = plan.l2_sensitivity, plan.l1_sensitivity
    rdp = participations * np.array([_paper_bound(a, d2, d1, plan.mu) for a in ORDERS])
    want = compute_epsilon(ORDERS, rdp, 1e-5)[0]
    assert math.isclose(skellam.server_epsilon(plan, participations, 1e-5), want, rel_tol=1e-9)
    assert skellam.server_epsilon(plan, participations, 1e-5) > skellam.observer_epsilon(plan, participations, 1e-5)
    assert skellam.server_epsilon(plan, 0, 1e-5) == 0.0


def test_the_committed_studys_plan_gives_the_reviewed_epsilons_against_the_server():
    """configs/study/distributed_dp.yaml's epsilon-3 plan (seed 0), recomputed by the review in
    issue 43: 3.8 after one round, 7.2 after 3, 15.0 after 10 against the server."""
    plan = skellam.SkellamPlan(dim=19587, clip_norm=2.0, scale=44516.10686284802, mu=5830524527.23044, min_clients=79, ring_bits=20, sample_rate=0.1)
    got = [skellam.server_epsilon(plan, k, 1e-5) for k in (1, 3, 10)]
    np.testing.assert_allclose(got, [3.80, 7.17, 15.00], atol=0.01)


@pytest.mark.parametrize("adversary", ["server", "observer"])
def test_the_plan_reaches_its_target_with_the_least_noise_and_noise_multiplier_fixes_mu(adversary):
    kwargs = dict(dim=20000, clip_norm=2.0, ring_bits=20, sample_rate=0.1, clients=100, min_clients=77, rounds=10, delta=1e-5)
    plan = skellam.plan_skellam(**kwargs, target_epsilon=3.0, adversary=adversary, participations=3)

    def spent(p):
        return skellam.server_epsilon(p, 3, 1e-5) if adversary == "server" else skellam.observer_epsilon(p, 10, 1e-5)

    assert 2.99 <= spent(plan) <= 3.0
    less_noise = _plan(**{**plan.__dict__, "mu": plan.mu * 0.99})
    assert spent(less_noise) > 3.0
    fixed = skellam.plan_skellam(**kwargs, noise_multiplier=1.5)
    assert math.isclose(fixed.noise_multiplier, 1.5) and math.isclose(fixed.mu, (1.5 * 2.0 * fixed.scale) ** 2 / 2)
    with pytest.raises(ValueError, match="too low"):
        skellam.plan_skellam(**kwargs, target_epsilon=1e-6)


def test_the_planned_scale_wraps_the_worst_case_sum_almost_never():
    """20 clients send the same update of the clip norm (the signal's worst case: aligned) at the
    least noise the scale is planned for: at 4 standard deviations of room a coordinate of the sum
    wraps with probability ~6e-5, about once in the 16,384 here; at 2 (say) some 750 times."""
    dim, clients, m, z, c, bits = 4096, 20, 20, 1.0, 1.0, 12
    plan = skellam.plan_skellam(dim, c, bits, 0.1, clients, m, rounds=1, delta=1e-5, noise_multiplier=z)
    update = np.random.default_rng(0).normal(size=dim)
    update *= c / np.linalg.norm(update) * (1 - 1e-9)
    wrapped = 0
    for draw in range(4):
        signs = skellam.rotation_signs(plan.padded, seed=1, round_idx=draw)
        total = np.uint64(0)
        for cid in range(clients):
            with np.errstate(over="ignore"):
                total = (total + skellam.encode(update, plan, signs, np.random.default_rng([draw, cid]))) & ring_mask(bits)
        exact = skellam.rotate(update * clients, signs) * plan.scale  # the noiseless sum, before any wrap
        signed = (total.astype(np.int64) + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))
        wrapped += int(np.sum(np.abs(signed - exact) > 2 ** (bits - 1)))
    assert wrapped <= 5


def test_the_scale_keeps_the_sum_within_k_stddevs_of_the_ring():
    padded, clients, m, z, c = 2**15, 100, 77, 1.3, 2.0
    gamma = skellam.choose_scale(c, padded, 20, z, clients, m)
    std = math.sqrt(gamma**2 * ((clients * c) ** 2 / padded + clients / m * (z * c) ** 2) + clients / 4)
    assert math.isclose(skellam.K_STDDEVS * std, 2.0**19, rel_tol=1e-9)


def test_the_decoded_sum_is_the_clipped_sum_plus_noise_of_the_planned_variance():
    """Six clients, 120 draws each: residual mean 0 and variance (2 mu n / m + rounding) / gamma^2."""
    plan = _plan()
    rng = np.random.default_rng(5)
    updates = rng.normal(size=(6, 300))
    updates /= np.linalg.norm(updates, axis=1, keepdims=True) * 1.25  # norm 0.8 < clip 1
    residuals, rounding = [], 0.0
    for draw in range(120):
        signs = skellam.rotation_signs(plan.padded, seed=0, round_idx=draw)
        total = np.uint64(0)
        for cid, u in enumerate(updates):
            client_rng = np.random.default_rng([draw, cid])
            with np.errstate(over="ignore"):
                total = (total + skellam.encode(u, plan, signs, client_rng)) & ring_mask(plan.ring_bits)
            scaled = skellam.rotate(u, signs) * plan.scale
            rounding += float(np.sum((scaled - np.floor(scaled)) * (np.ceil(scaled) - scaled))) / plan.padded
        residuals.append(skellam.decode_sum(total, plan, signs) - updates.sum(axis=0))
    residuals = np.concatenate(residuals)
    planned = (2 * plan.mu * 6 / plan.min_clients + rounding / 120) / plan.scale**2
    assert abs(residuals.mean()) < 4 * math.sqrt(planned / residuals.size)
    assert abs(residuals.var() / planned - 1) < 0.03  # 36,000 residuals: the variance to about 0.75%


def test_values_past_the_ring_wrap_and_an_unclipped_update_is_refused():
    plan = _plan(ring_bits=8, mu=0.5, scale=2000.0)  # a 1-norm update reaches 2000/sqrt(512) ~ 88 per value
    signs = skellam.rotation_signs(plan.padded, 0, 1)
    update = np.full(300, 1 / math.sqrt(300))
    decoded = skellam.decode_sum(skellam.encode(update, plan, signs, np.random.default_rng(0)), plan, signs)
    assert np.abs(decoded - update).max() > 0.1  # 256 levels cannot hold +-88 plus the rounding: the sum wrapped
    with pytest.raises(ValueError, match="clip"):
        skellam.encode(update * 2, plan, signs, np.random.default_rng(0))


def test_a_wide_ring_with_little_noise_still_rounds_an_update_clipped_in_float32():
    plan = skellam.plan_skellam(2253, 0.1, 32, 0.25, 10, 4, 3, 1e-5, noise_multiplier=1e-4)
    assert plan.scale * plan.clip_norm <= skellam.MAX_SCALED_CLIP
    update = np.random.default_rng(0).normal(size=2253).astype(np.float32)
    update *= np.float32(0.1 / np.linalg.norm(update.astype(np.float64)))  # float32: a hair above 0.1 or below
    signs = skellam.rotation_signs(plan.padded, 0, 1)
    decoded = skellam.decode_sum(skellam.encode(update, plan, signs, np.random.default_rng(1)), plan, signs)
    np.testing.assert_allclose(decoded, update, atol=3e-5)  # one sender: noise std 1e-4 x 0.1 / sqrt(4) = 5e-6
