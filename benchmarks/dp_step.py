"""Time per local step with and without DP-SGD (Opacus hooks and ghost clipping), per model and method.

    python benchmarks/dp_step.py                          # tiny and quickstart, ffa_lora and lora
    python benchmarks/dp_step.py --configs tiny --steps 5 --json out.json

One client's shard from the config's own partition, its configured batch size, one thread (as a
worker with worker.num_cpus=1). Without DP the batches are shuffled epochs; with DP they are
Poisson samples of the same expected size. Two warm-up steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from raysim import load_config
from raysim.config import CONFIG_DIR
from raysim.data.loading import from_arrow
from raysim.data.prepare import prepare
from raysim.data.tokenizer import load_tokenizer
from raysim.model import build_model, trainable_parameters
from raysim.privacy.local_dp import DPSGD, poisson_batch, sample_rate
from raysim.training import ClientData, ClientState, local_train, make_optimizer, shuffled_batches

WARMUP = 2
MODES = ("none", "hooks", "ghost")


def _largest_client(cfg) -> ClientData:
    data = prepare(cfg, load_tokenizer(cfg.model.name_or_path))
    return ClientData(*from_arrow(max(data.client_shards, key=lambda t: t.num_rows)))


def measure(config: str, method: str, steps: int, overrides: list[str]) -> list[dict]:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG_DIR / f"{config}.yaml", [f"output_dir={tmp}/run", f"method={method}", *overrides])
    client = _largest_client(cfg)
    batch, device = cfg.train.batch_size, torch.device("cpu")
    rate = sample_rate(len(client), batch)
    results = []
    for mode in MODES:
        model = build_model(cfg, 3)
        params = list(trainable_parameters(model).values())
        optimizer, loss_fn = make_optimizer(cfg.train, params), torch.nn.functional.cross_entropy
        rng = np.random.default_rng(0)
        if mode == "none":
            state = ClientState.new(cfg.seed, 0)
            batches = lambda n, state=state: shuffled_batches(state, client.lengths, batch, n)  # noqa: E731
        else:
            dp = DPSGD(model, optimizer, max_grad_norm=1.0, grad_sample_mode=mode)
            dp.set_client(1.0, rate * len(client), torch.Generator().manual_seed(0))
            optimizer, loss_fn = dp.optimizer, dp.loss
            batches = lambda n, rng=rng: (poisson_batch(rng, len(client), rate) for _ in range(n))  # noqa: E731
        local_train(model, optimizer, client, batches(WARMUP), device, loss_fn)
        started = time.perf_counter()
        local_train(model, optimizer, client, batches(steps), device, loss_fn)
        results.append({"config": config, "method": method, "mode": mode, "batch_size": batch,
                        "trained_params": sum(p.numel() for p in params), "step_ms": 1000 * (time.perf_counter() - started) / steps})
    base = results[0]["step_ms"]
    for r in results:
        r["vs_no_dp"] = r["step_ms"] / base
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "quickstart"])
    parser.add_argument("--methods", nargs="+", default=["ffa_lora", "lora"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = [r for c in args.configs for m in args.methods for r in measure(c, m, args.steps, args.overrides)]
    print(f"{'config':<11}{'method':<10}{'DP-SGD':<8}{'batch':>6}{'trained':>10}{'ms/step':>9}{'x no DP':>9}")
    for r in results:
        print(f"{r['config']:<11}{r['method']:<10}{r['mode']:<8}{r['batch_size']:>6}{r['trained_params']:>10}{r['step_ms']:>9.1f}{r['vs_no_dp']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
