"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine learning with
adversaries: Byzantine tolerant gradient descent", NeurIPS 2017, Section 4).

With n updates of which at most f are Byzantine (the paper needs n > 2f + 2), update i's score
is the sum of its squared Euclidean distances to its n - f - 2 nearest other updates. Krum
returns the update with the lowest score; Multi-Krum averages the m updates with the lowest
scores, all scored once as the paper defines it (some implementations re-score after each pick,
which is Bulyan's iterated Krum, not Multi-Krum). Ties go to the lower index. Unweighted."""

from __future__ import annotations

import numpy as np


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    n = len(updates)
    if updates.ndim != 2 or n == 0:
        raise ValueError(f"updates: need an (n, d) matrix with n >= 1, got shape {updates.shape}")
    if f < 0 or n <= 2 * f + 2:
        raise ValueError(f"krum: {n} updates tolerate no {f} Byzantine ones (the paper needs n > 2f + 2)")
    squares = (updates**2).sum(axis=1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2 * updates @ updates.T, 0.0)
    np.fill_diagonal(distances, np.inf)  # a vector is not its own neighbour
    nearest = np.sort(distances, axis=1)[:, : n - f - 2]
    return nearest.sum(axis=1)


def best_scored(scores: np.ndarray, m: int) -> np.ndarray:
    """The indices of the m lowest scores, ascending (ties to the lower index)."""
    if not 1 <= m <= len(scores):
        raise ValueError(f"multi_krum: m={m} is not between 1 and the {len(scores)} updates")
    return np.sort(np.argsort(scores, kind="stable")[:m])


def multi_krum(updates: np.ndarray, f: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(the mean of the m best-scored updates, their indices)."""
    chosen = best_scored(krum_scores(updates, f), m)
    return updates[chosen].mean(axis=0), chosen


def krum(updates: np.ndarray, f: int) -> tuple[np.ndarray, int]:
    """(the best-scored update, its index)."""
    aggregate, chosen = multi_krum(updates, f, 1)
    return aggregate, int(chosen[0])
