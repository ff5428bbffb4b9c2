"""Start-up: check the inputs (tokenizer, data plan, privacy plan) while the cluster starts,
create the workers and the server, tokenize the data and put it into the object store once.

Everything a user can get wrong in the data, tokenizer or privacy plan fails while Ray starts
(its start is mostly waiting on its own processes); the model fails as the workers build it.
Nothing is written to output_dir before both have passed."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from raysim.attacks import DATA_ATTACKS, malicious_clients
from raysim.attacks.data import poisoned_plan
from raysim.config import PER_UPDATE_AGGREGATORS, ConfigError, UserError
from raysim.data.loading import GENERATE_ROW
from raysim.data.prepare import PreparedData, plan_data, split_for_workers, tokenize_plan
from raysim.data.tokenizer import load_tokenizer, local_file
from raysim.privacy.budget import PrivacyBudget
from raysim.robust import RobustRule
from raysim.secagg.encoding import ring_bits

if TYPE_CHECKING:
    from raysim.runtime.simulation import Simulation

log = logging.getLogger("raysim")

TOKENIZER_SAMPLE = 256  # rows a worker tokenizes with AutoTokenizer to check the driver's tokenizer


def check_inputs(cfg: DictConfig) -> tuple[Any, Any, PrivacyBudget]:
    """Load the tokenizer, plan the data and the privacy budget. Raises UserError (or
    ConfigError) naming what is wrong. For task=causal_lm the tokenizer is transformers' (its chat
    template) and the plan an :class:`~raysim.data.instructions.InstructionPlan`."""
    check_context(cfg)
    if cfg.task == "causal_lm":
        from raysim.data.instructions import load_prompt_tokenizer, plan_instructions

        tokenizer: Any = load_prompt_tokenizer(cfg.model.name_or_path)
        plan: Any = plan_instructions(cfg)
    else:
        tokenizer, plan = load_tokenizer(cfg.model.name_or_path), poison(cfg, plan_data(cfg))
    return tokenizer, plan, plan_privacy(cfg, plan.client_sizes)


def poison(cfg: DictConfig, plan: Any) -> Any:
    """The plan with the malicious clients' rows poisoned, for a data attack (attack.*). A backdoor
    at fraction 0 poisons nothing but still gets its triggered rows, so that the run measures the
    clean model's rate of putting them in the target class: the attack's base rate."""
    a = cfg.attack
    if a.kind not in DATA_ATTACKS or (a.fraction == 0 and a.kind != "backdoor"):
        return plan
    if a.target_label >= len(plan.label_names):
        raise ConfigError(f"attack.target_label: {a.target_label} is not an index into the {len(plan.label_names)} labels {plan.label_names}")
    malicious = malicious_clients(cfg.seed, cfg.clients.num, a.fraction)
    log.info("attack: %d malicious client(s) %s, %s", len(malicious), malicious, a.kind)
    return poisoned_plan(plan, a, cfg.seed, malicious)


def check_context(cfg: DictConfig) -> None:
    """data.max_length within the model's positions, read from its config.json (no torch)."""
    path = local_file(cfg.model.name_or_path, "config.json")
    if path is None:
        return
    values = json.loads(path.read_text()) | dict(cfg.model.config_overrides)
    positions = values.get("max_position_embeddings")
    if isinstance(positions, int) and cfg.data.max_length > positions:
        raise ConfigError(f"data.max_length: {cfg.data.max_length} is more than the model's {positions} positions (max_position_embeddings)")


def plan_privacy(cfg: DictConfig, client_sizes: list[int]) -> PrivacyBudget:
    """Solve the noise for the privacy target up front: an unreachable target fails here."""
    try:
        return PrivacyBudget(
            cfg.privacy, client_sizes, cfg.rounds, cfg.train.local_steps, cfg.train.batch_size, cfg.clients.per_round, cfg.secagg
        )
    except ValueError as err:
        raise _unreachable(cfg, err) from None


def fit_privacy(cfg: DictConfig, budget: PrivacyBudget, values: int) -> None:
    """Distributed DP's plan, once the size of a client's message is known."""
    try:
        budget.fit_message(values)
    except ValueError as err:
        raise _unreachable(cfg, err) from None


def _unreachable(cfg: DictConfig, err: ValueError) -> ConfigError:
    return ConfigError(
        f"privacy.target_epsilon: {cfg.privacy.target_epsilon:g} cannot be reached at delta={cfg.privacy.target_delta:g} "
        f"for {cfg.rounds} rounds ({err}); raise it, or use fewer rounds or privacy.client_rounds"
    )


def check_adapters(sim: Simulation) -> None:
    """Every client's adapter must fit the workers' resident model: the same tensors trained, and
    a rank no larger than the model's (a client of a smaller rank uses its first slots)."""
    first = sim.method.adapter(0)
    for cid in range(sim.cfg.clients.num):
        spec = sim.method.adapter(cid)
        if spec.frozen_kinds != first.frozen_kinds:
            raise UserError(
                f"method: {sim.cfg.method} freezes {spec.frozen_kinds} for client {cid} and {first.frozen_kinds} for client 0; "
                "clients of one run train the same tensors on the resident model"
            )
        if not 1 <= spec.rank <= sim.cfg.lora.rank:
            raise UserError(f"method: {sim.cfg.method} gives client {cid} rank {spec.rank}, outside 1..lora.rank ({sim.cfg.lora.rank})")


def robust_rule(cfg: DictConfig) -> RobustRule | None:
    """The server's per-update rule (server.aggregator), or None for a weighted mean (mean, and
    norm_bound, which each client applies to its own update)."""
    s = cfg.server
    if s.aggregator not in PER_UPDATE_AGGREGATORS:
        return None
    return RobustRule(s.aggregator, float(s.trim_fraction), int(s.byzantine), int(s.krum_select))


def server_settings(cfg: DictConfig, budget: PrivacyBudget) -> tuple[dict | None, dict | None]:
    """(central DP settings, secure aggregation settings) for the Server, or None each. Under
    distributed DP the ring is secagg.bits wide, and clients are sampled as under central DP."""
    central_dp = None
    if budget.mode == "central_dp":
        central_dp = {"noise_multiplier": budget.noise_multiplier, "clip_norm": budget.clip_norm, "sample_rate": budget.sample_rate}
    secagg = None
    if cfg.secagg.enabled:
        s = cfg.secagg
        distributed = budget.mode == "distributed_dp"
        secagg = {
            "neighbors": None if s.neighbors == "all" else int(s.neighbors),
            "threshold": int(s.threshold),
            "clip_range": float(s.clip_range),
            "bits": int(s.bits),
            "ring_bits": int(s.bits) if distributed else ring_bits(s.bits, cfg.clients.num),
            "sample_rate": budget.sample_rate if distributed else None,
        }
    return central_dp, secagg


def tokenize_checked(sim: Simulation, tokenizer: Any, plan: Any) -> PreparedData:
    """Tokenize the data; where the driver read the tokenizer from its file, worker 0 compares a
    sample with AutoTokenizer (transformers may adjust a tokenizer.json from
    tokenizer_config.json), and a difference means tokenizing again with AutoTokenizer. For
    task=causal_lm (a PromptTokenizer, which is AutoTokenizer, and an InstructionPlan) there is
    nothing to compare."""
    max_length = sim.cfg.data.max_length
    if sim.cfg.task == "causal_lm":
        from raysim.data.instructions import tokenize_instructions

        return tokenize_instructions(plan, tokenizer, max_length)
    check = None
    if tokenizer.from_file:
        sample = plan.texts[:: max(1, len(plan.texts) // TOKENIZER_SAMPLE)][:TOKENIZER_SAMPLE]
        check = sim.workers[0].tokenizer_mismatch.remote(sample, tokenizer(sample, max_length), tokenizer.pad_token_id, max_length)
    data = tokenize_plan(plan, tokenizer, max_length)
    if check is not None:
        mismatch = sim.backend.get(check)
        if mismatch:
            log.warning("data: transformers adjusts this model's tokenizer.json (%s); tokenizing again with AutoTokenizer", mismatch)
            data = tokenize_plan(plan, load_tokenizer(sim.cfg.model.name_or_path, read_file=False), max_length)
    return data


def put_data(sim: Simulation, data: PreparedData, num_workers: int) -> tuple[Any, list[Any]]:
    """The clients' rows go into the object store once, as one table (client after client) and
    offsets, which every worker on a node maps without copying; each worker gets its slices of
    the evaluation split. The driver keeps the references, so a worker restarted by Ray is handed
    the same data again."""
    eval_lengths = data.eval_full.column("length").to_numpy()
    full_parts = split_for_workers(np.arange(data.eval_full.num_rows), eval_lengths, num_workers)
    subset_parts = split_for_workers(data.eval_subset, eval_lengths, num_workers)
    offsets = np.concatenate([[0], np.cumsum(sim.client_sizes)])
    shards_ref = sim.backend.put((pa.concat_tables(data.client_shards).combine_chunks(), offsets))
    tables: list[dict[str, pa.Table]] = [{"full": data.eval_full.take(full_parts[w]), "subset": data.eval_full.take(subset_parts[w])} for w in range(num_workers)]
    if data.triggered is not None:
        lengths = data.triggered.column("length").to_numpy()
        for w, rows in enumerate(split_for_workers(np.arange(data.triggered.num_rows), lengths, num_workers)):
            tables[w]["backdoor"] = data.triggered.take(rows)
    if data.generate_subset is not None:
        for w, rows in enumerate(split_for_workers(data.generate_subset, eval_lengths, num_workers)):
            tables[w]["generate"] = data.eval_full.take(rows).append_column(GENERATE_ROW, pa.array(rows, pa.int64()))
    return shards_ref, [sim.backend.put(t) for t in tables]


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError an actor's call raised, if that is what failed: the local runtime raises it
    as it is, Ray as its task error's cause (workers never raise in their constructor, where Ray
    would keep only its text: see raysim.runtime.worker)."""
    cause = getattr(err, "cause", None)  # Ray's task error is an instance of its cause's class too
    if isinstance(cause, UserError):
        return cause
    return err if isinstance(err, UserError) else None
