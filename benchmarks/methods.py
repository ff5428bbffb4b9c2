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
method's update), median over rounds. Fed-SB holds out 256 training rows as its public split and
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

# Each method at lora.rank 8, and Fed-SB also at the larger rank its paper pairs it with.
VARIANTS = {
    "lora": ["method=lora"],
    "ffa_lora": ["method=ffa_lora"],
    "lora_fair": ["method=lora_fair"],
    "flasc": ["method=flasc"],
    "fed_sb": ["method=fed_sb", "data.public_rows=256"],
    "fed_sb-r64": ["method=fed_sb", "data.public_rows=256", "lora.rank=64"],
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
    parser.add_argument("--json", type=Path, help="write the results here")
    args, overrides = parser.parse_known_args(argv)
    logging.getLogger("raysim").setLevel(logging.WARNING)
    results = []
    for config in args.configs:
        for variant in args.methods:
            results.append(measure(config, variant, args.rounds, overrides))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"command": "python benchmarks/methods.py " + " ".join(argv), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
