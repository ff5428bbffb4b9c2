"""LoRA-FAIR and FLASC through the local runtime on configs/tiny.yaml: what they send, what they
compose with, and what they save (Ray against the local runtime: tests/test_protocol.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from raysim import ConfigError, Simulation
from raysim.config import CONFIG_DIR, load_config
from raysim.data.loading import from_arrow
from raysim.data.prepare import prepare
from raysim.data.tokenizer import load_tokenizer
from raysim.methods.flasc import sparse_nbytes
from raysim.methods.lora_fair import PRODUCT
from raysim.model import build_model, trainable_parameters
from raysim.training import ClientData, collate, load_adapter

from conftest import client_results, secagg_mean_error_bound, tiny_config, worker_threads

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


CENTRAL_DP = ("privacy.mode=central_dp", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.05")
# One plain SGD step per client, each example's gradient clipped: the step is then a closed form.
LOCAL_DP = (
    "privacy.mode=local_dp_sgd",
    "privacy.noise_multiplier=0.7",
    "privacy.max_grad_norm=0.02",
    "train.optimizer=sgd",
    "train.momentum=0",
    "train.lr=0.5",
    "train.local_steps=1",
    *NO_DROPOUT,
)
FAIR_LEAST_SQUARES = ("method=lora_fair", "method_args.distance=least_squares")  # noise makes the cosine's optimum flat


def received_means(sim):
    """The mean the server's method receives each round, after the runtime's post-processing
    (SecAgg decoding, central DP noise), in float64: runtime=local keeps the server in process."""
    method, means = sim.server._target.method, []
    real = method.aggregate

    def aggregate(state, round_input):
        means.append({k: v.astype(np.float64) for k, v in round_input.mean.items()})
        return real(state, round_input)

    method.aggregate = aggregate
    return means


def trained_clients(sim):
    """{client: (the tensors it started from, its trained ones)} as each worker's method gets them
    (runtime=local keeps the workers in process), copied to numpy."""
    seen = {}
    for handle in sim.workers:
        method = handle._target.method

        def client_message(update, state, real=method.client_message):
            seen[update.client_id] = tuple({k: v.detach().cpu().numpy().copy() for k, v in part.items()} for part in (update.start, update.trained))
            return real(update, state)

        method.client_message = client_message
    return seen


def top_share(values, density):
    """``values`` with all but the top ``density`` of their magnitudes, over all tensors, zeroed."""
    flat = np.concatenate([v.ravel() for v in values.values()])
    threshold = np.sort(np.abs(flat))[-math.ceil(density * flat.size)]
    return {k: np.where(np.abs(v) >= threshold, v, 0).astype(v.dtype) for k, v in values.items()}


def fair_message(start, final):
    """LoRA-FAIR's summed message as its docstring says: each tensor's delta and each module's B_k A_k."""
    message = {k: final[k].astype(np.float64) - start[k] for k in start}
    for a, b in lora_modules(final):
        message[a.split(".lora_A.")[0] + PRODUCT] = final[b].astype(np.float64) @ final[a]
    return message


def lora_modules(adapter):
    return [(a, a.replace(".lora_A.", ".lora_B.")) for a in sorted(adapter) if ".lora_A." in a]


def cosine_objective(delta_b, delta_w, a_mean, b_mean, lam):
    """The paper's 1 - cos(ΔW, (B̄ + ΔB) Ā) + λ||ΔB||² on the full d_out x d_in matrices, and its
    gradient in ΔB (flattened, for scipy)."""
    delta_b = delta_b.reshape(b_mean.shape)
    approx = (b_mean + delta_b) @ a_mean
    norms, inner = np.linalg.norm(delta_w) * np.linalg.norm(approx), np.sum(delta_w * approx)
    d_approx = -(delta_w / norms - inner * approx / (norms * np.sum(approx**2)))
    return 1 - inner / norms + lam * np.sum(delta_b**2), (d_approx @ a_mean.T + 2 * lam * delta_b).ravel()


def replayed_correction(delta_w, a_mean, b_mean, distance, lam):
    """ΔB minimising S(ΔW, (B̄ + ΔB) Ā) + λ||ΔB||², found here: least squares as one stacked
    least-squares problem [Āᵀ; √λ I] ΔBᵀ = [(ΔW - B̄ Ā)ᵀ; 0]; the cosine by L-BFGS from zero."""
    if distance == "least_squares":
        rank = a_mean.shape[0]
        lhs = np.vstack([a_mean.T, math.sqrt(lam) * np.eye(rank)])
        rhs = np.vstack([(delta_w - b_mean @ a_mean).T, np.zeros((rank, b_mean.shape[0]))])
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
    found = minimize(cosine_objective, np.zeros(b_mean.size), (delta_w, a_mean, b_mean, lam), "L-BFGS-B", jac=True, options={"ftol": 1e-15, "gtol": 1e-12})
    return found.x.reshape(b_mean.shape)


def assert_corrected_like_a_replay(got, start, mean, distance, lam):
    """With server.lr 1: A and the head moved by the mean (FedIT), B by its mean plus the ΔB
    :func:`replayed_correction` solves for from the mean's ΔW, Ā and B̄: least squares to float
    precision; the cosine, which the method approaches by 100 gradient steps, to 0.2% of ΔB's
    largest value (within 0.07% on 2026-12-07, when a doubled or a zero λ failed it)."""
    for name, value in start.items():
        if ".lora_B." not in name:
            np.testing.assert_allclose(got[name], value + mean[name], rtol=1e-6, atol=1e-9, err_msg=name)
    for a, b in lora_modules(start):
        a_mean, b_mean, delta_w = start[a] + mean[a], start[b] + mean[b], mean[a.split(".lora_A.")[0] + PRODUCT]
        replay = replayed_correction(delta_w, a_mean, b_mean, distance, lam)
        rounding = 4 * np.finfo(np.float32).eps * np.abs(b_mean).max()  # the server's B is float32
        assert np.abs(replay).max() > 1e4 * rounding, b  # a correction float32 shows
        tolerance = 1e-4 if distance == "least_squares" else 2e-3
        np.testing.assert_allclose(got[b] - b_mean, replay, rtol=0, atol=tolerance * np.abs(replay).max() + rounding, err_msg=b)


def residual_check(residual, std):
    """The residual is N(0, std²) per value: its standard deviation within 4 standard errors (1 /
    sqrt(2n) relative), its mean within 4 of its own (std / sqrt(n))."""
    assert abs(residual.std() / std - 1) < 4 / math.sqrt(2 * residual.size), residual.std() / std
    assert abs(residual.mean()) < 4 * std / math.sqrt(residual.size)


@pytest.mark.parametrize("method", [FAIR_LEAST_SQUARES, FLASC_EF], ids=["lora_fair", "flasc"])
def test_central_dp_releases_the_clipped_messages_plus_noise_of_the_planned_size(tmp_path, method):
    """DP-FedAvg on each method's message (LoRA-FAIR: deltas and products; FLASC: the top quarter of
    the update, from a client that started from the top quarter of the adapter): the mean the
    server's method receives, times q N, less the sum of the messages replayed here from clients
    trained one by one and clipped here, must be Gaussian of std noise_multiplier x clip_norm;
    the server then steps on that mean (LoRA-FAIR's correction replayed as in the SecAgg test)."""
    cfg = tiny_config(tmp_path, "runtime=local", "rounds=1", *method, *CENTRAL_DP)
    flasc = method == FLASC_EF
    with Simulation(cfg) as sim:
        sampled = sim.backend.get(sim.server.sample.remote(1, cfg.clients.per_round))
        means, initial = received_means(sim), sim.global_adapter()
        row = sim.run_round()
        got = sim.global_adapter()
    assert row["clients"] == len(sampled) > 0 and 0 < row["epsilon"] < math.inf
    start, finals, _, _ = client_results(cfg, sampled, top_share(initial, 0.25) if flasc else None)
    sent = [top_share({k: f[k] - start[k] for k in start}, 0.25) if flasc else fair_message(start, f) for f in finals]
    names = sorted(sent[0])
    flat = np.stack([np.concatenate([np.asarray(m[k], np.float64).ravel() for k in names]) for m in sent])
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    assert norms.min() > 2 * 0.05  # the clip binds for every client, so a missing one shows
    (mean,) = means
    assert sorted(mean) == names
    residual = np.concatenate([mean[k].ravel() for k in names]) * cfg.clients.per_round - (flat * 0.05 / norms).sum(axis=0)  # q N = per_round
    residual_check(residual, 0.5 * 0.05)
    if flasc:  # the dense adapter takes the mean
        for name, value in initial.items():
            np.testing.assert_allclose(got[name], value + mean[name], rtol=1e-6, atol=1e-9, err_msg=name)
    else:
        assert_corrected_like_a_replay(got, initial, mean, "least_squares", 0.01)


@pytest.mark.parametrize("method", [("method=lora_fair",), FLASC_EF], ids=["lora_fair", "flasc"])
def test_local_dp_sgd_steps_by_the_clipped_example_gradients_plus_noise_of_the_planned_size(tmp_path, method):
    """One plain SGD step of DP-SGD moves a client's every trained value by -lr (sum_i clip(g_i) +
    N(0, (noise_multiplier x max_grad_norm)²)) / (expected batch): each g_i is computed here by its
    own backward pass at the client's start (FLASC: the adapter's top quarter) over the client's
    Poisson batch (its rows drawn here from its RNG), clipped here; the residual must be that
    noise, in every sampled client's step."""
    cfg = tiny_config(tmp_path, "runtime=local", "rounds=1", *method, *LOCAL_DP)
    sigma, clip, lr = 0.7, 0.02, 0.5
    with Simulation(cfg) as sim:
        sampled = sim.backend.get(sim.server.sample.remote(1, cfg.clients.per_round))
        clients, initial = trained_clients(sim), sim.global_adapter()
        row = sim.run_round()
    assert sorted(clients) == sampled and 0 < row["epsilon"] < math.inf
    data = prepare(cfg, load_tokenizer(cfg.model.name_or_path))
    model = build_model(cfg, len(data.label_names))
    params = trainable_parameters(model)
    expected_start = top_share(initial, 0.25) if method == FLASC_EF else initial
    residuals = []
    with worker_threads(cfg):
        for cid in sampled:
            start, trained = clients[cid]
            assert sorted(start) == sorted(params) and all(np.array_equal(start[k], expected_start[k]) for k in start)
            shard = ClientData(*from_arrow(data.client_shards[cid]))
            rate = min(1.0, cfg.train.batch_size / len(shard))
            batch = np.flatnonzero(np.random.default_rng([cfg.seed, cid, 0xC1]).random(len(shard)) < rate)
            assert len(batch) > 0
            load_adapter(params, {k: torch.from_numpy(v) for k, v in start.items()})
            ids, mask, labels = collate(shard, batch, torch.device("cpu"))
            clipped_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
            for i in range(len(batch)):  # each row as it is in the batch (same padding)
                model.zero_grad()
                F.cross_entropy(model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, labels[i : i + 1]).backward()
                norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params.values())))
                assert norm > 2 * clip  # the clip binds, so a missing one shows
                for k, p in params.items():
                    clipped_sum[k] += p.grad.double() * (clip / norm)
            residuals += [
                (start[k] - trained[k]).astype(np.float64).ravel() * (rate * len(shard)) / lr - clipped_sum[k].numpy().ravel() for k in sorted(params)
            ]
    residual_check(np.concatenate(residuals), sigma * clip)


def test_flasc_refuses_secure_aggregation_naming_the_key():
    with pytest.raises(ConfigError, match="^secagg.enabled: method flasc sends each client's top-k"):
        load_config(CONFIG_DIR / "tiny.yaml", ["method=flasc", "secagg.enabled=true"])


@pytest.mark.parametrize("distance", ["least_squares", "cosine"])
def test_lora_fair_under_secure_aggregation_corrects_the_decoded_mean_like_a_replay(tmp_path, distance):
    """Under SecAgg the server learns only the decoded weighted sum of the clients' messages (their
    deltas and each module's dense B_k A_k, masked). The mean it decodes must be the clients' plain
    weighted mean, replayed here from clients trained one by one, within the fixed-point encoding's
    worst case (conftest's bound, with the weights n_k / the largest client's n); and the adapter
    must be that mean with B corrected as the paper's objective says, solved here independently."""
    clip, bits, lam = 0.5, 16, 0.05
    cfg = tiny_config(
        tmp_path,
        "runtime=local",
        "rounds=1",
        "method=lora_fair",
        f"method_args.distance={distance}",
        f"method_args.lam={lam}",
        "secagg.enabled=true",
        f"secagg.clip_range={clip}",
        f"secagg.bits={bits}",
    )
    with Simulation(cfg) as sim:
        sampled = sim.backend.get(sim.server.sample.remote(1, cfg.clients.per_round))
        means = received_means(sim)
        row = sim.run_round()
        got, largest = sim.global_adapter(), max(sim.client_sizes)
    assert row["clients"] == len(sampled) and row["secagg_clipped"] == 0 and not row["secagg_aborted"]
    start, finals, sizes, _ = client_results(cfg, sampled)
    weights = np.array(sizes) / largest
    sent = [fair_message(start, f) for f in finals]
    plain = {k: sum(w * m[k] for w, m in zip(weights, sent)) / weights.sum() for k in sent[0]}
    (mean,) = means
    assert sorted(mean) == sorted(plain)
    assert row["uplink_bytes"] >= len(sampled) * sum(v.size for v in plain.values()) * bits / 8  # every value masked, products too
    for name, value in plain.items():
        bound = secagg_mean_error_bound(len(sampled), weights.sum(), value, clip, bits)
        assert np.all(np.abs(mean[name] - value) <= bound + 1e-9), name
    errors = np.concatenate([(mean[k] - plain[k]).ravel() for k in sorted(plain)])
    assert np.abs(errors).max() > 1e-7  # it did go through the encoding
    assert abs(errors.mean()) < 4 * errors.std() / math.sqrt(errors.size)  # whose stochastic rounding is unbiased
    assert_corrected_like_a_replay(got, start, mean, distance, lam)


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
        state = top_share(state, 0.25)
        assert sum(int(np.count_nonzero(v)) for v in state.values()) == math.ceil(0.25 * sum(v.size for v in state.values()))
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name].detach().numpy(), value)


def test_flasc_evaluates_the_adapter_clients_download_unless_asked_for_the_dense_one(tmp_path):
    """The authors' code evaluates the download-sparsified model; ``eval_dense`` evaluates the
    server's dense adapter (raysim before issue 43): same training, different evaluation."""
    sparse, _, _ = run(tmp_path / "sparse", "runtime=local", "method=flasc", rounds=1)
    dense, _, _ = run(tmp_path / "dense", "runtime=local", "method=flasc", "method_args.eval_dense=true", rounds=1)
    assert sparse[0]["train_loss"] == dense[0]["train_loss"]
    assert sparse[0]["eval_loss"] != dense[0]["eval_loss"]
