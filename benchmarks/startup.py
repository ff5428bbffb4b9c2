"""Start-up of `raysim run configs/tiny.yaml`: from the process's start to the first round, and
how much of it is Ray's own start.

    python benchmarks/startup.py --repeats 5 --clients 10 1000 --json FILE

Each run is a fresh Python process that does what `raysim run` does before its first round:
import raysim, read the config, and build the Simulation, which starts a local Ray (2 CPUs, no
dashboard) and its actors. ``ray_start_s`` is ray.init's share (``Simulation.ray_start_s``); the
issue's goal is on what is left, ``beyond_ray_s``. The median over the repeats is reported.
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


def measure(clients: list[int], repeats: int) -> list[dict]:
    results = []
    for n in clients:
        runs = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run.json"
                command = [sys.executable, __file__, "--one", str(n), "--json", str(out)]
                done = subprocess.run(command, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"start-up run failed:\n{done.stderr[-3000:]}")
                runs.append(json.loads(out.read_text()))
        summary = {key: median(r[key] for r in runs) for key in ("ready_s", "ray_start_s", "beyond_ray_s")}
        results.append({"clients": n, "repeats": repeats, **summary, "runs": runs})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10], help="clients.num values (tiny.yaml has 10)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        args.json.write_text(json.dumps(one(args.one)))
        return 0
    results = measure(args.clients, args.repeats)
    print(f"{'clients':>8}{'ready s':>10}{'Ray start s':>13}{'beyond Ray s':>14}   (medians of {args.repeats})")
    for r in results:
        print(f"{r['clients']:>8}{r['ready_s']:>10.2f}{r['ray_start_s']:>13.2f}{r['beyond_ray_s']:>14.2f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
