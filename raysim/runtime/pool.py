"""The pool of live workers: a worker that is gone for good (killed without restart, or past
``worker.max_restarts``) is retired once, and what it held gets new owners, so later rounds lose
nothing. Its clients move to the live workers with the fewest (their local state starts over, as
after a restart; under local DP their accountants continue from the driver's record, and their
method state comes back), and its evaluation slices to the live worker with the fewest."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from raysim.config import UserError
from raysim.runtime.messages import LocalDPPlan

if TYPE_CHECKING:
    from raysim.runtime.simulation import Simulation

log = logging.getLogger("raysim")


def retire(sim: Simulation, w: int) -> None:
    """Take worker ``w`` out of the pool and give its clients and evaluation slices to the others.
    Raises UserError when no worker is left; below ``worker.min_count`` the run stops after the
    round (:func:`check_pool`)."""
    if w not in sim.live:
        return
    sim.live.remove(w)
    if not sim.live:
        raise UserError(f"worker pool: worker {w}, the last one, is gone for good; resume=OUTPUT_DIR continues from the last checkpoint")
    moved: dict[int, list[int]] = {}
    owned = sim.worker_clients
    counts = {v: len(owned[v]) for v in sim.live}
    for cid in owned[w]:
        target = min(sim.live, key=lambda v: (counts[v], v))
        sim.client_worker[cid] = target
        counts[target] += 1
        moved.setdefault(target, []).append(cid)
    for share in sim.eval_shares.pop(w):
        target = min(sim.live, key=lambda v: (len(sim.eval_shares[v]), v))
        sim.eval_shares[target].append(share)
    for target, clients in moved.items():
        privacy = None
        if sim.budget.mode == "local_dp_sgd":
            privacy = LocalDPPlan(noise={}, histories={c: sim.budget.histories.get(c, []) for c in clients})
        refs = list({id(ref): ref for c in clients if (ref := sim.method_states.get(c)) is not None}.values())
        try:
            sim.backend.get(sim.workers[target].adopt.remote(privacy, clients, *refs))
        except sim.backend.lost:
            retire(sim, target)  # its new clients move on with the rest of its own
    log.warning(
        "worker %d is gone for good: its %d clients moved to worker(s) %s, their local state starting over; %d worker(s) remain",
        w,
        sum(map(len, moved.values())),
        ", ".join(map(str, sorted(moved))) or "none",
        len(sim.live),
    )


def check_pool(sim: Simulation) -> None:
    """After a round: stop the run (a checkpoint first, where the run has an output directory)
    when fewer workers are left than ``worker.min_count``."""
    minimum = int(sim.cfg.worker.min_count)
    if len(sim.live) >= minimum:
        return
    where = sim.save_checkpoint()
    raise UserError(
        f"worker.min_count: {len(sim.live)} worker(s) left, fewer than {minimum}; stopped after round {sim.round} "
        f"with a checkpoint ({where}): resume=OUTPUT_DIR continues once the cluster has room"
    )
