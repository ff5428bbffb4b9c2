"""Robust aggregators against independent computations (pure-Python loops) and small examples
worked by hand."""

import itertools
import statistics

import numpy as np
import pytest

from raysim.robust import RobustRule, coordinate_median, krum, multi_krum, trimmed_mean
from raysim.robust.krum import krum_scores


def _updates(n=9, d=7, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


@pytest.mark.parametrize("n", [1, 4, 9])
def test_coordinate_median_is_each_columns_median(n):
    updates = _updates(n)
    expected = [statistics.median(updates[:, j].tolist()) for j in range(updates.shape[1])]
    np.testing.assert_allclose(coordinate_median(updates), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n, beta", [(9, 0.0), (9, 0.2), (10, 0.25), (5, 0.49)])
def test_trimmed_mean_drops_floor_beta_n_at_each_end_of_each_column(n, beta):
    updates = _updates(n)
    b = min(int(beta * n), (n - 1) // 2)
    expected = [statistics.fmean(sorted(updates[:, j].tolist())[b : n - b]) for j in range(updates.shape[1])]
    np.testing.assert_allclose(trimmed_mean(updates, beta), expected, rtol=1e-12, atol=1e-15)


def test_trimmed_mean_worked_example_and_range():
    values = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert trimmed_mean(values, 0.2)[0] == 3.0  # one value off each end: mean of 2, 3, 4
    assert trimmed_mean(values, 0.0)[0] == 22.0
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(values, 0.5)


def _brute_force_scores(updates, f):
    n = len(updates)
    scores = []
    for i in range(n):
        distances = sorted(sum((a - b) ** 2 for a, b in zip(updates[i], updates[j])) for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    return scores


@pytest.mark.parametrize("n, f", [(5, 1), (9, 2), (12, 4)])
def test_krum_scores_equal_a_brute_force_count(n, f):
    updates = _updates(n, seed=n)
    np.testing.assert_allclose(krum_scores(updates, f), _brute_force_scores(updates.tolist(), f), rtol=1e-9)


def test_krum_worked_example_in_one_dimension():
    """Points 0, 1, 2, 3 and a Byzantine 100, f = 1: each is scored on its n - f - 2 = 2 nearest.
    Scores 5, 2, 2, 5, 97^2 + 98^2: Krum picks 1 (tied with 2, the lower index), Multi-Krum with
    m = 3 averages 0, 1 and 2."""
    points = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    np.testing.assert_array_equal(krum_scores(points, 1), [5, 2, 2, 5, 97**2 + 98**2])
    chosen, index = krum(points, 1)
    assert index == 1 and chosen[0] == 1.0
    mean, indices = multi_krum(points, 1, 3)
    assert indices.tolist() == [0, 1, 2] and mean[0] == 1.0


def test_krum_keeps_out_f_far_outliers_and_refuses_too_many():
    rng = np.random.default_rng(3)
    honest = rng.normal(0, 0.1, size=(8, 20))
    attackers = np.full((3, 20), 50.0)
    updates = np.vstack([honest, attackers])
    _, index = krum(updates, 3)
    _, indices = multi_krum(updates, 3, 8)
    assert index < 8 and set(indices.tolist()) == set(range(8))
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        krum(updates, 5)


def test_median_and_trimmed_mean_stay_in_the_honest_range_under_a_minority_of_outliers():
    rng = np.random.default_rng(4)
    honest = rng.uniform(-1, 1, size=(7, 30))
    for attack in itertools.product([-1e6, 1e6], repeat=1):
        updates = np.vstack([honest, np.full((3, 30), attack[0])])
        for aggregate in (coordinate_median(updates), trimmed_mean(updates, 0.3)):
            assert np.all(aggregate >= honest.min(axis=0)) and np.all(aggregate <= honest.max(axis=0))


def test_the_configured_rule_dispatches_with_its_defaults_and_names_the_updates_it_kept():
    points = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    result = RobustRule("multi_krum", byzantine=1).apply(points)  # m = n - f = 4
    assert result.aggregate[0] == 1.5 and result.kept is not None and result.kept.tolist() == [0, 1, 2, 3]
    assert result.scores is not None and result.scores.tolist() == [5, 2, 2, 5, 97**2 + 98**2]  # the worked example above
    result = RobustRule("krum", byzantine=1).apply(points)  # 1 and 2 tie at 1 + 1; the lower index wins
    assert result.aggregate[0] == 1.0 and result.kept is not None and result.kept.tolist() == [1]
    median = RobustRule("median").apply(points)
    assert median.aggregate[0] == 2.0 and median.kept is None and median.scores is None
    assert RobustRule("trimmed_mean", trim_fraction=0.2).apply(points).aggregate[0] == 2.0  # mean of 1, 2, 3
    assert RobustRule("krum", byzantine=2).min_updates() == 7 and RobustRule("median").min_updates() == 1
