"""``raysim report RUN_DIR... --out DIR``: runs compared across seeds, as a markdown table and plots.

A run is a directory ``raysim run`` wrote (config.yaml, metrics.parquet, summary.json); a directory
holding runs (a study's output) stands for all of them. Runs whose configs differ only in
``seed`` (and in keys that do not change results: output paths, Ray and worker placement,
checkpoints) form one setting; a setting is named by the keys in which the settings differ.
No Ray here.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from omegaconf import OmegaConf

from raysim.config import UserError, flatten

# Keys that never make two runs different settings.
_NOT_A_SETTING = ("seed", "output_dir", "overwrite", "resume", "checkpoint", "ray", "worker")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "privacy.target_epsilon" -> 3.0
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


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


def load_run(path: Path) -> Run:
    try:
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
        rows = pq.read_table(path / "metrics.parquet").to_pylist()
    except Exception as err:  # a missing or broken file: name the run, no traceback
        raise UserError(f"{path}: cannot read the run ({err})") from None
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(path, flatten(config), rows, summary)


def settings(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by setting, each named by its values of the keys in which the runs differ."""
    keys = sorted(
        k
        for k in set().union(*(r.config for r in runs))
        if not any(k == s or k.startswith(f"{s}.") for s in _NOT_A_SETTING) and len({repr(r.config.get(k)) for r in runs}) > 1
    )
    groups: dict[str, list[Run]] = {}
    for run in runs:
        name = ", ".join(f"{k}={run.config.get(k)}" for k in keys) or "all runs"
        groups.setdefault(name, []).append(run)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _final_accuracy(run: Run) -> float | None:
    """The final evaluation on the whole split (summary.json); else the last per-round one."""
    if run.summary.get("final_eval_accuracy") is not None:
        return float(run.summary["final_eval_accuracy"])
    finite = [r["eval_accuracy"] for r in run.rows if r.get("eval_accuracy") is not None and math.isfinite(r["eval_accuracy"])]
    return finite[-1] if finite else None


def _epsilon(run: Run) -> float | None:
    privacy = run.summary.get("privacy") or {}
    if "epsilon" in privacy:
        return float(privacy["epsilon"])
    epsilons = [r.get("epsilon") for r in run.rows if r.get("epsilon") is not None]
    return epsilons[-1] if epsilons and math.isfinite(epsilons[-1]) else None


def table(groups: dict[str, list[Run]]) -> str:
    """Markdown: per setting, mean ± std over seeds of final accuracy, epsilon spent and uplink."""
    split = next(iter(groups.values()))[0].config.get("eval.split", "test")
    lines = [
        f"| setting | seeds | rounds | final {split} accuracy | ε spent | uplink MB |",
        "| --- | --- | --- | --- | --- | --- |",
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
        )
    return "\n".join(lines) + "\n"


def _pm(mean_std: tuple[float, float], digits: int) -> str:
    mean, std = mean_std
    return "—" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def plot(groups: dict[str, list[Run]], path: Path, metric: str = "eval_accuracy") -> Path:
    """``metric`` against round: the mean over seeds per setting, with a band of ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # The legend goes below the plot (setting names are long); past 10 settings the colours repeat,
    # so the line style changes with each round of the colour cycle.
    fig, ax = plt.subplots(figsize=(9, 4.5 + 0.22 * len(groups)))
    styles = ["-", "--", ":", "-."]
    for index, (name, runs) in enumerate(groups.items()):
        by_round: dict[int, list[float]] = {}
        for run in runs:
            for row in run.rows:
                value = row.get(metric)
                if value is not None and math.isfinite(value):
                    by_round.setdefault(row["round"], []).append(value)
        if not by_round:
            continue
        rounds = np.array(sorted(by_round))
        mean = np.array([np.mean(by_round[r]) for r in rounds])
        std = np.array([np.std(by_round[r], ddof=1) if len(by_round[r]) > 1 else 0.0 for r in rounds])
        (line,) = ax.plot(rounds, mean, styles[index // 10 % 4], marker="o", markersize=3, label=f"{name} (n={len(runs)})")
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(paths: list[str | Path], out: str | Path) -> Path:
    """Write OUT/report.md (the table) and OUT/accuracy.png, OUT/train_loss.png; returns report.md."""
    out = Path(out)
    found = [load_run(p) for p in find_runs(paths)]
    # A run without summary.json has not finished (or is still running): shown apart, not averaged.
    runs = [r for r in found if r.summary]
    unfinished = [r for r in found if not r.summary]
    if not runs:
        raise UserError(f"no finished run (one with summary.json) among {len(found)} found")
    groups = settings(runs)
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot(groups, out / "accuracy.png", "eval_accuracy"), plot(groups, out / "train_loss.png", "train_loss")]
    text = [
        "# raysim report",
        "",
        f"{len(runs)} runs in {len(groups)} settings; mean ± standard deviation over seeds.",
        "",
        table(groups),
        *(f"![{p.stem}]({p.name})" for p in plots),
        "",
        "Runs:",
        "",
        *(f"- {name}: {', '.join(str(r.path) for r in group)}" for name, group in groups.items()),
        "",
        *([f"Not finished, left out: {', '.join(f'{r.path} ({len(r.rows)} rounds)' for r in unfinished)}", ""] if unfinished else []),
    ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path
