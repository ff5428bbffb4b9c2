"""Command line: ``raysim run [CONFIG.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys

from raysim.config import DEFAULT_CONFIG, UserError, load_config

log = logging.getLogger("raysim")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysim", description="Federated LoRA / FFA-LoRA fine-tuning simulated on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a simulation", description="Run a simulation from a YAML config plus key=value overrides.")
    run.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help=f"config file (default: {DEFAULT_CONFIG.name}) and overrides")
    run.add_argument("--quiet", action="store_true", help="no progress bar; log lines only")
    return parser


def run(args: list[str], quiet: bool = False) -> int:
    config_path = None
    if args and "=" not in args[0]:
        config_path, args = args[0], args[1:]
    cfg = load_config(config_path, args)

    from raysim.runtime.simulation import Simulation

    sim = Simulation(cfg)
    try:
        log.info("output_dir: %s", sim.output_dir)
        sim.run(progress=not quiet)  # up to cfg.rounds, from where a resumed run stopped
        final = sim.evaluate()
        adapter = sim.save_adapter()
        summary = sim.write_summary(final)
        log.info(
            "done: %d rounds, final %s accuracy %.4f on %d examples; adapter in %s, summary in %s",
            sim.round,
            cfg.eval.split,
            final["eval_accuracy"],
            final["eval_examples"],
            adapter,
            summary,
        )
        if sim.budget.enabled:
            log.info("privacy: %s spent (epsilon, delta) = (%.3f, %g)", cfg.privacy.mode, sim.budget.epsilon, sim.budget.delta)
    finally:
        sim.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parsed = _parser().parse_args(argv)
    try:
        if parsed.command == "run":
            return run(parsed.args, parsed.quiet)
    except UserError as err:
        print(f"raysim: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysim: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
