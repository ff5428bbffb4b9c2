"""LoRA-FAIR's correction and FLASC's sparse messages against independent numpy computations,
without Ray or a model."""

import math

import numpy as np
import pytest
import torch

from raysim.methods.common import lora_pairs
from raysim.methods.flasc import FLASC, sparse_nbytes, top_k_numpy, top_k_torch
from raysim.methods.flasc import Options as FLASCOptions
from raysim.methods.lora_fair import PRODUCT, LoRAFAIR, correction
from raysim.methods.lora_fair import Options as FAIROptions
from raysim.methods.protocol import ClientUpdate, RoundInput

D_OUT, D_IN, R = 12, 10, 4
A_KEY, B_KEY = "m.lora_A.default.weight", "m.lora_B.default.weight"
HEAD = "classifier.modules_to_save.default.weight"


def _factors(rng, n):
    """n clients' trained (A_k, B_k) around a shared start, as FedIT clients end a round."""
    a0, b0 = rng.normal(size=(R, D_IN)), 0.1 * rng.normal(size=(D_OUT, R))
    return a0, b0, [(a0 + 0.5 * rng.normal(size=a0.shape), b0 + rng.normal(size=b0.shape)) for _ in range(n)]


def _cos(x, y):
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_the_least_squares_correction_at_lambda_zero_is_the_least_squares_solution():
    """min_C ||ΔW - C Ā||_F is a linear least-squares problem in C's rows: numpy's lstsq solves it."""
    rng = np.random.default_rng(0)
    _, _, clients = _factors(rng, 5)
    p = rng.dirichlet(np.ones(5))
    delta_w = sum(pk * b @ a for pk, (a, b) in zip(p, clients))
    a_mean, b_mean = sum(pk * a for pk, (a, _) in zip(p, clients)), sum(pk * b for pk, (_, b) in zip(p, clients))
    best_c = np.linalg.lstsq(a_mean.T, delta_w.T, rcond=None)[0].T  # (Ā)ᵀ Cᵀ = ΔWᵀ
    got = correction(delta_w, a_mean, b_mean, distance="least_squares", lam=0.0, steps=500)
    np.testing.assert_allclose(b_mean + got, best_c, rtol=1e-6, atol=1e-8)
    assert np.linalg.norm(delta_w - (b_mean + got) @ a_mean) < 0.9 * np.linalg.norm(delta_w - b_mean @ a_mean)


def test_the_least_squares_correction_with_lambda_is_ridge_regression():
    """λ||ΔB||² is ridge regression on ΔB: the same least squares with √λ I rows appended."""
    rng = np.random.default_rng(1)
    _, _, clients = _factors(rng, 3)
    delta_w = sum(b @ a for a, b in clients) / 3
    a_mean, b_mean = sum(a for a, _ in clients) / 3, sum(b for _, b in clients) / 3
    lam = 0.3
    design = np.vstack([a_mean.T, np.sqrt(lam) * np.eye(R)])  # rows: Āᵀ ΔBᵀ ≈ (ΔW - B̄ Ā)ᵀ, √λ ΔBᵀ ≈ 0
    target = np.vstack([(delta_w - b_mean @ a_mean).T, np.zeros((R, D_OUT))])
    want = np.linalg.lstsq(design, target, rcond=None)[0].T
    np.testing.assert_allclose(correction(delta_w, a_mean, b_mean, "least_squares", lam, steps=500), want, rtol=1e-6, atol=1e-8)


def test_the_cosine_correction_raises_the_similarity_to_the_ideal_update():
    rng = np.random.default_rng(2)
    _, _, clients = _factors(rng, 6)
    delta_w = sum(b @ a for a, b in clients) / 6
    a_mean, b_mean = sum(a for a, _ in clients) / 6, sum(b for _, b in clients) / 6
    delta_b = correction(delta_w, a_mean, b_mean, "cosine", lam=0.0, steps=200)
    before, after = _cos(delta_w, b_mean @ a_mean), _cos(delta_w, (b_mean + delta_b) @ a_mean)
    best = _cos(delta_w, np.linalg.lstsq(a_mean.T, delta_w.T, rcond=None)[0].T @ a_mean)  # the best in Ā's row space
    assert before < 0.95 and after > before and after == pytest.approx(best, abs=1e-6)
    # λ pulls the correction toward zero, at some cost in similarity
    damped = correction(delta_w, a_mean, b_mean, "cosine", lam=1.0, steps=200)
    assert np.linalg.norm(damped) < np.linalg.norm(delta_b) and _cos(delta_w, (b_mean + damped) @ a_mean) > before


def test_lora_fairs_round_sums_products_and_starts_clients_from_the_corrected_mean():
    """Through the method as the runtime drives it: client messages (torch), their weighted mean,
    aggregate. A is the weighted mean; B is B̄ + ΔB with ΔB the lstsq solution; the uplink counts
    the factors and the head, not the products."""
    rng = np.random.default_rng(3)
    a0, b0, clients = _factors(rng, 4)
    head0 = rng.normal(size=(3, D_OUT))
    start = {A_KEY: a0, B_KEY: b0, HEAD: head0}
    weights = np.array([5.0, 1.0, 2.0, 8.0])
    method = LoRAFAIR(FAIROptions(distance="least_squares", lam=0.0, steps=500), lora_rank=R)
    state = method.init_server(start, {})
    summed = {k: np.zeros_like(v) for k, v in method.message_template(state).items()}
    heads = []
    for cid, ((a, b), w) in enumerate(zip(clients, weights)):
        heads.append(head0 + rng.normal(size=head0.shape))
        trained = {A_KEY: torch.from_numpy(a), B_KEY: torch.from_numpy(b), HEAD: torch.from_numpy(heads[-1])}
        message = method.client_message(ClientUpdate(cid, 1, 10, {k: torch.from_numpy(v) for k, v in start.items()}, trained), {})
        assert message.size() == sum(v.nbytes for v in start.values())
        for k, v in message.summable.items():
            summed[k] += w * v.numpy()
    new = method.aggregate(state, RoundInput(1, {k: v / weights.sum() for k, v in summed.items()}, float(weights.sum()))).adapter
    p = weights / weights.sum()
    a_mean = sum(pk * a for pk, (a, _) in zip(p, clients))
    delta_w = sum(pk * b @ a for pk, (a, b) in zip(p, clients))
    np.testing.assert_allclose(new[A_KEY], a_mean, rtol=1e-10)
    np.testing.assert_allclose(new[B_KEY], np.linalg.lstsq(a_mean.T, delta_w.T, rcond=None)[0].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(new[HEAD], sum(pk * h for pk, h in zip(p, heads)), rtol=1e-10)
    assert sorted(summed) == sorted([A_KEY, B_KEY, HEAD, "m" + PRODUCT]) and lora_pairs(new) == {"m": (A_KEY, B_KEY)}


def _sorted_top_k(values: dict, density: float) -> dict:
    """Top-k by sorting all magnitudes, independently of argpartition and torch.topk."""
    names = sorted(values)
    flat = np.concatenate([values[n].ravel() for n in names])
    k = max(1, math.ceil(density * flat.size))
    threshold = np.sort(np.abs(flat))[::-1][k - 1]
    return {n: np.where(np.abs(values[n]) >= threshold, values[n], 0) for n in names}


@pytest.mark.parametrize("density", [0.01, 0.25, 1.0])
def test_top_k_keeps_the_largest_magnitudes_over_all_tensors(density):
    rng = np.random.default_rng(4)
    values = {"a": rng.normal(size=(7, 9)), "b": 3 * rng.normal(size=(5,)), "c": rng.normal(size=(2, 3, 4))}
    want = _sorted_top_k(values, density)
    total = sum(v.size for v in values.values())
    got_np, k_np = top_k_numpy(values, density)
    got_torch, k_torch = top_k_torch({n: torch.from_numpy(v) for n, v in values.items()}, density)
    assert k_np == k_torch == max(1, math.ceil(density * total))
    for n in values:
        np.testing.assert_array_equal(got_np[n], want[n])
        np.testing.assert_array_equal(got_torch[n].numpy(), want[n])
    assert sum(int(np.count_nonzero(v)) for v in got_np.values()) == k_np


def test_sparse_messages_count_values_and_the_cheaper_of_indices_or_a_bitmap():
    assert sparse_nbytes(10, 1000) == 10 * 4 + 10 * 4  # 40 index bytes < a 125-byte bitmap
    assert sparse_nbytes(250, 1000) == 250 * 4 + 125  # a bitmap of 1000 bits is smaller
    assert sparse_nbytes(1, 9) == 4 + 2


def test_flasc_clients_send_a_top_k_and_keep_the_rest_with_error_feedback():
    """Three rounds of one client against a numpy replay: sent_t = topk(d_t + e_{t-1}),
    e_t = d_t + e_{t-1} - sent_t, so Σ sent_t + e_T = Σ d_t exactly."""
    rng = np.random.default_rng(5)
    method = FLASC(FLASCOptions(upload_density=0.1, error_feedback=True), lora_rank=R)
    state: dict = {}
    residual = {A_KEY: np.zeros((R, D_IN)), B_KEY: np.zeros((D_OUT, R))}
    sent_total = {k: np.zeros_like(v) for k, v in residual.items()}
    for round_idx in range(1, 4):
        start = {A_KEY: rng.normal(size=(R, D_IN)), B_KEY: rng.normal(size=(D_OUT, R))}
        trained = {k: v + rng.normal(size=v.shape) for k, v in start.items()}
        message = method.client_message(
            ClientUpdate(0, round_idx, 10, {k: torch.from_numpy(v) for k, v in start.items()}, {k: torch.from_numpy(v) for k, v in trained.items()}), state
        )
        carried = {k: trained[k] - start[k] + residual[k] for k in start}
        want = _sorted_top_k(carried, 0.1)
        residual = {k: carried[k] - want[k] for k in carried}
        for k in start:
            np.testing.assert_allclose(message.summable[k].numpy(), want[k], rtol=1e-12)
            np.testing.assert_allclose(state[k].numpy(), residual[k], rtol=1e-12, atol=1e-15)
            sent_total[k] += want[k]
        total = R * D_IN + D_OUT * R
        assert message.size() == sparse_nbytes(math.ceil(0.1 * total), total)
    without = FLASC(FLASCOptions(upload_density=0.1), lora_rank=R)
    plain_state: dict = {}
    without.client_message(ClientUpdate(0, 1, 10, {A_KEY: torch.zeros(R, D_IN)}, {A_KEY: torch.ones(R, D_IN)}), plain_state)
    assert plain_state == {}  # without error feedback a client keeps nothing


def test_flasc_downloads_the_top_k_of_the_dense_global_adapter_and_updates_the_dense_one():
    rng = np.random.default_rng(6)
    adapter = {A_KEY: rng.normal(size=(R, D_IN)), B_KEY: rng.normal(size=(D_OUT, R)), HEAD: rng.normal(size=(3, D_OUT))}
    method = FLASC(FLASCOptions(download_density=0.2), lora_rank=R)
    state = method.init_server(adapter, {})
    sent = method.broadcast(state)
    want = _sorted_top_k(adapter, 0.2)
    for k in adapter:
        np.testing.assert_array_equal(sent[k], want[k])
    total = sum(v.size for v in adapter.values())
    assert method.broadcast_bytes(state, sent, R) == sparse_nbytes(math.ceil(0.2 * total), total)
    mean = {k: rng.normal(size=v.shape) for k, v in adapter.items()}
    new = method.aggregate(state, RoundInput(1, mean, 3.0)).adapter
    for k in adapter:
        np.testing.assert_allclose(new[k], adapter[k] + mean[k])  # the dense adapter moves, not the sparse copy


@pytest.mark.parametrize(
    "cls, options",
    [(FAIROptions, {"distance": "l1"}), (FAIROptions, {"lam": -1.0}), (FAIROptions, {"steps": 0}), (FLASCOptions, {"upload_density": 0.0}), (FLASCOptions, {"download_density": 1.5})],
)
def test_out_of_range_options_are_refused_naming_the_option(cls, options):
    with pytest.raises(ValueError, match=f"^{next(iter(options))}: "):
        cls(**options)
