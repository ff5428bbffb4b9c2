"""Fed-SB: its initialisation against an independent gradient and SVD, exact averaging of R, and
what it sends, saves and composes with (the local runtime; Ray against it in tests/test_protocol.py)."""

import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysim import ConfigError, Simulation, UserError
from raysim.config import CONFIG_DIR, load_config
from raysim.methods.fed_sb import FedSB, Options, r_name
from raysim.methods.protocol import RoundInput
from raysim.model import build_model
from raysim.training import ClientData, backward_mean_loss

from conftest import secagg_mean_error_bound

RANK = 4
FED_SB = ("method=fed_sb", f"lora.rank={RANK}", "data.public_rows=64")
NO_DROPOUT = ("model.config_overrides.hidden_dropout_prob=0", "model.config_overrides.attention_probs_dropout_prob=0", "lora.dropout=0")
SGD = ("train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9")


def config(tmp_path, *args):
    return load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", "runtime=local", *FED_SB, *args])


def run(tmp_path, *args, rounds=2):
    with Simulation(config(tmp_path, f"rounds={rounds}", *args)) as sim:
        start = sim.global_adapter()
        sim.run(progress=False)
        frozen = sim.backend.get(sim.server.frozen_state.remote())
        return sim.metrics.to_pylist(), start, sim.global_adapter(), frozen


def _rows(n, seed, width=16, vocab=1000):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, width + 1, size=n).astype(np.int32)
    ids = rng.integers(1, vocab, size=(n, width)).astype(np.int32)
    return ClientData(ids, lengths, rng.integers(0, 3, size=n).astype(np.int64))


def test_the_initial_adapter_is_the_truncated_svd_of_the_first_adam_step(tmp_path):
    """s B R0 A of each module equals the rank-r truncation of -η sign(G), with G the mean-loss
    gradient of the module's base weight computed on the same rows by a plain transformers model
    (no PEFT, no Fed-SB) and the SVD by numpy."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = config(tmp_path, *NO_DROPOUT)
    data = _rows(48, 0)
    model = build_model(cfg, 3)
    method = FedSB(Options(init_lr=2e-3), lora_rank=RANK)
    tensors = method.public_init(model, lambda: backward_mean_loss(model, data, 16, torch.device("cpu")))

    torch.manual_seed(cfg.seed)
    plain = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path, num_labels=3, **cfg.model.config_overrides))
    plain.eval()  # the initialisation's gradient is taken without dropout
    width = int(data.lengths.max())
    mask = torch.arange(width)[None, :] < torch.from_numpy(data.lengths.astype(np.int64))[:, None]
    logits = plain(input_ids=torch.from_numpy(data.ids[:, :width].astype(np.int64)), attention_mask=mask.long()).logits
    F.cross_entropy(logits, torch.from_numpy(data.labels)).backward()
    scaling = 1.0  # the paper's alpha = r
    modules = [n for n, _ in plain.named_modules() if n.endswith(("query", "value"))]
    assert len(modules) == 4
    for name in modules:
        g = plain.get_submodule(name).weight.grad.numpy().astype(np.float64)
        u, s, vt = np.linalg.svd(-2e-3 * np.sign(g))
        want = (u[:, :RANK] * s[:RANK]) @ vt[:RANK]
        prefix = f"base_model.model.{name}"
        b, r0, a = (tensors[f"{prefix}.lora_B.default.weight"], tensors[r_name(prefix)], tensors[f"{prefix}.lora_A.default.weight"])
        got = scaling * b.astype(np.float64) @ r0 @ a
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), name
        np.testing.assert_allclose(a @ a.T, np.eye(RANK), atol=1e-5)  # A's rows and B's columns: singular vectors
        np.testing.assert_allclose(b.T @ b, np.eye(RANK), atol=1e-5)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)  # frozen again


def test_averaging_r_is_exact_and_only_r_and_the_head_are_sent():
    rng = np.random.default_rng(1)
    prefix = "m"
    b, a = rng.normal(size=(12, RANK)), rng.normal(size=(RANK, 10))
    frozen = {f"{prefix}.lora_A.default.weight": a, f"{prefix}.lora_B.default.weight": b}
    start = {r_name(prefix): np.eye(RANK), "head": np.zeros(3)}
    method = FedSB(Options(), lora_rank=RANK)
    state = method.init_server(start, frozen)
    finals = [{k: v + rng.normal(size=v.shape) for k, v in start.items()} for _ in range(4)]
    weights = np.array([1.0, 4.0, 2.0, 3.0])
    mean = {k: sum(w * (f[k] - start[k]) for f, w in zip(finals, weights)) / weights.sum() for k in start}
    new = method.aggregate(state, RoundInput(1, mean, float(weights.sum()))).adapter
    want = sum(w * b @ f[r_name(prefix)] @ a for f, w in zip(finals, weights)) / weights.sum()
    np.testing.assert_allclose(b @ new[r_name(prefix)] @ a, want, rtol=1e-10)
    left, right = method.factors(new, frozen)[prefix]
    np.testing.assert_allclose(left @ right, b @ new[r_name(prefix)] @ a, rtol=1e-12)


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_r_is_averaged_unweighted_as_the_paper_does_whatever_the_clients_examples(weighting):
    """Under train.weighting: examples the runtime would weight clients by their examples
    (raysim/runtime/host.py); the paper's R is the plain mean of the R_k. ``weighting: examples``
    keeps raysim's rule before issue 43."""
    rng = np.random.default_rng(4)
    method = FedSB(Options(weighting=weighting), lora_rank=RANK)
    start = {r_name("m"): rng.normal(size=(RANK, RANK)), "head": np.zeros(3)}
    state = method.init_server(start, {})
    finals = [{k: v + rng.normal(size=v.shape) for k, v in start.items()} for _ in range(4)]
    examples = np.array([10.0, 40.0, 20.0, 30.0])
    weights = examples if method.client_weighting("examples") == "examples" else np.ones(4)  # the runtime's rule
    mean = {k: sum(w * (f[k] - start[k]) for f, w in zip(finals, weights)) / weights.sum() for k in start}
    new = method.aggregate(state, RoundInput(1, mean, float(weights.sum()))).adapter
    p = np.full(4, 0.25) if weighting == "uniform" else examples / examples.sum()
    for k in start:
        np.testing.assert_allclose(new[k], sum(pk * f[k] for pk, f in zip(p, finals)), rtol=1e-10)


def test_a_run_averages_r_unweighted_whatever_train_weighting_says(tmp_path):
    """The runtime weights messages by the method's weighting: train.weighting changes nothing
    under Fed-SB's default; ``method_args.weighting=examples`` brings the clients' examples back
    (tiny.yaml's Dirichlet clients differ in size)."""
    _, _, by_examples, _ = run(tmp_path / "examples", "train.weighting=examples", rounds=1)
    _, _, uniform, _ = run(tmp_path / "uniform", "train.weighting=uniform", rounds=1)
    _, _, weighted, _ = run(tmp_path / "weighted", "train.weighting=examples", "method_args.weighting=examples", rounds=1)
    for name, value in uniform.items():
        np.testing.assert_array_equal(by_examples[name], value)
    assert max(float(np.abs(weighted[k] - uniform[k]).max()) for k in uniform) > 1e-6


@pytest.mark.parametrize("args, scaling", [((), 1.0), (("method_args.scaling=lora_alpha",), 16 / RANK)], ids=["one", "lora_alpha"])
def test_each_module_is_w0_plus_b_r_a_at_the_papers_scaling(tmp_path, args, scaling):
    """The paper sets alpha = r: each module adds x (B R A)^T to its base output, whatever
    lora.alpha (16 here) says; ``scaling: lora_alpha`` keeps raysim's earlier lora.alpha / r."""
    cfg = config(tmp_path, *args)
    model = build_model(cfg, 3).eval()
    layers = [m for m in model.modules() if hasattr(m, "fed_sb_R")]
    assert len(layers) == 4
    rng = np.random.default_rng(6)
    for layer in layers:
        a, b, r = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.fed_sb_R["default"].weight
        with torch.no_grad():
            for t in (a, b, r):
                t.copy_(torch.from_numpy(rng.normal(size=tuple(t.shape)).astype(np.float32)))
        x = rng.normal(size=(5, a.shape[1])).astype(np.float32)
        with torch.no_grad():
            got = (layer(torch.from_numpy(x)) - layer.get_base_layer()(torch.from_numpy(x))).numpy()
        product = b.detach().double().numpy() @ r.detach().double().numpy() @ a.detach().double().numpy()
        np.testing.assert_allclose(got, scaling * x.astype(np.float64) @ product.T, rtol=1e-4, atol=1e-4)
    saved = model.peft_config["default"]
    assert saved.lora_alpha / saved.r == scaling  # what a saved adapter's config says


def test_a_run_sends_r_squared_per_module_and_saves_a_plain_lora_of_the_same_product(tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = config(tmp_path, "rounds=2")
    with Simulation(cfg) as sim:
        start = sim.global_adapter()
        sim.run(progress=False)
        rows, adapter = sim.metrics.to_pylist(), sim.global_adapter()
        frozen = sim.backend.get(sim.server.frozen_state.remote())
        on_workers = [sim.backend.get(w.initial_adapter.remote())[1] for w in sim.workers]
        adapter_dir = sim.save_adapter()
    modules = [k[: -len(".fed_sb_R.default.weight")] for k in adapter if k.endswith(".fed_sb_R.default.weight")]
    head = sum(v.size for k, v in adapter.items() if "classifier" in k)
    assert len(modules) == 4 and len(adapter) == 4 + 2
    for row in rows:
        assert row["uplink_bytes"] == row["clients"] * 4 * (len(modules) * RANK**2 + head)
    for worker_frozen in on_workers:  # every worker holds the server's B and A
        assert sorted(worker_frozen) == sorted(frozen) and all(np.array_equal(worker_frozen[k], frozen[k]) for k in frozen)
    assert max(float(np.abs(adapter[k] - start[k]).max()) for k in adapter) > 1e-4

    torch.manual_seed(cfg.seed)
    base = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path, num_labels=3, **cfg.model.config_overrides))
    loaded = PeftModel.from_pretrained(base, adapter_dir)
    scaling = 1.0  # the paper's alpha = r, whatever lora.alpha says
    for prefix in modules:
        layer = loaded.get_submodule(prefix)
        saved = layer.get_delta_weight("default").detach().numpy()
        b, a = frozen[f"{prefix}.lora_B.default.weight"], frozen[f"{prefix}.lora_A.default.weight"]
        np.testing.assert_allclose(saved, scaling * b @ adapter[r_name(prefix)] @ a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "privacy",
    [
        ("privacy.mode=local_dp_sgd", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0"),
        ("privacy.mode=central_dp", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.05"),
        ("secagg.enabled=true", "secagg.clip_range=0.5"),
    ],
    ids=["local_dp_sgd", "central_dp", "secagg"],
)
def test_fed_sb_trains_under_dp_and_secure_aggregation(tmp_path, privacy):
    rows, start, adapter, _ = run(tmp_path, *privacy)
    assert all(np.isfinite(v).all() for v in adapter.values()) and all(math.isfinite(r["eval_loss"]) for r in rows)
    assert max(float(np.abs(adapter[k] - start[k]).max()) for k in adapter) > 1e-4
    assert sorted(adapter) == sorted(start) and not any(".lora_" in k for k in adapter)  # only R and the head


def test_secure_aggregation_of_r_equals_plaintext_within_the_encoding_bound(tmp_path):
    """R and the head are the masked vector: with server.lr 1 the adapter moves by the decoded
    mean, off by at most conftest's bound (weights at most 1, the largest exactly 1)."""
    clip, bits = 0.5, 16
    rows, start, plain, _ = run(tmp_path / "plain", f"secagg.clip_range={clip}", f"secagg.bits={bits}", rounds=1)
    _, _, secure, _ = run(tmp_path / "secure", "secagg.enabled=true", f"secagg.clip_range={clip}", f"secagg.bits={bits}", rounds=1)
    for name, value in plain.items():
        bound = secagg_mean_error_bound(rows[0]["clients"], 1.0, value.astype(np.float64) - start[name], clip, bits)
        assert np.all(np.abs(secure[name].astype(np.float64) - value) <= bound + 1e-6), name
    assert max(float(np.abs(secure[k] - plain[k]).max()) for k in plain) > 0  # it did go through the encoding


def test_clients_trained_together_give_the_same_run(tmp_path):
    _, _, alone, _ = run(tmp_path / "alone", *SGD, *NO_DROPOUT)
    _, _, together, _ = run(tmp_path / "together", *SGD, *NO_DROPOUT, "train.clients_per_batch=3")
    for name, value in alone.items():
        np.testing.assert_allclose(together[name], value, rtol=1e-4, atol=1e-6)


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    args = (*SGD, "checkpoint.every=2")
    _, _, whole, whole_frozen = run(tmp_path / "whole", *args, rounds=4)
    run(tmp_path / "part", *args, rounds=2)
    resumed = load_config(CONFIG_DIR / "tiny.yaml", [f"resume={tmp_path / 'part' / 'run'}", "runtime=local", *FED_SB, "rounds=4", *args])
    with Simulation(resumed) as sim:
        assert sim.round == 2
        sim.run(progress=False)
        got, frozen = sim.global_adapter(), sim.backend.get(sim.server.frozen_state.remote())
    assert all(np.array_equal(got[k], whole[k]) for k in whole) and all(np.array_equal(frozen[k], whole_frozen[k]) for k in whole_frozen)


@pytest.mark.usefixtures("ray_session")
def test_a_restarted_worker_gets_b_and_a_back(tmp_path):
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", *FED_SB, "clients.per_round=10", "worker.rebalance=false"])
    with Simulation(cfg) as sim:
        sim.run_round()
        os.kill(sim.backend.get(sim.workers[0].ready.remote()).pid, signal.SIGKILL)
        assert sim.run_round()["dropped"] > 0  # found dead, restarted by Ray, loaded again
        frozen = sim.backend.get(sim.server.frozen_state.remote())
        after = sim.backend.get(sim.workers[0].initial_adapter.remote())[1]
    assert sorted(after) == sorted(frozen) and all(np.array_equal(after[k], frozen[k]) for k in frozen)


def test_fed_sb_needs_a_public_split_and_a_rank_its_layers_allow(tmp_path):
    with pytest.raises(ConfigError, match="^data.public_rows: method fed_sb initialises"):
        load_config(CONFIG_DIR / "tiny.yaml", ["method=fed_sb"])
    with pytest.raises(UserError, match="^lora.rank: 100 is more than"):
        Simulation(config(tmp_path, "lora.rank=100"))
