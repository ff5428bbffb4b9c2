"""Simulation: the driver object shared by the CLI and notebooks.

    sim = raysim.Simulation(cfg)     # data prepared once, actors started, model resident
    sim.run_round()                  # one federated round; returns its metrics row
    sim.run(rounds)                  # several, with a progress bar
    sim.set_train(lr=1e-4)           # between rounds; sim.set_clients(per_round=8) likewise
    sim.save_checkpoint()            # resume with Simulation(cfg with resume=output_dir)
    sim.metrics                      # pyarrow Table, one row per round
    sim.evaluate()                   # global adapter on the whole evaluation split
    sim.save_adapter(path)           # loadable with peft.PeftModel.from_pretrained
    sim.shutdown()
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raysim.attacks import malicious_clients
from raysim.config import USER_LEVEL_MODES, ConfigError, UserError, from_dict, load_config, to_yaml, validate
from raysim.methods import build as build_method
from raysim.methods.common import BASE_LAYER
from raysim.privacy.budget import BudgetExhausted
from raysim.runtime import bootstrap, pool, resume, server_guard
from raysim.runtime.backend import LocalBackend, RayBackend
from raysim.runtime.messages import LocalDPPlan, TrainSettings
from raysim.runtime.outputs import RunOutputs, check_output_dir, format_row, write_atomic
from raysim.runtime.placement import assign_clients
from raysim.runtime.rounds import failure, place, plain_round
from raysim.runtime.secure_round import secure_round
from raysim.runtime.server import Server
from raysim.scoring import extract_answer, is_correct

log = logging.getLogger("raysim")

_TRAIN_KEYS = ("lr", "lr_decay", "local_steps", "batch_size", "weighting")


def _lm_scores(result: dict[str, float], score: str) -> str:
    return (
        f"{score} {result['eval_accuracy']:.4f} on {result['eval_examples']} generated answers, "
        f"loss {result['eval_loss']:.4f} per response token (perplexity {result['eval_perplexity']:.2f})"
    )


class Simulation:
    """One federated fine-tuning run, over Ray actors (``runtime: ray``) or in this process (``runtime: local``)."""

    server_class = Server  # a subclass can observe or change the server's side

    def __init__(self, cfg: DictConfig | dict | str | os.PathLike):
        """``cfg``: a config from :func:`raysim.load_config`, nested values over the defaults, or a YAML path."""
        started = time.perf_counter()
        if isinstance(cfg, (str, os.PathLike)):
            cfg = load_config(cfg)
        if isinstance(cfg, DictConfig):
            validate(cfg)  # as load_config and from_dict do: a config edited by hand is checked too
            self.cfg = cfg
        else:
            self.cfg = from_dict(cfg)
        self.resumed_from, saved = resume.read_resume(self.cfg)
        self.output_dir = check_output_dir(self.cfg, self.resumed_from and resume.run_dir_of(self.resumed_from))
        self.outputs = RunOutputs(self.output_dir)
        self.method = build_method(self.cfg)
        self.round = 0
        self.rows: list[dict[str, Any]] = []
        self.method_states: dict[int, Any] = {}  # client -> reference to its newest method state
        self.workers: list[Any] = []
        self.live: list[int] = []
        self.eval_shares: dict[int, list[int]] = {}
        self.server: Any = None
        self.server_snapshot: Any = None  # the server's state after the last round (raysim.runtime.server_guard)
        self._owns_ray = self._started_ray = False
        self._checkpointed_round = -1
        self.answers: list[str] | None = None
        self.backdoor = False
        # attack.*: the malicious clients, for the metrics' attackers* columns
        self.attackers = frozenset(malicious_clients(self.cfg.seed, self.cfg.clients.num, self.cfg.attack.fraction))
        self.untuned: dict[str, float] | None = None  # task=causal_lm: the evaluation before round 1
        self._predictions: list[dict[str, Any]] = []
        self.ray_start_s = 0.0  # ray.init's share of startup_s; 0 where Ray was already up (or not used)
        local = self.cfg.runtime == "local"

        with ThreadPoolExecutor(1) as pool:
            checked = pool.submit(bootstrap.check_inputs, self.cfg)
            self.backend: LocalBackend | RayBackend = LocalBackend() if local else self._init_ray()
            try:
                tokenizer, plan, self.budget = checked.result()
                self.label_names, self.client_sizes = plan.label_names, plan.client_sizes
                bootstrap.check_adapters(self)
                num_workers = min(self._worker_count(), self.cfg.clients.num)
            except UserError:
                self.shutdown()
                raise
        if saved:
            self.budget.load_state_dict(saved["budget"])
        # Asset references stay references: each worker resolves them on its own node.
        portable = cast(dict, OmegaConf.to_container(self.cfg, resolve=False))
        try:
            # The actors start now: importing torch and transformers takes a worker several
            # seconds, while the driver tokenizes the data.
            self.workers = [self.backend.worker(portable, w, len(self.label_names)) for w in range(num_workers)]
            central_dp, secagg = bootstrap.server_settings(self.cfg, self.budget)
            self.secure = secagg is not None
            self.server_args = (
                self.method, self.cfg.seed, self.cfg.clients.num, central_dp, secagg, self._sketch_columns(), self.backend.object_putter(), bootstrap.robust_rule(self.cfg)
            )
            self.server = self.backend.actor(self.server_class, *self.server_args, num_cpus=0)
            data = bootstrap.tokenize_checked(self, tokenizer, plan)
            self.answers = data.answers  # task=causal_lm: the evaluation rows' reference responses
            self.backdoor = data.triggered is not None  # attack.kind=backdoor: its success is measured too
            # Each client's owner: the worker holding its local state (see raysim.runtime.placement).
            self.client_worker = {c: w for w, group in enumerate(assign_clients(self.client_sizes, num_workers)) for c in group}
            if saved and saved["workers"] == num_workers:
                self.client_worker = dict(saved["owners"])
            elif saved:
                log.warning(
                    "resume: %d workers now, %d in the checkpoint; clients get new owners, so sums add up in another order (results equal up to float rounding)",
                    num_workers,
                    saved["workers"],
                )
            self._shards_ref, self._eval_refs = bootstrap.put_data(self, data, num_workers)
            self.live = list(range(num_workers))  # workers not retired (raysim.runtime.pool)
            self.eval_shares = {w: [w] for w in self.live}  # the evaluation slices each live worker scores
            self.backend.started()
            ready = self.backend.get([worker.load.remote(*self._load_args(w)) for w, worker in enumerate(self.workers)])
            if self.method.needs_public_data and not saved:
                tensors = self.backend.put(self.backend.get(self.workers[0].public_init.remote(data.public)))
                self.backend.get([worker.install.remote(tensors) for worker in self.workers])
            initial, frozen = self.backend.get(self.workers[0].initial_adapter.remote())
            merged_base_bytes = sum(v.nbytes for k, v in frozen.items() if BASE_LAYER in k)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.output_dir / "config.yaml", lambda p: p.write_text(to_yaml(self.cfg)))
            self.backend.get(self.server.initialize.remote(initial, frozen))
            if saved:
                resume.restore(self, saved)
                self._checkpointed_round = self.round
                self._write_metrics()
                log.info("resumed from %s at round %d", self.resumed_from, self.round)
            bootstrap.fit_privacy(self.cfg, self.budget, self.backend.get(self.server.summed_values.remote()))
            frozen = self.backend.get(self.server.frozen_state.remote())
            self._frozen_ref = self.backend.put(frozen)  # a restarted worker installs them again
            self.backend.get([worker.install.remote(self._frozen_ref) for worker in self.workers])
            server_guard.snapshot(self)
        except Exception as err:  # nothing of Ray's is left behind, whatever failed
            self.shutdown()
            user_error = bootstrap.user_error_in(err)
            if user_error is not None:
                raise user_error from None
            raise
        devices = sorted({r.device for r in ready})
        once = self.method.frozen_download_bytes(frozen)
        self.sent_values_per_client = int(sum(v.size for v in initial.values()))
        self.startup_s = time.perf_counter() - started
        log.info(
            "%d %sworkers (%s) host %d clients; method %s sends %d tensors (%.1f KiB) per client; ready in %.1fs%s",
            num_workers,
            "in-process " if local else "",
            ", ".join(devices),
            self.cfg.clients.num,
            self.cfg.method,
            len(initial),
            sum(v.nbytes for v in initial.values()) / 1024,
            self.startup_s,
            f" (Ray's start {self.ray_start_s:.1f}s)" if self.ray_start_s else "",
        )
        if self.method.changes_base:
            log.info(
                "method %s changes the base weights: each round the object store carries the adapted layers' merged weights "
                "(%.1f MiB) once per node; downlink_bytes counts what the method's protocol sends each client",
                self.cfg.method,
                merged_base_bytes / 2**20,
            )
        if once:
            log.info("each client also downloads %.1f KiB of frozen tensors once, before its first round (not in downlink_bytes)", once / 1024)
        if not local:
            from raysim.runtime.cluster import gpu_hint

            hint = gpu_hint(devices, self.cfg)
            if hint:
                log.info(hint)
        if self.budget.enabled:
            log.info("privacy: %s", self.budget.describe())
        if self.secure and self.budget.mode == "distributed_dp":
            s = self.cfg.secagg
            log.info(
                "secure aggregation: SecAgg+ with %s neighbours, threshold %s, in a %d-bit ring carrying the Skellam mechanism's integers%s",
                s.neighbors,
                s.threshold or "a majority",
                s.bits,
                f", {s.dropout_rate:.0%} of clients drop mid-protocol" if s.dropout_rate else "",
            )
        elif self.secure:
            s = self.cfg.secagg
            log.info(
                "secure aggregation: SecAgg+ with %s neighbours, threshold %s, values clipped to +-%g and quantized to %d bits in a %d-bit ring%s",
                s.neighbors,
                s.threshold or "a majority",
                s.clip_range,
                s.bits,
                cast(dict, secagg)["ring_bits"],
                f", {s.dropout_rate:.0%} of clients drop mid-protocol" if s.dropout_rate else "",
            )

    def _init_ray(self) -> RayBackend:
        import ray

        from raysim.runtime.cluster import start_ray

        if not ray.is_initialized():
            started = time.perf_counter()
            self._started_ray = start_ray(self.cfg)
            self._owns_ray = True
            self.ray_start_s = time.perf_counter() - started
        return RayBackend()

    def _worker_count(self) -> int:
        if self.cfg.runtime == "local":
            return 1 if self.cfg.worker.count == "auto" else int(self.cfg.worker.count)
        from raysim.runtime.cluster import worker_count

        return worker_count(self.cfg, self._started_ray)

    def _sketch_columns(self) -> int:
        return int(self.cfg.eval.aggregation_sketch)

    def save_checkpoint(self) -> Path:
        """Write everything needed to continue this run (see raysim.checkpoint); returns its directory."""
        path = resume.save_checkpoint(self)
        self._checkpointed_round = self.round
        return path

    @property
    def worker_clients(self) -> list[list[int]]:
        """The clients each worker owns now."""
        groups: list[list[int]] = [[] for _ in self.workers]
        for c, w in sorted(self.client_worker.items()):
            groups[w].append(c)
        return groups

    def _load_args(self, w: int) -> tuple:
        """What worker ``w`` is loaded with: the shards, its evaluation slices, under local DP the
        clients' noise and the accountant histories so far of the clients it owns, and the
        references to those clients' method state (top-level arguments: Ray resolves them there)."""
        privacy = None
        if self.budget.mode == "local_dp_sgd":
            privacy = LocalDPPlan(
                noise=dict(enumerate(self.budget.noise)),
                histories={c: self.budget.histories.get(c, []) for c in self.worker_clients[w]},
            )
        owned = self.worker_clients[w]
        refs = list({id(ref): ref for c in owned if (ref := self.method_states.get(c)) is not None}.values())
        return (self._shards_ref, self._eval_refs[w], privacy, owned, *refs)

    def reload(self, w: int, timeout_s: float = 300.0) -> None:
        """After a worker died: wait until Ray has restarted it, then hand it its data again. Its
        clients start over with fresh optimizer moments and data order; their accountants and
        method state come back. A worker that does not come back is retired (raysim.runtime.pool)."""
        if self.backend.name != "ray" or w not in self.live:
            return
        if self.cfg.worker.max_restarts == 0:
            pool.retire(self, w)
            return
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.backend.get(self.workers[w].load.remote(*self._load_args(w)))
                self.backend.get(self.workers[w].install.remote(self._frozen_ref))
                log.warning("worker %d was restarted; its clients' optimizer moments and data order start over", w)
                return
            except ActorUnavailableError:
                time.sleep(0.5)
            except self.backend.lost:
                break
        pool.retire(self, w)

    def deadline_s(self) -> float | None:
        """How long a round's stage waits for a worker's answer (None: as long as it takes)."""
        timeout = float(self.cfg.worker.round_timeout_s)
        return timeout if timeout > 0 else None

    def recover(self, w: int, err: BaseException) -> None:
        """After worker ``w`` failed a call: a straggler (timed out) is killed for Ray to restart;
        then, as for a worker that died, it is handed its data again or retired."""
        if isinstance(err, self.backend.timed_out):
            self.backend.restart(self.workers[w])
        self.reload(w)

    def set_train(self, **values: Any) -> None:
        """Change training hyperparameters between rounds, e.g. ``sim.set_train(lr=1e-4)``."""
        for key in values:
            if key not in _TRAIN_KEYS:
                raise UserError(f"train.{key}: cannot be changed between rounds (changeable: {', '.join(_TRAIN_KEYS)})")
        try:
            changed = OmegaConf.merge(self.cfg, {"train": values})
        except OmegaConfBaseException as err:
            raise ConfigError(f"train.{next(iter(values))}: {str(err).splitlines()[0]}") from None
        validate(cast(DictConfig, changed))  # exactly as a config file's values are
        self.cfg.train = changed.train

    def set_clients(self, per_round: int) -> None:
        """Change how many clients are sampled from the next round on, e.g. ``sim.set_clients(per_round=8)``."""
        cfg = self.cfg
        if not 1 <= per_round <= cfg.clients.num:
            raise UserError(f"clients.per_round: {per_round} is not between 1 and clients.num ({cfg.clients.num})")
        if self.budget.mode in USER_LEVEL_MODES:
            raise UserError(f"clients.per_round: under {self.budget.mode} the sampling rate is part of the privacy plan and cannot change")
        if self.secure and per_round < 3:
            raise UserError("clients.per_round: secure aggregation needs at least 3 clients per round")
        cfg.clients.per_round = per_round

    def run_round(self) -> dict[str, Any]:
        """One round: sample, broadcast, train on the workers in parallel, aggregate, evaluate.
        A round in which the server actor died runs again on a server rebuilt from the last
        round's state (raysim.runtime.server_guard); a second death in the round stops the run.

        Raises BudgetExhausted, before doing anything, when no round fits the privacy budget."""
        try:
            return self._run_round_once()
        except server_guard.failures(self):
            if not server_guard.server_is_gone(self):
                raise
        server_guard.rebuild(self, self.round + 1)
        try:
            return self._run_round_once()
        except server_guard.failures(self) as err:
            if not server_guard.server_is_gone(self):
                raise
            raise UserError(f"server: died twice in round {self.round + 1} ({type(err).__name__}); resume=OUTPUT_DIR continues from the last checkpoint") from None

    def _run_round_once(self) -> dict[str, Any]:
        cfg, get = self.cfg, self.backend.get
        round_idx = self.round + 1
        self.budget.check_next_round(cfg.clients.num)
        if round_idx == 1 and self.causal_lm and self.untuned is None:
            self.untuned = self._evaluate("subset")
            log.info(
                "before round 1 (the untuned model): %s; one answer given to every row would score %.4f",
                _lm_scores(self.untuned, cfg.eval.score),
                self._constant_answer_score(),
            )
        started = time.perf_counter()
        excluded = sorted(self.budget.exhausted)
        sampled = get(self.server.sample.remote(round_idx, cfg.clients.per_round, excluded))
        global_ref, downlink_by_rank = get(self.server.broadcast.remote())
        by_worker, arrivals = place(self, round_idx, sampled)
        settings = {k: cfg.train[k] for k in _TRAIN_KEYS}
        train = TrainSettings(**{**settings, "lr": cfg.train.lr * cfg.train.lr_decay ** (round_idx - 1)})
        run = secure_round if self.secure else plain_round
        reports, server_report, extra = run(self, round_idx, global_ref, by_worker, train, arrivals)
        trained_clients = sum(len(r.clients) for r in reports)
        completed = extra.pop("aggregated") if self.secure else trained_clients
        released = extra.pop("released") if self.secure else []
        newly_exhausted = self.budget.record_round({c: p for r in reports for c, p in r.privacy.items()}, released)
        if newly_exhausted:
            log.info(
                "round %d: client(s) %s reached the privacy budget (epsilon %g) and will not be sampled again",
                round_idx,
                ", ".join(map(str, newly_exhausted)),
                self.cfg.privacy.target_epsilon,
            )
        slowest = max(reports, key=lambda r: r.train_s, default=None)
        uplink = server_report.uplink_bytes
        if uplink is None:
            uplink = sum(r.uplink_bytes for r in reports)
        row: dict[str, Any] = {
            "round": round_idx,
            "lr": train.lr,
            "clients": completed,
            "dropped": len(sampled) - completed,
            "train_loss": sum(r.loss_sum for r in reports) / trained_clients if trained_clients else math.nan,
            "aggregation_error": server_report.aggregation_error,
            "update_norm": float(np.median(norms)) if (norms := [n for r in reports for n in r.update_norms]) else math.nan,
            "uplink_bytes": uplink,
            "downlink_bytes": sum(downlink_by_rank[self.method.rank_of(c)] for c in sampled),
            "train_s": slowest.train_s if slowest else 0.0,
            "steps_s": slowest.steps_s if slowest else 0.0,
            "aggregate_s": extra.pop("aggregate_s", math.nan),
            "epsilon": self.budget.epsilon,
            "delta": self.budget.delta if self.budget.enabled else 0.0,
            **self.budget.columns(),
            **extra,
        }
        if self.attackers:
            row["attackers"] = sum(c in self.attackers for r in reports for c in r.clients)
            row["attackers_norm_ratio"] = self._attackers_ratio({c: n for r in reports for c, n in zip(r.clients, r.update_norms)})
            if cfg.server.aggregator in ("krum", "multi_krum"):  # none kept when too few updates arrived
                row["attackers_kept"] = sum(c in self.attackers for c in server_report.kept_clients or [])
                row["attackers_score_ratio"] = self._attackers_ratio(server_report.krum_scores or {})
        if row.get("secagg_clipped", 0) > 0.01:
            log.warning(
                "round %d: %.1f%% of the values sent were clipped to +-%g before encoding; raise secagg.clip_range",
                round_idx,
                100 * row["secagg_clipped"],
                cfg.secagg.clip_range,
            )
        eval_started = time.perf_counter()
        if round_idx % cfg.eval.every == 0 or round_idx == cfg.rounds:
            result = self._evaluate("subset")
        else:
            result = {"eval_loss": math.nan, "eval_accuracy": math.nan, "eval_perplexity": math.nan}
        row.update(eval_loss=result["eval_loss"], eval_accuracy=result["eval_accuracy"])
        if self.backdoor:
            row["attack_success"] = self._evaluate("backdoor")["eval_accuracy"] if math.isfinite(result["eval_loss"]) else math.nan
        if self.causal_lm:
            row["eval_perplexity"] = result["eval_perplexity"]
        row["eval_s"] = time.perf_counter() - eval_started
        row["wall_s"] = time.perf_counter() - started
        self.round = round_idx
        self.rows.append(row)
        self._write_metrics()
        self.outputs.write_tensorboard(row)
        server_guard.snapshot(self)
        if cfg.checkpoint.every and round_idx % cfg.checkpoint.every == 0:
            self.save_checkpoint()
        pool.check_pool(self)
        return row

    def run(self, rounds: int | None = None, progress: bool = True, on_round: Callable[[dict[str, Any]], None] | None = None) -> pa.Table:
        """Run ``rounds`` more rounds (default: up to the configured number), printing one line per
        round (and handing each round's row to ``on_round``: a study reports it to Ray Tune); with
        checkpoint.every, the last round is checkpointed too."""
        from tqdm.auto import tqdm

        rounds = max(0, self.cfg.rounds - self.round) if rounds is None else rounds
        target = self.round + rounds
        bar = tqdm(total=rounds, desc="rounds", unit="round", disable=not progress, leave=False)
        for _ in range(rounds):
            try:
                row = self.run_round()
            except BudgetExhausted as reason:
                log.warning("privacy budget: %s; stopping after round %d", reason, self.round)
                break
            bar.update(1)
            bar.set_postfix(acc=f"{row['eval_accuracy']:.3f}", loss=f"{row['train_loss']:.3f}")
            line = format_row(row, target)
            if on_round is not None:
                on_round(row)
            if progress:
                bar.write(line)
            else:
                log.info(line)
        bar.close()
        if self.cfg.checkpoint.every and self._checkpointed_round != self.round:
            self.save_checkpoint()
        return self.metrics

    def _attackers_ratio(self, by_client: dict[int, float]) -> float:
        """The attackers' mean of a per-sender value over the honest senders' (NaN without both):
        for Krum scores, below 1 the attackers' updates sit closer to their nearest neighbours and
        Krum prefers them; for update norms (before the attack's transform), below 1 their training
        moved the adapter less than the honest clients'. The values' common scale cancels."""
        attacker = [v for c, v in by_client.items() if c in self.attackers]
        honest = [v for c, v in by_client.items() if c not in self.attackers]
        return float(np.mean(attacker) / np.mean(honest)) if attacker and honest and np.mean(honest) > 0 else math.nan

    def _evaluate(self, split: str) -> dict[str, float]:
        (global_ref,) = self.backend.get(self.server.adapter_ref.remote())
        calls = [(w, self.workers[w].evaluate.remote(global_ref, split, *self._extra_shares(w))) for w in self.live]  # all in parallel
        results = self._evaluation_answers(calls, f"the {split} set")
        loss, correct, n = (sum(r[i] for r in results) for i in range(3))
        out = {"eval_loss": loss / n if n else math.nan, "eval_accuracy": correct / n if n else math.nan, "eval_examples": n}
        if self.causal_lm:  # n counts response tokens; accuracy is the generated answers'
            out["eval_perplexity"] = math.exp(out["eval_loss"]) if n else math.nan
            out["eval_tokens"] = out.pop("eval_examples")
            predictions = self._generate(global_ref)
            scored = [p["correct"] for p in predictions]
            out["eval_accuracy"] = sum(scored) / len(scored) if scored else math.nan
            out["eval_examples"] = len(scored)
            self._predictions = predictions
        return out

    def _evaluation_answers(self, calls: list[tuple[int, Any]], what: str) -> list[Any]:
        """The answers of the workers' evaluation calls that came back within the deadline; a
        worker that died or did not answer is recovered (restarted or retired) and its share of
        ``what`` skipped this time, said in the log."""
        limit = self.deadline_s()
        deadline = None if limit is None else time.monotonic() + limit
        answers = []
        for w, call in calls:
            try:
                answers.append(self.backend.get(call, timeout=None if deadline is None else max(0.0, deadline - time.monotonic())))
            except (*self.backend.lost, *self.backend.timed_out) as err:
                log.warning("evaluation: worker %d %s; its share of %s is skipped", w, failure(self, err), what)
                self.recover(w, err)
        return answers

    def _extra_shares(self, w: int) -> list[Any]:
        """References to the evaluation slices worker ``w`` scores for workers gone for good."""
        return [self._eval_refs[share] for share in self.eval_shares[w] if share != w]

    def _constant_answer_score(self) -> float:
        """The share of the scored rows whose reference answer is the most common one: what a
        model that learnt only the answers' prior (always "yes") scores."""
        references = [extract_answer(self.cfg.eval.score, p["reference"]) for p in self._predictions]
        return max(Counter(references).values()) / len(references) if references else math.nan

    @property
    def causal_lm(self) -> bool:
        return self.cfg.task == "causal_lm"

    def _generate(self, global_ref: Any) -> list[dict[str, Any]]:
        """The workers' greedy answers to the rows scored by generation, scored against the
        references (task=causal_lm)."""
        assert self.answers is not None
        calls = [(w, self.workers[w].generate.remote(global_ref, *self._extra_shares(w))) for w in self.live]
        answered = [pair for answers in self._evaluation_answers(calls, "the generated answers") for pair in answers]
        kind = self.cfg.eval.score
        return [
            {"row": row, "prediction": text, "reference": self.answers[row], "correct": is_correct(kind, text, self.answers[row])}
            for row, text in sorted(answered)
        ]

    def evaluate(self) -> dict[str, float]:
        """The current global adapter on the whole evaluation split (not just the per-round
        subset). For a causal LM, the rows scored by generation are the fixed subset of every
        evaluation, and their predictions go to output_dir/predictions.jsonl."""
        result = self._evaluate("full")
        if self.causal_lm:
            self.outputs.write_predictions(self._predictions)
        if self.backdoor:  # the triggered copies of the per-round subset's rows of other labels
            result["attack_success"] = self._evaluate("backdoor")["eval_accuracy"]
        return result

    @property
    def metrics(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows)

    def client_privacy(self) -> pa.Table:
        """Local DP: each client's noise multiplier, DP-SGD steps taken and epsilon spent.
        Distributed DP: each client's unmasked rounds and its epsilon against the server."""
        if not self._per_client_privacy:
            return pa.table({})
        return pa.Table.from_pylist(self.budget.client_rows(self.cfg.train.batch_size))

    @property
    def _per_client_privacy(self) -> bool:
        return self.budget.mode in ("local_dp_sgd", "distributed_dp")

    def _write_metrics(self) -> None:
        self.outputs.write_metrics(self.rows, self.client_privacy() if self._per_client_privacy else None)

    def global_adapter(self) -> dict[str, np.ndarray]:
        return self.backend.get(self.server.global_state.remote())

    def save_adapter(self, path: str | os.PathLike | None = None) -> Path:
        """Write the global adapter as a PEFT adapter directory (default: output_dir/adapter)."""
        path = Path(path) if path is not None else self.output_dir / "adapter"
        (global_ref,) = self.backend.get(self.server.adapter_ref.remote())
        for w in self.live:
            try:
                files = self.backend.get(self.workers[w].adapter_files.remote(global_ref))
                break
            except self.backend.lost:
                continue
        else:
            raise RuntimeError("no worker is alive to write the adapter")
        return self.outputs.write_files(path, files)

    def write_summary(self, final: dict[str, float]) -> Path:
        rows = self.rows
        return self.outputs.write_summary(
            {
                "rounds": self.round,
                "method": self.cfg.method,
                "runtime": self.cfg.runtime,
                "final_eval_accuracy": final.get("eval_accuracy"),
                "final_eval_loss": final.get("eval_loss"),
                "final_eval_examples": final.get("eval_examples"),
                **(self._lm_summary(final) if self.causal_lm else {}),
                **({"final_attack_success": final.get("attack_success")} if self.backdoor else {}),
                "uplink_bytes": int(sum(r["uplink_bytes"] for r in rows)),
                "downlink_bytes": int(sum(r["downlink_bytes"] for r in rows)),
                "startup_s": round(self.startup_s, 3),
                "ray_start_s": round(self.ray_start_s, 3),
                "rounds_wall_s": round(sum(r["wall_s"] for r in rows), 3),
                "privacy": self.budget.summary(),
                "secagg": {"enabled": self.secure, "aborted_rounds": sum(bool(r.get("secagg_aborted")) for r in rows)},
            }
        )

    def _lm_summary(self, final: dict[str, float]) -> dict[str, Any]:
        untuned = self.untuned or {}
        return {
            "task": "causal_lm",
            "score": self.cfg.eval.score,
            "final_eval_perplexity": final.get("eval_perplexity"),
            "untuned_eval_accuracy": untuned.get("eval_accuracy"),
            "untuned_eval_loss": untuned.get("eval_loss"),
            "untuned_eval_perplexity": untuned.get("eval_perplexity"),
            "constant_answer_accuracy": self._constant_answer_score(),
        }

    def shutdown(self) -> None:
        """Stop this simulation's actors, and Ray itself if this simulation started it."""
        self.outputs.close()
        if self.backend_started():
            for actor in [*self.workers, self.server]:
                if actor is not None:
                    self.backend.kill(actor)
        self.workers = []
        self.server = None
        if getattr(self, "backend", None) is not None:
            self.backend.close()
        if self._owns_ray:
            import ray

            from raysim.runtime.cluster import stop_autoscaler_monitor

            if ray.is_initialized():
                if self._started_ray:
                    stop_autoscaler_monitor()
                ray.shutdown()
            self._owns_ray = False

    def backend_started(self) -> bool:
        backend = getattr(self, "backend", None)
        if isinstance(backend, RayBackend):
            import ray

            return ray.is_initialized()
        return backend is not None

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
