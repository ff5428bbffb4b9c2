"""A study's cells as Ray Tune trials: as many at once as the cluster's resources hold.

Each trial reserves its whole simulation as one placement group: one bundle per client worker
with ``worker.num_cpus`` / ``worker.num_gpus`` (raysim.runtime.cluster places the workers in it).
The trial itself, which drives the simulation, and the server actor ask for no CPU (Tune's empty
head bundle): both wait on the workers most of the time. Tune starts a cell only when its whole
group fits, so cells never wait on each other's workers. A trial runs its cell as the sequential
runner does (into ``OUTPUT/<cell>``, resuming from its checkpoint if it has one, skipping it if it
is done) and reports each round's metrics to Tune, whose own outputs (results table, CSV and
TensorBoard loggers, ``Tuner.restore``) go to ``OUTPUT/_tune/``. A study file's ``search`` runs
per-cell hyperparameter searches instead (:func:`search`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raysim.config import UserError

TUNE_DIR = "_tune"
BEST_FILE = "best.yaml"  # a search's chosen values, next to the study's cells
METRIC, MODE = "eval_accuracy", "max"  # on the validation split
GRACE_ROUNDS = 2  # ASHA stops no trial before this many rounds
_NO_TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"  # read by Tune when a fit starts
SEARCH_STREAM = 0x5EA7C4  # the search's draws: (cell seed, this), apart from the runs' own streams


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


def trainable_for(study_file: str | Path) -> Any:
    """The trainable of a study file's grid, for ``Tuner.restore(OUTPUT/_tune/<experiment>,
    trainable_for(STUDY.yaml))``: Tune's own way to finish an interrupted experiment (rerunning
    the study does the same from the cells' directories)."""
    from raysim.config import load_config
    from raysim.study import load_study

    base, out, cells = load_study(study_file)
    resources = {c.name: bundles(load_config(base, [*c.overrides, f"output_dir={out / c.name}"])) for c in cells}
    return trainable(base, out, {c.name: c.overrides for c in cells}, resources)


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
    from raysim.study import cell_state

    if len(failed) + sum(cell_state(out / c.name) == "done" for c in cells) < len(cells):
        raise KeyboardInterrupt  # Tune stopped on Ctrl-C (it counts trials it never started as terminated)
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


def read_best(out: Path) -> dict[str, Any]:
    """{cell: {"set": {key: value}, "eval_accuracy": score}} of the searches done so far."""
    path = out / BEST_FILE
    return dict(OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else {}  # type: ignore[arg-type]


def search(base: Path, out: Path, cells: list, configs: dict[str, DictConfig], spec: Any, max_concurrent: int, started_ray: bool) -> None:
    """Per cell, ``spec.trials`` trials drawn from ``spec.space`` by Tune's random search, stopped
    early by ASHA (rounds as its time, validation accuracy as its metric) unless the scheduler is
    fifo; the best trial's values are added to OUTPUT/best.yaml, as the ``where`` rule that feeds
    them to a grid. One Tune experiment per cell, so that ASHA compares a cell's trials only with
    each other. The draws are seeded by the cell's seed, so a rerun samples the same values and
    cells that share a seed try the same ones."""
    import numpy as np
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raysim.study import search_overrides

    _check_fits({c.name: bundles(configs[c.name]) for c in cells}, started_ray)
    for cell in cells:
        cfg = configs[cell.name]
        overrides = {cell.name: [*cell.overrides, *search_overrides(cell, cfg)]}
        runner = tune.with_parameters(_search_trial, base=str(base.resolve()), out=str(out.resolve()), cells=overrides, cwd=os.getcwd())
        runner = tune.with_resources(runner, tune.PlacementGroupFactory(bundles(cfg)))
        rounds = int(cfg.rounds)
        scheduler = (
            ASHAScheduler(time_attr="round", max_t=rounds, grace_period=min(GRACE_ROUNDS, rounds))
            if spec.scheduler == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            runner,
            param_space={"cell": cell.name, "params": {k: _distribution(d) for k, d in spec.space.items()}},
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                num_samples=spec.trials,
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=np.random.default_rng([int(cfg.seed), SEARCH_STREAM])),
                max_concurrent_trials=max_concurrent or None,
            ),
            run_config=tune.RunConfig(
                name=time.strftime(f"search-{cell.name}-%Y%m%d-%H%M%S"), storage_path=str((out / TUNE_DIR).resolve()), verbose=1
            ),
        )
        results = _fit_interruptible(tuner)
        failed = [results[i].error for i in range(len(results)) if results[i].error is not None]
        if failed:
            raise UserError(f"cell {cell.name}: {len(failed)} of its search trials failed, so no value was chosen: {_last_line(failed[0])}")
        best = results.get_best_result(metric=METRIC, mode=MODE, scope="all")
        if best.config is None or best.metrics is None or METRIC not in best.metrics:
            raise UserError(f"cell {cell.name}: no search trial reported {METRIC}")
        chosen = dict(best.config["params"])
        history = best.metrics_dataframe
        score = float(history[METRIC].max()) if history is not None else float(best.metrics[METRIC])
        record = read_best(out)
        record[cell.name] = {"match": dict(cell.values), "set": chosen, METRIC: score, "trials": spec.trials}
        (out / BEST_FILE).parent.mkdir(parents=True, exist_ok=True)
        (out / BEST_FILE).write_text(OmegaConf.to_yaml(record))


def _fit_interruptible(tuner: Any) -> Any:
    """``tuner.fit()``, with Ctrl-C raising KeyboardInterrupt out of it: Tune's own handler would
    end the search quietly and hand back its trials so far, from which a best value would be
    chosen and the cell marked done. An interrupted cell's search runs again from its start."""
    before = os.environ.get(_NO_TUNE_SIGINT)
    os.environ[_NO_TUNE_SIGINT] = "1"
    try:
        return tuner.fit()
    finally:
        if before is None:
            del os.environ[_NO_TUNE_SIGINT]
        else:
            os.environ[_NO_TUNE_SIGINT] = before


def _distribution(dist: dict[str, list]) -> Any:
    from ray import tune

    ((kind, args),) = dist.items()
    if kind == "choice":
        return tune.choice(args)
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*args)


def _search_trial(config: dict[str, Any], base: str, out: str, cells: dict[str, list[str]], cwd: str) -> None:
    from ray import tune

    from raysim.config import load_config
    from raysim.runtime.simulation import Simulation

    os.chdir(cwd)
    name = config["cell"]
    sampled = [f"{key}={json.dumps(value)}" for key, value in config["params"].items()]
    run_dir = Path(out) / name / "search" / tune.get_context().get_trial_id()
    cfg = load_config(Path(base), [*cells[name], *sampled, f"output_dir={run_dir}", "overwrite=true"])
    with Simulation(cfg) as sim:
        sim.run(progress=False, on_round=lambda row: tune.report(_numbers(row)))
