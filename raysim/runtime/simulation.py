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

import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig, OmegaConf
from ray.exceptions import ActorUnavailableError, RayActorError

from raysim.checkpoint import check_resumable, find_checkpoint, read_checkpoint, write_checkpoint
from raysim.config import ConfigError, UserError, from_dict, load_config, to_yaml
from raysim.data.prepare import DataPlan, plan_data, split_for_workers, tokenize_plan
from raysim.data.tokenizer import Tokenizer, load_tokenizer
from raysim.privacy.budget import BudgetExhausted, PrivacyBudget
from raysim.runtime.placement import assign_clients, balance, workers_that_fit
from raysim.runtime.server import Server
from raysim.runtime.worker import ClientWorker
from raysim.secagg.encoding import ring_bits
from raysim.secagg.protocol import SecAggAborted
from raysim.tensorboard_log import TensorBoardLog

log = logging.getLogger("raysim")

_TRAIN_KEYS = ("lr", "lr_decay", "local_steps", "batch_size", "weighting")
_TOKENIZER_SAMPLE = 256  # rows a worker tokenizes with AutoTokenizer to check the driver's tokenizer


def _check_output_dir(cfg: DictConfig, resumed_run: Path | None) -> Path:
    out = Path(cfg.output_dir)
    continuing = resumed_run is not None and out.resolve() == resumed_run.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite and not continuing:
        raise UserError(f"output_dir: '{out}' already exists and is not empty; choose another or pass overwrite=true")
    return out


def worker_options(worker: DictConfig) -> dict[str, Any]:
    """How Ray places a client worker: its CPU and (fractional) GPU share, spread over all nodes of
    a cluster instead of packed onto the first. Ray picks the GPU; the actor uses what it was granted."""
    return {
        "num_cpus": worker.num_cpus,
        "num_gpus": worker.num_gpus,
        "max_restarts": worker.max_restarts,
        "max_task_retries": 0,
        "scheduling_strategy": "SPREAD",
    }


def start_ray(cfg: DictConfig) -> bool:
    """Join the cluster that ray.address names, or under `ray job submit` (RAY_ADDRESS) the job's
    own; else start a local Ray with ray.num_cpus and ray.dashboard. True when Ray started here."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = bool(cfg.ray.dashboard)
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
    try:
        info = ray.init(address=address, **kwargs)
    except ConnectionError as err:
        raise UserError(f"ray.address: cannot connect to '{address}': {str(err).splitlines()[0]}") from None
    dashboard = getattr(info, "dashboard_url", None)
    if dashboard:
        log.info("Ray dashboard: http://%s", dashboard)
    elif address is None:
        log.info("Ray dashboard: off (ray.dashboard=true starts it)")
    return address is None


def stop_autoscaler_monitor() -> None:
    """Stop the autoscaler's monitor process of a Ray started in this process, before ray.shutdown().

    ray.shutdown() stops the GCS first; the monitor's SIGTERM handler then waits on the stopped GCS
    until Ray kills it a second later (Ray 2.55 to 2.60), which made every local run end 1 s late.
    A Ray started here scales nothing, so its monitor has no work to finish. This goes through
    Ray's private node handle, and does nothing where that is missing."""
    node = getattr(ray._private.worker, "_global_node", None)
    kill = getattr(node, "kill_monitor", None)
    if kill is None:
        return
    try:
        kill(check_alive=False)
    except Exception as err:  # a private API: a change in Ray must not break shutdown
        log.debug("could not stop Ray's autoscaler monitor first: %s", err)


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class Simulation:
    """One federated fine-tuning run over Ray actors."""

    server_class = Server  # run as a Ray actor; a subclass can observe or change the server's side

    def __init__(self, cfg: DictConfig | dict | str | os.PathLike):
        """``cfg``: a config from :func:`raysim.load_config`, nested values over the defaults, or a YAML path."""
        started = time.perf_counter()
        if isinstance(cfg, (str, os.PathLike)):
            cfg = load_config(cfg)
        self.cfg = cfg if isinstance(cfg, DictConfig) else from_dict(cfg)
        saved = self._read_resume()
        self.output_dir = _check_output_dir(self.cfg, self.resumed_from and _run_dir_of(self.resumed_from))
        self.round = 0
        self._rows: list[dict[str, Any]] = []
        self._owns_ray = self._started_ray = False
        self._checkpointed_round = -1
        self._tensorboard = None
        self.ray_start_s = 0.0  # ray.init's share of startup_s; 0 where Ray was already up

        # Everything a user can get wrong in the data, tokenizer or privacy plan fails here, while
        # Ray starts (its start is mostly waiting on its own processes); the model fails as the
        # workers build it. Nothing is written before both have passed.
        with ThreadPoolExecutor(1) as pool:
            checked = pool.submit(self._check_inputs)
            self._init_ray()
            try:
                tokenizer, plan = checked.result()
                num_workers = min(self._worker_count(), self.cfg.clients.num)
            except UserError:
                self.shutdown()
                raise
        if saved:
            self.budget.load_state_dict(saved["budget"])
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        # The actors start now: importing torch and transformers takes a worker several seconds,
        # while the driver tokenizes the data.
        self.workers = [
            ClientWorker.options(**worker_options(self.cfg.worker)).remote(resolved, w, len(self.label_names))
            for w in range(num_workers)
        ]
        central_dp = None
        if self.budget.mode == "central_dp":
            b = self.budget
            central_dp = {"noise_multiplier": b.noise_multiplier, "clip_norm": b.clip_norm, "sample_rate": b.sample_rate}
        self.secure = bool(self.cfg.secagg.enabled)
        secagg = None
        if self.secure:
            s = self.cfg.secagg
            secagg = {
                "neighbors": None if s.neighbors == "all" else int(s.neighbors),
                "threshold": int(s.threshold),
                "clip_range": float(s.clip_range),
                "bits": int(s.bits),
                "ring_bits": ring_bits(s.bits, self.cfg.clients.num),
            }
        self.server = ray.remote(num_cpus=0)(self.server_class).remote(
            self.cfg.method, self.cfg.seed, self.cfg.clients.num, self.cfg.server.lr, self.cfg.server.momentum, central_dp, secagg
        )
        max_length = self.cfg.data.max_length
        check = None
        if tokenizer.from_file:  # worker 0 compares a sample with AutoTokenizer once it has started
            sample = plan.texts[:: max(1, len(plan.texts) // _TOKENIZER_SAMPLE)][:_TOKENIZER_SAMPLE]
            check = self.workers[0].tokenizer_mismatch.remote(sample, tokenizer(sample, max_length), tokenizer.pad_token_id, max_length)
        data = tokenize_plan(plan, tokenizer, max_length)
        if check is not None:
            try:
                mismatch = ray.get(check)
            except (ray.exceptions.RayTaskError, RayActorError) as err:  # e.g. a model worker 0 cannot build
                self.shutdown()
                raise _user_error_in(err) or err
            if mismatch:
                log.warning("data: transformers adjusts this model's tokenizer.json (%s); tokenizing again with AutoTokenizer", mismatch)
                data = tokenize_plan(plan, load_tokenizer(self.cfg.model.name_or_path, read_file=False), max_length)
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
        eval_lengths = data.eval_full.column("length").to_numpy()
        full_parts = split_for_workers(np.arange(data.eval_full.num_rows), eval_lengths, num_workers)
        subset_parts = split_for_workers(data.eval_subset, eval_lengths, num_workers)
        # The clients' rows go into the object store once, as one table (client after client) and
        # offsets, which every worker on a node maps without copying. The driver keeps the
        # references, so a worker restarted by Ray is handed the same data again.
        offsets = np.concatenate([[0], np.cumsum(self.client_sizes)])
        self._shards_ref = ray.put((pa.concat_tables(data.client_shards).combine_chunks(), offsets))
        self._eval_refs = [
            ray.put({"full": data.eval_full.take(full_parts[w]), "subset": data.eval_full.take(subset_parts[w])}) for w in range(num_workers)
        ]
        try:
            ready = ray.get([worker.load.remote(*self._load_args(w)) for w, worker in enumerate(self.workers)])
            initial, frozen_a = ray.get(self.workers[0].initial_adapter.remote())
        except (ray.exceptions.RayTaskError, RayActorError) as err:
            self.shutdown()
            raise _user_error_in(err) or err
        devices = sorted({r["device"] for r in ready})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.output_dir / "config.yaml", lambda p: p.write_text(to_yaml(self.cfg)))
        ray.get(self.server.initialize.remote(initial, frozen_a))
        if saved:
            self._restore(saved)
        self.sent_bytes_per_client = int(sum(v.nbytes for v in initial.values()))
        self.sent_values_per_client = int(sum(v.size for v in initial.values()))
        self.startup_s = time.perf_counter() - started
        log.info(
            "%d workers (%s) host %d clients; method %s sends %d tensors (%.1f KiB) per client; ready in %.1fs%s",
            num_workers,
            ", ".join(devices),
            self.cfg.clients.num,
            self.cfg.method,
            len(initial),
            self.sent_bytes_per_client / 1024,
            self.startup_s,
            f" (Ray's start {self.ray_start_s:.1f}s)" if self.ray_start_s else "",
        )
        hint = gpu_hint(devices, self.cfg)
        if hint:
            log.info(hint)
        if self.budget.enabled:
            log.info("privacy: %s", self.budget.describe())
        if self.secure:
            s = self.cfg.secagg
            log.info(
                "secure aggregation: SecAgg+ with %s neighbours, threshold %s, values clipped to +-%g and quantized to %d bits in a %d-bit ring%s",
                s.neighbors,
                s.threshold or "a majority",
                s.clip_range,
                s.bits,
                secagg["ring_bits"],
                f", {s.dropout_rate:.0%} of clients drop mid-protocol" if s.dropout_rate else "",
            )

    def _read_resume(self) -> dict[str, Any] | None:
        """With ``resume``: the checkpoint, checked against this config before anything starts;
        output goes on in the resumed run's directory unless output_dir names another."""
        self.resumed_from = None
        if not self.cfg.resume:
            return None
        self.resumed_from = find_checkpoint(self.cfg.resume)
        saved = read_checkpoint(self.resumed_from)
        check_resumable(saved["config"], self.cfg)
        if not self.cfg.output_dir:
            self.cfg.output_dir = str(_run_dir_of(self.resumed_from))
        return saved

    def _restore(self, saved: dict[str, Any]) -> None:
        """Put a checkpoint's state back: server, every client's local state on its owner, the
        metrics so far. The privacy budget was restored before the workers were loaded."""
        ray.get(self.server.load_state_dict.remote(saved["server"]))
        by_owner: dict[int, dict] = {}
        for cid, values in saved["clients"].items():
            by_owner.setdefault(self.client_worker[cid], {})[cid] = values
        ray.get([self.workers[w].import_states.remote(states) for w, states in by_owner.items()])
        self.round = self._checkpointed_round = saved["round"]
        self._rows = list(saved["rows"])
        self._write_metrics()
        log.info("resumed from %s at round %d", self.resumed_from, self.round)

    def save_checkpoint(self) -> Path:
        """Write everything needed to continue this run (see raysim.checkpoint); returns its directory."""
        clients: dict[int, dict] = {}
        for w, worker in enumerate(self.workers):
            try:
                clients.update(ray.get(worker.export_states.remote()))
            except RayActorError:
                log.warning("checkpoint: worker %d is unavailable; its clients' local state starts over on resume", w)
        state = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "server": ray.get(self.server.state_dict.remote()),
            "clients": clients,
            "owners": dict(self.client_worker),
            "workers": len(self.workers),
            "budget": self.budget.state_dict(),
            "rows": self._rows,
        }
        path = write_checkpoint(self.output_dir, self.round, state, to_yaml(self.cfg), self.cfg.checkpoint.keep)
        self._checkpointed_round = self.round
        log.info("checkpoint of round %d: %s", self.round, path)
        return path

    def _check_inputs(self) -> tuple[Tokenizer, DataPlan]:
        """Load the tokenizer, plan the data and the privacy budget: (tokenizer, data plan).
        Raises UserError (or ConfigError) naming what is wrong."""
        tokenizer = load_tokenizer(self.cfg.model.name_or_path)
        plan = plan_data(self.cfg)
        self.label_names = plan.label_names
        self.client_sizes = plan.client_sizes
        self.budget = self._plan_privacy()
        return tokenizer, plan

    def _plan_privacy(self) -> PrivacyBudget:
        """Solve the noise for the privacy target up front: an unreachable target fails here."""
        cfg = self.cfg
        try:
            return PrivacyBudget(
                cfg.privacy, self.client_sizes, cfg.rounds, cfg.train.local_steps, cfg.train.batch_size, cfg.clients.per_round
            )
        except ValueError as err:
            raise ConfigError(
                f"privacy.target_epsilon: {cfg.privacy.target_epsilon:g} cannot be reached at delta={cfg.privacy.target_delta:g} "
                f"for {cfg.rounds} rounds ({err}); raise it, or use fewer rounds or privacy.client_rounds"
            ) from None

    @property
    def worker_clients(self) -> list[list[int]]:
        """The clients each worker owns now."""
        groups: list[list[int]] = [[] for _ in self.workers]
        for c, w in sorted(self.client_worker.items()):
            groups[w].append(c)
        return groups

    def _load_args(self, w: int) -> tuple:
        """What worker ``w`` is loaded with: the shards, its evaluation slices, and under local DP
        the clients' noise and the accountant histories so far of the clients it owns."""
        privacy = None
        if self.budget.mode == "local_dp_sgd":
            privacy = {
                "noise": dict(enumerate(self.budget.noise)),
                "histories": {c: self.budget.histories.get(c, []) for c in self.worker_clients[w]},
            }
        return (self._shards_ref, self._eval_refs[w], privacy)

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        started = time.perf_counter()
        self._started_ray = start_ray(self.cfg)
        self._owns_ray = True
        self.ray_start_s = time.perf_counter() - started

    def _reload(self, w: int, timeout_s: float = 300.0) -> None:
        """After a worker died: wait until Ray has restarted it, then hand it its data again. Its
        clients start over with fresh local state (optimizer moments, data order)."""
        if self.cfg.worker.max_restarts == 0:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.workers[w].load.remote(*self._load_args(w)))
                log.warning("worker %d was restarted; its clients' local state starts over", w)
                return
            except ActorUnavailableError:
                time.sleep(0.5)
            except RayActorError:
                break
        log.warning("worker %d did not come back; its clients will count as dropped", w)

    def _worker_count(self) -> int:
        """Workers to start: worker.count, or as many as the cluster's CPUs (and GPUs) fit ("auto").
        Asks that a locally started Ray cannot meet fail now instead of leaving actors pending."""
        w = self.cfg.worker
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        if w.num_gpus > 0 and gpus == 0:
            log.warning("worker.num_gpus=%g but the Ray cluster has no GPU: running on CPU", w.num_gpus)
            w.num_gpus = 0.0
        fits = workers_that_fit([n["Resources"] for n in ray.nodes() if n["Alive"]], w.num_cpus, w.num_gpus)
        if w.count == "auto":
            return max(1, fits)
        if w.count > fits:
            need = f"{w.count} workers x {w.num_cpus:g} CPU" + (f" x {w.num_gpus:g} GPU" if w.num_gpus else "")
            message = f"worker.count: {need} do not fit the Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs)"
            if self._started_ray:  # a cluster may still grow (autoscaling); a Ray started here will not
                raise UserError(message)
            log.warning("%s; some workers wait until the cluster grows", message)
        return int(w.count)

    def set_train(self, **values: Any) -> None:
        """Change training hyperparameters between rounds, e.g. ``sim.set_train(lr=1e-4)``."""
        for key, value in values.items():
            if key not in _TRAIN_KEYS:
                raise UserError(f"train.{key}: cannot be changed between rounds (changeable: {', '.join(_TRAIN_KEYS)})")
            self.cfg.train[key] = value

    def set_clients(self, per_round: int) -> None:
        """Change how many clients are sampled from the next round on, e.g. ``sim.set_clients(per_round=8)``."""
        cfg = self.cfg
        if not 1 <= per_round <= cfg.clients.num:
            raise UserError(f"clients.per_round: {per_round} is not between 1 and clients.num ({cfg.clients.num})")
        if self.budget.mode == "central_dp":
            raise UserError("clients.per_round: under central_dp the sampling rate is part of the privacy plan and cannot change")
        if self.secure and per_round < 3:
            raise UserError("clients.per_round: secure aggregation needs at least 3 clients per round")
        cfg.clients.per_round = per_round

    def run_round(self) -> dict[str, Any]:
        """One round: sample, broadcast, train on the workers in parallel, aggregate, evaluate.

        Raises BudgetExhausted, before doing anything, when no round fits the privacy budget."""
        started = time.perf_counter()
        cfg = self.cfg
        round_idx = self.round + 1
        self.budget.check_next_round(cfg.clients.num)
        excluded = sorted(self.budget.exhausted)
        sampled = ray.get(self.server.sample.remote(round_idx, cfg.clients.per_round, excluded))
        (global_ref,) = ray.get(self.server.broadcast.remote())
        by_worker, arrivals = self._place(round_idx, sampled)
        train = {k: cfg.train[k] for k in _TRAIN_KEYS}
        train["lr"] = cfg.train.lr * cfg.train.lr_decay ** (round_idx - 1)
        secagg_row: dict[str, Any] = {}
        if self.secure:
            metas, server_metrics, secagg_row = self._secure_round(round_idx, global_ref, by_worker, train, arrivals)
        else:
            calls = {
                w: self.workers[w].train_clients.remote(global_ref, ids, round_idx, train, arrivals=arrivals.get(w))
                for w, ids in by_worker.items()
            }
            trained = self._gather(round_idx, calls, by_worker, "training")
            metas = [meta for meta, _ in trained.values()]
            weight = sum(m["weight"] for m in metas)
            aggregate_started = time.perf_counter()
            server_metrics = ray.get(self.server.aggregate.remote(round_idx, weight, *(ref for _, ref in trained.values())))
            server_metrics["aggregate_s"] = time.perf_counter() - aggregate_started
        trained_clients = sum(len(m["clients"]) for m in metas)
        completed = secagg_row.pop("aggregated") if self.secure else trained_clients
        newly_exhausted = self.budget.record_round({c: p for m in metas for c, p in m["privacy"].items()})
        if newly_exhausted:
            log.info(
                "round %d: client(s) %s reached the privacy budget (epsilon %g) and will not be sampled again",
                round_idx,
                ", ".join(map(str, newly_exhausted)),
                self.cfg.privacy.target_epsilon,
            )
        slowest = max(metas, key=lambda m: m["train_s"], default={"train_s": 0.0, "steps_s": 0.0})
        row: dict[str, Any] = {
            "round": round_idx,
            "lr": train["lr"],
            "clients": completed,
            "dropped": len(sampled) - completed,
            "train_loss": sum(m["loss_sum"] for m in metas) / trained_clients if trained_clients else math.nan,
            "aggregation_error": server_metrics["aggregation_error"],
            "uplink_bytes": server_metrics.get("uplink_bytes", completed * self.sent_bytes_per_client),
            "downlink_bytes": len(sampled) * self.sent_bytes_per_client,
            "train_s": slowest["train_s"],
            "steps_s": slowest["steps_s"],
            "aggregate_s": server_metrics.get("aggregate_s", math.nan),
            "epsilon": self.budget.epsilon,
            "delta": self.budget.delta if self.budget.enabled else 0.0,
            **secagg_row,
        }
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
            result = {"eval_loss": math.nan, "eval_accuracy": math.nan}
        row.update(eval_loss=result["eval_loss"], eval_accuracy=result["eval_accuracy"])
        row["eval_s"] = time.perf_counter() - eval_started
        row["wall_s"] = time.perf_counter() - started
        self.round = round_idx
        self._rows.append(row)
        self._write_metrics()
        self._write_tensorboard(row)
        if cfg.checkpoint.every and round_idx % cfg.checkpoint.every == 0:
            self.save_checkpoint()
        return row

    def _place(self, round_idx: int, sampled: list[int]) -> tuple[dict[int, list[int]], dict[int, dict]]:
        """This round's clients per worker, and the local state of the clients that move (by their
        new worker). A client whose worker died while handing it over drops out of the round."""
        if not self.cfg.worker.rebalance:
            by_worker: dict[int, list[int]] = {}
            for c in sorted(sampled):
                by_worker.setdefault(self.client_worker[c], []).append(c)
            return by_worker, {}
        by_worker, moves = balance(sampled, self.client_worker, len(self.workers))
        leaving: dict[int, list[int]] = {}
        for cid, source, _ in moves:
            leaving.setdefault(source, []).append(cid)
        handed = {source: self.workers[source].hand_over.remote(ids) for source, ids in leaving.items()}
        destination = {cid: dest for cid, _, dest in moves}
        arrivals: dict[int, dict] = {}
        for source, ref in handed.items():
            try:
                states = ray.get(ref)
            except RayActorError as err:
                log.warning("round %d: worker %d died handing over clients %s (%s); they count as dropped", round_idx, source, leaving[source], type(err).__name__)
                for cid in leaving[source]:
                    by_worker[destination[cid]].remove(cid)
                self._reload(source)
                continue
            for cid, state in states.items():
                arrivals.setdefault(destination[cid], {})[cid] = state
                self.client_worker[cid] = destination[cid]
        return {w: ids for w, ids in by_worker.items() if ids}, arrivals

    def _gather(self, round_idx: int, calls: dict[int, tuple], by_worker: dict[int, list[int]], stage: str) -> dict[int, tuple]:
        """(small result, payload reference) of each worker call that succeeded. A worker that died
        is handed its data again once Ray has restarted it; its clients drop out of the round."""
        done = {}
        for w, (result_ref, payload_ref) in calls.items():
            try:
                done[w] = (ray.get(result_ref), payload_ref)
            except RayActorError as err:
                log.warning(
                    "round %d: worker %d died during %s (%s); its %d clients count as dropped",
                    round_idx,
                    w,
                    stage,
                    type(err).__name__,
                    len(by_worker[w]),
                )
                self._reload(w)
        return done

    def _secure_round(
        self, round_idx: int, global_ref, by_worker: dict[int, list[int]], train: dict, arrivals: dict[int, dict]
    ) -> tuple[list, dict, dict]:
        """One round of SecAgg+: workers act for their clients, the server only routes keys and
        shares, receives masked sums and unmasks their total. An aborted round leaves the global
        adapter unchanged. Returns (worker metadata, server metrics, secagg columns)."""
        server, workers = self.server, self.workers
        examples = train["weighting"] == "examples" and self.budget.mode != "central_dp"
        weight_scale = float(max(self.client_sizes)) if examples else 1.0
        metas: list[dict] = []
        try:
            advertised = self._gather(
                round_idx, {w: (workers[w].secagg_advertise.remote(round_idx, ids),) * 2 for w, ids in by_worker.items()}, by_worker, "key advertisement"
            )
            roster = server.secagg_roster.remote(round_idx, *(publics for publics, _ in advertised.values()))
            shared = self._gather(round_idx, {w: workers[w].secagg_share_keys.remote(roster) for w in advertised}, by_worker, "key sharing")
            if not shared:
                raise SecAggAborted("every worker failed before sharing keys")
            alive = list(shared)
            groups = [by_worker[w] for w in alive]
            inboxes = server.secagg_route.options(num_returns=len(alive)).remote(round_idx, groups, *(ref for _, ref in shared.values()))
            inboxes = inboxes if len(alive) > 1 else [inboxes]
            calls = {
                w: workers[w].train_clients.remote(global_ref, by_worker[w], round_idx, train, inbox, weight_scale, arrivals.get(w))
                for w, inbox in zip(alive, inboxes)
            }
            trained = self._gather(round_idx, calls, by_worker, "training")
            metas = [meta for meta, _ in trained.values()]
            senders = ray.get(server.secagg_collect.remote(round_idx, *(ref for _, ref in trained.values())))
            revealed = self._gather(round_idx, {w: workers[w].secagg_unmask.remote(round_idx, senders) for w in trained}, by_worker, "unmasking")
            server_metrics = ray.get(server.secagg_aggregate.remote(round_idx, *(ref for _, ref in revealed.values())))
            aborted, aggregated = "", len(senders)
        except SecAggAborted as reason:
            # Raised in the server actor, it arrives wrapped by Ray: keep the message only.
            aborted, aggregated = str(reason).strip().splitlines()[-1].split("SecAggAborted: ")[-1], 0
            log.warning("round %d: secure aggregation aborted (%s); the global adapter is unchanged", round_idx, aborted)
            server_metrics = {"aggregation_error": math.nan, "uplink_bytes": ray.get(server.secagg_abort.remote(round_idx))}
        sent_values = sum(len(m["clients"]) for m in metas) * self.sent_values_per_client
        clipped = sum(m["secagg_clipped"] for m in metas)
        return metas, server_metrics, {
            "aggregated": aggregated,
            "secagg_aborted": bool(aborted),
            "secagg_clipped": clipped / sent_values if sent_values else 0.0,
        }

    def run(self, rounds: int | None = None, progress: bool = True) -> pa.Table:
        """Run ``rounds`` more rounds (default: up to the configured number), printing one line per
        round; with checkpoint.every, the last round is checkpointed too."""
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
            if progress:
                bar.write(line)
            else:
                log.info(line)
        bar.close()
        if self.cfg.checkpoint.every and self._checkpointed_round != self.round:
            self.save_checkpoint()
        return self.metrics

    def _evaluate(self, split: str) -> dict[str, float]:
        (global_ref,) = ray.get(self.server.broadcast.remote())
        calls = [worker.evaluate.remote(global_ref, split) for worker in self.workers]  # all in parallel
        results = []
        for w, call in enumerate(calls):
            try:
                results.append(ray.get(call))
            except RayActorError:
                log.warning("evaluation: worker %d is unavailable; its share of the %s set is skipped", w, split)
        loss, correct, n = (sum(r[i] for r in results) for i in range(3))
        return {"eval_loss": loss / n if n else math.nan, "eval_accuracy": correct / n if n else math.nan, "eval_examples": n}

    def evaluate(self) -> dict[str, float]:
        """The current global adapter on the whole evaluation split (not just the per-round subset)."""
        return self._evaluate("full")

    @property
    def metrics(self) -> pa.Table:
        return pa.Table.from_pylist(self._rows)

    def client_privacy(self) -> pa.Table:
        """Local DP: each client's noise multiplier, DP-SGD steps taken and epsilon spent."""
        if self.budget.mode != "local_dp_sgd":
            return pa.table({})
        return pa.Table.from_pylist(self.budget.client_rows(self.cfg.train.batch_size))

    def _write_metrics(self) -> None:
        table = self.metrics
        _write_atomic(self.output_dir / "metrics.parquet", lambda p: pq.write_table(table, p))
        if self.budget.mode == "local_dp_sgd":
            clients = self.client_privacy()
            _write_atomic(self.output_dir / "privacy.parquet", lambda p: pq.write_table(clients, p))

    def _write_tensorboard(self, row: dict[str, Any]) -> None:
        """The round's numbers as TensorBoard scalars in output_dir/tensorboard, when tensorboard is
        installed. A resumed run first purges the events of rounds it is about to redo."""
        if self._tensorboard is None:
            try:
                self._tensorboard = TensorBoardLog(self.output_dir / "tensorboard", purge_step=row["round"])
            except ImportError:
                self._tensorboard = False
            else:
                log.info("TensorBoard: tensorboard --logdir %s", self.output_dir / "tensorboard")
        if self._tensorboard:
            scalars = {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, (int, float)) and math.isfinite(v)}
            self._tensorboard.add_scalars(row["round"], scalars, time.time())
            self._tensorboard.flush()

    def global_adapter(self) -> dict[str, np.ndarray]:
        return ray.get(self.server.global_state.remote())

    def save_adapter(self, path: str | os.PathLike | None = None) -> Path:
        """Write the global adapter as a PEFT adapter directory (default: output_dir/adapter)."""
        path = Path(path) if path is not None else self.output_dir / "adapter"
        (global_ref,) = ray.get(self.server.broadcast.remote())
        for worker in self.workers:
            try:
                files = ray.get(worker.adapter_files.remote(global_ref))
                break
            except RayActorError:
                continue
        else:
            raise RuntimeError("no worker is alive to write the adapter")
        path.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            _write_atomic(path / name, lambda p, c=content: p.write_bytes(c))
        return path

    def write_summary(self, final: dict[str, float]) -> Path:
        rows = self._rows
        summary = {
            "rounds": self.round,
            "method": self.cfg.method,
            "final_eval_accuracy": final.get("eval_accuracy"),
            "final_eval_loss": final.get("eval_loss"),
            "final_eval_examples": final.get("eval_examples"),
            "uplink_bytes": int(sum(r["uplink_bytes"] for r in rows)),
            "downlink_bytes": int(sum(r["downlink_bytes"] for r in rows)),
            "startup_s": round(self.startup_s, 3),
            "ray_start_s": round(self.ray_start_s, 3),
            "rounds_wall_s": round(sum(r["wall_s"] for r in rows), 3),
            "privacy": self.budget.summary(),
            "secagg": {"enabled": self.secure, "aborted_rounds": sum(bool(r.get("secagg_aborted")) for r in rows)},
        }
        path = self.output_dir / "summary.json"
        _write_atomic(path, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
        return path

    def shutdown(self) -> None:
        """Stop this simulation's actors, and Ray itself if this simulation started it."""
        if self._tensorboard:
            self._tensorboard.close()
            self._tensorboard = None
        if not ray.is_initialized():
            return
        for actor in [*getattr(self, "workers", []), getattr(self, "server", None)]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.workers = []
        self.server = None
        if self._owns_ray:
            if self._started_ray:
                stop_autoscaler_monitor()
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def gpu_hint(devices: list[str], cfg: DictConfig) -> str | None:
    """A line for GPU runs that train one client per forward pass, which leaves a GPU mostly idle."""
    if not any(d.startswith("cuda") for d in devices) or cfg.train.clients_per_batch > 1 or cfg.privacy.mode == "local_dp_sgd":
        return None
    return (
        "workers run on GPUs one client at a time; train.clients_per_batch=8 trains 8 clients per "
        "forward pass, 3 to 6x faster on an H200 (docs/PERFORMANCE.md)"
    )


def _run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (OUTPUT_DIR/checkpoints/round-N)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _user_error_in(err: Exception) -> UserError | None:
    """The UserError an actor raised (in a method or its constructor), if that is what failed."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, UserError):
        return cause
    text = str(err)
    marker = "UserError: "
    for line in text.splitlines():
        if marker in line:
            return UserError(line.split(marker, 1)[1].strip())
    return None


def format_row(row: dict[str, Any], total_rounds: int) -> str:
    parts = [
        f"round {row['round']}/{total_rounds}",
        f"clients {row['clients']}" + (f" ({row['dropped']} dropped)" if row["dropped"] else ""),
        f"train_loss {row['train_loss']:.4f}",
        f"eval_loss {row['eval_loss']:.4f}",
        f"eval_acc {row['eval_accuracy']:.4f}",
    ]
    if not math.isnan(row["aggregation_error"]):
        parts.append(f"agg_err {row['aggregation_error']:.2e}")
    if math.isfinite(row["epsilon"]):
        parts.append(f"eps {row['epsilon']:.3f}")
    if row.get("secagg_aborted"):
        parts.append("secagg aborted")
    parts.append(f"{row['wall_s']:.1f}s")
    return " | ".join(parts)
