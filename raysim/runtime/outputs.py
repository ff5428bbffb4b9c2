"""A run's outputs in output_dir: metrics.parquet, privacy.parquet, TensorBoard scalars,
summary.json and the adapter's files, each written so that a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from raysim.config import UserError
from raysim.tensorboard_log import TensorBoardLog

log = logging.getLogger("raysim")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file. A
    write that fails (a full disk, a directory made read-only) is a UserError naming the file; the
    previous version of the file is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"output_dir: cannot write '{path}' ({err.strerror or err}); the files written before are intact") from None


def check_output_dir(cfg: DictConfig, resumed_run: Path | None) -> Path:
    """output_dir, checked before anything starts: it is a directory this process can create (or
    write), and not another run's unless overwrite or resuming that run."""
    out = Path(cfg.output_dir)
    continuing = resumed_run is not None and out.resolve() == resumed_run.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite and not continuing:
        raise UserError(f"output_dir: '{out}' already exists and is not empty; choose another or pass overwrite=true")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"output_dir: '{out}' cannot be created: '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: '{out}' cannot be {'written' if existing == out.absolute() else 'created'}: no write permission in '{existing}'")
    if existing != out.absolute():
        _probe_creation(out.absolute(), existing)
    return out


def _probe_creation(target: Path, existing: Path) -> None:
    """Create ``target`` and remove what was created again, up to ``existing``: permission bits do
    not tell (root may "write" into /proc, a read-only mount, a full disk)."""
    try:
        target.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"output_dir: '{target}' cannot be created ({err.strerror or err})") from None
    for created in (target, *target.parents):
        if created == existing:
            break
        created.rmdir()


class RunOutputs:
    """The files of one run directory."""

    def __init__(self, output_dir: Path):
        self.dir = output_dir
        self._tensorboard: TensorBoardLog | bool | None = None

    def write_metrics(self, rows: list[dict[str, Any]], client_privacy: pa.Table | None) -> None:
        table = pa.Table.from_pylist(rows)
        write_atomic(self.dir / "metrics.parquet", lambda p: pq.write_table(table, p))
        if client_privacy is not None:
            write_atomic(self.dir / "privacy.parquet", lambda p: pq.write_table(client_privacy, p))

    def write_tensorboard(self, row: dict[str, Any]) -> None:
        """The round's numbers as TensorBoard scalars in output_dir/tensorboard, when tensorboard is
        installed. A resumed run first purges the events of rounds it is about to redo."""
        if self._tensorboard is None:
            try:
                self._tensorboard = TensorBoardLog(self.dir / "tensorboard", purge_step=row["round"])
            except ImportError:
                self._tensorboard = False
            else:
                log.info("TensorBoard: tensorboard --logdir %s", self.dir / "tensorboard")
        if isinstance(self._tensorboard, TensorBoardLog):
            scalars = {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, (int, float)) and math.isfinite(v)}
            self._tensorboard.add_scalars(row["round"], scalars, time.time())
            self._tensorboard.flush()

    def write_files(self, directory: Path, files: dict[str, bytes]) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():

            def write(path: Path, data: bytes = content) -> None:
                path.write_bytes(data)

            write_atomic(directory / name, write)
        return directory

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.dir / "summary.json"
        write_atomic(path, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
        return path

    def write_predictions(self, predictions: list[dict[str, Any]]) -> Path:
        """task=causal_lm: the final evaluation's generated answers, one JSON object per line."""
        path = self.dir / "predictions.jsonl"
        write_atomic(path, lambda p: p.write_text("".join(json.dumps(row) + "\n" for row in predictions)))
        return path

    def close(self) -> None:
        if isinstance(self._tensorboard, TensorBoardLog):
            self._tensorboard.close()
        self._tensorboard = None


def format_row(row: dict[str, Any], total_rounds: int) -> str:
    parts = [
        f"round {row['round']}/{total_rounds}",
        f"clients {row['clients']}" + (f" ({row['dropped']} dropped)" if row["dropped"] else ""),
        f"train_loss {row['train_loss']:.4f}",
        f"eval_loss {row['eval_loss']:.4f}",
        f"eval_acc {row['eval_accuracy']:.4f}",
    ]
    if not math.isnan(row["aggregation_error"]):
        parts.append(f"agg_err {row['aggregation_error']:.2e}")
    if "attackers" in row:
        parts.append(f"attackers {row['attackers']}" + (f" ({row['attackers_kept']} kept)" if "attackers_kept" in row else ""))
    if "epsilon_server" in row:  # distributed DP: both adversaries' numbers
        parts.append(f"eps {row['epsilon_server']:.3f} vs server, {row['epsilon_observer']:.3f} vs observer")
    elif math.isfinite(row["epsilon"]):
        parts.append(f"eps {row['epsilon']:.3f}")
    if row.get("secagg_aborted"):
        parts.append("secagg aborted")
    parts.append(f"{row['wall_s']:.1f}s")
    return " | ".join(parts)
