"""LoRA-FAIR and FLASC through the local runtime on configs/tiny.yaml: what they send, what they
compose with, and what they save (Ray against the local runtime: tests/test_protocol.py)."""

import math

import numpy as np
import pytest
import torch

from raysim import ConfigError, Simulation
from raysim.config import CONFIG_DIR, load_config
from raysim.methods.flasc import sparse_nbytes

from conftest import secagg_mean_error_bound

SGD = ("runtime=local", "train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9")
NO_DROPOUT = ("model.config_overrides.hidden_dropout_prob=0", "model.config_overrides.attention_probs_dropout_prob=0", "lora.dropout=0")
FLASC_EF = ("method=flasc", "method_args.error_feedback=true")


def run(tmp_path, *args, rounds=2):
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", f"rounds={rounds}", *args])
    with Simulation(cfg) as sim:
        start = sim.global_adapter()
        sim.run(progress=False)
        return sim.metrics.to_pylist(), sim.global_adapter(), start


def test_flasc_at_full_density_is_fedit(tmp_path):
    _, flasc, _ = run(tmp_path / "flasc", *SGD, "method=flasc", "method_args.download_density=1", "method_args.upload_density=1")
    _, lora, _ = run(tmp_path / "lora", *SGD, "method=lora")
    for name, value in lora.items():
        np.testing.assert_allclose(flasc[name], value, rtol=1e-5, atol=1e-7)


def test_flasc_counts_its_sparse_bytes_and_moves_the_adapter_less_than_dense(tmp_path):
    rows, flasc, _ = run(tmp_path / "flasc", *SGD, *FLASC_EF, "method_args.download_density=0.1", "method_args.upload_density=0.05")
    _, lora, _ = run(tmp_path / "lora", *SGD, "method=lora")
    total = sum(v.size for v in flasc.values())
    for row in rows:
        assert row["uplink_bytes"] == row["clients"] * sparse_nbytes(math.ceil(0.05 * total), total)
        assert row["downlink_bytes"] == row["clients"] * sparse_nbytes(math.ceil(0.1 * total), total)
        assert row["uplink_bytes"] < 0.15 * row["clients"] * 4 * total
    assert max(float(np.abs(flasc[k] - lora[k]).max()) for k in lora) > 1e-3


def test_lora_fair_narrows_fedits_aggregation_error_on_the_same_clients(tmp_path):
    """Round 1 trains the same clients from the same start under both methods; only the server
    differs. The exact (unsketched) diagnostic compares each server's adapter with the clients' mean product."""
    exact = ("runtime=local", "eval.aggregation_error=true", "eval.aggregation_sketch=0")
    fedit, _, _ = run(tmp_path / "fedit", *exact, "method=lora", rounds=1)
    fair, _, _ = run(tmp_path / "fair", *exact, "method=lora_fair", rounds=1)
    least, _, _ = run(tmp_path / "ls", *exact, "method=lora_fair", "method_args.distance=least_squares", "method_args.lam=0", rounds=1)
    assert fair[0]["train_loss"] == fedit[0]["train_loss"] and fair[0]["uplink_bytes"] == fedit[0]["uplink_bytes"]
    assert fedit[0]["aggregation_error"] > 1e-3
    assert least[0]["aggregation_error"] <= fair[0]["aggregation_error"] < fedit[0]["aggregation_error"]


@pytest.mark.parametrize("method", [("method=lora_fair",), FLASC_EF])
@pytest.mark.parametrize(
    "privacy",
    [
        ("privacy.mode=central_dp", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.05"),
        ("privacy.mode=local_dp_sgd", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0"),
    ],
    ids=["central_dp", "local_dp_sgd"],
)
def test_each_method_trains_under_either_kind_of_dp(tmp_path, method, privacy):
    rows, adapter, start = run(tmp_path, "runtime=local", *method, *privacy)
    assert all(0 < row["epsilon"] < math.inf for row in rows)
    assert all(np.isfinite(v).all() for v in adapter.values()) and all(math.isfinite(row["eval_loss"]) for row in rows)
    assert max(float(np.abs(adapter[k] - start[k]).max()) for k in adapter) > 1e-4


def test_flasc_refuses_secure_aggregation_naming_the_key():
    with pytest.raises(ConfigError, match="^secagg.enabled: method flasc sends each client's top-k"):
        load_config(CONFIG_DIR / "tiny.yaml", ["method=flasc", "secagg.enabled=true"])


def test_lora_fair_under_secure_aggregation_equals_plaintext_within_the_encoding_bound(tmp_path):
    """The masked vector carries each module's B_k A_k beside the factors. With server.lr 1, A and
    the head move by their decoded mean, off by at most conftest's bound (weights at most 1, the
    largest exactly 1); B also takes the correction solved from the decoded products and Ā, which
    can magnify that error, so it is held to 10x the bound (on 2026-12-02 it stayed within 1x)."""
    clip, bits = 0.5, 16
    args = ("runtime=local", "method=lora_fair", "method_args.distance=least_squares", f"secagg.clip_range={clip}", f"secagg.bits={bits}")
    plain_rows, plain, start = run(tmp_path / "plain", *args, rounds=1)
    secure_rows, secure, _ = run(tmp_path / "secure", *args, "secagg.enabled=true", rounds=1)
    assert secure_rows[0]["secagg_clipped"] == 0 and not secure_rows[0]["secagg_aborted"]
    assert secure_rows[0]["uplink_bytes"] > 3 * plain_rows[0]["uplink_bytes"]  # the dense products are sent masked
    clients = plain_rows[0]["clients"]
    for name, value in plain.items():
        bound = secagg_mean_error_bound(clients, 1.0, value.astype(np.float64) - start[name], clip, bits)
        off = np.abs(secure[name].astype(np.float64) - value)
        if ".lora_B." in name:
            assert off.max() <= 10 * bound.max(), name
        else:
            assert np.all(off <= bound + 1e-6), name
    assert max(float(np.abs(secure[k] - plain[k]).max()) for k in plain) > 0  # it did go through the encoding


@pytest.mark.parametrize("method", [("method=lora_fair",), FLASC_EF])
def test_clients_trained_together_give_the_same_run(tmp_path, method):
    _, alone, _ = run(tmp_path / "alone", *SGD, *NO_DROPOUT, *method)
    _, together, _ = run(tmp_path / "together", *SGD, *NO_DROPOUT, *method, "train.clients_per_batch=3")
    for name, value in alone.items():
        np.testing.assert_allclose(together[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [("method=lora_fair",), FLASC_EF])
def test_the_saved_adapter_is_a_plain_lora_that_peft_loads(tmp_path, method):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", "rounds=1", "runtime=local", *method])
    with Simulation(cfg) as sim:
        sim.run(progress=False)
        adapter_dir, state = sim.save_adapter(), sim.global_adapter()
    torch.manual_seed(cfg.seed)
    base = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path, num_labels=3, **cfg.model.config_overrides))
    loaded = dict(PeftModel.from_pretrained(base, adapter_dir).named_parameters())
    if method == FLASC_EF:  # FLASC saves what it evaluates: the adapter as clients download it, its top quarter by magnitude
        flat = np.concatenate([v.ravel() for v in state.values()])
        threshold = np.sort(np.abs(flat))[-math.ceil(0.25 * flat.size)]
        state = {k: np.where(np.abs(v) >= threshold, v, 0).astype(v.dtype) for k, v in state.items()}
        assert sum(int(np.count_nonzero(v)) for v in state.values()) == math.ceil(0.25 * flat.size)
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name].detach().numpy(), value)


def test_flasc_evaluates_the_adapter_clients_download_unless_asked_for_the_dense_one(tmp_path):
    """The authors' code evaluates the download-sparsified model; ``eval_dense`` evaluates the
    server's dense adapter (raysim before issue 43): same training, different evaluation."""
    sparse, _, _ = run(tmp_path / "sparse", "runtime=local", "method=flasc", rounds=1)
    dense, _, _ = run(tmp_path / "dense", "runtime=local", "method=flasc", "method_args.eval_dense=true", rounds=1)
    assert sparse[0]["train_loss"] == dense[0]["train_loss"]
    assert sparse[0]["eval_loss"] != dense[0]["eval_loss"]
