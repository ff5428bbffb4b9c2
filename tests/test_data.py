import itertools

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
from omegaconf import OmegaConf

from raysim.config import UserError, tweets_path
from raysim.data import partition as part
from raysim.data.loading import clean, from_arrow, read_table, split_indices, to_arrow
from raysim.runtime.placement import assign_clients, balance


def _table():
    return pa.table(
        {
            "text": ["good", "", "bad", "meh", None, "great", "awful"],
            "label": ["pos", "pos", "neg", "other", "neg", "pos", "neg"],
        }
    )


def test_clean_drops_and_counts_empty_and_unknown_rows():
    data = clean(_table(), "text", "label", ["neg", "pos"])
    assert data.texts == ["good", "bad", "great", "awful"]
    assert data.labels.tolist() == [1, 0, 1, 0]
    assert (data.dropped_empty_text, data.dropped_unknown_label) == (2, 1)


def test_clean_names_a_missing_column():
    with pytest.raises(UserError, match="data.label_column: no column 'y'"):
        clean(_table(), "text", "y")


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_read_table_formats(tmp_path, suffix):
    table = _table()
    path = tmp_path / f"d.{suffix}"
    if suffix == "csv":
        pyarrow.csv.write_csv(table, path)
    elif suffix == "parquet":
        pyarrow.parquet.write_table(table, path)
    else:
        import json

        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    data = clean(read_table(path), "text", "label", ["neg", "pos"])
    assert data.texts == ["good", "bad", "great", "awful"]


def test_tweets_load_with_invalid_utf8_decoded():
    data = clean(read_table(tweets_path()), "text", "sentiment", ["negative", "neutral", "positive"])
    assert len(data.texts) > 38_000 and np.bincount(data.labels).argmax() == 0
    assert all(isinstance(t, str) for t in data.texts[:100])


def test_split_is_seeded_and_disjoint():
    a = split_indices(1000, 3, 0.2, 0.1)
    b = split_indices(1000, 3, 0.2, 0.1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    union = np.concatenate(list(a.values()))
    assert len(union) == 1000 and len(np.unique(union)) == 1000
    assert len(a["test"]) == 200 and len(a["validation"]) == 80
    assert not np.array_equal(a["test"], split_indices(1000, 4, 0.2)["test"])


def test_arrow_roundtrip():
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = from_arrow(to_arrow(ids, np.array([4, 2, 1], np.int32), np.array([0, 2, 1])))
    assert np.array_equal(out[0], ids) and out[1].tolist() == [4, 2, 1] and out[2].tolist() == [0, 2, 1] and out[3] is False
    causal = from_arrow(to_arrow(ids, np.array([4, 2, 1], np.int32), np.array([3, 1, 0]), causal=True))
    assert causal[2].tolist() == [3, 1, 0] and causal[3] is True


LABELS = np.random.default_rng(0).choice(3, size=3000, p=[0.5, 0.3, 0.2])


def _is_partition(parts, n):
    allidx = np.concatenate(parts)
    return len(np.unique(allidx)) == len(allidx) and allidx.max() < n


def test_iid_covers_everything_evenly():
    parts = part.iid(len(LABELS), 7, seed=1)
    assert _is_partition(parts, len(LABELS)) and sum(map(len, parts)) == len(LABELS)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def spread(alpha):
        parts = part.dirichlet(LABELS, 10, alpha, seed=2)
        assert _is_partition(parts, len(LABELS)) and sum(map(len, parts)) == len(LABELS)
        mixes = np.array([np.bincount(LABELS[p], minlength=3) / len(p) for p in parts])
        return np.abs(mixes - np.bincount(LABELS) / len(LABELS)).sum(axis=1).mean()

    assert spread(0.1) > 3 * spread(100.0)


def test_dirichlet_is_seeded():
    a, b = part.dirichlet(LABELS, 5, 0.5, seed=9), part.dirichlet(LABELS, 5, 0.5, seed=9)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_label_proportions_gives_each_client_its_exact_mix():
    p = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]
    parts = part.label_proportions(LABELS, p, seed=0)
    assert _is_partition(parts, len(LABELS))
    sizes = {len(x) for x in parts}
    assert max(sizes) - min(sizes) <= 3
    for row, idx in zip(p, parts):
        mix = np.bincount(LABELS[idx], minlength=3) / len(idx)
        assert np.allclose(mix, row, atol=0.01)
    # the scarcest label (2) is used up by the clients that demand it
    assert sum(np.sum(LABELS[x] == 2) for x in parts) > 0.97 * np.sum(LABELS == 2)


def test_shards_give_few_labels_per_client():
    parts = part.shards(LABELS, 10, 2, seed=0)
    assert _is_partition(parts, len(LABELS)) and sum(map(len, parts)) == len(LABELS)
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 3
    assert np.mean([len(np.unique(LABELS[p])) for p in parts]) < 2.5


def test_partition_refuses_empty_clients():
    cfg = OmegaConf.create({"partition": "iid"})
    with pytest.raises(UserError, match="got no examples"):
        part.partition(LABELS[:5], cfg, 10, 0, 3)


def test_assign_clients_balances_counts_and_sizes():
    sizes = [100, 90, 80, 10, 10, 10, 5, 5]
    groups = assign_clients(sizes, 2)
    assert sorted(c for g in groups for c in g) == list(range(8))
    assert [len(g) for g in groups] == [4, 4]
    loads = [sum(sizes[c] for c in g) for g in groups]
    best = min(
        abs(2 * sum(sizes[c] for c in half) - sum(sizes)) for half in itertools.combinations(range(8), 4)
    )
    assert abs(loads[0] - loads[1]) == best


def test_prepare_counts_dropped_rows_in_the_log(tmp_path, caplog):
    from conftest import tiny_config
    from raysim.data.prepare import prepare
    from raysim.data.tokenizer import load_tokenizer

    rows = [("good day", "pos"), ("bad day", "neg")] * 20 + [("", "pos"), ("   ", "neg"), ("ok", "maybe"), ("hm", "")]
    path = tmp_path / "mine.csv"
    pyarrow.csv.write_csv(pa.table({"text": [r[0] for r in rows], "sentiment": [r[1] for r in rows]}), path)
    cfg = tiny_config(tmp_path, f"data.path={path}", "data.labels=[neg,pos]", "clients.num=4", "clients.per_round=2", "data.partition=iid")
    with caplog.at_level("INFO", logger="raysim"):
        data = prepare(cfg, load_tokenizer(cfg.model.name_or_path))
    assert "dropped 2 rows with empty text and 2 rows with a label outside ['neg', 'pos']" in caplog.text
    assert sum(t.num_rows for t in data.client_shards) + data.eval_full.num_rows == 40


def test_a_natural_split_of_labelled_texts_follows_the_client_column_of_the_kept_rows(tmp_path):
    from conftest import tiny_config
    from raysim.data.prepare import plan_data

    # Authors a (12 rows), b (8), c (4); two rows with empty text sit between them and are dropped.
    authors = ["a"] * 6 + ["x", "x"] + ["a"] * 6 + ["b"] * 8 + ["c"] * 4
    texts = [f"text {i}" if author != "x" else "" for i, author in enumerate(authors)]
    path = tmp_path / "authors.csv"
    pyarrow.csv.write_csv(pa.table({"text": texts, "sentiment": ["pos", "neg"] * 13, "author": authors}), path)
    cfg = tiny_config(tmp_path, f"data.path={path}", "data.labels=[neg,pos]", "clients.num=2", "clients.per_round=2", "data.partition=natural", "data.client_column=author", "data.test_fraction=0.1")
    plan = plan_data(cfg)
    train_texts = plan.texts[: plan.n_train]
    owner = {t: authors[int(t.split()[1])] for t in train_texts}
    by_client = [sorted({owner[train_texts[i]] for i in part}) for part in plan.parts]
    assert by_client == [["a"], ["b", "c"]]  # the largest author alone, the two others merged
    assert sum(map(len, plan.parts)) == plan.n_train


def test_balance_evens_out_a_round_with_the_fewest_moves():
    """Over the live workers only: their ids need not be 0..n-1 once one was retired."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        count = int(rng.integers(1, 6))
        workers = sorted(int(w) for w in rng.choice(8, count, replace=False))
        num = int(rng.integers(count, 40))
        owner = {c: workers[int(rng.integers(count))] for c in range(num)}
        sampled = sorted(rng.choice(num, int(rng.integers(1, num + 1)), replace=False).tolist())
        placed, moves = balance(sampled, owner, workers)
        assert sorted(c for ids in placed.values() for c in ids) == sampled and set(placed) <= set(workers)
        counts = [len(placed.get(w, [])) for w in workers]
        assert max(counts) - min(counts) <= 1
        moved = {c: (src, dst) for c, src, dst in moves}
        for w, ids in placed.items():
            for c in ids:
                assert (w == owner[c]) != (c in moved) and (c not in moved or moved[c] == (owner[c], w))
        # Fewest moves, by brute force over which workers take the extra clients.
        held = {w: sum(owner[c] == w for c in sampled) for w in workers}
        base, extra = divmod(len(sampled), count)
        fewest = min(
            sum(max(0, held[w] - base - (w in extras)) for w in workers)
            for extras in itertools.combinations(workers, extra)
        )
        assert len(moves) == fewest


def _transformers_ids(path, texts, max_length):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    return hf(texts, truncation=True, max_length=max_length)["input_ids"], hf.pad_token_id


def test_tokenize_gives_transformers_ids_on_every_tweet():
    """raysim reads tokenizer.json without transformers; AutoTokenizer is the independent reference."""
    from raysim.config import minilm_path
    from raysim.data.loading import tokenize
    from raysim.data.tokenizer import load_tokenizer

    texts = ["good day", "a much longer tweet that goes on and on " * 5, "émoji 🙂 and\tunicode", "x"]
    texts += [str(t) for t in read_table(tweets_path()).column("text").to_pylist()]
    tokenizer = load_tokenizer(minilm_path())
    # Every tweet at the length runs use; truncation to 8 tokens on a seeded sample of 3,000.
    sample = [texts[i] for i in sorted(np.random.default_rng(0).choice(len(texts), 3000, replace=False))]
    for max_length, rows in ((64, texts), (8, texts[:4] + sample)):
        ids, lengths = tokenize(tokenizer, rows, max_length)
        expected, pad = _transformers_ids(minilm_path(), rows, max_length)
        assert [list(row[:n]) for row, n in zip(ids, lengths)] == expected
        assert max(lengths) == min(max_length, max(len(e) for e in expected))
        assert tokenizer.pad_token_id == pad and (ids[lengths < ids.shape[1], -1] == pad).all()


def test_a_model_without_tokenizer_json_is_tokenized_by_transformers(tmp_path):
    import shutil

    from raysim.config import minilm_path
    from raysim.data.tokenizer import load_tokenizer

    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{minilm_path()}/{name}", tmp_path / name)
    texts = ["good day", "émoji 🙂 and\tunicode"]
    expected, pad = _transformers_ids(tmp_path, texts, 16)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer(texts, 16) == expected and tokenizer.pad_token_id == pad


def test_a_missing_tokenizer_names_the_key(tmp_path):
    from raysim.data.tokenizer import load_tokenizer

    with pytest.raises(UserError, match=f"model.name_or_path: cannot load a tokenizer from '{tmp_path}'"):
        load_tokenizer(str(tmp_path))


def test_dirichlet_gives_every_client_examples_even_when_draws_leave_some_empty():
    labels = np.random.default_rng(0).integers(0, 3, size=3200)
    parts = part.dirichlet(labels, 1000, 0.5, seed=1)
    assert _is_partition(parts, len(labels)) and sum(map(len, parts)) == len(labels)
    assert min(map(len, parts)) >= 1
    # The skew survives: label mixes far from the overall one, farther than an iid split's.
    overall = np.bincount(labels) / len(labels)

    def distance(split):
        return np.mean([np.abs(np.bincount(labels[p], minlength=3) / len(p) - overall).sum() / 2 for p in split])

    assert distance(parts) > 1.5 * distance(part.iid(len(labels), 1000, 1))
    assert distance(parts) > 3 * distance(part.dirichlet(labels, 1000, 100.0, seed=1))


def test_workers_that_fit_count_per_node_and_per_gpu():
    from raysim.runtime.placement import workers_that_fit

    cpu_head, gpu_node = {"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}
    assert workers_that_fit([cpu_head, gpu_node], 1, 0) == 24
    assert workers_that_fit([{"CPU": 3.0}, {"CPU": 3.0}], 2, 0) == 2  # not 6 // 2 = 3
    assert workers_that_fit([cpu_head, gpu_node], 1, 0.5) == 8  # the CPU-only head takes none
    assert workers_that_fit([{"CPU": 64.0, "GPU": 3.0}], 1, 0.4) == 6  # 2 per GPU, not 3 / 0.4 = 7
    assert workers_that_fit([gpu_node, {"CPU": 16.0, "GPU": 1.0}], 1, 2) == 2
    assert workers_that_fit([{"CPU": 2.0, "GPU": 4.0}], 1, 0.25) == 2  # CPUs bind first
