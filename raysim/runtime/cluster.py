"""Cluster start and placement: joining or starting Ray, how many workers fit, where they go."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from omegaconf import DictConfig

from raysim.config import UserError
from raysim.runtime.placement import workers_that_fit

log = logging.getLogger("raysim")


def worker_options(worker: DictConfig) -> dict[str, Any]:
    """How Ray places a client worker: its CPU and (fractional) GPU share, spread over all nodes of
    a cluster instead of packed onto the first. Ray picks the GPU; the actor uses what it was granted.
    Inside a placement group (a study's Tune trial reserves its whole simulation as one: a bundle
    per worker), the worker takes a free bundle of it."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    strategy: Any = "SPREAD" if group is None else PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=-1)
    return {
        "num_cpus": worker.num_cpus,
        "num_gpus": worker.num_gpus,
        "max_restarts": worker.max_restarts,
        "max_task_retries": 0,
        "scheduling_strategy": strategy,
    }


def start_ray(cfg: DictConfig) -> bool:
    """Join the cluster that ray.address names, or under `ray job submit` (RAY_ADDRESS) the job's
    own; else start a local Ray with ray.num_cpus and ray.dashboard. True when Ray started here."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = bool(cfg.ray.dashboard)
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
    try:
        info = ray.init(address=address, **kwargs)
    except ConnectionError as err:
        raise UserError(f"ray.address: cannot connect to '{address}': {str(err).splitlines()[0]}") from None
    dashboard = getattr(info, "dashboard_url", None)
    if dashboard:
        log.info("Ray dashboard: http://%s", dashboard)
    elif address is None:
        log.info("Ray dashboard: off (ray.dashboard=true starts it)")
    return address is None


def stop_autoscaler_monitor() -> None:
    """Stop the autoscaler's monitor process of a Ray started in this process, before ray.shutdown().

    ray.shutdown() stops the GCS first; the monitor's SIGTERM handler then waits on the stopped GCS
    until Ray kills it a second later (Ray 2.55 to 2.60), which made every local run end 1 s late.
    A Ray started here scales nothing, so its monitor has no work to finish. This goes through
    Ray's private node handle, and does nothing where that is missing."""
    node = getattr(ray._private.worker, "_global_node", None)
    kill = getattr(node, "kill_monitor", None)
    if kill is None:
        return
    try:
        kill(check_alive=False)
    except Exception as err:  # a private API: a change in Ray must not break shutdown
        log.debug("could not stop Ray's autoscaler monitor first: %s", err)


def worker_count(cfg: DictConfig, started_ray: bool) -> int:
    """Workers to start: worker.count, or as many as the cluster's CPUs (and GPUs) fit ("auto").
    Asks that a locally started Ray cannot meet fail now instead of leaving actors pending."""
    w = cfg.worker
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if w.num_gpus > 0 and gpus == 0:
        log.warning("worker.num_gpus=%g but the Ray cluster has no GPU: running on CPU", w.num_gpus)
        w.num_gpus = 0.0
    fits = workers_that_fit([n["Resources"] for n in ray.nodes() if n["Alive"]], w.num_cpus, w.num_gpus)
    if w.count == "auto":
        return max(1, fits)
    if w.count > fits:
        need = f"{w.count} workers x {w.num_cpus:g} CPU" + (f" x {w.num_gpus:g} GPU" if w.num_gpus else "")
        message = f"worker.count: {need} do not fit the Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs)"
        if started_ray:  # a cluster may still grow (autoscaling); a Ray started here will not
            raise UserError(message)
        log.warning("%s; some workers wait until the cluster grows", message)
    return int(w.count)


def gpu_hint(devices: list[str], cfg: DictConfig) -> str | None:
    """A line for GPU runs that train one client per forward pass, which leaves a GPU mostly idle."""
    if not any(d.startswith("cuda") for d in devices) or cfg.train.clients_per_batch > 1 or cfg.privacy.mode == "local_dp_sgd":
        return None
    return (
        "workers run on GPUs one client at a time; train.clients_per_batch=8 trains 8 clients per "
        "forward pass, 3 to 6x faster on an H200 (docs/PERFORMANCE.md)"
    )
