"""One plaintext round, as the driver runs it: place the sampled clients on workers (moving the
few whose state must change hands), train them in parallel, hand the workers' partial sums to the
server, which aggregates. A worker that dies costs its clients for this round, not the run."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from raysim.runtime.messages import ServerReport, TrainSettings, WorkerReport
from raysim.runtime.placement import balance

if TYPE_CHECKING:
    from raysim.runtime.simulation import Simulation

log = logging.getLogger("raysim")


def place(sim: Simulation, round_idx: int, sampled: list[int]) -> tuple[dict[int, list[int]], dict[int, list]]:
    """This round's clients per worker, and references to the local state of the clients that
    move (by their new worker). The state goes from the old owner to the new one through the
    object store, never through the driver's memory. A client whose worker died handing it over
    drops out of the round."""
    if not sim.cfg.worker.rebalance:
        by_worker: dict[int, list[int]] = {}
        for c in sorted(sampled):
            by_worker.setdefault(sim.client_worker[c], []).append(c)
        return by_worker, {}
    by_worker, moves = balance(sampled, sim.client_worker, sim.live)
    leaving: dict[int, list[int]] = {}
    for cid, source, _ in moves:
        leaving.setdefault(source, []).append(cid)
    destination = {cid: dest for cid, _, dest in moves}
    arrivals: dict[int, list] = {}
    for source, ids in leaving.items():
        # One reference per destination: Ray passes it to that worker's call, resolved there.
        targets = sorted({destination[c] for c in ids})
        refs = sim.workers[source].hand_over.options(num_returns=len(targets) + 1).remote(ids, [[c for c in ids if destination[c] == t] for t in targets])
        try:
            sim.backend.get(refs[0], timeout=sim.deadline_s())  # the handed-over ids: raises if the source died
        except (*sim.backend.lost, *sim.backend.timed_out) as err:
            log.warning("round %d: worker %d %s handing over clients %s; they count as dropped", round_idx, source, failure(sim, err), ids)
            for cid in ids:
                by_worker[destination[cid]].remove(cid)
            sim.recover(source, err)
            continue
        for target, ref in zip(targets, refs[1:]):
            arrivals.setdefault(target, []).append(ref)
        for cid in ids:
            sim.client_worker[cid] = destination[cid]
    return {w: ids for w, ids in by_worker.items() if ids and w in sim.live}, arrivals


def gather(sim: Simulation, round_idx: int, calls: dict[int, tuple], by_worker: dict[int, list[int]], stage: str) -> dict[int, tuple]:
    """(small result, the other references) of each worker call that succeeded within the stage's
    deadline (``worker.round_timeout_s``, one for all the stage's calls). A worker that died, or
    did not answer in time (a straggler: it is restarted), is handed its data again once Ray has
    restarted it, or retired; its clients drop out of the round."""
    done = {}
    limit = sim.deadline_s()
    deadline = None if limit is None else time.monotonic() + limit
    for w, (result_ref, *other_refs) in calls.items():
        try:
            done[w] = (sim.backend.get(result_ref, timeout=None if deadline is None else max(0.0, deadline - time.monotonic())), *other_refs)
        except (*sim.backend.lost, *sim.backend.timed_out) as err:
            log.warning("round %d: worker %d %s during %s; its %d clients count as dropped", round_idx, w, failure(sim, err), stage, len(by_worker[w]))
            sim.recover(w, err)
    return done


def failure(sim: Simulation, err: BaseException) -> str:
    """What happened to a worker, for a log line."""
    if isinstance(err, sim.backend.timed_out):
        return f"did not answer within worker.round_timeout_s={sim.cfg.worker.round_timeout_s:g}s (a straggler, restarted)"
    return f"died ({type(err).__name__})"


def plain_round(
    sim: Simulation, round_idx: int, global_ref: Any, by_worker: dict[int, list[int]], train: TrainSettings, arrivals: dict[int, list]
) -> tuple[list[WorkerReport], ServerReport, dict[str, Any]]:
    """Train and aggregate without secure aggregation: (worker reports, server report, extra columns)."""
    calls = {
        w: sim.workers[w].train_clients.remote(global_ref, ids, round_idx, train, None, 1.0, *arrivals.get(w, []))
        for w, ids in by_worker.items()
    }
    trained = gather(sim, round_idx, calls, by_worker, "training")
    keep_method_states(sim, trained)
    reports = [report for report, *_ in trained.values()]
    weight = sum(r.weight for r in reports)
    started = time.perf_counter()
    server_report = sim.backend.get(sim.server.aggregate.remote(round_idx, weight, *(ref for _, ref, _ in trained.values())))
    return reports, server_report, {"aggregate_s": time.perf_counter() - started}


def keep_method_states(sim: Simulation, trained: dict[int, tuple]) -> None:
    """The driver keeps, per client, the reference to its newest method state (held in the object
    store, never fetched), so a worker restarted by Ray gets its clients' state back."""
    for report, _, kept_ref in trained.values():
        for cid in report.method_state_clients:
            sim.method_states[cid] = kept_ref
