"""raysim against the bare PyTorch loop on identical work: the runtime's overhead, and where it goes.

    python benchmarks/overhead.py --clients 100 --json FILE
    python benchmarks/overhead.py --clients 100 --rounds 5 key=value ...
    python benchmarks/overhead.py --config configs/llm.yaml --clients 20 --rounds 3 --json FILE

The workload (issue 5's reference): configs/tiny.yaml (a BERT with hidden size 64 and 2 layers),
LoRA r=8 on query/value with A frozen (FFA-LoRA), N iid clients, 10 per round, 10 local SGD steps
of batch 16 at length 64.
- bare: one process, no Ray: raysim's local runtime (``runtime=local``) with one in-process worker
  whose torch uses as many threads as the raysim run's workers have CPUs in total. Same model,
  same clients' batches and seeds, same update and averaging, none of Ray's scheduling or
  serialization.
- raysim: a Simulation on a local Ray with the same CPUs (2 workers x 1 CPU by default).
Both skip per-round evaluation. The two final adapters are compared, so the work is the same.
With ``--config`` the workload is that file's as it is (e.g. configs/llm.yaml, the causal LM),
evaluation off.

``ratio`` is raysim's time over the bare loop's for the rounds; start-up is reported apart. The
ideal parallel round is the bare loop's single-thread step time x steps per round / worker CPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from omegaconf import OmegaConf

from raysim import Simulation, load_config
from raysim.config import CONFIG_DIR
from workload import WORKLOAD


def bare_loop(cfg, rounds: int, threads: int) -> dict:
    """The same rounds in one process: the local runtime, one in-process worker with ``threads``
    torch threads, one resident model."""
    started = time.perf_counter()
    local = OmegaConf.merge(cfg, {"runtime": "local", "worker": {"count": 1, "num_cpus": threads}})
    with Simulation(local) as sim:
        startup_s = time.perf_counter() - started
        initial = sim.global_adapter()
        rows = [sim.run_round() for _ in range(rounds)]
        adapter = sim.global_adapter()
    client_steps = rounds * cfg.clients.per_round * cfg.train.local_steps
    change = max(float(np.max(np.abs(adapter[k] - initial[k]))) for k in initial)
    steps_s = sum(r["steps_s"] for r in rows)
    return {"startup_s": startup_s, "round_s": [r["wall_s"] for r in rows], "step_ms": 1e3 * steps_s / client_steps, "adapter": adapter, "change": change}


def raysim_run(cfg, rounds: int) -> dict:
    started = time.perf_counter()
    with Simulation(cfg) as sim:
        startup_s = time.perf_counter() - started
        rows = [sim.run_round() for _ in range(rounds)]
        adapter = sim.global_adapter()
    return {"startup_s": startup_s, "rows": rows, "adapter": adapter}


NO_EVALUATION = ["rounds=1000000", "eval.every=1000000", "eval.aggregation_error=false", "eval.generate_examples=0"]


def measure(clients: int, rounds: int, overrides: list[str], config: Path | None = None) -> dict:
    """Both runs and the comparison; starts (and stops) a local Ray unless one is running."""
    with tempfile.TemporaryDirectory() as tmp:
        workload = [*WORKLOAD] if config is None else list(NO_EVALUATION)
        cfg = load_config(config or CONFIG_DIR / "tiny.yaml", [*workload, f"clients.num={clients}", f"output_dir={tmp}/run", *overrides])
        cpus = int(cfg.worker.count * cfg.worker.num_cpus)
        in_process = {"overwrite": True, "output_dir": f"{tmp}/bare"}
        single = bare_loop(OmegaConf.merge(cfg, in_process), min(rounds, 2), threads=1)  # single-thread step time, for the ideal parallel round
        bare = bare_loop(OmegaConf.merge(cfg, in_process), rounds, threads=cpus)
        ray_started = time.perf_counter()
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
        ray_start_s = time.perf_counter() - ray_started
        try:
            ours = raysim_run(cfg, rounds)
        finally:
            if owns_ray:
                ray.shutdown()

    rows = ours["rows"]
    raysim_s, bare_s = sum(r["wall_s"] for r in rows), sum(bare["round_s"])
    ideal_round_s = single["step_ms"] / 1e3 * cfg.clients.per_round * cfg.train.local_steps / cpus
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {
        "config": str(config or "configs/tiny.yaml + workload.py"),
        "clients": clients,
        "per_round": cfg.clients.per_round,
        "local_steps": cfg.train.local_steps,
        "rounds": rounds,
        "cpus": cpus,
        "raysim_s": raysim_s,
        "bare_s": bare_s,
        "ratio": raysim_s / bare_s,
        "startup_s": ours["startup_s"],
        "ray_start_s": ray_start_s,
        "bare_startup_s": bare["startup_s"],
        "single_thread_step_ms": single["step_ms"],
        "ideal_parallel_round_s": ideal_round_s,
        "parallel_efficiency": ideal_round_s / (raysim_s / rounds),
        "round_breakdown_s": {
            "local steps (slowest worker)": mean("steps_s"),
            "adapter swaps and deltas (slowest worker)": mean("train_s") - mean("steps_s"),
            "aggregation (server call)": mean("aggregate_s"),
            "evaluation": mean("eval_s"),
            "scheduling and serialization (the rest)": mean("wall_s") - mean("train_s") - mean("aggregate_s") - mean("eval_s"),
        },
        "max_adapter_change": bare["change"],
        "max_adapter_difference": max(float(np.max(np.abs(ours["adapter"][k] - bare["adapter"][k]))) for k in bare["adapter"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", type=Path, help="a config file's workload instead of the reference (evaluation off)")
    parser.add_argument("overrides", nargs="*", help="key=value on top of the reference workload")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = measure(args.clients, args.rounds, args.overrides, args.config)
    rounds, steps = r["rounds"], r["per_round"] * r["local_steps"]
    print(f"{r['clients']} clients, {r['per_round']} per round, {steps} client-steps per round, {r['cpus']} CPUs, {rounds} rounds")
    print(f"  raysim   {r['raysim_s']:7.2f} s  ({r['raysim_s'] / rounds:.3f} s/round; start-up {r['startup_s']:.1f} s after Ray's own {r['ray_start_s']:.1f} s)")
    print(f"  bare     {r['bare_s']:7.2f} s  ({r['bare_s'] / rounds:.3f} s/round, {r['cpus']} threads; start-up {r['bare_startup_s']:.1f} s)")
    print(f"  ratio    {r['ratio']:.2f}")
    print(
        f"  ideal parallel round {r['ideal_parallel_round_s']:.3f} s (single-thread step {r['single_thread_step_ms']:.1f} ms); "
        f"raysim's parallel efficiency {r['parallel_efficiency']:.0%}"
    )
    print("  raysim's round, on average:")
    for name, seconds in r["round_breakdown_s"].items():
        print(f"    {name:<44}{seconds:7.3f} s")
    print(f"  same work: final adapters differ by at most {r['max_adapter_difference']:.1e} (training moved them by up to {r['max_adapter_change']:.1e})")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
