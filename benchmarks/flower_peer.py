"""raysim against Flower's simulation engine (the peer users would pick) on the same workload.

    pip install -e ".[bench]"           # flwr[simulation]; it pins Ray, which raysim then uses too
    python benchmarks/flower_peer.py --clients 100 --rounds 20 --json FILE

The workload is benchmarks/overhead.py's (issue 5's reference): tiny BERT (hidden 64, 2 layers),
FFA-LoRA r=8 on query/value, N iid clients of the tweets, 10 per round, 10 local SGD steps of batch
16 at length 64, FedAvg weighted by examples, no evaluation. Each side runs end to end in a fresh
Python process on a local Ray with the same CPUs (2 by default, no dashboard, Flower's own
default), timed from the process's start to its end; start-up is the time to the first round.

The Flower side is written as its documentation advises for simulations:
- a ``ClientApp`` with a ``@app.train()`` function and a ``ServerApp`` running the message-API
  ``FedAvg`` strategy (``fraction_train`` = per_round / N) through ``run_simulation``;
- ``client_resources`` of 1 CPU per virtual client, so as many ClientApps run at once as raysim
  has workers, each with one torch thread;
- the model and the data are built once per Ray actor and cached at module level (Flower's
  advice for expensive set-up), not once per message; each message loads the received adapter
  into the cached model;
- each client's data order lives in its ``context.state`` (Flower's per-node state), so its
  batches follow the same schedule as raysim's;
- the client sends back only the tensors FFA-LoRA trains (B and the head), as raysim does.
Both sides share raysim's data preparation, model builder and local training step, so the
compute per client is identical; only the sampled clients differ (each framework's own sampler).
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def workload(clients: int, output_dir: str, *overrides: str):
    from raysim import load_config
    from raysim.config import CONFIG_DIR

    sys.path.insert(0, str(HERE))
    from workload import WORKLOAD

    return load_config(CONFIG_DIR / "tiny.yaml", [*WORKLOAD, f"clients.num={clients}", f"output_dir={output_dir}", "overwrite=true", *overrides])


def run_raysim(clients: int, rounds: int, cpus: int, output_dir: str, started: float) -> dict:
    """As ``raysim run`` does it: the Simulation starts its own local Ray (no dashboard, as Flower)."""
    from raysim import Simulation

    cfg = workload(clients, output_dir, f"ray.num_cpus={cpus}", "ray.dashboard=false")
    with Simulation(cfg) as sim:
        first_round = time.perf_counter() - started
        rows = [sim.run_round() for _ in range(rounds)]
        adapter = sim.global_adapter()
    return {"startup_s": first_round, "round_s": [r["wall_s"] for r in rows], "adapter_norm": _norm(adapter)}


# ---- the Flower program -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _resident(clients: int, output_dir: str):
    """Per Ray actor, once: the config, the prepared client shards and the model (Flower's advice)."""
    import torch

    from raysim.data.loading import from_arrow
    from raysim.data.prepare import prepare
    from raysim.data.tokenizer import load_tokenizer
    from raysim.model import build_model, trainable_parameters
    from raysim.training import ClientData, make_optimizer

    torch.set_num_threads(1)
    cfg = workload(clients, output_dir)
    data = prepare(cfg, load_tokenizer(cfg.model.name_or_path))
    model = build_model(cfg, len(data.label_names))
    params = trainable_parameters(model)
    optimizer = make_optimizer(cfg.train, list(params.values()))
    shards = [ClientData(*from_arrow(t)) for t in data.client_shards]
    return cfg, shards, model, params, optimizer


def flower_apps(clients: int, rounds: int, output_dir: str, marks: list[float]):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from raysim.model import adapter_state, build_model
    from raysim.training import ClientState, load_adapter, local_train, shuffled_batches, step_seed

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, shards, model, params, optimizer = _resident(clients, output_dir)
        cid = int(context.node_config["partition-id"])
        round_idx = int(msg.content["config"]["server-round"])
        received = msg.content["arrays"].to_torch_state_dict()
        load_adapter(params, received)
        kept = context.state.get("client")
        state = pickle.loads(kept["state"]) if kept else ClientState.new(cfg.seed, cid)
        shard = shards[cid]
        torch.manual_seed(step_seed(cfg.seed, round_idx, cid))
        batches = shuffled_batches(state, shard.lengths, cfg.train.batch_size, cfg.train.local_steps)
        loss = local_train(model, optimizer, shard, batches, torch.device("cpu"))
        context.state["client"] = ConfigRecord({"state": pickle.dumps(state)})
        reply = RecordDict(
            {
                "arrays": ArrayRecord({k: p.detach() for k, p in params.items()}),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": len(shard)}),
            }
        )
        return Message(content=reply, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = workload(clients, output_dir)
        initial = build_model(cfg, len(cfg.data.labels))
        arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in adapter_state(initial).items()})
        strategy = FedAvg(
            fraction_train=cfg.clients.per_round / clients,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.clients.per_round,
            min_available_nodes=clients,
        )

        def mark_round(server_round: int, arrays: ArrayRecord) -> None:
            marks.append(time.perf_counter())  # called before round 1 and after every round

        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds, evaluate_fn=mark_round)
        final = {k: v.numpy() for k, v in result.arrays.to_torch_state_dict().items()}
        marks.append(_norm(final))

    return server_app, client_app


def run_flower(clients: int, rounds: int, cpus: int, output_dir: str, started: float) -> dict:
    from flwr.simulation import run_simulation

    marks: list[float] = []
    server_app, client_app = flower_apps(clients, rounds, output_dir, marks)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": cpus, "logging_level": "ERROR"}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients, backend_config=backend)
    *times, norm = marks
    return {"startup_s": times[0] - started, "round_s": list(np.diff(times)), "adapter_norm": norm}


def _norm(adapter: dict) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(v, dtype=np.float64) ** 2) for v in adapter.values())))


# ---- the comparison -----------------------------------------------------------------------------


def run_side(side: str, clients: int, rounds: int, cpus: int) -> dict:
    """One side in a fresh Python process, timed from outside; its own report from inside."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        started = time.perf_counter()
        command = [sys.executable, __file__, "--side", side, "--clients", str(clients), "--rounds", str(rounds), "--cpus", str(cpus), "--json", str(out)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the {side} side failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    result["end_to_end_s"] = wall
    result["median_round_s"] = float(np.median(result["round_s"]))
    return result


def compare(clients: int, rounds: int, cpus: int) -> dict:
    flower = run_side("flower", clients, rounds, cpus)
    ours = run_side("raysim", clients, rounds, cpus)
    return {
        "clients": clients,
        "rounds": rounds,
        "cpus": cpus,
        "raysim": ours,
        "flower": flower,
        "end_to_end_speedup": flower["end_to_end_s"] / ours["end_to_end_s"],
        "per_round_speedup": flower["median_round_s"] / ours["median_round_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray, on each side")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--side", choices=["raysim", "flower"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        # Imported by name, so that Ray's actors can import what Flower sends them by reference.
        sys.path.insert(0, str(HERE))
        import flower_peer

        run = flower_peer.run_raysim if args.side == "raysim" else flower_peer.run_flower
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args.clients, args.rounds, args.cpus, f"{tmp}/run", PROCESS_START)
        args.json.write_text(json.dumps(result))
        return 0
    r = compare(args.clients, args.rounds, args.cpus)
    print(f"{r['clients']} clients, {r['rounds']} rounds, {r['cpus']} CPUs; each side end to end in a fresh process")
    for name in ("raysim", "flower"):
        s = r[name]
        print(
            f"  {name:<7}{s['end_to_end_s']:7.1f} s end to end: start-up {s['startup_s']:.1f} s, "
            f"rounds {sum(s['round_s']):.1f} s (median {s['median_round_s']:.3f} s/round)"
        )
    print(f"  raysim is {r['end_to_end_speedup']:.2f}x faster end to end, {r['per_round_speedup']:.2f}x per round")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
