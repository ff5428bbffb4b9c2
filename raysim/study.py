"""``python -m raysim.study STUDY.yaml``: a grid of runs, resumable cell by cell.

A study file names a base config, settings shared by every cell, and axes. Each axis maps a
value's name to overrides (a bare value sets the axis' own key); the cells are the axes'
cartesian product, each run with ``raysim run``'s code into ``OUTPUT/<axis=value,...>``:

    base: ../quickstart.yaml          # relative to the study file
    output_dir: studies/ffa_vs_lora
    settings: {rounds: 20, data.max_length: 32, checkpoint.every: 5}
    axes:
      method:
        lora: {method: lora, train.lr: 2.0e-3}
        ffa_lora: {method: ffa_lora, train.lr: 5.0e-3}
      seed: [0, 1, 2]
    where:                            # optional: overrides for the cells that match
      - {match: {method: lora, privacy: [eps6, eps3, eps1]}, set: {train.lr: 2.0e-2}}
    max_concurrent: 4                 # optional: at most this many cells at once (0: no cap)

A study may search instead of running its grid: ``search: {train.lr: {loguniform: [1e-4, 1e-1]}}``
(or uniform, randint, choice), ``trials: 8`` per cell and ``scheduler: asha`` (or fifo). Each cell
is then tuned with Tune's random search on the validation split, ASHA stopping poor trials early
(rounds as its time axis), and the best values go to OUTPUT/best.yaml; a grid's ``where:`` takes
them with ``- {from: path/to/best.yaml}``.

The cells run as Ray Tune trials (raysim.study_tune), as many at once as the cluster's resources
hold, each reserving its whole simulation; ``--sequential`` runs them one after another in this
process instead. A cell whose summary.json exists is done and skipped; one with a checkpoint
resumes from it; any other is started afresh. A done or resumable cell whose config.yaml no longer matches what the
study file says (a learning rate edited after it ran, say) is stale: the study refuses to run
until its directory is removed, so one table never mixes two versions of a cell. All cells share
one Ray instance: the one already up in this process (``main`` called from a notebook), left
running, or else one started as the first cell's ``ray.*`` settings say. ``--list`` prints the cells and their state without running anything;
``--only AXIS=VALUE[,VALUE]`` narrows either to some cells (to run a grid's parts in the order
that matters most, or on several machines into shared storage).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, cast

from omegaconf import DictConfig, OmegaConf

from raysim.checkpoint import find_checkpoint
from raysim.config import UserError, differing_keys, error_line, flatten, load_config

log = logging.getLogger("raysim")

_STUDY_KEYS = ("base", "output_dir", "settings", "axes", "where", "max_concurrent", "search", "trials", "scheduler")
SCHEDULERS = ("asha", "fifo")
_DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
# Keys that say where and on what a cell runs, not what it computes.
_PLACEMENT_KEYS = ("output_dir", "overwrite", "resume", "checkpoint", "ray", "worker")


@dataclass
class Cell:
    name: str  # "method=lora,seed=0", also its directory's name
    overrides: list[str]
    values: dict[str, str]  # axis -> the name of this cell's value on it


def _overrides(values: dict[str, Any]) -> list[str]:
    """key=value strings for load_config; JSON is YAML's flow style, so lists and nulls survive."""
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values.items()]


def load_study(path: str | Path) -> tuple[Path, Path, list[Cell]]:
    """(base config path, output directory, cells) of a study file; UserError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        spec = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    except Exception as err:
        raise UserError(f"{path}: {str(err).splitlines()[0]}") from None
    unknown = set(spec) - set(_STUDY_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(_STUDY_KEYS)})")
    concurrent = spec.get("max_concurrent", 0)
    if not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 0:
        raise UserError(f"{path}: max_concurrent: give a number of cells >= 0 (0: as many as the cluster holds)")
    for key in ("base", "output_dir", "axes"):
        if not spec.get(key):
            raise UserError(f"{path}: '{key}' is missing")
    base = (path.parent / spec["base"]).resolve()
    if not base.is_file():
        raise UserError(f"{path}: base: config file not found: {base}")
    shared = _overrides(spec.get("settings") or {})
    axes: list[list[tuple[str, str, list[str]]]] = []  # per axis: (axis, value name, overrides)
    for axis, values in spec["axes"].items():
        if isinstance(values, list):
            axes.append([(axis, str(v), _overrides({axis: v})) for v in values])
        elif isinstance(values, dict) and all(isinstance(v, dict) for v in values.values()):
            axes.append([(axis, str(name), _overrides(v)) for name, v in values.items()])
        else:
            raise UserError(f"{path}: axes.{axis}: give a list of values, or named values each mapping keys to values")
    rules = _rules(path, spec.get("where") or [], {a[0][0]: {name for _, name, _ in a} for a in axes})
    cells = []
    for combo in itertools.product(*axes):
        chosen = {axis: name for axis, name, _ in combo}
        matched = [o for match, overrides in rules if all(chosen[a] in names for a, names in match.items()) for o in overrides]
        overrides = [*shared, *(o for *_, overrides in combo for o in overrides), *matched]
        cells.append(Cell(",".join(f"{a}={n}" for a, n in chosen.items()), overrides, chosen))
    return base, Path(spec["output_dir"]), cells


@dataclass
class Search:
    """A study file's hyperparameter search: each cell of its grid becomes ``trials`` Tune trials
    drawn from ``space`` ({key: {distribution: arguments}}), tuned on the validation split."""

    space: dict[str, dict[str, list]]
    trials: int
    scheduler: str


def max_concurrent(path: str | Path) -> int:
    """The study file's cap on cells run at once (0: as many as the cluster's resources hold)."""
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return int(cast(dict, spec).get("max_concurrent", 0))


def load_search(path: str | Path) -> Search | None:
    """The study file's search, checked; None for a plain grid."""
    spec = cast(dict, OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    space = spec.get("search")
    if space is None:
        return None
    if not isinstance(space, dict) or not space:
        raise UserError(f"{path}: search: give {{key: {{loguniform: [low, high]}}}} (or uniform, randint, choice)")
    for key, dist in space.items():
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in _DISTRIBUTIONS and isinstance(next(iter(dist.values())), list)):
            raise UserError(f"{path}: search.{key}: give one of {', '.join(_DISTRIBUTIONS)} with a list, e.g. {{loguniform: [1.0e-4, 1.0e-1]}}")
        (kind, args), = dist.items()
        if kind != "choice" and (len(args) != 2 or not args[0] < args[1]):
            raise UserError(f"{path}: search.{key}: {kind} takes [low, high] with low < high")
    trials, scheduler = spec.get("trials", 8), spec.get("scheduler", "asha")
    if not isinstance(trials, int) or trials < 1:
        raise UserError(f"{path}: trials: give the number of trials per cell, >= 1")
    if scheduler not in SCHEDULERS:
        raise UserError(f"{path}: scheduler: '{scheduler}' is not one of {', '.join(SCHEDULERS)}")
    return Search(space, trials, scheduler)


def search_overrides(cell: Cell, cfg: DictConfig) -> list[str]:
    """A search trial's overrides beyond its cell's: scored on the validation split every round
    (carved from the training rows where the cell has none), the test split never looked at."""
    extra = ["eval.split=validation", "eval.every=1", "checkpoint.every=0"]
    if not cfg.data.validation_fraction:
        extra.append("data.validation_fraction=0.1")
    return extra


def _rules(path: Path, where: list, axes: dict[str, set[str]]) -> list[tuple[dict[str, set[str]], list[str]]]:
    """``where`` entries as (axis -> value names it matches, overrides); names checked against the
    axes. An entry ``{from: FILE}`` (relative to the study file) takes the rules a search wrote
    into its best.yaml, one per searched cell; ``map: {axis: {searched value: [values here]}}``
    applies a value's result to other values too (a rate tuned at epsilon 3, used at 1)."""
    rules = []
    expanded = []
    for i, rule in enumerate(where):
        if isinstance(rule, dict) and "from" in rule and set(rule) <= {"from", "map"}:
            found = path.parent / str(rule["from"])
            if not found.is_file():
                raise UserError(f"{path}: where[{i}].from: file not found: {found} (run the search that writes it first)")
            mapping = rule.get("map") or {}
            for entry in cast(dict, OmegaConf.to_container(OmegaConf.load(found))).values():
                mapped = {a: [n for v in (vs if isinstance(vs, list) else [vs]) for n in mapping.get(a, {}).get(str(v), [v])] for a, vs in entry["match"].items()}
                expanded.append((i, {"match": mapped, "set": entry["set"]}))
        else:
            expanded.append((i, rule))
    for i, rule in expanded:
        if not isinstance(rule, dict) or set(rule) != {"match", "set"}:
            raise UserError(f"{path}: where[{i}]: give {{match: {{axis: value or [values]}}, set: {{key: value}}}}")
        match = {}
        for axis, names in rule["match"].items():
            names = {str(n) for n in (names if isinstance(names, list) else [names])}
            if axis not in axes or not names <= axes[axis]:
                raise UserError(f"{path}: where[{i}].match.{axis}: no such axis or value (axes: {axes})")
            match[axis] = names
        rules.append((match, _overrides(rule["set"])))
    return rules


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """The cells whose values match every ``AXIS=NAME[,NAME...]`` in ``only``; UserError naming an
    axis or value the study does not have."""
    names: dict[str, set[str]] = {}
    for cell in cells:
        for axis, name in cell.values.items():
            names.setdefault(axis, set()).add(name)
    for entry in only:
        axis, _, wanted = entry.partition("=")
        chosen = set(wanted.split(","))
        if axis not in names or not wanted or not chosen <= names[axis]:
            raise UserError(f"--only {entry}: give AXIS=VALUE[,VALUE...] with the study's axes and value names: "
                            + "; ".join(f"{a}: {', '.join(sorted(v))}" for a, v in names.items()))
        cells = [c for c in cells if c.values[axis] in chosen]
    return cells


def cell_state(run_dir: Path) -> str:
    if (run_dir / "summary.json").is_file():
        return "done"
    try:
        find_checkpoint(run_dir)
        return "resumable"
    except UserError:
        return "to do"


def config_changes(run_dir: Path, cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, value in the cell's saved config.yaml, value in ``cfg``) for each key on which the two
    differ, ``cfg`` being the study's config for the cell now. Keys the saved config lacks (added to
    raysim after the cell ran) and placement keys are not compared."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    before = flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    known = set(flatten(OmegaConf.to_container(cfg, resolve=False)))
    return [
        (key, was, now)
        for key, was, now in differing_keys(before, cfg)
        if key in before and key in known and not any(key == p or key.startswith(f"{p}.") for p in _PLACEMENT_KEYS)
    ]


def run_cell(base: Path, run_dir: Path, cell: Cell, on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
    """One cell, as ``raysim run`` would, without the adapter files (a study keeps numbers only);
    a done cell is left as it is. ``on_round`` gets each round's metrics row."""
    from raysim.runtime.simulation import Simulation

    state = cell_state(run_dir)
    if state == "done":
        return
    where = [f"resume={run_dir}"] if state == "resumable" else [f"output_dir={run_dir}", "overwrite=true"]
    cfg = load_config(base, [*cell.overrides, *where])
    with Simulation(cfg) as sim:
        sim.run(progress=False, on_round=on_round)
        sim.write_summary(sim.evaluate())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m raysim.study", description="Run a grid of raysim runs, skipping finished cells.")
    parser.add_argument("study", help="study file (YAML)")
    parser.add_argument("--list", action="store_true", help="print the cells and their state, run nothing")
    parser.add_argument("--output-dir", help="override the study's output_dir")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="AXIS=VALUE[,VALUE]",
        help="run (or list) only the cells with these values, e.g. --only data=iid3,skew3 --only seed=0; repeatable",
    )
    parser.add_argument(
        "--sequential", action="store_true", help="run the cells one after another in this process, not as Ray Tune trials"
    )
    args = parser.parse_args(argv)
    try:
        base, out, cells = load_study(args.study)
        out = Path(args.output_dir) if args.output_dir else out
        cells = select(cells, args.only)
        states, stale, configs = {}, [], {}
        for cell in cells:  # every cell's config is checked before the first one runs
            cfg = configs[cell.name] = load_config(base, [*cell.overrides, f"output_dir={out / cell.name}"])
            states[cell.name] = cell_state(out / cell.name)
            changes = config_changes(out / cell.name, cfg) if states[cell.name] != "to do" else []
            if changes:
                states[cell.name] = "stale"
                key, before, now = changes[0]
                stale.append(f"{out / cell.name}: {key} was {before!r}, the study now says {now!r}")
        search = load_search(args.study)
        if search is not None:  # a sample of every key, checked before anything runs
            for cell in cells:
                sample = [f"{k}={json.dumps(next(iter(d.values()))[0])}" for k, d in search.space.items()]
                load_config(base, [*cell.overrides, *sample, *search_overrides(cell, configs[cell.name]), f"output_dir={out / cell.name}"])
            from raysim import study_tune

            states = {c.name: "done" if c.name in study_tune.read_best(out) else "to do" for c in cells}
        if args.list:
            for cell in cells:
                print(f"{states[cell.name]:9}  {cell.name}")
            return 0
        if stale:
            raise UserError(
                f"{len(stale)} cell(s) ran with a config the study file no longer gives; remove their directories "
                "to run them again, or restore the study file:\n  " + "\n  ".join(stale)
            )
        todo = [c for c in cells if states[c.name] != "done"]
        log.info("study %s: %d cells, %d done, %d to run, into %s", args.study, len(cells), len(cells) - len(todo), len(todo), out)
        if not todo:
            return 0
        import ray

        from raysim.runtime.cluster import start_ray, stop_autoscaler_monitor

        # One Ray for all cells, as the first cell's ray.* settings (or RAY_ADDRESS) ask; where Ray
        # is already up (a notebook), that one, left running as a Simulation leaves it.
        owns_ray = not ray.is_initialized()
        started_ray = owns_ray and start_ray(configs[todo[0].name])
        try:
            if search is not None:
                from raysim import study_tune

                study_tune.search(base, out, todo, configs, search, max_concurrent(args.study), started_ray)
            elif args.sequential:
                for i, cell in enumerate(todo, 1):
                    log.info("cell %d/%d: %s", i, len(todo), cell.name)
                    run_cell(base, out / cell.name, cell)
            else:
                from raysim import study_tune

                study_tune.run(base, out, todo, configs, max_concurrent(args.study), started_ray)
        finally:
            if started_ray:
                stop_autoscaler_monitor()
            if owns_ray:
                ray.shutdown()
    except UserError as err:
        print(f"raysim.study: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysim.study: interrupted; run the same command to go on from the finished cells", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
