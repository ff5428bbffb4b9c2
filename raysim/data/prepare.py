"""From a data file to tokenized client shards and evaluation sets, once, on the driver."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raysim.config import UserError
from raysim.data.loading import clean, column_values, read_table, split_indices, to_arrow, tokenize
from raysim.data.partition import partition

log = logging.getLogger("raysim")


@dataclass
class DataPlan:
    """Which rows go where, decided from the labels alone (no tokenizer): every data error shows
    here, and the client sizes are known before anything is tokenized."""

    texts: list[str]  # the rows used: training rows first, then the evaluation split's, then the public split's
    labels: np.ndarray
    parts: list[np.ndarray]  # per client, indices into the training rows
    n_train: int
    eval_subset: np.ndarray  # indices into the evaluation rows evaluated every round
    label_names: list[str]
    n_public: int = 0
    triggered: tuple[list[str], np.ndarray] | None = None  # attack.kind=backdoor: triggered evaluation rows, labelled the target

    @property
    def client_sizes(self) -> list[int]:
        return [len(p) for p in self.parts]


@dataclass
class PreparedData:
    client_shards: list[pa.Table]  # one tokenized table per client, in client-id order
    eval_full: pa.Table  # the whole evaluation split (test, or validation when tuning)
    eval_subset: np.ndarray  # row indices of eval_full evaluated every round
    label_names: list[str]
    public: pa.Table | None = None  # data.public_rows held out from every client
    answers: list[str] | None = None  # task=causal_lm: each evaluation row's reference response
    generate_subset: np.ndarray | None = None  # task=causal_lm: evaluation rows answered by generation
    triggered: pa.Table | None = None  # attack.kind=backdoor: the triggered evaluation rows, labelled the target


@dataclass
class RowPlan:
    """Which of a table's usable rows each split and client gets; shared by both tasks."""

    needed: np.ndarray  # indices into the usable rows: training rows first, then the evaluation split's, then the public split's
    parts: list[np.ndarray]  # per client, indices into the training rows
    n_train: int
    n_public: int
    eval_subset: np.ndarray  # indices into the evaluation rows evaluated every round


def plan_rows(cfg, n: int, labels: np.ndarray | None = None, num_classes: int = 0, groups: np.ndarray | None = None) -> RowPlan:
    """Seeded row cap, splits, public split, partition and evaluation subset over ``n`` usable
    rows (their ``labels`` for the label-skewed partitions, ``groups`` for the natural one)."""
    d = cfg.data
    rows = np.arange(n)
    if d.max_rows and d.max_rows < len(rows):
        rows = np.sort(np.random.default_rng([cfg.seed, 0x5AB]).choice(len(rows), d.max_rows, replace=False))
    splits = {k: rows[v] for k, v in split_indices(len(rows), cfg.seed, d.test_fraction, d.validation_fraction).items()}
    public = np.empty(0, dtype=rows.dtype)
    if d.public_rows:
        train = splits["train"]
        if d.public_rows >= len(train):
            raise UserError(f"data.public_rows: {d.public_rows} is not fewer than the {len(train)} training rows")
        held_out = np.sort(np.random.default_rng([cfg.seed, 0x9B1C]).choice(len(train), d.public_rows, replace=False))
        public, splits["train"] = train[held_out], np.delete(train, held_out)
    needed = np.concatenate([splits["train"], splits[cfg.eval.split], public])
    n_train = len(splits["train"])
    train_rows = needed[:n_train]
    parts = partition(
        n_train,
        d,
        cfg.clients.num,
        cfg.seed,
        None if labels is None else labels[train_rows],
        num_classes,
        None if groups is None else groups[train_rows],
    )
    unused = n_train - sum(len(p) for p in parts)
    if unused:
        log.info("data: %s partition leaves %d of %d training rows unused", d.partition, unused, n_train)
    n_eval = len(needed) - n_train - len(public)
    if cfg.eval.max_examples and cfg.eval.max_examples < n_eval:
        subset = np.sort(np.random.default_rng([cfg.seed, 0xE7A1]).choice(n_eval, cfg.eval.max_examples, replace=False))
    else:
        subset = np.arange(n_eval)
    if len(public):
        log.info("data: %d training rows held out as the public split", len(public))
    return RowPlan(needed, parts, n_train, len(public), subset)


def client_groups(table: pa.Table, data_cfg, rows: np.ndarray | None = None) -> np.ndarray | None:
    """data.client_column's values (of the table's ``rows``) for partition=natural, else None."""
    if data_cfg.partition != "natural":
        return None
    values = np.asarray([str(v) for v in column_values(table, data_cfg.client_column, "data.client_column")], dtype=object)
    return values if rows is None else values[rows]


def plan_data(cfg) -> DataPlan:
    d = cfg.data
    table = read_table(d.path)
    data = clean(table, d.text_column, d.label_column, list(d.labels))
    if data.dropped_empty_text or data.dropped_unknown_label:
        log.warning(
            "data: dropped %d rows with empty text and %d rows with a label outside %s",
            data.dropped_empty_text,
            data.dropped_unknown_label,
            data.label_names,
        )
    rows = plan_rows(cfg, len(data.labels), data.labels, len(data.label_names), client_groups(table, d, data.kept_rows))
    log.info(
        "data: %d rows kept (dropped %d with empty text, %d with unknown labels), %d train over %d clients (%s), "
        "%d %s (%d evaluated each round), labels %s",
        min(len(data.labels), d.max_rows or len(data.labels)),
        data.dropped_empty_text,
        data.dropped_unknown_label,
        rows.n_train,
        cfg.clients.num,
        d.partition,
        len(rows.needed) - rows.n_train - rows.n_public,
        cfg.eval.split,
        len(rows.eval_subset),
        data.label_names,
    )
    return DataPlan([data.texts[i] for i in rows.needed], data.labels[rows.needed], rows.parts, rows.n_train, rows.eval_subset, data.label_names, rows.n_public)


def tokenize_plan(plan: DataPlan, tokenizer, max_length: int) -> PreparedData:
    ids, lengths = tokenize(tokenizer, plan.texts, max_length)
    labels, n, end = plan.labels, plan.n_train, len(plan.labels) - plan.n_public
    shards = [to_arrow(ids[p], lengths[p], labels[p]) for p in plan.parts]
    eval_full = to_arrow(ids[n:end], lengths[n:end], labels[n:end])
    public = to_arrow(ids[end:], lengths[end:], labels[end:]) if plan.n_public else None
    triggered = None
    if plan.triggered is not None:
        texts, targets = plan.triggered
        triggered = to_arrow(*tokenize(tokenizer, texts, max_length), targets)
    return PreparedData(shards, eval_full, plan.eval_subset, plan.label_names, public, triggered=triggered)


def prepare(cfg, tokenizer) -> PreparedData:
    """From the data file to tokenized client shards and evaluation sets."""
    return tokenize_plan(plan_data(cfg), tokenizer, cfg.data.max_length)


def split_for_workers(rows: np.ndarray, lengths: np.ndarray, num_workers: int) -> list[np.ndarray]:
    """Deal evaluation rows to workers by length, round robin, so each gets equal work."""
    order = rows[np.argsort(lengths[rows], kind="stable")]
    return [np.sort(order[w::num_workers]) for w in range(num_workers)]
