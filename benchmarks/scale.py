"""Memory and start-up against the number of clients.

    python benchmarks/scale.py --clients 100 1000 5000 --json FILE
    python benchmarks/scale.py --clients 1000 10000 100000 --per-round 50 --per-round 500 --json FILE
    python benchmarks/scale.py --config configs/llm.yaml --clients 20 200 --json FILE train.batch_size=1

For each N: configs/tiny.yaml over all ~30k training tweets (iid, length 64), N clients, one round
in which *every* client trains one AdamW step, so every client holds its full local state (AdamW
moments, data order) at the end; no per-round evaluation. Each N runs in a fresh process with its
own local Ray (2 CPUs, no dashboard), sampled every 0.2 s:
- peak memory: the sum of the proportional set size (PSS: shared pages, such as the object
  store's, split among the processes mapping them) of the driver and all its descendants (Ray's
  GCS, raylet, workers and server actor);
- steady memory: the same sum after the round;
- start-up: from Simulation() to ready, Ray's own start (ray.init) reported apart;
- with ``--per-round K ...``: then the median wall time of 3 rounds of K sampled clients each.
Every client needs at least one training row, and the tweets have ~30k: past 25,000 clients the
data is the tweets file repeated (copies, tiled into a temporary parquet file), which changes the
work of none of the measured steps.
Memory per extra client is the steady memory's slope between the smallest and largest N; it is
compared with the bound 2 x (adapter + optimizer state) + the client's shard. ``--config`` takes
another config's model and data (SmolLM2 on BoolQ: one resident 135M-parameter model per worker),
with the same settings and any ``key=value`` overrides after them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SETTINGS = [
    "data.partition=iid",
    "data.max_rows=0",
    "data.max_length=64",
    "train.local_steps=1",
    "eval.every=1000000",
    "eval.aggregation_error=false",
]


def tree_pss() -> int:
    """PSS in bytes of this process and every descendant (Ray's processes included)."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


TWEETS_FOR_CLIENTS = 25_000  # clients the tweets' ~30k training rows give one row or more each
ROUNDS_PER_SIZE = 3


def tiled_tweets(clients: int, folder: str) -> list[str]:
    """The override that gives ``clients`` clients a row each: none up to TWEETS_FOR_CLIENTS,
    else data.path to the tweets repeated as often as needed."""
    if clients <= TWEETS_FOR_CLIENTS:
        return []
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysim.config import tweets_path
    from raysim.data.loading import read_table

    copies = -(-clients // TWEETS_FOR_CLIENTS)
    path = Path(folder) / f"tweets-x{copies}.parquet"
    pq.write_table(pa.concat_tables([read_table(tweets_path())] * copies), path)
    return [f"data.path={path}"]


def one(clients: int, config: str | None = None, overrides: tuple[str, ...] = (), per_round: tuple[int, ...] = ()) -> dict:
    """Runs in its own process: start-up, one round of every client, memory samples; then
    ROUNDS_PER_SIZE rounds of each of ``per_round`` sampled clients."""
    import ray

    from raysim import Simulation, load_config
    from raysim.config import CONFIG_DIR

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(tree_pss())
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        settings = [*SETTINGS, *tiled_tweets(clients, tmp), f"clients.num={clients}", f"clients.per_round={clients}", f"output_dir={tmp}/run", *overrides]
        if config is not None:
            settings.append("eval.generate_examples=0")
        cfg = load_config(config or CONFIG_DIR / "tiny.yaml", settings)
        ray_started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray_start_s = time.perf_counter() - ray_started
        with Simulation(cfg) as sim:
            row = sim.run_round()
            steady = tree_pss()
            adapter_bytes = row["uplink_bytes"] // row["clients"]
            shard_rows = sum(sim.client_sizes)
            round_s_at = {}
            for k in per_round:
                sim.set_clients(min(k, clients))
                round_s_at[k] = sorted(sim.run_round()["wall_s"] for _ in range(ROUNDS_PER_SIZE))[ROUNDS_PER_SIZE // 2]
        ray.shutdown()
    stop.set()
    sampler.join()
    return {
        "clients": clients,
        "trained": row["clients"],
        "ray_start_s": ray_start_s,
        "startup_s": sim.startup_s,
        "round_s": row["wall_s"],
        "round_s_at": round_s_at,
        "peak_bytes": max(samples),
        "steady_bytes": steady,
        "adapter_bytes": adapter_bytes,
        "train_rows": shard_rows,
        "row_bytes": 4 * cfg.data.max_length + 4 + 8,  # token ids (int32), length, label
    }


def measure(clients: list[int], config: str | None = None, overrides: tuple[str, ...] = (), per_round: tuple[int, ...] = ()) -> dict:
    results = []
    for n in clients:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "one.json"
            sizes = [arg for k in per_round for arg in ("--per-round", str(k))]
            command = [sys.executable, __file__, "--one", str(n), "--json", str(out), *sizes, *(["--config", config] if config else []), *overrides]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{n} clients failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(out.read_text()))
    low, high = results[0], results[-1]
    per_client = (high["steady_bytes"] - low["steady_bytes"]) / (high["clients"] - low["clients"]) if len(results) > 1 else float("nan")
    adapter = high["adapter_bytes"]
    shard = high["train_rows"] / high["clients"] * high["row_bytes"]
    # AdamW keeps two moments per trained value: optimizer state = 2 x adapter.
    bound = 2 * (adapter + 2 * adapter) + shard
    return {"config": config or "configs/tiny.yaml", "overrides": list(overrides), "results": results, "bytes_per_extra_client": per_client, "bound_per_client": bound, "adapter_bytes": adapter, "optimizer_bytes": 2 * adapter}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", help="another config's model and data")
    parser.add_argument("--per-round", type=int, action="append", default=[], help="then time rounds of this many sampled clients (repeat for more sizes)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value after the settings")
    args = parser.parse_args(argv)
    if args.one:
        args.json.write_text(json.dumps(one(args.one, args.config, tuple(args.overrides), tuple(args.per_round))))
        return 0
    r = measure(args.clients, args.config, tuple(args.overrides), tuple(args.per_round))
    mib = 2**20
    print("every client trains once (one AdamW step), so each holds its full local state; 2 CPUs")
    sized = "".join(f"{f'round@{k} s':>13}" for k in args.per_round)
    print(f"{'clients':>8}{'Ray start s':>12}{'start-up s':>11}{'round s':>9}{sized}{'peak MiB':>10}{'steady MiB':>11}")
    for x in r["results"]:
        at = "".join(f"{x['round_s_at'][str(k)]:>13.2f}" for k in args.per_round)
        print(f"{x['clients']:>8}{x['ray_start_s']:>12.1f}{x['startup_s']:>11.1f}{x['round_s']:>9.1f}{at}{x['peak_bytes'] / mib:>10.0f}{x['steady_bytes'] / mib:>11.0f}")
    print(
        f"memory per extra client {r['bytes_per_extra_client'] / 1024:.1f} KiB; bound 2 x (adapter {r['adapter_bytes'] / 1024:.1f} KiB "
        f"+ AdamW state {r['optimizer_bytes'] / 1024:.1f} KiB) + shard = {r['bound_per_client'] / 1024:.1f} KiB"
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
