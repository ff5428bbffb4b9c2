"""From a data file to tokenized client shards and evaluation sets, once, on the driver."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raysim.config import UserError
from raysim.data.loading import clean, read_table, split_indices, to_arrow, tokenize
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


def plan_data(cfg) -> DataPlan:
    d = cfg.data
    data = clean(read_table(d.path), d.text_column, d.label_column, list(d.labels))
    if data.dropped_empty_text or data.dropped_unknown_label:
        log.warning(
            "data: dropped %d rows with empty text and %d rows with a label outside %s",
            data.dropped_empty_text,
            data.dropped_unknown_label,
            data.label_names,
        )
    rows = np.arange(len(data.labels))
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
    labels = data.labels[needed]
    n_train = len(splits["train"])

    parts = partition(labels[:n_train], d, cfg.clients.num, cfg.seed, len(data.label_names))
    unused = n_train - sum(len(p) for p in parts)
    if unused:
        log.info("data: %s partition leaves %d of %d training rows unused", d.partition, unused, n_train)
    n_eval = len(needed) - n_train - len(public)
    if cfg.eval.max_examples and cfg.eval.max_examples < n_eval:
        subset = np.sort(np.random.default_rng([cfg.seed, 0xE7A1]).choice(n_eval, cfg.eval.max_examples, replace=False))
    else:
        subset = np.arange(n_eval)
    log.info(
        "data: %d rows kept (dropped %d with empty text, %d with unknown labels), %d train over %d clients (%s), "
        "%d %s (%d evaluated each round), labels %s",
        len(rows),
        data.dropped_empty_text,
        data.dropped_unknown_label,
        n_train,
        cfg.clients.num,
        d.partition,
        n_eval,
        cfg.eval.split,
        len(subset),
        data.label_names,
    )
    if len(public):
        log.info("data: %d training rows held out as the public split", len(public))
    return DataPlan([data.texts[i] for i in needed], labels, parts, n_train, subset, data.label_names, len(public))


def tokenize_plan(plan: DataPlan, tokenizer, max_length: int) -> PreparedData:
    ids, lengths = tokenize(tokenizer, plan.texts, max_length)
    labels, n, end = plan.labels, plan.n_train, len(plan.labels) - plan.n_public
    shards = [to_arrow(ids[p], lengths[p], labels[p]) for p in plan.parts]
    eval_full = to_arrow(ids[n:end], lengths[n:end], labels[n:end])
    public = to_arrow(ids[end:], lengths[end:], labels[end:]) if plan.n_public else None
    return PreparedData(shards, eval_full, plan.eval_subset, plan.label_names, public)


def prepare(cfg, tokenizer) -> PreparedData:
    """From the data file to tokenized client shards and evaluation sets."""
    return tokenize_plan(plan_data(cfg), tokenizer, cfg.data.max_length)


def split_for_workers(rows: np.ndarray, lengths: np.ndarray, num_workers: int) -> list[np.ndarray]:
    """Deal evaluation rows to workers by length, round robin, so each gets equal work."""
    order = rows[np.argsort(lengths[rows], kind="stable")]
    return [np.sort(order[w::num_workers]) for w in range(num_workers)]
