"""``raysim report RUN_DIR... --out DIR``: runs compared across seeds, as a markdown table and plots.

A run is a directory ``raysim run`` wrote (config.yaml, metrics.parquet, summary.json); a directory
holding runs (a study's output) stands for all of them. Runs whose configs differ only in
``seed`` (and in keys that do not change results: output paths, Ray and worker placement,
checkpoints) form one setting; a setting is named by the keys in which the settings differ.
``--compare KEY`` puts KEY's values side by side per setting, paired by seed. No Ray here.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow.parquet as pq
from omegaconf import OmegaConf

from raysim.config import RaysimConfig, UserError, flatten

# Keys that never make two runs different settings.
_NOT_A_SETTING = ("seed", "output_dir", "overwrite", "resume", "checkpoint", "ray", "worker")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "privacy.target_epsilon" -> 3.0
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


Metric = Callable[[Run], float | None]  # a run's final value of something, None where it has none


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Each path if it is a run, else the runs directly or at any depth below it."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path}: no such directory")
        found = [path] if (path / "metrics.parquet").is_file() else sorted(p.parent for p in path.rglob("metrics.parquet"))
        if not found:
            raise UserError(f"{path}: holds no run (no metrics.parquet in it or below it)")
        runs.extend(found)
    return list(dict.fromkeys(runs))


def _settings(saved: Any) -> Any:
    """A saved config's values, asset references resolved here: a run saved with the reference and
    one saved earlier with the path it resolved to are the same setting. Where a reference cannot
    resolve on this machine (its package is not installed), it is compared as written."""
    try:
        return OmegaConf.to_container(saved, resolve=True)
    except Exception:  # an interpolation this machine cannot resolve
        return OmegaConf.to_container(saved, resolve=False)


def _defaults() -> dict[str, Any]:
    return flatten(OmegaConf.to_container(OmegaConf.structured(RaysimConfig), resolve=False))


def load_run(path: Path, defaults: dict[str, Any] | None = None) -> Run:
    """A run's config, rows and summary. A key its config lacks (one added to raysim after the run)
    reads as the key's default, which is how the run behaved: so a run saved before ``attack.*``
    existed is the same setting as one saved after with no attack."""
    try:
        config = _settings(OmegaConf.load(path / "config.yaml"))
        rows = pq.read_table(path / "metrics.parquet").to_pylist()
    except Exception as err:  # a missing or broken file: name the run, no traceback
        raise UserError(f"{path}: cannot read the run ({err})") from None
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(path, {**(_defaults() if defaults is None else defaults), **flatten(config)}, rows, summary)


def _varying_keys(runs: list[Run]) -> list[str]:
    """The keys, other than seed and placement, in which some runs differ."""
    return sorted(
        k
        for k in set().union(*(r.config for r in runs))
        if not any(k == s or k.startswith(f"{s}.") for s in _NOT_A_SETTING) and len({repr(r.config.get(k)) for r in runs}) > 1
    )


def _order(value: Any) -> tuple:
    """Sort key for a config value: numbers by size (alpha 8 before 64 before 256), then text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _group(runs: list[Run], keys: list[str]) -> dict[str, list[Run]]:
    """Runs grouped by their values of ``keys``, the groups in order of those values."""
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: [_order(r.config.get(k)) for k in keys]):
        name = ", ".join(f"{k}={run.config.get(k)}" for k in keys) or "all runs"
        groups.setdefault(name, []).append(run)
    return groups


def settings(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by setting, each named by its values of the keys in which the runs differ."""
    return _group(runs, _varying_keys(runs))


def _determined(runs: list[Run], key: str, by: list[str]) -> bool:
    """Whether the runs' values of ``by`` fix their value of ``key``."""
    seen: dict[tuple, str] = {}
    for run in runs:
        value = repr(run.config.get(key))
        if seen.setdefault(tuple(repr(run.config.get(b)) for b in by), value) != value:
            return False
    return True


def comparison_rows(runs: list[Run], key: str) -> dict[str, list[Run]]:
    """The rows of a comparison along ``key``: runs grouped by the keys in which they differ, except
    ``key`` and the keys that ``key`` and the rest fix (a learning rate chosen per method, the client
    count that goes with a partition), so that each row holds every value of ``key``. Of two keys
    that fix each other (a rate tuned per method and privacy level fixes the level, given the
    method), the one with more values goes: the coarser one is the grid's axis; with as many
    values each (a rate per method), the more nested one goes, so the row keeps the name that
    says what the cell is (method, not train.lr)."""
    keys = [k for k in _varying_keys(runs) if k != key]
    for k in sorted(keys, key=lambda k: (-len({repr(r.config.get(k)) for r in runs}), -k.count("."), k)):
        if _determined(runs, k, [o for o in keys if o != k] + [key]):
            keys.remove(k)
    return _group(runs, keys)


def _mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values; the deviation is NaN for one value."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


def _final_accuracy(run: Run) -> float | None:
    """The final evaluation on the whole split (summary.json); else the last per-round one."""
    if run.summary.get("final_eval_accuracy") is not None:
        return float(run.summary["final_eval_accuracy"])
    finite = [r["eval_accuracy"] for r in run.rows if r.get("eval_accuracy") is not None and math.isfinite(r["eval_accuracy"])]
    return finite[-1] if finite else None


def _final_attack_success(run: Run) -> float | None:
    """A backdoor run's share of triggered rows classified as the target (summary.json); else the
    last per-round one; None for a run without a backdoor."""
    if run.summary.get("final_attack_success") is not None:
        return float(run.summary["final_attack_success"])
    finite = [r["attack_success"] for r in run.rows if r.get("attack_success") is not None and math.isfinite(r["attack_success"])]
    return finite[-1] if finite else None


def _epsilon(run: Run) -> float | None:
    privacy = run.summary.get("privacy") or {}
    if "epsilon" in privacy:
        return float(privacy["epsilon"])
    epsilons = [r["epsilon"] for r in run.rows if r.get("epsilon") is not None]
    return epsilons[-1] if epsilons and math.isfinite(epsilons[-1]) else None


def table(groups: dict[str, list[Run]]) -> str:
    """Markdown: per setting, mean ± std over seeds of final accuracy, epsilon spent and uplink, and
    of the backdoor's success where some run has a backdoor."""
    split = next(iter(groups.values()))[0].config.get("eval.split", "test")
    backdoor = any(_final_attack_success(r) is not None for runs in groups.values() for r in runs)
    lines = [
        f"| setting | seeds | rounds | final {split} accuracy | ε spent | uplink MB |" + (" backdoor success |" if backdoor else ""),
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if backdoor else ""),
    ]
    for name, runs in groups.items():
        accuracy = _mean_std([_final_accuracy(r) for r in runs])
        epsilons = [_epsilon(r) for r in runs]
        eps = _mean_std([e for e in epsilons if e is not None]) if any(e is not None for e in epsilons) else None
        uplink = _mean_std([sum(row["uplink_bytes"] for row in r.rows) / 1e6 for r in runs])
        rounds = sorted({len(r.rows) for r in runs})
        lines.append(
            f"| {name} | {len(runs)} | {'/'.join(map(str, rounds))} | {_pm(accuracy, 4)} | "
            f"{'—' if eps is None else _pm(eps, 2)} | {_pm(uplink, 2)} |"
            + (f" {_pm(_mean_std([_final_attack_success(r) for r in runs]), 4)} |" if backdoor else "")
        )
    return "\n".join(lines) + "\n"


def compare_values(runs: list[Run], key: str) -> list[str]:
    """The values of ``key`` among the runs, as text, sorted; UserError unless there are several."""
    distinct = {str(r.config.get(key)): r.config.get(key) for r in runs}
    values = sorted(distinct, key=lambda text: _order(distinct[text]))
    if not any(key in r.config for r in runs):
        varying = _varying_keys(runs)
        named = [k for k in varying if k.endswith(f".{key}")]  # a study's axis is often named by its key's last part
        hint = f"did you mean {' or '.join(named)}?" if named else f"these runs differ in: {', '.join(varying) or 'nothing but seed'}"
        raise UserError(f"--compare: no run has the config key '{key}'; {hint}")
    if len(values) < 2:
        raise UserError(f"--compare: every run has {key}={values[0]}; nothing to compare")
    return values


def _paired_differences(runs: list[Run], key: str, first: str, second: str, metric: Metric = _final_accuracy) -> list[float]:
    """``metric`` of ``key=first`` minus that of ``key=second``, one difference per seed both ran
    (same seed, same data and sampling)."""
    def by_seed(value: str) -> dict[Any, float | None]:
        return {r.config.get("seed"): metric(r) for r in runs if str(r.config.get(key)) == value}

    a, b = by_seed(first), by_seed(second)
    return [x - y for seed, x in a.items() if x is not None and (y := b.get(seed)) is not None]


def compare_table(rows: dict[str, list[Run]], key: str, values: list[str], metric: Metric = _final_accuracy) -> str:
    """Markdown: a row per setting, a column per value of ``key`` (mean ± std over seeds of
    ``metric``). With two values, their difference paired by seed and how many seeds the first wins."""
    paired = len(values) == 2
    head = [f"{key}={v}" for v in values] + ([f"{values[0]} − {values[1]}, paired by seed", f"seeds {values[0]} ahead"] if paired else [])
    lines = ["| setting | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
    for name, runs in rows.items():
        by_value = {v: [r for r in runs if str(r.config.get(key)) == v] for v in values}
        cells = [f"{_pm(_mean_std([metric(r) for r in by_value[v]]), 4)} (n={len(by_value[v])})" for v in values]
        if paired:
            diffs = _paired_differences(runs, key, values[0], values[1], metric)
            cells += [_pm(_mean_std(diffs), 4), f"{sum(d > 0 for d in diffs)}/{len(diffs)}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def baseline_table(rows: dict[str, list[Run]], key: str, values: list[str], baseline: str) -> str:
    """Markdown: a row per setting, a column per value of ``key`` other than ``baseline``: its final
    accuracy minus the baseline's, paired by seed (mean ± std), and on how many seeds it is ahead."""
    others = [v for v in values if v != baseline]
    lines = ["| setting | " + " | ".join(f"{v} − {baseline}" for v in others) + " |", "| --- |" + " --- |" * len(others)]
    for name, runs in rows.items():
        cells = []
        for value in others:
            diffs = _paired_differences(runs, key, value, baseline)
            cells.append(f"{_pm(_mean_std(diffs), 4)} ({sum(d > 0 for d in diffs)}/{len(diffs)} ahead)" if diffs else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pm(mean_std: tuple[float, float], digits: int) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _curve(runs: list[Run], metric: str):
    """(rounds, mean, std) of ``metric`` over the runs, or None when no run has it."""
    import numpy as np

    by_round: dict[int, list[float]] = {}
    for run in runs:
        for row in run.rows:
            value = row.get(metric)
            if value is not None and math.isfinite(value):
                by_round.setdefault(row["round"], []).append(value)
    if not by_round:
        return None
    rounds = np.array(sorted(by_round))
    mean = np.array([np.mean(by_round[r]) for r in rounds])
    std = np.array([np.std(by_round[r], ddof=1) if len(by_round[r]) > 1 else 0.0 for r in rounds])
    return rounds, mean, std


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot(groups: dict[str, list[Run]], path: Path, metric: str = "eval_accuracy") -> Path:
    """``metric`` against round: the mean over seeds per setting, with a band of ± one std."""
    plt = _pyplot()
    # The legend goes below the plot (setting names are long); past 10 settings the colours repeat,
    # so the line style changes with each round of the colour cycle.
    fig, ax = plt.subplots(figsize=(9, 4.5 + 0.22 * len(groups)))
    styles = ["-", "--", ":", "-."]
    for index, (name, runs) in enumerate(groups.items()):
        curve = _curve(runs, metric)
        if curve is None:
            continue
        rounds, mean, std = curve
        (line,) = ax.plot(rounds, mean, styles[index // 10 % 4], marker="o", markersize=3, label=f"{name} (n={len(runs)})")
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def compare_plot(rows: dict[str, list[Run]], key: str, values: list[str], path: Path, metric: str = "eval_accuracy") -> Path:
    """One panel per setting that has ``metric`` (a backdoor's success only where there is a
    backdoor), one line per value of ``key`` (mean over seeds, ± one std band); the legend names
    every value drawn in any panel."""
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves = {name: {value: _curve([r for r in runs if str(r.config.get(key)) == value], metric) for value in values} for name, runs in rows.items()}
    panels = {name: by_value for name, by_value in curves.items() if any(c is not None for c in by_value.values())} or curves
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows + 0.6), sharex=True, squeeze=False)
    legend: dict[str, Any] = {}  # value -> its line, from whichever panel drew it
    for ax, (name, by_value) in zip(axes.flat, panels.items()):
        for colour, value in zip(colours * len(values), values):
            curve = by_value[value]
            if curve is not None:
                rounds, mean, std = curve
                (legend[value],) = ax.plot(rounds, mean, color=colour, marker="o", markersize=3)
                ax.fill_between(rounds, mean - std, mean + std, color=colour, alpha=0.2)
        ax.set_title(name.replace(", ", "\n"), fontsize="small")
        ax.set_xlabel("round")
        ax.tick_params(labelbottom=True)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(metric.replace("_", " "))
    drawn = [value for value in values if value in legend]
    fig.legend([legend[v] for v in drawn], [f"{key}={v}" for v in drawn], loc="lower center", ncol=max(1, len(drawn)), frameon=False)
    fig.tight_layout(rect=(0, 0.06 if nrows == 1 else 0.03, 1, 1))
    return _save(fig, path)


def report(paths: list[str | Path], out: str | Path, compare: str | None = None, baseline: str | None = None) -> Path:
    """Write OUT/report.md (the table) and OUT/accuracy.png, OUT/train_loss.png (and, where runs
    have a backdoor, OUT/attack_success.png and its success in the tables); returns report.md.
    With ``compare`` (a config key such as ``method``), report.md starts with a table that puts its
    values side by side for each setting, and the plots get a panel per setting; with ``baseline``
    (one of its values), a second table gives every other value's difference from it, paired by seed."""
    if baseline is not None and not compare:
        raise UserError("--baseline: needs --compare KEY (a value of KEY to measure the others against)")
    out = Path(out)
    defaults = _defaults()
    found = [load_run(p, defaults) for p in find_runs(paths)]
    # A run without summary.json has not finished (or is still running): shown apart, not averaged.
    runs = [r for r in found if r.summary]
    unfinished = [r for r in found if not r.summary]
    if not runs:
        raise UserError(f"no finished run (one with summary.json) among {len(found)} found")
    groups = settings(runs)
    backdoor = any(_final_attack_success(r) is not None for r in runs)
    plotted = {"accuracy": "eval_accuracy", "train_loss": "train_loss"} | ({"attack_success": "attack_success"} if backdoor else {})  # file name -> metric
    if compare:
        values = compare_values(runs, compare)
        if baseline is not None and baseline not in values:
            raise UserError(f"--baseline: no run has {compare}={baseline}; its values are {', '.join(values)}")
        rows = comparison_rows(runs, compare)
        images = [f"![{name}]({compare_plot(rows, compare, values, out / f'{name}.png', metric).name})" for name, metric in plotted.items()]
        split = runs[0].config.get("eval.split", "test")
        against = [f"Against {compare}={baseline}: final {split} accuracy minus the baseline's, paired by seed.", "", baseline_table(rows, compare, values, baseline)] if baseline else []
        attack = [
            "The backdoor's success: the share of triggered test rows of other labels classified as its target, mean ± std over seeds.",
            "",
            compare_table({n: r for n, r in rows.items() if any(_final_attack_success(x) is not None for x in r)}, compare, values, _final_attack_success),
        ] if backdoor else []
        head = [f"## {compare}, side by side", "", f"Final {split} accuracy, mean ± std over seeds.", "", compare_table(rows, compare, values), *against, *attack, *images, "", "## Every setting", ""]
        images = []
    else:
        images = [f"![{name}]({plot(groups, out / f'{name}.png', metric).name})" for name, metric in plotted.items()] + [""]
        head = []
    text = [
        "# raysim report",
        "",
        f"{len(runs)} runs in {len(groups)} settings; mean ± standard deviation over seeds.",
        "",
        *head,
        table(groups),
        *images,
        "Runs:",
        "",
        *(f"- {name}: {', '.join(str(r.path) for r in group)}" for name, group in groups.items()),
        "",
        *([f"Not finished, left out: {', '.join(f'{r.path} ({len(r.rows)} rounds)' for r in unfinished)}", ""] if unfinished else []),
    ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path
