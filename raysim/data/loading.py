"""Reading a labelled text table (CSV, Parquet, JSONL) with pyarrow, and cleaning it.

Rows with empty text or a label outside the known label set are dropped and counted, never
silently: :class:`LabelledTexts` carries the counts so the caller can log them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet

from raysim.config import UserError
from raysim.data.tokenizer import Tokenizer


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: np.ndarray  # int64 class indices into label_names
    label_names: list[str]
    dropped_empty_text: int
    dropped_unknown_label: int
    kept_rows: np.ndarray  # the table's row of each kept text


def read_table(path: str | Path) -> pa.Table:
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pyarrow.csv.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pyarrow.parquet.read_table(path)
        if suffix in (".jsonl", ".json"):
            return pyarrow.json.read_json(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"data.path: cannot read {path}: {str(err).splitlines()[0]}") from None
    raise UserError(f"data.path: '{path}' is not a .csv, .parquet or .jsonl file")


def _as_text(column: pa.ChunkedArray) -> list[str | None]:
    """Strings from a text column; bytes that are not valid UTF-8 are decoded with replacement."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if b is None else b.decode("utf-8", errors="replace") for b in column.to_pylist()]
    return pc.cast(column, pa.string()).to_pylist()


def clean(
    table: pa.Table, text_column: str, label_column: str, label_names: Sequence[str] = ()
) -> LabelledTexts:
    """Texts and integer labels; label_names fixes the class order (empty: sorted distinct labels)."""
    for key, column in (("data.text_column", text_column), ("data.label_column", label_column)):
        if column not in table.column_names:
            raise UserError(f"{key}: no column '{column}' in the data (columns: {', '.join(table.column_names)})")
    texts = _as_text(table[text_column])
    raw_labels = [None if v is None else str(v).strip() for v in table[label_column].to_pylist()]
    if not label_names:
        label_names = sorted({v for v in raw_labels if v})
    if len(label_names) < 2:
        raise UserError(f"data.labels: need at least 2 classes, found {list(label_names)}")
    index = {name: i for i, name in enumerate(label_names)}
    kept_texts, kept_labels, kept_rows, empty, unknown = [], [], [], 0, 0
    for row, (text, label) in enumerate(zip(texts, raw_labels)):
        if text is None or not text.strip():
            empty += 1
        elif label not in index:
            unknown += 1
        else:
            kept_texts.append(text)
            kept_labels.append(index[label])
            kept_rows.append(row)
    if not kept_texts:
        raise UserError(f"data.path: no usable rows (empty text: {empty}, unknown label: {unknown})")
    return LabelledTexts(kept_texts, np.asarray(kept_labels, dtype=np.int64), list(label_names), empty, unknown, np.asarray(kept_rows, dtype=np.int64))


def column_values(table: pa.Table, column: str, key: str) -> list:
    """A column's values as Python objects; a UserError naming ``key`` if there is no such column."""
    if column not in table.column_names:
        raise UserError(f"{key}: no column '{column}' in the data (columns: {', '.join(table.column_names)})")
    return table[column].to_pylist()


def split_indices(
    n: int, seed: int, test_fraction: float, validation_fraction: float = 0.0
) -> dict[str, np.ndarray]:
    """Seeded disjoint train / validation / test index sets (validation carved from train)."""
    order = np.random.default_rng([seed, 0x5B117]).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    n_val = int(round((n - n_test) * validation_fraction))
    if n - n_test - n_val < 1:
        raise UserError(f"data: {n} rows leave no training rows after the test/validation split")
    return {
        "test": np.sort(order[:n_test]),
        "validation": np.sort(order[n_test : n_test + n_val]),
        "train": np.sort(order[n_test + n_val :]),
    }


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to the longest row (int32, shape [n, L]) and each row's true length.

    Done once, on the driver; batches are later trimmed to their own longest row.
    """
    encoded = tokenizer(texts, max_length)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int32, count=len(encoded))
    ids = np.full((len(encoded), int(lengths.max())), tokenizer.pad_token_id, dtype=np.int32)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = seq
    return ids, lengths


RESPONSE_START = "response_start"
GENERATE_ROW = "row"  # a generation table's row of the evaluation split


def to_arrow(ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray, causal: bool = False) -> pa.Table:
    """A tokenized shard as an Arrow table: fixed-width token rows, lengths, and each row's class
    label, or with ``causal`` the position of its first response token (task=causal_lm)."""
    width = ids.shape[1]
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int32()), width)
    target = RESPONSE_START if causal else "label"
    return pa.table({"input_ids": tokens, "length": pa.array(lengths, pa.int32()), target: pa.array(labels, pa.int64())})


def from_arrow(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Inverse of :func:`to_arrow`: (ids [n, L] int32, lengths, labels or response starts, causal)
    as numpy, zero-copy where possible."""
    tokens = table.column("input_ids").combine_chunks()
    width = tokens.type.list_size
    ids = tokens.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    lengths = table.column("length").to_numpy()
    causal = RESPONSE_START in table.column_names
    labels = table.column(RESPONSE_START if causal else "label").to_numpy()
    return ids, lengths, labels, causal
