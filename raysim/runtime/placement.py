"""Which worker hosts which virtual client. Plain functions, no Ray.

A client's local state lives on one worker (its owner), so it is trained there. Owners are set
once, balanced; but a round's sample rarely splits evenly over them (10 of 100 clients over two
workers gives 6/4 or worse about half the time), and the round waits for the busiest worker. So
each round :func:`balance` moves the fewest clients needed from the busiest workers to the idlest
ones, and their state moves with them.
"""

from __future__ import annotations

import numpy as np


def assign_clients(sizes: list[int], num_workers: int) -> list[list[int]]:
    """Initial owners. Client counts are equal (each client trains the same number of steps per
    round, so counts balance compute); within that, largest shards go first onto the lightest
    worker with room, which balances data."""
    capacity = -(-len(sizes) // num_workers)
    loads = np.zeros(num_workers)
    groups: list[list[int]] = [[] for _ in range(num_workers)]
    for cid in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        open_workers = [w for w in range(num_workers) if len(groups[w]) < capacity]
        w = min(open_workers, key=lambda w: (loads[w], w))
        groups[w].append(cid)
        loads[w] += sizes[cid]
    return [sorted(g) for g in groups]


def balance(sampled: list[int], owner: dict[int, int], workers: list[int]) -> tuple[dict[int, list[int]], list[tuple[int, int, int]]]:
    """Split this round's clients over ``workers`` (the live ones, which own every client) as
    evenly as counts allow, moving as few as possible: (clients per worker, moves as (client,
    from, to)). Deterministic in its inputs."""
    by_owner: dict[int, list[int]] = {w: [] for w in workers}
    for cid in sorted(sampled):
        by_owner[owner[cid]].append(cid)
    base, extra = divmod(len(sampled), len(workers))
    # The workers that already hold the most clients get the extra ones: fewer moves.
    order = sorted(workers, key=lambda w: (-len(by_owner[w]), w))
    quota = {w: base + (i < extra) for i, w in enumerate(order)}
    surplus = [(cid, w) for w in order for cid in by_owner[w][quota[w] :]]
    placed = {w: by_owner[w][: quota[w]] for w in order}
    moves = []
    for w in reversed(order):
        while len(placed[w]) < quota[w]:
            cid, source = surplus.pop()
            placed[w].append(cid)
            moves.append((cid, source, w))
    return {w: sorted(ids) for w, ids in placed.items() if ids}, moves


def workers_that_fit(nodes: list[dict[str, float]], num_cpus: float, num_gpus: float) -> int:
    """How many workers of (num_cpus, num_gpus) the nodes' resources hold. Per node, not over the
    cluster's total: 3 CPUs on each of two nodes hold two 2-CPU workers, not three. A fractional
    GPU share cannot straddle two GPUs, so a GPU holds floor(1 / num_gpus) workers; more than one
    GPU per worker must be whole GPUs of one node."""
    total = 0
    for node in nodes:
        fits = int(node.get("CPU", 0) // num_cpus)
        if num_gpus > 0:
            gpus = int(node.get("GPU", 0))
            fits = min(fits, gpus * int(1 // num_gpus) if num_gpus <= 1 else gpus // int(num_gpus))
        total += fits
    return total
