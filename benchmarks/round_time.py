"""Time per round and client-steps per second for configs/tiny.yaml and configs/quickstart.yaml.

    python benchmarks/round_time.py                       # both configs, 5 rounds each
    python benchmarks/round_time.py --configs tiny --rounds 3 key=value ...
    python benchmarks/round_time.py --workers 1 2 4       # throughput against worker actors (1 CPU each)
    python benchmarks/round_time.py --gpus 1 0.5 0.25     # 1, 2, 4 workers sharing one GPU

Ray is started once, declaring at least as many CPUs as the most workers asked for (more workers
than cores oversubscribe them, which is the point of measuring it); each config then reports its
own start-up (data, actors, model) apart from Ray's. Round 1 is reported but left out of the
steady-state means (first-call costs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

from raysim import Simulation, load_config
from raysim.config import CONFIG_DIR


def measure(config: str, rounds: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG_DIR / f"{config}.yaml", [f"output_dir={tmp}/run", *overrides])
        with Simulation(cfg) as sim:
            rows = [sim.run_round() for _ in range(rounds)]
            startup = sim.startup_s
    steady = rows[1:] or rows
    mean = lambda key: statistics.fmean(r[key] for r in steady)  # noqa: E731
    client_steps = cfg.clients.per_round * cfg.train.local_steps
    return {
        "config": config,
        "workers": cfg.worker.count,
        "num_gpus": cfg.worker.num_gpus,
        "clients_per_batch": cfg.train.clients_per_batch,
        "clients": cfg.clients.num,
        "per_round": cfg.clients.per_round,
        "local_steps": cfg.train.local_steps,
        "startup_s": startup,
        "first_round_s": rows[0]["wall_s"],
        "round_s": mean("wall_s"),
        "train_s": mean("train_s"),
        "eval_s": mean("eval_s"),
        "client_steps_per_s": client_steps / mean("train_s"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "quickstart"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts to compare (1 CPU each); default: each config's own")
    parser.add_argument("--gpus", type=float, nargs="+", help="GPU shares per worker to compare: F gives 1/F workers on one GPU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    ray.init(num_cpus=max([os.cpu_count() or 1, *(args.workers or [])]), include_dashboard=False, logging_level="ERROR")
    ray_start = time.perf_counter() - started
    counts = [[f"worker.count={w}", "worker.num_cpus=1"] for w in args.workers or []]
    counts += [[f"worker.count={round(1 / f)}", "worker.num_cpus=1", f"worker.num_gpus={f}"] for f in args.gpus or []]
    counts = counts or [[]]
    try:
        results = [measure(c, args.rounds, [*workers, *args.overrides]) for c in args.configs for workers in counts]
    finally:
        ray.shutdown()

    print(f"Ray start: {ray_start:.1f}s   (steady state = rounds 2..{args.rounds})")
    header = f"{'config':<11}{'workers':>8}{'GPUs':>6}{'K':>4}{'clients':>8}{'steps/rnd':>10}{'startup s':>10}{'round s':>9}{'train s':>9}{'eval s':>8}{'client-steps/s':>16}"
    print(header)
    for r in results:
        print(
            f"{r['config']:<11}{r['workers']:>8}{r['num_gpus']:>6g}{r['clients_per_batch']:>4}{r['clients']:>8}{r['per_round'] * r['local_steps']:>10}"
            f"{r['startup_s']:>10.1f}{r['round_s']:>9.2f}{r['train_s']:>9.2f}{r['eval_s']:>8.2f}{r['client_steps_per_s']:>16.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"ray_start_s": ray_start, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
