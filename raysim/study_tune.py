"""A study's cells as Ray Tune trials: as many at once as the cluster's resources hold.

Each trial reserves its whole simulation as one placement group: one bundle per client worker
with ``worker.num_cpus`` / ``worker.num_gpus`` (raysim.runtime.cluster places the workers in it).
The trial itself, which drives the simulation, and the server actor ask for no CPU (Tune's empty
head bundle): both wait on the workers most of the time. Tune starts a cell only when its whole
group fits, so cells never wait on each other's workers. A trial runs its cell as ``raysim.study`` always did (into
``OUTPUT/<cell>``, resuming from its checkpoint if it has one, skipping it if it is done) and
reports each round's metrics to Tune, whose own outputs (results table, CSV and TensorBoard
loggers, ``Tuner.restore``) go to ``OUTPUT/_tune/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from raysim.config import UserError

TUNE_DIR = "_tune"


def bundles(cfg: DictConfig) -> list[dict[str, float]]:
    """The placement group one cell's simulation needs: an empty bundle for its driver (Tune's
    head bundle), then one per worker (worker.count "auto" counts as one: a trial's size is fixed
    before it starts)."""
    w = cfg.worker
    worker = {"CPU": float(w.num_cpus), **({"GPU": float(w.num_gpus)} if w.num_gpus else {})}
    count = 1 if w.count == "auto" else int(w.count)
    return [{"CPU": 0.0}] + [dict(worker) for _ in range(count)]


def trainable(base: Path, out: Path, cells: dict[str, list[str]], resources: dict[str, list[dict[str, float]]]) -> Any:
    """The Tune trainable that runs the cell named by its config's ``cell``, with each cell's
    placement group: what ``Tuner`` (and ``Tuner.restore``) takes."""
    from ray import tune

    runner = tune.with_parameters(_trial, base=str(base.resolve()), out=str(out.resolve()), cells=cells, cwd=os.getcwd())
    return tune.with_resources(runner, lambda config: tune.PlacementGroupFactory(resources[config["cell"]]))


def _trial(config: dict[str, Any], base: str, out: str, cells: dict[str, list[str]], cwd: str) -> None:
    from ray import tune

    from raysim.study import Cell, run_cell

    os.chdir(cwd)  # Tune starts a trial in its own directory: relative paths in a config mean the study's
    name = config["cell"]
    run_cell(Path(base), Path(out) / name, Cell(name, cells[name], {}), on_round=lambda row: tune.report(_numbers(row)))


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric metrics, as Tune's loggers take them."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


def run(base: Path, out: Path, cells: list, configs: dict[str, DictConfig], max_concurrent: int, started_ray: bool) -> None:
    """Run ``cells`` (raysim.study.Cell) as one Tune experiment under OUTPUT/_tune; UserError naming
    each cell that failed, with its error's last line."""
    from ray import tune

    resources = {c.name: bundles(configs[c.name]) for c in cells}
    _check_fits(resources, started_ray)
    tuner = tune.Tuner(
        trainable(base, out, {c.name: c.overrides for c in cells}, resources),
        param_space={"cell": tune.grid_search([c.name for c in cells])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None),
        run_config=tune.RunConfig(name=time.strftime("study-%Y%m%d-%H%M%S"), storage_path=str((out / TUNE_DIR).resolve()), verbose=1),
    )
    results = tuner.fit()
    trials = [results[i] for i in range(len(results))]
    failed = [((r.config or {}).get("cell"), r.error) for r in trials if r.error is not None]
    if failed:
        lines = [f"{name}: {_last_line(error)}" for name, error in failed]
        raise UserError(f"{len(failed)} cell(s) failed:\n  " + "\n  ".join(lines))


def _check_fits(resources: dict[str, list[dict[str, float]]], started_ray: bool) -> None:
    """A cell whose whole simulation cannot fit on the cluster would wait forever: UserError where
    Ray was started here (it will not grow), a warning on a cluster (it may autoscale)."""
    import logging

    import ray

    have = ray.cluster_resources()
    for name, groups in resources.items():
        need = {k: sum(b.get(k, 0.0) for b in groups) for k in ("CPU", "GPU")}
        short = [k for k, v in need.items() if v > have.get(k, 0.0) + 1e-9]
        if short:
            message = (
                f"cell {name}: its simulation needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs at once (worker.count x "
                f"worker.num_cpus / num_gpus), the Ray cluster has {have.get('CPU', 0):g} and {have.get('GPU', 0):g}; "
                "lower worker.count or raise ray.num_cpus"
            )
            if started_ray:
                raise UserError(message)
            logging.getLogger("raysim").warning("%s; it waits until the cluster grows", message)


def _last_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__
