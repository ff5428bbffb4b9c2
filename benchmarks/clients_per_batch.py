"""Client-steps per second when a worker trains K clients in one forward pass (train.clients_per_batch).

    python benchmarks/clients_per_batch.py                           # tiny and quickstart, K = 1, 2, 4, 8, 16
    python benchmarks/clients_per_batch.py --configs tiny --per-batch 1 4 --json FILE key=value ...
    python benchmarks/clients_per_batch.py --configs llm --per-batch 1 4 8 --clients 16 --json FILE   # SmolLM2 (GPU)

One process, no Ray: the worker's own training functions on one resident model, on a GPU when
torch sees one (else the CPU, one thread). Each run trains the same ``--clients`` clients of the
config's real data from the same adapter, ``train.local_steps`` each: one at a time (K = 1, what
:func:`raysim.training.local_train` does) or K at a time (:func:`raysim.client_batch.local_train_stacked`).
Dropout is switched off so that every K must give the same adapters; the largest difference from
K = 1 is reported beside the speed (float rounding: different batch shapes sum in a different
order, which AdamW's first steps, normalised by tiny second moments, can enlarge). quickstart's model is built from MiniLM's config with random
weights (``model.init=random``): the speed does not depend on the weights' values. A causal-LM
config (``task: causal_lm``, e.g. llm) is planned and tokenized as the runtime does it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from raysim import load_config
from raysim.client_batch import local_train_stacked
from raysim.config import CONFIG_DIR
from raysim.data.loading import from_arrow
from raysim.data.prepare import PreparedData, prepare
from raysim.data.tokenizer import load_tokenizer
from raysim.model import build_model, trainable_parameters
from raysim.training import ClientData, ClientState, load_adapter, local_train, make_optimizer, shuffled_batches, swap_optimizer_state

NO_DROPOUT = ["lora.dropout=0", "model.config_overrides.hidden_dropout_prob=0", "model.config_overrides.attention_probs_dropout_prob=0"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepared(cfg) -> PreparedData:
    if cfg.task == "causal_lm":
        from raysim.data.instructions import load_prompt_tokenizer, plan_instructions, tokenize_instructions

        return tokenize_instructions(plan_instructions(cfg), load_prompt_tokenizer(cfg.model.name_or_path), cfg.data.max_length)
    return prepare(cfg, load_tokenizer(cfg.model.name_or_path))


def measure(config: str, per_batch: list[int], clients: int, overrides: list[str], device: torch.device) -> list[dict]:
    cfg = load_config(CONFIG_DIR / f"{config}.yaml", ["model.init=random", f"clients.num={clients}", f"clients.per_round={clients}", "data.partition=iid", *NO_DROPOUT, *overrides])
    data = prepared(cfg)
    shards = [ClientData(*from_arrow(t)) for t in data.client_shards]
    model = build_model(cfg, len(data.label_names), device)
    params = trainable_parameters(model)
    param_list = list(params.values())
    start = {k: v.detach().clone() for k, v in params.items()}
    steps, batch_size = cfg.train.local_steps, cfg.train.batch_size

    def client_batches(cid: int) -> list[np.ndarray]:
        state = ClientState.new(cfg.seed, cid)  # the same batches for every K
        return list(shuffled_batches(state, shards[cid].lengths, batch_size, steps))

    def run(k: int) -> list[dict[str, torch.Tensor]]:
        out = []
        if k == 1:
            optimizer = make_optimizer(cfg.train, param_list)
            for cid in range(clients):
                load_adapter(params, start)
                swap_optimizer_state(optimizer, param_list, {})
                local_train(model, optimizer, shards[cid], client_batches(cid), device)
                out.append({n: p.detach().clone() for n, p in params.items()})
            return out
        for at in range(0, clients, k):
            group = list(range(at, min(at + k, clients)))
            results = local_train_stacked(
                model,
                lambda ps: make_optimizer(cfg.train, ps),
                [start] * len(group),
                [{} for _ in group],
                [shards[c] for c in group],
                [client_batches(c) for c in group],
                device,
            )
            out.extend(values for _, values, _ in results)
        return out

    rows, reference = [], None
    for k in per_batch:
        run(k)  # warm-up: allocator, kernels' first calls
        _sync(device)
        started = time.perf_counter()
        adapters = run(k)
        _sync(device)
        seconds = time.perf_counter() - started
        if reference is None:
            reference = run(1) if k != 1 else adapters
        difference = max(float((a[n] - b[n]).abs().max()) for a, b in zip(adapters, reference) for n in a)
        change = max(float((a[n] - start[n]).abs().max()) for a in reference for n in a)
        rows.append(
            {
                "config": config,
                "device": str(device),
                "clients": clients,
                "clients_per_batch": k,
                "local_steps": steps,
                "batch_size": batch_size,
                "seconds": seconds,
                "client_steps_per_s": clients * steps / seconds,
                "max_difference_from_one_at_a_time": difference,
                "max_change": change,
            }
        )
    base = rows[0]["client_steps_per_s"]
    for row in rows:
        row["speedup"] = row["client_steps_per_s"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "quickstart"])
    parser.add_argument("--per-batch", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value on top of each config")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 thread"
    results = []
    for config in args.configs:
        rows = measure(config, args.per_batch, args.clients, args.overrides, device)
        results.extend(rows)
        print(f"{config} on {name}: {args.clients} clients x {rows[0]['local_steps']} steps of batch {rows[0]['batch_size']}")
        for r in rows:
            print(
                f"  K={r['clients_per_batch']:<3} {r['client_steps_per_s']:9.1f} client-steps/s  x{r['speedup']:5.2f}"
                f"  max |difference| from K=1: {r['max_difference_from_one_at_a_time']:.1e} (training moved the adapter by up to {r['max_change']:.1e})"
            )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
