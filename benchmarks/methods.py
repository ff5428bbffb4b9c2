"""What each method costs: bytes per client per round each way, client time per local step, and
server time per round, on the same clients.

    python benchmarks/methods.py                                  # tiny and quickstart, every method
    python benchmarks/methods.py --configs tiny --methods lora flasc --rounds 3 --json FILE key=value ...

One process, no Ray: the local runtime with one in-process worker and one torch thread, so a
method's client and server work are timed without scheduling noise. Each config runs every method
for ``--rounds`` rounds from the same seed (the same clients each round), evaluating only after
the last. Bytes are the metrics' own (real sizes: FLASC counts values plus positions); client time
is the worker's local-step seconds over its clients' steps (the message a client builds is not
in it); server time is the aggregate call (summing the worker's partial sum, post-processing, the
method's update; FLoRA's stacking and merge), median over rounds. FLoRA's downlink is its
protocol's (the head and the last round's stacked adapter), not the dense merged layers raysim's
object store carries once per round per node. ``--rank-steps`` also times one client's local step
at each rank of the mix on the resident rank-8 model (masked slots) and on a PEFT model built at
that rank. Fed-SB holds out 256 training rows as its public split and
runs at rank 8 and 64 (``fed_sb-r64``); its one-off initialisation is in neither time. quickstart's model is built from MiniLM's config with
random weights (``model.init=random``): costs do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from raysim import Simulation, load_config
from raysim.config import CONFIG_DIR

HETERO = "clients.ranks={8: 0.2, 4: 0.3, 2: 0.5}"
# Each method at lora.rank 8, and Fed-SB also at the larger rank its paper pairs it with.
VARIANTS = {
    "lora": ["method=lora"],
    "ffa_lora": ["method=ffa_lora"],
    "lora_fair": ["method=lora_fair"],
    "flasc": ["method=flasc"],
    "fed_sb": ["method=fed_sb", "data.public_rows=256"],
    "fed_sb-r64": ["method=fed_sb", "data.public_rows=256", "lora.rank=64"],
    # Mixed ranks: 20% of clients at 8, 30% at 4, 50% at 2, on the resident rank-8 model.
    "fedit-hetero": ["method=lora", HETERO],
    "hetlora": ["method=hetlora", HETERO],
    "flora": ["method=flora", HETERO],
}


def measure(config: str, variant: str, rounds: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            CONFIG_DIR / f"{config}.yaml",
            ["runtime=local", "model.init=random", *VARIANTS[variant], f"rounds={rounds}", f"eval.every={rounds}", f"output_dir={out}", *overrides],
        )
        cfg = OmegaConf.merge(cfg, {"worker": {"count": 1, "num_cpus": 1}})
        with Simulation(cfg) as sim:
            sent = sum(v.size for v in sim.global_adapter().values())
            rows = [sim.run_round() for _ in range(rounds)]
    clients = sum(r["clients"] for r in rows)
    return {
        "config": config,
        "method": variant,
        "adapter_values": sent,
        "uplink_bytes_per_client": sum(r["uplink_bytes"] for r in rows) / clients,
        "downlink_bytes_per_client": sum(r["downlink_bytes"] for r in rows) / clients,
        "client_ms_per_step": 1e3 * sum(r["steps_s"] for r in rows) / (clients * cfg.train.local_steps),
        "server_ms_per_round": 1e3 * statistics.median(r["aggregate_s"] for r in rows),
        "aggregation_error_last_round": rows[-1]["aggregation_error"],
    }


def rank_step_times(config: str, ranks: tuple[int, ...], steps: int, overrides: list[str]) -> list[dict]:
    """ms per local step of one client at each rank: on the resident model at the largest rank
    (the client's slots, :class:`raysim.client_rank.ClientRank`) and on a model built at its rank."""
    import time

    import torch

    from raysim.client_rank import ClientRank
    from raysim.data.loading import from_arrow
    from raysim.data.prepare import prepare
    from raysim.data.tokenizer import load_tokenizer
    from raysim.methods.protocol import AdapterSpec
    from raysim.model import build_model, frozen_lora_a, trainable_parameters
    from raysim.training import ClientData, ClientState, local_train, make_optimizer, shuffled_batches

    torch.set_num_threads(1)
    largest = max(ranks)
    cfg = load_config(CONFIG_DIR / f"{config}.yaml", ["runtime=local", "model.init=random", "method=lora", f"lora.rank={largest}", "output_dir=/tmp/unused", *overrides])
    data = prepare(cfg, load_tokenizer(cfg.model.name_or_path))
    client = ClientData(*from_arrow(data.client_shards[0]))

    def timed(model, masked: ClientRank | None, rank: int) -> float:
        params = trainable_parameters(model)
        optimizer = make_optimizer(cfg.train, list(params.values()))
        batches = list(shuffled_batches(ClientState.new(0, 0), client.lengths, cfg.train.batch_size, steps + 2))
        local_train(model, optimizer, client, batches[:2], torch.device("cpu"))  # warm-up
        spec = AdapterSpec(rank=rank, scaling=cfg.lora.alpha / rank)
        frozen = {k: torch.from_numpy(v) for k, v in frozen_lora_a(model).items()}
        started = time.perf_counter()
        if masked is None:
            local_train(model, optimizer, client, batches[2:], torch.device("cpu"))
        else:
            with masked.applied(spec, frozen):
                local_train(model, optimizer, client, batches[2:], torch.device("cpu"), after_step=masked.project)
        return 1e3 * (time.perf_counter() - started) / steps

    resident = build_model(cfg, len(data.label_names))
    mask = ClientRank(resident, largest, trainable_parameters(resident))
    out = []
    for rank in sorted(set(ranks), reverse=True):
        own = build_model(OmegaConf.merge(cfg, {"lora": {"rank": rank}}), len(data.label_names))
        out.append({"config": config, "rank": rank, "resident_ms_per_step": timed(resident, mask, rank), "own_rank_ms_per_step": timed(own, None, rank)})
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| config | method | uplink KiB/client | downlink KiB/client | client ms/step | server ms/round |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['method']} | {r['uplink_bytes_per_client'] / 1024:.1f} | {r['downlink_bytes_per_client'] / 1024:.1f} "
            f"| {r['client_ms_per_step']:.2f} | {r['server_ms_per_round']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "quickstart"])
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank-steps", type=int, default=0, help="also time this many local steps per rank of the mix")
    parser.add_argument("--json", type=Path, help="write the results here")
    args, overrides = parser.parse_known_args(argv)
    logging.getLogger("raysim").setLevel(logging.WARNING)
    results, rank_steps = [], []
    for config in args.configs:
        for variant in args.methods:
            results.append(measure(config, variant, args.rounds, overrides))
            print(json.dumps(results[-1]), flush=True)
        if args.rank_steps:
            rank_steps += rank_step_times(config, (8, 4, 2), args.rank_steps, overrides)
            print(json.dumps(rank_steps[-3:]), flush=True)
    print(table(results))
    for r in rank_steps:
        print(f"{r['config']} rank {r['rank']}: {r['resident_ms_per_step']:.2f} ms/step on the resident rank-8 model, {r['own_rank_ms_per_step']:.2f} on a rank-{r['rank']} model")
    if args.json:
        payload = {"command": "python benchmarks/methods.py " + " ".join(argv), "results": results, "rank_steps": rank_steps}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
