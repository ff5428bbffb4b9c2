"""The aggregation math against independent computations, without Ray or a model."""

import numpy as np
import pytest

from raysim.methods import METHODS, method_class
from raysim.methods.common import apply_step, lora_pairs, lora_products, relative_aggregation_error, seeded_lora_a, server_step, sketch_matrix
from raysim.methods.ffa_lora import FFALoRA
from raysim.methods.lora import LoRA
from raysim.methods.protocol import NoOptions, RoundInput

D_OUT, D_IN, R = 12, 10, 4
A_KEY, B_KEY = "m.lora_A.default.weight", "m.lora_B.default.weight"
HEAD = "classifier.modules_to_save.default.weight"


def _clients(rng, n, train_a):
    shared_a = rng.normal(size=(R, D_IN))
    start = {B_KEY: np.zeros((D_OUT, R)), HEAD: rng.normal(size=(3, D_OUT))}
    if train_a:
        start[A_KEY] = shared_a
    finals = []
    for _ in range(n):
        final = {k: v + rng.normal(size=v.shape) for k, v in start.items()}
        finals.append(final)
    return shared_a, start, finals


def _aggregate(cls, start, finals, weights):
    """The method's server step on the weighted mean delta, as the server hands it over."""
    method = cls(NoOptions(), lora_rank=R)
    mean = {k: sum(w * (f[k] - start[k]) for f, w in zip(finals, weights)) / sum(weights) for k in start}
    return method.aggregate(method.init_server(start, {}), RoundInput(1, mean, sum(weights))).adapter


def test_ffa_lora_aggregate_equals_weighted_mean_of_client_products():
    rng = np.random.default_rng(0)
    shared_a, start, finals = _clients(rng, 5, train_a=False)
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    new = _aggregate(FFALoRA, start, finals, weights)
    expected = sum(w * f[B_KEY] @ shared_a for f, w in zip(finals, weights)) / sum(weights)
    np.testing.assert_allclose(new[B_KEY] @ shared_a, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new[HEAD], sum(w * f[HEAD] for f, w in zip(finals, weights)) / sum(weights))


def test_lora_aggregate_is_inexact_and_the_error_matches_an_independent_computation():
    rng = np.random.default_rng(1)
    _, start, finals = _clients(rng, 4, train_a=True)
    weights = [1.0, 2.0, 3.0, 4.0]
    new = _aggregate(LoRA, start, finals, weights)
    np.testing.assert_allclose(new[A_KEY], sum(w * f[A_KEY] for f, w in zip(finals, weights)) / 10)
    exact = sum(w * f[B_KEY] @ f[A_KEY] for f, w in zip(finals, weights)) / 10
    averaged = new[B_KEY] @ new[A_KEY]
    independent = np.linalg.norm(exact - averaged) / np.linalg.norm(exact)
    assert independent > 0.05
    error = relative_aggregation_error({"m": exact}, lora_products(new))
    assert error == pytest.approx(independent, rel=1e-12)


@pytest.mark.parametrize("lr, momentum", [(1.0, 0.0), (0.5, 0.7)])
def test_server_momentum_matches_its_unrolled_form(lr, momentum):
    rng = np.random.default_rng(2)
    updates = [{"x": rng.normal(size=4)} for _ in range(5)]
    state, buffer = {"x": np.zeros(4)}, None
    for update in updates:
        step, buffer = server_step(update, buffer, lr, momentum)
        state = apply_step(state, step)
    # after n rounds the state moved by lr * sum_t sum_{i<=t} momentum^(t-i) u_i
    expected = lr * sum(sum(momentum ** (t - i) * updates[i]["x"] for i in range(t + 1)) for t in range(5))
    np.testing.assert_allclose(state["x"], expected, rtol=1e-12)
    if momentum == 0.0:
        np.testing.assert_allclose(state["x"], sum(u["x"] for u in updates))


def test_methods_choose_what_they_train():
    lora, ffa = LoRA(NoOptions(), lora_rank=R).adapter(0), FFALoRA(NoOptions(), lora_rank=R).adapter(3)
    assert lora.trains(A_KEY) and lora.trains(B_KEY) and lora.trains(HEAD) and lora.rank == R
    assert not ffa.trains(A_KEY) and ffa.trains(B_KEY) and ffa.trains(HEAD)
    assert method_class("ffa_lora") is FFALoRA and sorted(METHODS) == ["fed_sb", "ffa_lora", "flasc", "flora", "hetlora", "lora", "lora_fair"]
    with pytest.raises(ValueError, match="'fedavg' is not one of lora, ffa_lora"):
        method_class("fedavg")


def test_server_momentum_through_the_method_matches_its_unrolled_form():
    method = LoRA(NoOptions(), lora_rank=R, server_lr=0.5, server_momentum=0.7)
    rng = np.random.default_rng(3)
    updates = [{"x": rng.normal(size=4)} for _ in range(4)]
    state = method.init_server({"x": np.zeros(4)}, {})
    for t, update in enumerate(updates):
        state = method.aggregate(state, RoundInput(t + 1, update, 1.0))
    expected = 0.5 * sum(sum(0.7 ** (t - i) * updates[i]["x"] for i in range(t + 1)) for t in range(4))
    np.testing.assert_allclose(state.adapter["x"], expected, rtol=1e-12)
    assert method.aggregate(state, RoundInput(5, None, 0.0)) is state  # no client arrived: nothing moves


@pytest.mark.parametrize("rank", [1, 8])
def test_the_sketched_aggregation_error_is_within_its_stated_bound(rank):
    """The diagnostic's sketch against the exact dense error, over many rounds' sketches: its
    relative deviation averages about zero and stays within 3 / sqrt(columns) (3 standard deviations
    of the worst case that sketch_matrix's docstring derives)."""
    rng = np.random.default_rng(4)
    d_out, d_in, columns = 48, 40, 32
    mean_product = rng.normal(size=(d_out, rank)) @ rng.normal(size=(rank, d_in))
    averaged = mean_product + 0.3 * rng.normal(size=(d_out, 1)) @ rng.normal(size=(1, d_in))
    exact = relative_aggregation_error({"m": mean_product}, {"m": averaged})
    deviations = []
    for round_idx in range(200):
        s = sketch_matrix("m", d_in, columns, seed=0, round_idx=round_idx).astype(np.float64)
        deviations.append(relative_aggregation_error({"m": mean_product @ s}, {"m": averaged @ s}) / exact - 1)
    assert abs(np.mean(deviations)) < 0.05
    assert np.max(np.abs(deviations)) < 3 / np.sqrt(columns)
    assert sketch_matrix("m", d_in, 0, 0, 1) is None
    np.testing.assert_array_equal(sketch_matrix("m", d_in, columns, 0, 1), sketch_matrix("m", d_in, columns, 0, 1))


def test_lora_pairs_match_a_with_b():
    assert lora_pairs([A_KEY, B_KEY, HEAD, "x.lora_A.default.weight"]) == {"m": (A_KEY, B_KEY)}


def test_seeded_a_depends_only_on_seed_and_name():
    a = seeded_lora_a("layer.0.q.lora_A.default.weight", (8, 384), seed=5)
    assert a.dtype == np.float32
    assert np.array_equal(a, seeded_lora_a("layer.0.q.lora_A.default.weight", (8, 384), seed=5))
    assert not np.array_equal(a, seeded_lora_a("layer.0.q.lora_A.default.weight", (8, 384), seed=6))
    assert not np.array_equal(a, seeded_lora_a("layer.1.q.lora_A.default.weight", (8, 384), seed=5))
    bound = 1 / np.sqrt(384)
    assert np.abs(a).max() <= bound and a.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
