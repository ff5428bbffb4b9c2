"""Command line: ``raysim run [CONFIG.yaml] [key=value ...]``,
``raysim submit CONFIG.yaml [key=value ...] --address URL`` and ``raysim report RUN_DIR... --out DIR``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from raysim.config import DEFAULT_CONFIG, UserError, error_line, load_config

log = logging.getLogger("raysim")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysim", description="Federated LoRA / FFA-LoRA fine-tuning simulated on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a simulation", description="Run a simulation from a YAML config plus key=value overrides.")
    run.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help=f"config file (default: {DEFAULT_CONFIG.name}) and overrides")
    run.add_argument("--quiet", action="store_true", help="no progress bar; log lines only")
    submit = sub.add_parser(
        "submit",
        help="run a simulation as a job on a Ray cluster",
        description="Check the config here, then run `raysim run CONFIG key=value ...` as a Ray job with this directory uploaded, streaming its logs.",
    )
    submit.add_argument("config", metavar="CONFIG.yaml", help="config file, inside the working directory")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as for raysim run")
    submit.add_argument("--address", help="the cluster's job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    submit.add_argument("--working-dir", default=".", help="directory uploaded to the job; the job runs there (default: .)")
    submit.add_argument("--no-wait", action="store_true", help="only submit, and print the job id")
    report = sub.add_parser(
        "report",
        help="compare runs over seeds: a markdown table and plots",
        description="Group runs (directories raysim run wrote, or directories holding them) into settings that differ only in seed; write OUT/report.md and PNG plots.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding runs")
    report.add_argument("--out", required=True, metavar="DIR", help="where report.md and the plots go")
    report.add_argument(
        "--compare",
        metavar="KEY",
        help="a config key (e.g. method): put its values side by side per setting, with their difference paired by seed, and plot a panel per setting",
    )
    report.add_argument(
        "--baseline",
        metavar="VALUE",
        help="with --compare: a value of its key (e.g. ffa_lora) that every other value's accuracy is measured against, paired by seed",
    )
    return parser


def run(args: list[str], quiet: bool = False) -> int:
    config_path = None
    # A study cell's directory has "=" in its name, so a path to an existing file is a config too.
    if args and ("=" not in args[0] or Path(args[0]).is_file()):
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
        if cfg.task == "causal_lm":
            scored = f"{cfg.eval.score} {final['eval_accuracy']:.4f} on {final['eval_examples']} generated answers, perplexity {final['eval_perplexity']:.2f}"
        else:
            scored = f"accuracy {final['eval_accuracy']:.4f} on {final['eval_examples']} examples"
        log.info("done: %d rounds, final %s %s; adapter in %s, summary in %s", sim.round, cfg.eval.split, scored, adapter, summary)
        if sim.budget.enabled:
            log.info("privacy: %s spent (epsilon, delta) = (%.3f, %g) %s", cfg.privacy.mode, sim.budget.epsilon, sim.budget.delta, sim.budget.whom())
    finally:
        sim.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = _parser()
    # Options anywhere, as in `raysim run CONFIG --quiet key=value`: argparse gives a subcommand's
    # positionals after an option back as unknown, and they are the run's overrides.
    parsed, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown or (extra and parsed.command not in ("run", "submit")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if parsed.command == "run":
        parsed.args += extra
    elif parsed.command == "submit":
        parsed.overrides += extra
    try:
        if parsed.command == "run":
            return run(parsed.args, parsed.quiet)
        if parsed.command == "submit":
            from raysim.runtime.submit import default_address, submit

            address = parsed.address or default_address()
            return submit(parsed.config, parsed.overrides, address, parsed.working_dir, wait=not parsed.no_wait)
        if parsed.command == "report":
            from raysim.report import report

            log.info("report: %s", report(parsed.runs, parsed.out, parsed.compare, parsed.baseline))
            return 0
    except UserError as err:
        print(f"raysim: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysim: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
