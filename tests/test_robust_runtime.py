"""server.aggregator through the runtime (in process, runtime=local): one round's global adapter
against the rule applied here, in numpy, to the clients' updates trained one by one."""

import numpy as np
import pytest

from raysim import Simulation

from conftest import client_results, secagg_mean_error_bound, tiny_config

SETTINGS = ["runtime=local", "clients.per_round=7", "train.local_steps=3", "eval.max_examples=20", "server.lr=0.5"]


def _deltas(start, finals):
    names = sorted(start)
    return names, np.stack([np.concatenate([(f[k].astype(np.float64) - start[k]).reshape(-1) for k in names]) for f in finals])


def _brute_force_krum_scores(deltas, f):
    n = len(deltas)
    return [sum(sorted(float(((deltas[i] - deltas[j]) ** 2).sum()) for j in range(n) if j != i)[: n - f - 2]) for i in range(n)]


def _brute_force_krum_choice(deltas, f):
    scores = _brute_force_krum_scores(deltas, f)
    return sorted(range(len(deltas)), key=lambda i: (scores[i], i))


def _expected_update(aggregator, deltas, weights):
    if aggregator == "median":
        return np.median(deltas, axis=0)
    if aggregator == "trimmed_mean":  # server.trim_fraction 0.2 of 7: one value off each end
        return np.sort(deltas, axis=0)[1:-1].mean(axis=0)
    if aggregator == "multi_krum":  # f = 1, m = 7 - 1
        return deltas[_brute_force_krum_choice(deltas, 1)[:6]].mean(axis=0)
    if aggregator == "norm_bound":  # each update scaled to norm <= 0.01, then the weighted mean
        norms = np.linalg.norm(deltas, axis=1, keepdims=True)
        clipped = deltas * np.minimum(1.0, 0.01 / norms)
        return (np.asarray(weights)[:, None] * clipped).sum(axis=0) / sum(weights)
    raise AssertionError(aggregator)


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "multi_krum", "norm_bound"])
def test_one_round_moves_the_adapter_by_the_rule_over_the_clients_updates(tmp_path, aggregator):
    cfg = tiny_config(tmp_path, *SETTINGS, f"server.aggregator={aggregator}", "server.trim_fraction=0.2", "server.norm_bound=0.01")
    with Simulation(cfg) as sim:
        sampled = sim.backend.get(sim.server.sample.remote(1, 7))
        sim.run_round()
        got = sim.global_adapter()
    start, finals, weights, _ = client_results(cfg, sampled)
    names, deltas = _deltas(start, finals)
    update = _expected_update(aggregator, deltas, weights)
    if aggregator == "norm_bound":
        assert np.linalg.norm(deltas, axis=1).min() > 0.01  # the bound binds for every client
    offset = 0
    for k in names:
        size = start[k].size
        expected = start[k] + 0.5 * update[offset : offset + size].reshape(start[k].shape)
        np.testing.assert_allclose(got[k], expected, rtol=1e-4, atol=1e-6, err_msg=k)
        offset += size


@pytest.mark.parametrize(
    "attack, aggregator, secure",
    [("sign_flip", "mean", False), ("scale", "norm_bound", False), ("scale", "norm_bound", True)],
)
def test_malicious_clients_poison_their_update_and_skip_norm_bound_only_under_secagg(tmp_path, attack, aggregator, secure):
    """A third of the clients attack. Expected: the weighted mean of the honest updates and the
    attackers' poisoned ones, each clipped under norm_bound (by the server), except the attackers'
    under SecAgg, where each client clips its own and they skip it. The update_norm column is the
    median of the clients' norms before any of that, and attackers_norm_ratio the attackers' mean
    norm over the honest clients', also before the attack boosts it."""
    from raysim.attacks import malicious_clients

    cfg = tiny_config(
        tmp_path,
        *SETTINGS,
        f"attack.kind={attack}",
        "attack.fraction=0.3",
        "attack.scale=5",
        f"server.aggregator={aggregator}",
        "server.norm_bound=0.01",
        f"secagg.enabled={secure}",
        "secagg.clip_range=1.0",
        "secagg.bits=24",
    )
    with Simulation(cfg) as sim:
        sampled = sim.backend.get(sim.server.sample.remote(1, 7))
        row = sim.run_round()
        got = sim.global_adapter()
    attackers = set(malicious_clients(cfg.seed, cfg.clients.num, 0.3))
    assert attackers & set(sampled) and set(sampled) - attackers
    start, finals, weights, _ = client_results(cfg, sampled)
    names, deltas = _deltas(start, finals)
    norms = np.linalg.norm(deltas, axis=1)
    assert row["update_norm"] == pytest.approx(np.median(norms), rel=1e-4)
    malicious = np.array([c in attackers for c in sampled])
    assert row["attackers_norm_ratio"] == pytest.approx(norms[malicious].mean() / norms[~malicious].mean(), rel=1e-4)
    assert norms.min() > 0.01  # norm_bound binds for every client
    for i, c in enumerate(sampled):
        if c in attackers:
            deltas[i] *= -1.0 if attack == "sign_flip" else 5.0
        if aggregator == "norm_bound" and not (secure and c in attackers):
            deltas[i] *= 0.01 / np.linalg.norm(deltas[i])
    update = (np.asarray(weights)[:, None] * deltas).sum(axis=0) / sum(weights)
    if secure:
        assert row["secagg_clipped"] == 0
        relative = np.asarray(weights) / max(weights)
    offset = 0
    for k in names:
        size = start[k].size
        mean = update[offset : offset + size].reshape(start[k].shape)
        tolerance = 0.5 * secagg_mean_error_bound(len(sampled), relative.sum(), mean, 1.0, 24) if secure else 1e-4 * np.abs(start[k] + 0.5 * mean)
        assert np.all(np.abs(got[k] - (start[k] + 0.5 * mean)) <= tolerance + 1e-6), k
        offset += size


@pytest.mark.parametrize("aggregator, keep", [("krum", 1), ("multi_krum", 6), ("median", None)])
def test_the_metrics_count_the_sampled_attackers_and_those_krum_kept(tmp_path, aggregator, keep):
    """attackers: the malicious clients among the round's senders; attackers_kept: those among the
    updates Krum or Multi-Krum averaged, and attackers_score_ratio: their mean Krum score over the
    honest senders', here against a brute-force Krum over the poisoned updates (boosted 3x, so
    close enough to the honest ones that Multi-Krum keeps some)."""
    from raysim.attacks import malicious_clients

    cfg = tiny_config(tmp_path, *SETTINGS, "attack.kind=scale", "attack.fraction=0.3", "attack.scale=3", f"server.aggregator={aggregator}")
    with Simulation(cfg) as sim:
        sampled = sim.backend.get(sim.server.sample.remote(1, 7))
        row = sim.run_round()
    attackers = [i for i, c in enumerate(sampled) if c in set(malicious_clients(cfg.seed, cfg.clients.num, 0.3))]
    assert row["attackers"] == len(attackers) > 0
    if keep is None:
        assert "attackers_kept" not in row and "attackers_score_ratio" not in row
        return
    start, finals, _, _ = client_results(cfg, sampled)
    _, deltas = _deltas(start, finals)
    deltas[attackers] *= 3.0
    kept = _brute_force_krum_choice(deltas, 1)[:keep]
    assert row["attackers_kept"] == len(set(kept) & set(attackers))
    scores = np.asarray(_brute_force_krum_scores(deltas, 1))
    honest = [i for i in range(len(sampled)) if i not in attackers]
    assert row["attackers_score_ratio"] == pytest.approx(scores[attackers].mean() / scores[honest].mean(), rel=1e-4)


def test_a_backdoor_run_reports_its_success_each_evaluation(tmp_path):
    cfg = tiny_config(tmp_path, "runtime=local", "rounds=2", "train.local_steps=2", "eval.max_examples=40", "attack.kind=backdoor", "attack.fraction=0.3")
    with Simulation(cfg) as sim:
        rows = [sim.run_round() for _ in range(2)]
        final = sim.evaluate()
        sim.write_summary(final)
    assert all(0 <= r["attack_success"] <= 1 for r in rows) and 0 <= final["attack_success"] <= 1
    assert (tmp_path / "run" / "summary.json").read_text().count("final_attack_success") == 1


def test_a_backdoor_at_fraction_zero_trains_as_a_clean_run_and_measures_the_base_rate(tmp_path):
    rows = {}
    for kind in ("sign_flip", "backdoor"):
        cfg = tiny_config(tmp_path / kind, "runtime=local", "rounds=1", "train.local_steps=2", "eval.max_examples=40", f"attack.kind={kind}", "attack.fraction=0")
        with Simulation(cfg) as sim:
            rows[kind] = sim.run_round()
    assert "attack_success" not in rows["sign_flip"] and 0 <= rows["backdoor"]["attack_success"] <= 1
    for key in ("train_loss", "eval_loss", "eval_accuracy", "update_norm"):
        assert rows["backdoor"][key] == rows["sign_flip"][key], key
