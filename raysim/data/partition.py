"""Splitting training examples among clients. Plain numpy; each function returns one index array per client.

- ``iid``: a seeded shuffle cut into near-equal parts.
- ``dirichlet``: per label, client shares drawn from Dir(alpha) (Yurochkin et al., 2019; the
  "Dir(beta)" split of NIID-Bench, Li et al., 2022); small alpha = skew.
- ``label_proportions``: each client gets a given label mix, e.g. the FFA-LoRA paper's 3-client
  split [[.9,.05,.05],[.05,.9,.05],[.05,.05,.9]]; clients are equally sized, as large as the data allow.
- ``shards``: sort by label, cut into ``num_clients * shards_per_client`` shards, deal them out
  (McMahan et al., 2017).
- ``natural``: one client per distinct value of a column (Flower Datasets' NaturalIdPartitioner);
  with fewer clients than values, small groups are merged.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

from raysim.config import UserError

_PARTITION_STREAM = 0xDA7A


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, _PARTITION_STREAM])


def iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    order = _rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_examples: int = 1) -> list[np.ndarray]:
    """Label-skewed split. With many clients and little data some clients draw (almost) nothing;
    rather than redraw until none does (hopeless at, say, 1,000 clients over 3,000 examples), such
    a client takes the examples it lacks, at random, from the then largest client: a few examples
    moved, the label skew otherwise as drawn."""
    if len(labels) < num_clients * min_examples:
        raise UserError(f"data.partition: {len(labels)} training rows cannot give {num_clients} clients {min_examples} each; lower clients.num")
    rng = _rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for client, piece in enumerate(np.split(idx, cuts)):
            parts[client].append(piece)
    out = [list(np.concatenate(p)) for p in parts]
    largest = [(-len(rows), client) for client, rows in enumerate(out)]
    heapq.heapify(largest)
    for client in range(num_clients):
        while len(out[client]) < min_examples:
            _, donor = heapq.heappop(largest)
            out[client].append(out[donor].pop(int(rng.integers(len(out[donor])))))
            heapq.heappush(largest, (-len(out[donor]), donor))
    return [np.sort(np.asarray(rows, dtype=np.int64)) for rows in out]


def label_proportions(
    labels: np.ndarray, proportions: Sequence[Sequence[float]], seed: int, num_classes: int | None = None
) -> list[np.ndarray]:
    """Client i gets an exact label mix proportions[i]; all clients get the same size m, the largest
    the data allow: m = min over labels j of count_j / sum_i proportions[i][j]."""
    p = np.asarray(proportions, dtype=float)
    num_classes = num_classes or int(labels.max()) + 1
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise UserError(f"data.label_proportions: each row needs {num_classes} entries (one per label)")
    rng = _rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    demand = p.sum(axis=0)
    size = min(len(pools[c]) / demand[c] for c in range(num_classes) if demand[c] > 0)
    counts = np.floor(p * size).astype(int)
    out, taken = [], np.zeros(num_classes, dtype=int)
    for row in counts:
        pieces = [pools[c][taken[c] : taken[c] + row[c]] for c in range(num_classes)]
        taken += row
        out.append(np.sort(np.concatenate(pieces)))
    return out


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    rng = _rng(seed)
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise UserError(f"data.shards_per_client: {num_shards} shards for {len(labels)} examples")
    order = np.lexsort((rng.random(len(labels)), labels))  # by label, ties in random order
    pieces = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


def natural(groups: Sequence, num_clients: int) -> list[np.ndarray]:
    """One client per distinct value of ``groups`` (one value per example), largest group first
    (ties by value). With fewer clients than values, the ``num_clients`` largest groups start the
    clients and each other group, largest first, joins the then smallest client: no randomness,
    and no example is dropped."""
    values, inverse, counts = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    if num_clients > len(values):
        raise UserError(
            f"data.client_column: its {len(values)} distinct values cannot make clients.num={num_clients} clients; "
            f"set clients.num to at most {len(values)}"
        )
    order = sorted(range(len(values)), key=lambda g: (-counts[g], values[g]))
    client_of = np.empty(len(values), dtype=np.int64)
    client_of[order[:num_clients]] = np.arange(num_clients)
    smallest = [(int(counts[g]), i) for i, g in enumerate(order[:num_clients])]
    heapq.heapify(smallest)
    for g in order[num_clients:]:
        size, client = heapq.heappop(smallest)
        client_of[g] = client
        heapq.heappush(smallest, (size + int(counts[g]), client))
    owner = client_of[inverse]
    return [np.flatnonzero(owner == c) for c in range(num_clients)]


def partition(
    n: int, data_cfg, num_clients: int, seed: int, labels: np.ndarray | None = None, num_classes: int = 0, groups: Sequence | None = None
) -> list[np.ndarray]:
    """Dispatch on ``data.partition`` for ``n`` examples: ``labels`` (their classes) for the
    label-skewed splits, ``groups`` (their data.client_column values) for ``natural``; every
    client must end up with at least one example."""
    kind = data_cfg.partition
    if kind == "natural":
        assert groups is not None, "partition=natural without the client column's values"
        parts = natural(groups, num_clients)
    elif kind == "iid":
        parts = iid(n, num_clients, seed)
    elif labels is None:
        raise UserError(f"data.partition: '{kind}' needs class labels; use iid or natural")
    elif kind == "dirichlet":
        parts = dirichlet(labels, num_clients, data_cfg.dirichlet_alpha, seed)
    elif kind == "label_proportions":
        parts = label_proportions(labels, data_cfg.label_proportions, seed, num_classes)
    elif kind == "shards":
        parts = shards(labels, num_clients, data_cfg.shards_per_client, seed)
    else:
        raise UserError(f"data.partition: unknown partition '{kind}'")
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise UserError(
            f"data.partition: {len(empty)} of {num_clients} clients got no examples "
            f"({n} training rows); lower clients.num or use more data"
        )
    return parts
