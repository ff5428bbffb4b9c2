"""Noise distributed DP needs against central DP's for the same (epsilon, delta), and where the
gap comes from. Not a timing: the planned noise multipliers, which depend on nothing but the
arguments.

    python benchmarks/ddp_noise.py --json benchmarks/results-ddp_noise-2026-12-04.json

For each epsilon: central DP's noise multiplier (Opacus' exact accountant for the subsampled
Gaussian), distributed DP's (the Skellam bound with Zhu and Wang's general subsampling bound,
raysim.privacy.skellam.plan_skellam), and the epsilon the exact Gaussian accountant would charge
distributed DP's noise ("gaussian-equivalent"): what is left of the gap once the looser
subsampling bound is taken out. The defaults are configs/study/distributed_dp.yaml's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raysim.privacy import skellam
from raysim.privacy.accounting import epsilon, solve_noise_multiplier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--values", type=int, default=19587, help="values per client message")
    parser.add_argument("--clients", type=int, default=100, help="expected senders per round")
    parser.add_argument("--min-clients", type=int, default=77)
    parser.add_argument("--bits", type=int, default=20)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for eps in args.epsilons:
        central = solve_noise_multiplier(eps, args.delta, args.sample_rate, args.rounds)
        plan = skellam.plan_skellam(
            args.values, 2.0, args.bits, args.sample_rate, args.clients, args.min_clients, args.rounds, args.delta, target_epsilon=eps
        )
        gaussian_eps = epsilon([(plan.noise_multiplier, args.sample_rate, args.rounds)], args.delta)
        rows.append(
            {
                "epsilon": eps,
                "central_noise_multiplier": central,
                "distributed_noise_multiplier": plan.noise_multiplier,
                "ratio": plan.noise_multiplier / central,
                "distributed_gaussian_equivalent_epsilon": gaussian_eps,
                "scale": plan.scale,
            }
        )
        print(
            f"epsilon {eps:g}: central z {central:.3f}, distributed z {plan.noise_multiplier:.3f} ({plan.noise_multiplier / central:.2f}x); "
            f"the exact Gaussian accountant would charge distributed's noise epsilon {gaussian_eps:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
