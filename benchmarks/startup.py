"""Start-up of `raysim run configs/tiny.yaml`: from the process's start to the first round, how
much of it is Ray's own start, and how much a bare Ray program needs for the same imports.

    python benchmarks/startup.py --repeats 5 --clients 10 1000 --json FILE

Each run is a fresh Python process that does what `raysim run` does before its first round:
import raysim, read the config, and build the Simulation, which starts a local Ray (2 CPUs, no
dashboard) and its actors. ``ray_start_s`` is ray.init's share (``Simulation.ray_start_s``); the
issue's goal is on what is left, ``beyond_ray_s``. The median over the repeats is reported.

The floor: each repeat also runs, in turn with raysim's, a bare Ray program with the same
``ray.init`` and as many actors as tiny.yaml's workers, whose constructors only import torch, PEFT
and the model's transformers class, as any Ray program fine-tuning it must. Its ``beyond_ray_s``
is what Ray's actors and those libraries cost on the machine at that hour; raysim's own start-up is
the difference (``raysim_own_s``). Alternating the two keeps a slower hour from biasing either.

Work the driver does beside ``ray.init`` (raysim checks its inputs there) makes Ray's start longer
instead: ``ray_start_extra_s`` compares the shortest Ray start of each side, because Ray's start
is bimodal here (a 1 s poll in ray.init is hit or missed), so medians of a few runs jump by 1 s.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from statistics import median  # noqa: E402


def one(clients: int) -> dict:
    """In a fresh process: start-up of tiny.yaml with ``clients`` clients."""
    from raysim import Simulation, load_config
    from raysim.config import CONFIG_DIR

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"clients.num={clients}", "ray.num_cpus=2", "ray.dashboard=false", f"output_dir={tmp}/run"])
        with Simulation(cfg) as sim:
            ready = time.perf_counter() - PROCESS_START
            ray_start = sim.ray_start_s
    return {"clients": clients, "ready_s": ready, "ray_start_s": ray_start, "beyond_ray_s": ready - ray_start}


def floor(workers: int) -> dict:
    """In a fresh process: the same ray.init as raysim's, then ``workers`` actors that only import
    the libraries (tiny.yaml's model is a BERT)."""
    import ray

    @ray.remote(num_cpus=1)
    class Importer:
        def __init__(self):
            import peft  # noqa: F401
            import torch  # noqa: F401
            from transformers import BertForSequenceClassification  # noqa: F401

        def ready(self) -> bool:
            return True

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - started
    actors = [Importer.remote() for _ in range(workers)]
    ray.get([a.ready.remote() for a in actors])
    ready = time.perf_counter() - PROCESS_START
    ray.shutdown()
    return {"ready_s": ready, "ray_start_s": ray_start, "beyond_ray_s": ready - ray_start}


def _fresh(*args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        command = [sys.executable, __file__, *args, "--json", str(out)]
        done = subprocess.run(command, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"start-up run failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def measure(clients: list[int], repeats: int) -> list[dict]:
    from raysim.config import CONFIG_DIR, load_config

    workers = int(load_config(CONFIG_DIR / "tiny.yaml").worker.count)
    results = []
    for n in clients:
        runs, floors = [], []
        for _ in range(repeats):
            runs.append(_fresh("--one", str(n)))
            floors.append(_fresh("--floor", str(workers)))
        summary = {key: median(r[key] for r in runs) for key in ("ready_s", "ray_start_s", "beyond_ray_s")}
        floor_beyond = median(f["beyond_ray_s"] for f in floors)
        results.append(
            {
                "clients": n,
                "repeats": repeats,
                **summary,
                "floor_beyond_ray_s": floor_beyond,
                "raysim_own_s": summary["beyond_ray_s"] - floor_beyond,
                "ray_start_extra_s": min(r["ray_start_s"] for r in runs) - min(f["ray_start_s"] for f in floors),
                "runs": runs,
                "floor_runs": floors,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10], help="clients.num values (tiny.yaml has 10)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one or args.floor:
        args.json.write_text(json.dumps(one(args.one) if args.one else floor(args.floor)))
        return 0
    results = measure(args.clients, args.repeats)
    print(
        f"{'clients':>8}{'ready s':>10}{'Ray start s':>13}{'beyond Ray s':>14}{'floor s':>10}{'raysim own s':>14}"
        f"{'Ray start +s':>14}   (medians of {args.repeats}; the last column: shortest against shortest)"
    )
    for r in results:
        print(
            f"{r['clients']:>8}{r['ready_s']:>10.2f}{r['ray_start_s']:>13.2f}{r['beyond_ray_s']:>14.2f}"
            f"{r['floor_beyond_ray_s']:>10.2f}{r['raysim_own_s']:>14.2f}{r['ray_start_extra_s']:>14.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
