"""Wall time of a study with the sequential runner and with Ray Tune, on this machine.

    python benchmarks/study_runner.py --json benchmarks/results-study_runner-2026-12-04.json

A study of --cells tiny cells (configs/tiny.yaml, --rounds rounds, one 1-CPU worker each) runs
with ``python -m raysim.study --sequential`` and with the default (Tune) runner, each in a fresh
process that starts its own Ray with --cpus CPUs, so Tune may run --cpus cells at once. A
one-cell study under each runner gives the start-up a Tune experiment and its trial add. Every
wall time includes Ray's own start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from raysim.config import CONFIG_DIR


def _study(directory: Path, cells: int, rounds: int, cpus: int) -> Path:
    spec = {
        "base": str(CONFIG_DIR / "tiny.yaml"),
        "output_dir": str(directory / "out"),
        "settings": {"rounds": rounds, "worker.count": 1, "eval.max_examples": 50, "ray.num_cpus": cpus},
        "axes": {"seed": list(range(cells))},
    }
    path = directory / "study.yaml"
    path.write_text(OmegaConf.to_yaml(spec))
    return path


def _wall(cells: int, rounds: int, cpus: int, sequential: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = _study(Path(tmp), cells, rounds, cpus)
        command = [sys.executable, "-m", "raysim.study", str(path), *(["--sequential"] if sequential else [])]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), **vars(args)}
    out["json"] = str(args.json)
    for label, cells in (("one_cell", 1), ("study", args.cells)):
        for runner, sequential in (("sequential", True), ("tune", False)):
            out[f"{label}_{runner}_s"] = _wall(cells, args.rounds, args.cpus, sequential)
            print(f"{cells} cell(s), {runner}: {out[f'{label}_{runner}_s']:.1f} s", flush=True)
    out["tune_startup_s"] = out["one_cell_tune_s"] - out["one_cell_sequential_s"]
    out["study_speedup"] = out["study_sequential_s"] / out["study_tune_s"]
    print(f"Tune's experiment and trial add {out['tune_startup_s']:.1f} s to one cell; {args.cells} cells run {out['study_speedup']:.2f}x faster under Tune")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
