"""Noise distributed DP needs against central DP's for the same (epsilon, delta), against each
adversary, and where the gap comes from. Not a timing: the planned noise multipliers, which
depend on nothing but the arguments.

    python benchmarks/ddp_noise.py --json benchmarks/results-ddp_noise-2026-12-07.json

For each epsilon: central DP's noise multiplier with the default (PLD) and the RDP accountant
(against an observer of the released adapters; the server is trusted); distributed DP's planned
against an observer (the Skellam bound with Zhu and Wang's general subsampling bound) and against
the server (unamplified, over --participations rounds of one client's; default every round);
and the epsilon the tight (PLD) Gaussian accountant would charge the observer plan's noise
("gaussian-equivalent"): what is left of the gap once the looser bounds are taken out. The
defaults are configs/study/distributed_dp.yaml's.
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
    parser.add_argument("--min-clients", type=int, default=79)
    parser.add_argument("--bits", type=int, default=20)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--participations", type=int, nargs="+", default=[3, 0], help="a client's rounds the server plan covers (0: every round)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for eps in args.epsilons:
        central = solve_noise_multiplier(eps, args.delta, args.sample_rate, args.rounds, "pld")
        central_rdp = solve_noise_multiplier(eps, args.delta, args.sample_rate, args.rounds, "rdp")
        common = (args.values, 2.0, args.bits, args.sample_rate, args.clients, args.min_clients, args.rounds, args.delta)
        observer = skellam.plan_skellam(*common, target_epsilon=eps, adversary="observer")
        server = {k or args.rounds: skellam.plan_skellam(*common, target_epsilon=eps, adversary="server", participations=k or args.rounds) for k in args.participations}
        gaussian_eps = epsilon([(observer.noise_multiplier, args.sample_rate, args.rounds)], args.delta, "pld")
        rows.append(
            {
                "epsilon": eps,
                "central_noise_multiplier": central,
                "central_noise_multiplier_rdp": central_rdp,
                "distributed_observer_noise_multiplier": observer.noise_multiplier,
                "observer_ratio": observer.noise_multiplier / central,
                "distributed_server_noise_multiplier": {str(k): p.noise_multiplier for k, p in server.items()},
                "distributed_gaussian_equivalent_epsilon": gaussian_eps,
                "scale": observer.scale,
            }
        )
        against_server = ", ".join(f"{p.noise_multiplier:.3f} for {k} rounds" for k, p in server.items())
        print(
            f"epsilon {eps:g}: central z {central:.3f} (RDP {central_rdp:.3f}); distributed z against an observer "
            f"{observer.noise_multiplier:.3f} ({observer.noise_multiplier / central:.2f}x central), against the server {against_server}; "
            f"the tight Gaussian accountant would charge the observer plan's noise epsilon {gaussian_eps:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
