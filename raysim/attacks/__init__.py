"""Poisoning clients, for robustness studies: which clients are malicious (drawn from the seed),
what they do to their data (label_flip, backdoor: raysim.attacks.data) or to their method's
message (sign_flip, scale, gaussian: raysim.attacks.updates). No Ray. Malicious clients train in
the same workers through the same method protocol as honest ones; only their rows or their
message differ."""

from __future__ import annotations

import numpy as np

DATA_ATTACKS = ("label_flip", "backdoor")
UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian")
ATTACKS = (*UPDATE_ATTACKS, *DATA_ATTACKS)

_MALICIOUS_STREAM = 0xBAD


def malicious_clients(seed: int, num_clients: int, fraction: float) -> list[int]:
    """round(fraction x num_clients) clients, drawn from the seed alone."""
    count = int(round(fraction * num_clients))
    chosen = np.random.default_rng([seed, _MALICIOUS_STREAM]).choice(num_clients, size=count, replace=False)
    return sorted(int(c) for c in chosen)
