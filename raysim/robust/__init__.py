"""Robust aggregation of per-client updates against poisoning clients: plain numpy functions, one
file per rule with its paper, no Ray. Each takes the sampled clients' updates as the rows of an
(n, d) matrix and returns the aggregate (d,). ``server.aggregator`` picks one, applied by the
server to each client's update.

``server.aggregator: norm_bound`` (Sun, Kairouz, Suresh, McMahan, "Can you really backdoor
federated learning?", 2019, Section 4) is not here: each update is scaled to an L2 norm of at
most ``server.norm_bound`` before the weighted sum (raysim.runtime.host, with DP's
``clip_update``), which caps what a boosted model-replacement update can move. The server does
it, as in the paper; under secure aggregation, where it sees no update, each client does it to
itself and a malicious client may skip it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysim.robust.krum import best_scored, krum, krum_scores, multi_krum
from raysim.robust.median import coordinate_median
from raysim.robust.trimmed_mean import trimmed_mean

__all__ = ["RobustAggregate", "RobustRule", "coordinate_median", "krum", "multi_krum", "trimmed_mean"]


@dataclass(frozen=True)
class RobustAggregate:
    """A rule's aggregate and, for Krum and Multi-Krum, which rows it averaged and every row's
    score (what the metrics report about the attackers); None for the coordinate-wise rules, which
    take no update whole."""

    aggregate: np.ndarray
    kept: np.ndarray | None = None
    scores: np.ndarray | None = None


@dataclass(frozen=True)
class RobustRule:
    """A per-update rule as ``server.*`` configures it."""

    aggregator: str  # median, trimmed_mean, krum or multi_krum
    trim_fraction: float = 0.1
    byzantine: int = 1
    krum_select: int = 0  # 0: n - byzantine

    def min_updates(self) -> int:
        return 2 * self.byzantine + 3 if self.aggregator in ("krum", "multi_krum") else 1

    def apply(self, updates: np.ndarray) -> RobustAggregate:
        if self.aggregator == "median":
            return RobustAggregate(coordinate_median(updates))
        if self.aggregator == "trimmed_mean":
            return RobustAggregate(trimmed_mean(updates, self.trim_fraction))
        if self.aggregator in ("krum", "multi_krum"):  # Krum is Multi-Krum with m = 1
            m = 1 if self.aggregator == "krum" else self.krum_select or len(updates) - self.byzantine
            scores = krum_scores(updates, self.byzantine)
            kept = best_scored(scores, min(m, len(updates)))
            return RobustAggregate(updates[kept].mean(axis=0), kept, scores)
        raise ValueError(f"server.aggregator: '{self.aggregator}' is not a per-update rule")
