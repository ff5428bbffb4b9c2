"""Privacy math without Ray: accounting against Opacus' accountants, clipping against independent
per-example gradients, central DP noise, and the driver's budget."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from opacus.accountants import PRVAccountant, RDPAccountant

from raysim.config import CONFIG_DIR, ConfigError, PrivacyConfig, load_config
from raysim.model import build_model, trainable_parameters
from raysim.privacy.accounting import RDP_ORDERS, epsilon, resolve_accountant, solve_noise_multiplier
from raysim.privacy import skellam
from raysim.privacy.budget import BudgetExhausted, ClientPrivacy, PrivacyBudget
from raysim.privacy.central_dp import clip_update, noisy_mean, poisson_clients, update_norm
from raysim.privacy.local_dp import DPSGD, plan_noise, poisson_batch, sample_rate
from raysim.training import ClientData, collate

from conftest import tiny_config

HISTORIES = [
    [(1.1, 0.01, 100)],
    [(0.8, 0.05, 30), (1.3, 0.02, 70)],
    [(2.0, 1.0, 5)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_epsilon_equals_opacus_rdp_accountant(history):
    assert RDP_ORDERS == RDPAccountant.DEFAULT_ALPHAS
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


# (noise multiplier, sample rate, steps): central DP's and local DP-SGD's settings from issue 43's
# review, many small steps, full batches, and a long run at a high rate.
SETTINGS = [(1.0718, 0.1, 10), (3.662, 16 / 34, 10), (1.0, 0.01, 1000), (20.0, 1.0, 5), (0.9, 0.5, 200)]


def _microsoft_prv(sigma: float, q: float, steps: int) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon at delta 1e-5 from Microsoft's prv-accountant, a library
    raysim does not call."""
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant as MicrosoftPRV

    mechanism = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    accountant = MicrosoftPRV(prvs=[mechanism], max_self_compositions=[steps], eps_error=0.01, delta_error=1e-10)
    return accountant.compute_epsilon(delta=1e-5, num_self_compositions=[steps])


@pytest.mark.parametrize("sigma, q, steps", SETTINGS)
def test_the_default_accountant_is_within_1_percent_of_an_independent_tight_one(sigma, q, steps):
    low, estimate, high = _microsoft_prv(sigma, q, steps)
    got = epsilon([(sigma, q, steps)], 1e-5, resolve_accountant(PrivacyConfig.accountant))
    assert got == pytest.approx(estimate, rel=0.01) and low <= got <= high


@pytest.mark.parametrize("sigma, q, steps", SETTINGS[:3])
def test_rdp_equals_dp_accountings_rdp_and_is_looser_than_the_default(sigma, q, steps):
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import RdpAccountant

    reference = RdpAccountant().compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps).get_epsilon(1e-5)
    rdp = epsilon([(sigma, q, steps)], 1e-5, "rdp")
    assert rdp == pytest.approx(reference, rel=1e-3)
    assert rdp > 1.1 * epsilon([(sigma, q, steps)], 1e-5, "pld")


def test_a_history_of_several_noise_levels_composes_like_the_independent_accountant():
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant as MicrosoftPRV

    history = [(0.8, 0.05, 30), (1.3, 0.02, 70), (0.8, 0.05, 20)]
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=0.05, noise_multiplier=0.8),
            PoissonSubsampledGaussianMechanism(sampling_probability=0.02, noise_multiplier=1.3)]
    accountant = MicrosoftPRV(prvs=prvs, max_self_compositions=[50, 70], eps_error=0.01, delta_error=1e-10)
    low, estimate, high = accountant.compute_epsilon(delta=1e-5, num_self_compositions=[50, 70])
    got = epsilon(history, 1e-5, "pld")
    assert got == pytest.approx(estimate, rel=0.01) and low <= got <= high


@pytest.mark.parametrize("q, steps, target", [(0.1, 10, 3.0), (16 / 34, 10, 1.0), (0.02, 500, 2.0)])
def test_the_pld_solve_finds_the_least_noise_for_the_target_by_the_independent_accountant(q, steps, target):
    sigma = solve_noise_multiplier(target, 1e-5, q, steps, "pld")
    assert _microsoft_prv(sigma, q, steps)[0] <= target  # within the target by its lower bound
    assert _microsoft_prv(sigma * 0.99, q, steps)[1] > target  # 1% less noise would not be
    assert sigma < solve_noise_multiplier(target, 1e-5, q, steps, "rdp")  # the tighter bound buys less noise


def test_prv_epsilon_equals_opacus_prv_accountant():
    accountant = PRVAccountant()
    accountant.history = list(HISTORIES[1])
    assert epsilon(HISTORIES[1], 1e-5, "prv") == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_with_steps_and_is_zero_before_any():
    spent = [epsilon([(1.0, 0.05, steps)], 1e-5) for steps in (0, 1, 10, 100)]
    assert spent[0] == 0 and all(a < b for a, b in zip(spent, spent[1:]))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_solved_noise_reaches_the_target_without_exceeding_it(accountant):
    sigma = solve_noise_multiplier(3.0, 1e-5, 0.05, 200, accountant)
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    reference.history = [(sigma, 0.05, 200)]
    spent = reference.get_epsilon(1e-5)
    assert 2.7 < spent <= 3.0


def test_an_unreachable_target_is_an_error():
    with pytest.raises(ValueError, match="too low"):
        solve_noise_multiplier(1e-4, 1e-9, 1.0, 10**6)


def test_planned_noise_keeps_every_client_within_the_target_with_few_solves():
    sizes = [17, 40, 41, 45, 300, 301, 1000, 5]
    sigmas = plan_noise(sizes, batch_size=16, steps=50, target_epsilon=4.0, delta=1e-5, accountant="rdp")
    for n, sigma in zip(sizes, sigmas):
        assert 3.0 < epsilon([(sigma, sample_rate(n, 16), 50)], 1e-5) <= 4.0
    assert sigmas[1] == sigmas[2] and len(set(sigmas)) < len(sizes)  # 40 and 41 share a rate cell
    assert sigmas[-1] == max(sigmas)  # the smallest client samples at rate 1: the most noise


def test_poisson_sampling_rates():
    rng = np.random.default_rng(0)
    sizes = [len(poisson_batch(rng, 1000, 0.05)) for _ in range(400)]
    assert abs(np.mean(sizes) - 50) < 2 and np.std(sizes) > 3
    chosen = [len(poisson_clients(rng, 200, 0.1)) for _ in range(400)]
    assert abs(np.mean(chosen) - 20) < 1.5


def test_clip_update_bounds_the_norm_over_all_tensors():
    gen = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(4, 8, generator=gen), "b": torch.randn(3, generator=gen)}
    norm = float(torch.sqrt(sum((t**2).sum() for t in update.values())))
    clipped, before = clip_update(update, 0.5)
    assert before == pytest.approx(norm) and update_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    for k in update:  # same direction
        assert torch.allclose(clipped[k] * norm / 0.5, update[k], atol=1e-5)
    unchanged, _ = clip_update(update, 2 * norm)
    assert all(torch.equal(unchanged[k], update[k]) for k in update)


def test_noisy_mean_adds_the_calibrated_noise():
    total = {"w": np.full((400, 500), 3.0, np.float32)}
    exact = noisy_mean(total, 0.0, 1.0, 4.0, np.random.default_rng(0))
    np.testing.assert_allclose(exact["w"], 0.75)
    noisy = noisy_mean(total, 2.0, 0.5, 4.0, np.random.default_rng(0))
    residual = noisy["w"] - 0.75
    assert noisy["w"].dtype == np.float32
    assert abs(residual.mean()) < 0.005 and residual.std() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.01)


def _batch(n=6, width=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, width, n).astype(np.int32)
    ids = np.zeros((n, width), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(1000, 2000, length)
    return ClientData(ids, lengths, rng.integers(0, 3, n))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("method", ["ffa_lora", "lora"])
def test_dp_sgd_clips_each_example_like_an_independent_computation(tmp_path, mode, method):
    """With zero noise, Opacus' gradient must equal sum_i g_i * min(1, C/|g_i|) / B, where each g_i
    is computed here by its own backward pass on an identical model."""
    # No dropout (attention dropout included), so separate forward passes compute the same function.
    no_dropout = ["model.config_overrides.hidden_dropout_prob=0", "model.config_overrides.attention_probs_dropout_prob=0"]
    cfg = tiny_config(tmp_path, f"method={method}", *no_dropout)
    data, clip, expected_batch = _batch(), 0.05, 4.0
    reference = build_model(cfg, 3)
    ref_params = trainable_parameters(reference)
    clipped_sum = {k: torch.zeros_like(p) for k, p in ref_params.items()}
    ids, mask, labels = collate(data, np.arange(len(data)), torch.device("cpu"))
    for i in range(len(data)):  # each row exactly as it is in the batch (same padding)
        reference.zero_grad()
        F.cross_entropy(reference(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, labels[i : i + 1]).backward()
        norm = float(torch.sqrt(sum((p.grad**2).sum() for p in ref_params.values())))
        factor = min(1.0, clip / norm)
        assert norm > clip  # clipping is active, so the test can fail
        for k, p in ref_params.items():
            clipped_sum[k] += p.grad * factor

    model = build_model(cfg, 3)
    params = trainable_parameters(model)
    dp = DPSGD(model, torch.optim.SGD(list(params.values()), lr=0.0), clip, mode)
    dp.set_client(0.0, expected_batch, torch.Generator().manual_seed(0))
    dp.optimizer.zero_grad()
    dp.loss(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
    dp.optimizer.pre_step()  # clip, add noise, scale: leaves the private gradient in .grad
    got = torch.cat([p.grad.flatten() for p in params.values()])
    expected = torch.cat([clipped_sum[k].flatten() for k in params]) / expected_batch
    assert float((got - expected).norm() / expected.norm()) < 1e-4


def test_dp_sgd_noise_moves_every_trained_tensor_in_train_mode(tmp_path):
    model = build_model(tiny_config(tmp_path), 3)
    params = trainable_parameters(model)
    before = {k: p.detach().clone() for k, p in params.items()}
    dp = DPSGD(model, torch.optim.SGD(list(params.values()), lr=0.1), 1.0)
    dp.set_client(1.0, 4.0, torch.Generator().manual_seed(0))
    ids, mask, labels = collate(_batch(), np.arange(6), torch.device("cpu"))
    dp.optimizer.zero_grad()
    dp.loss(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
    dp.optimizer.step()
    assert all(not torch.equal(before[k], p) for k, p in params.items())


def _privacy(**values):
    """The privacy section with the schema's defaults, RDP unless ``values`` say otherwise."""
    return OmegaConf.merge(OmegaConf.structured(PrivacyConfig), {"max_grad_norm": 1.0, "clip_norm": 0.1, "accountant": "rdp", **values})


def test_central_budget_stops_before_the_round_that_would_exceed_it():
    budget = PrivacyBudget(_privacy(mode="central_dp", target_epsilon=2.0), [50] * 100, rounds=10, local_steps=5, batch_size=8, per_round=10)
    spent = []
    for _ in range(10):
        budget.check_next_round(100)
        budget.record_round({})
        spent.append(budget.epsilon)
    reference = RDPAccountant()
    reference.history = [(budget.noise_multiplier, 0.1, 10)]
    assert spent[-1] == pytest.approx(reference.get_epsilon(1e-5)) and spent[-1] <= 2.0
    assert all(a < b for a, b in zip(spent, spent[1:]))
    with pytest.raises(BudgetExhausted):
        budget.check_next_round(100)


def _distributed(**values):
    privacy = _privacy(mode="distributed_dp", accountant="auto", clip_norm=1.0, **values)
    budget = PrivacyBudget(privacy, [30] * 50, rounds=6, local_steps=2, batch_size=8, per_round=10, secagg=OmegaConf.create({"bits": 20, "dropout_rate": 0.0}))
    budget.fit_message(300)
    return budget


def test_distributed_budget_accounts_each_client_against_the_server_over_its_own_unmasked_rounds():
    budget = _distributed(target_epsilon=8.0, client_rounds=2)
    plan = budget.skellam
    assert skellam.server_epsilon(plan, 2, 1e-5) <= 8.0 < skellam.server_epsilon(plan, 3, 1e-5)  # planned for 2 of its own rounds
    assert budget.record_round({}, released=[0, 1, 2]) == []
    assert budget.record_round({}, released=[0, 3]) == [0]  # a third round would take client 0 over
    budget.record_round({}, released=[])  # an aborted round: nothing unmasked, nothing spent against the server
    rows = {r["client"]: r for r in budget.client_rows(8)}
    assert [rows[c]["participations"] for c in range(5)] == [2, 1, 1, 1, 0]
    assert rows[0]["epsilon_server"] == skellam.server_epsilon(plan, 2, 1e-5) and rows[4]["epsilon_server"] == 0.0
    assert rows[0]["exhausted"] and budget.exhausted == {0}
    assert budget.epsilon == budget.epsilon_server == rows[0]["epsilon_server"]
    # The observer's number is the run's, amplified, over every round noised (aborted ones too).
    assert budget.columns()["epsilon_observer"] == skellam.observer_epsilon(plan, 3, 1e-5) < budget.epsilon
    summary = budget.summary()
    assert summary["adversary"] == "server" and summary["participations_max"] == 2 and "zeroed" in summary["neighbours"]
    budget.check_next_round(50)  # 49 clients left


def test_distributed_budget_planned_for_an_observer_says_so_and_stops_rounds_not_clients():
    budget = _distributed(target_epsilon=3.0, adversary="observer")
    assert skellam.observer_epsilon(budget.skellam, 6, 1e-5) <= 3.0
    for _ in range(6):
        budget.check_next_round(50)
        assert budget.record_round({}, released=list(range(10))) == []
    assert budget.epsilon == budget.columns()["epsilon_observer"] < budget.columns()["epsilon_server"]
    assert "OBSERVER OF THE RELEASED ADAPTERS ONLY" in budget.describe() and budget.summary()["adversary"] == "observer"
    assert budget.whom().startswith("against an observer of the released adapters only, not the server; neighbours: ")
    with pytest.raises(BudgetExhausted):
        budget.check_next_round(50)


@pytest.mark.parametrize("mode, adversary, message", [
    ("central_dp", "server", "central_dp trusts the server"),
    ("local_dp_sgd", "observer", "already holds against the server"),
    ("distributed_dp", "anyone", "not one of server, observer"),
])
def test_an_adversary_the_mode_cannot_promise_is_refused(tmp_path, mode, adversary, message):
    extra = ["secagg.enabled=true"] if mode == "distributed_dp" else []
    with pytest.raises(ConfigError, match=f"privacy.adversary: .*{message}"):
        tiny_config(tmp_path, f"privacy.mode={mode}", "privacy.target_epsilon=3", "privacy.clip_norm=0.1", f"privacy.adversary={adversary}", *extra)


@pytest.mark.parametrize("mode, adversary", [("central_dp", "null"), ("distributed_dp", "observer")])
def test_a_per_client_budget_is_refused_where_the_run_is_accounted_as_a_whole(tmp_path, mode, adversary):
    with pytest.raises(ConfigError, match="privacy.client_rounds: only a per-client budget has it"):
        tiny_config(tmp_path, f"privacy.mode={mode}", "privacy.target_epsilon=3", "privacy.clip_norm=0.1", f"privacy.adversary={adversary}",
                    "privacy.client_rounds=2", "secagg.enabled=true")


def test_local_budget_excludes_exhausted_clients_and_reports_the_largest_epsilon():
    budget = PrivacyBudget(_privacy(mode="local_dp_sgd", target_epsilon=3.0), [40, 80], rounds=4, local_steps=5, batch_size=8, per_round=1)
    newly = budget.record_round({0: ClientPrivacy([(1.0, 0.2, 5)], epsilon=2.5, exhausted=True, trained=True),
                                 1: ClientPrivacy([(1.0, 0.1, 5)], epsilon=1.0, exhausted=False, trained=True)})
    assert newly == [0] and budget.exhausted == {0} and budget.epsilon == 2.5
    assert [r["steps"] for r in budget.client_rows(8)] == [5, 5]
    # The rates come from the histories, not from the batch size asked now (16 would give 0.4, 0.2).
    assert [(r["sample_rate"], r["sample_rates"]) for r in budget.client_rows(16)] == [(0.2, [0.2]), (0.1, [0.1])]
    budget.record_round({1: ClientPrivacy([(1.0, 0.1, 5), (1.0, 0.2, 5)], epsilon=1.2, exhausted=False, trained=True)})
    assert budget.client_rows(16)[1]["sample_rates"] == [0.1, 0.2] and budget.client_rows(16)[1]["sample_rate"] == 0.2
    budget.record_round({1: ClientPrivacy([(1.0, 0.1, 10)], epsilon=1.5, exhausted=True, trained=True)})
    with pytest.raises(BudgetExhausted):
        budget.check_next_round(2)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["privacy.mode=local_dp_sgd", "privacy.target_epsilon=0", "privacy.max_grad_norm=1"], "privacy.target_epsilon"),
        (["privacy.mode=local_dp_sgd", "privacy.target_epsilon=-1", "privacy.max_grad_norm=1"], "privacy.target_epsilon"),
        (["privacy.mode=central_dp", "privacy.target_epsilon=3", "privacy.clip_norm=0.1", "privacy.target_delta=1"], "privacy.target_delta"),
        (["privacy.mode=central_dp", "privacy.target_epsilon=3", "privacy.clip_norm=0.1", "privacy.target_delta=0"], "privacy.target_delta"),
        (["privacy.mode=central_dp", "privacy.target_epsilon=3"], "privacy.clip_norm"),
        (["privacy.mode=local_dp_sgd", "privacy.target_epsilon=3"], "privacy.max_grad_norm"),
        (["privacy.mode=local_dp_sgd", "privacy.max_grad_norm=1"], "privacy.target_epsilon"),
        (["privacy.mode=dp"], "privacy.mode"),
        (["privacy.mode=central_dp", "privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.accountant=gdp"], "privacy.accountant"),
    ],
)
def test_bad_privacy_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "tiny.yaml", overrides)
    assert str(err.value).startswith(key)


def test_the_default_accountant_falls_back_to_rdp_where_the_noise_is_too_small_for_its_grid():
    """sigma 0.01 would need ~1e10 grid points: RDP's bound (also an upper bound) is reported."""
    assert epsilon([(0.01, 0.1, 10)], 1e-5, "pld") == epsilon([(0.01, 0.1, 10)], 1e-5, "rdp") > 100
