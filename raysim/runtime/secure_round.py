"""One round of SecAgg+ as the driver runs it: workers act for their clients, the server only
routes keys and shares, receives masked sums and unmasks their total. An aborted round leaves
the global adapter unchanged. The protocol's math is in raysim.secagg (no Ray)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from raysim.config import USER_LEVEL_MODES
from raysim.runtime.messages import SecAggEncoding, ServerReport, TrainSettings, WorkerReport
from raysim.runtime.rounds import gather, keep_method_states
from raysim.secagg.protocol import SecAggAborted

if TYPE_CHECKING:
    from raysim.runtime.simulation import Simulation

log = logging.getLogger("raysim")


def secure_round(
    sim: Simulation, round_idx: int, global_ref: Any, by_worker: dict[int, list[int]], train: TrainSettings, arrivals: dict[int, list]
) -> tuple[list[WorkerReport], ServerReport, dict[str, Any]]:
    """(worker reports, server report, the secagg columns of the metrics row)."""
    server, workers, get = sim.server, sim.workers, sim.backend.get
    examples = train.weighting == "examples" and sim.budget.mode not in USER_LEVEL_MODES
    skellam = sim.budget.skellam if sim.budget.mode == "distributed_dp" else None
    encoding = SecAggEncoding(weight_scale=float(max(sim.client_sizes)) if examples else 1.0, skellam=skellam)
    reports: list[WorkerReport] = []
    try:
        advertised = gather(
            sim, round_idx, {w: (workers[w].secagg_advertise.remote(round_idx, ids),) * 2 for w, ids in by_worker.items()}, by_worker, "key advertisement"
        )
        roster = server.secagg_roster.remote(round_idx, *(publics for publics, _ in advertised.values()))
        shared = gather(sim, round_idx, {w: workers[w].secagg_share_keys.remote(roster) for w in advertised}, by_worker, "key sharing")
        if not shared:
            raise SecAggAborted("every worker failed before sharing keys")
        alive = list(shared)
        groups = [by_worker[w] for w in alive]
        inboxes = server.secagg_route.options(num_returns=len(alive)).remote(round_idx, groups, *(ref for _, ref in shared.values()))
        inboxes = inboxes if len(alive) > 1 else [inboxes]
        calls = {
            w: workers[w].train_clients.remote(global_ref, by_worker[w], round_idx, train, inbox, encoding, *arrivals.get(w, []))
            for w, inbox in zip(alive, inboxes)
        }
        trained = gather(sim, round_idx, calls, by_worker, "training")
        keep_method_states(sim, trained)
        reports = [report for report, *_ in trained.values()]
        senders = get(server.secagg_collect.remote(round_idx, *(ref for _, ref, _ in trained.values())))
        revealed = gather(sim, round_idx, {w: workers[w].secagg_unmask.remote(round_idx, senders) for w in trained}, by_worker, "unmasking")
        server_report = get(server.secagg_aggregate.remote(round_idx, skellam, *(ref for _, ref in revealed.values())))
        aborted, aggregated, released = "", len(senders), list(senders)
    except SecAggAborted as reason:
        # Raised in the server actor, it arrives as Ray's task error, which carries it as its cause.
        aborted, aggregated, released = str(getattr(reason, "cause", None) or reason), 0, []
        log.warning("round %d: secure aggregation aborted (%s); the global adapter is unchanged", round_idx, aborted)
        server_report = ServerReport(aggregation_error=math.nan, uplink_bytes=get(server.secagg_abort.remote(round_idx)))
    sent_values = sum(len(r.clients) for r in reports) * sim.sent_values_per_client
    clipped = sum(r.secagg_clipped for r in reports)
    columns = {
        "aggregated": aggregated,
        "released": released,
        "secagg_aborted": bool(aborted),
        "secagg_clipped": clipped / sent_values if sent_values else 0.0,
    }
    if skellam is not None:
        # The noise each coordinate of the released mean carried: more senders than the floor, more noise.
        noise = skellam.noise_std * math.sqrt(aggregated / skellam.min_clients) / (skellam.sample_rate * sim.cfg.clients.num)
        columns["ddp_noise_std"] = noise if aggregated else math.nan
    return reports, server_report, columns
