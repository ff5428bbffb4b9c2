"""privacy.mode=distributed_dp through the runtime (in process, runtime=local): the round's update
against the clients' clipped updates trained here one by one, its noise against the plan, the
reported epsilon, the noise floor the clients enforce, and resume."""

import json
import math

import numpy as np
import pytest

from safetensors.numpy import load_file

from raysim import Simulation
from raysim.cli import main
from raysim.config import CONFIG_DIR, UserError
from raysim.privacy import skellam
from raysim.privacy.budget import PrivacyBudget
from raysim.runtime.outputs import format_row
from raysim.state_codec import decode, encode

from conftest import client_results, tiny_config

DDP = [
    "runtime=local",
    "privacy.mode=distributed_dp",
    "privacy.target_epsilon=3",
    "privacy.clip_norm=0.1",
    "secagg.enabled=true",
    "clients.num=40",
    "clients.per_round=10",
    "train.local_steps=3",
    "eval.max_examples=20",
    "server.lr=0.5",
]


def test_one_round_is_the_clipped_sum_plus_skellam_noise_of_the_planned_size(tmp_path):
    cfg = tiny_config(tmp_path, *DDP, "rounds=1")
    with Simulation(cfg) as sim:
        sampled = sim.backend.get(sim.server.sample.remote(1, 10))
        row = sim.run_round()
        got, plan = sim.global_adapter(), sim.budget.skellam
        summary = json.loads(sim.write_summary(sim.evaluate()).read_text())["privacy"]
        clients = sim.client_privacy().to_pylist()
        with pytest.raises(UserError, match="clients.per_round: under distributed_dp the sampling rate is part of the privacy plan"):
            sim.set_clients(per_round=5)
    assert row["clients"] == len(sampled) >= plan.min_clients and not row["secagg_aborted"]
    start, finals, _, _ = client_results(cfg, sampled)
    names = sorted(start)
    deltas = np.stack([np.concatenate([(f[k].astype(np.float64) - start[k]).reshape(-1) for k in names]) for f in finals])
    norms = np.linalg.norm(deltas, axis=1, keepdims=True)
    assert norms.min() > 0.1  # the clip binds for every client
    clipped_sum = (deltas * np.minimum(1.0, 0.1 / norms)).sum(axis=0)
    # global = start + server.lr x (sum + noise) / (q N): the fixed denominator of DP-FedAvg.
    moved = np.concatenate([(got[k].astype(np.float64) - start[k]).reshape(-1) for k in names])
    residual = moved / 0.5 * (plan.sample_rate * 40) - clipped_sum
    planned = 2 * plan.mu * len(sampled) / plan.min_clients / plan.scale**2  # rounding adds < n/4 / gamma^2: 1e-7 of it
    assert residual.size == plan.dim and plan.padded == 1 << math.ceil(math.log2(plan.dim))
    assert abs(residual.var() / planned - 1) < 0.15  # over ~2,000 values: 4 standard errors
    assert abs(residual.mean()) < 4 * math.sqrt(planned / residual.size)
    assert row["ddp_noise_std"] == pytest.approx(math.sqrt(planned) / (plan.sample_rate * 40))
    # Against the server (the default): each sender's one unmasked round, unamplified; against an
    # observer of the adapters: the round, amplified by sampling.
    assert row["epsilon"] == row["epsilon_server"] == pytest.approx(skellam.server_epsilon(plan, 1, 1e-5), rel=1e-12)
    assert row["epsilon_observer"] == pytest.approx(skellam.observer_epsilon(plan, 1, 1e-5), rel=1e-12)
    assert f"eps {row['epsilon_server']:.3f} vs server, {row['epsilon_observer']:.3f} vs observer" in format_row(row, 1)
    assert summary["adversary"] == "server" and summary["epsilon_server"] == row["epsilon_server"]
    assert [c["client"] for c in clients if c["participations"] == 1] == sorted(sampled)
    assert all(c["participations"] == 0 and c["epsilon_server"] == 0 for c in clients if c["client"] not in sampled)
    assert summary["mode"] == "distributed_dp" and summary["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    assert summary["gaussian_equivalent_epsilon"] < summary["epsilon"]  # the general subsampling bound is looser


def test_clients_do_not_unmask_a_round_with_fewer_senders_than_the_noise_needs(tmp_path, caplog):
    cfg = tiny_config(tmp_path, *DDP, "rounds=1", "privacy.min_clients=40")
    with Simulation(cfg) as sim:
        before = {k: v.copy() for k, v in sim.global_adapter().items()}
        row = sim.run_round()
        after = sim.global_adapter()
    assert row["secagg_aborted"] and row["clients"] == 0
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert "fewer than the 40 whose noise shares make the planned distributed DP noise" in caplog.text


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    tiny = str(CONFIG_DIR / "tiny.yaml")
    # A fixed noise multiplier: a plan for a target epsilon depends on the rounds planned.
    common = [*DDP, "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "checkpoint.every=1"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["run", tiny, f"output_dir={whole}", "rounds=2", *common, "--quiet"]) == 0
    assert main(["run", tiny, f"output_dir={part}", "rounds=1", *common, "--quiet"]) == 0
    assert main(["run", tiny, f"resume={part}", "rounds=2", *common, "--quiet"]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, part))
    assert a["privacy"] == b["privacy"] and a["privacy"]["rounds_noised"] == 2
    assert a["final_eval_accuracy"] == b["final_eval_accuracy"] and a["final_eval_loss"] == b["final_eval_loss"]
    x, y = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (whole, part))
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_a_checkpointed_budget_keeps_its_plan_through_json(tmp_path):
    """A resumed run keeps the noise it promised, even where a new plan would differ (more rounds)."""
    cfg = tiny_config(tmp_path, *DDP)
    budget = PrivacyBudget(cfg.privacy, [80] * 40, rounds=3, local_steps=3, batch_size=16, per_round=10, secagg=cfg.secagg)
    budget.fit_message(2253)
    budget.record_round({}, released=[3, 7])
    tree, arrays = encode(budget.state_dict())
    saved = decode(json.loads(json.dumps(tree)), arrays)  # as a checkpoint writes and reads it
    longer = PrivacyBudget(cfg.privacy, [80] * 40, rounds=30, local_steps=3, batch_size=16, per_round=10, secagg=cfg.secagg)
    longer.load_state_dict(saved)
    longer.fit_message(2253)
    assert longer.skellam == budget.skellam and longer.epsilon == budget.epsilon > 0
    assert longer.participations == {3: 1, 7: 1} and longer.columns() == budget.columns()


@pytest.mark.parametrize("bits", [20, 32])
def test_with_little_noise_a_distributed_round_moves_the_adapter_as_a_central_one(tmp_path, bits):
    """The same clipped sum through rotation, rounding, masking and decoding as in the clear: an
    ordering or weighting slip would show here, where noise would hide it in the variance test."""
    common = [*DDP, "rounds=1", "privacy.target_epsilon=null", "privacy.noise_multiplier=0.000001"]
    moved = {}
    for mode, extra in (("central_dp", ["secagg.enabled=false"]), ("distributed_dp", [f"secagg.bits={bits}"])):
        with Simulation(tiny_config(tmp_path / mode, *common, f"privacy.mode={mode}", *extra)) as sim:
            start = {k: v.copy() for k, v in sim.global_adapter().items()}
            sim.run_round()
            moved[mode] = np.concatenate([(v - start[k]).ravel() for k, v in sorted(sim.global_adapter().items())])
    central, distributed = moved["central_dp"], moved["distributed_dp"]
    # Noise of 1e-6 x clip 0.1 per coordinate of the sum, / q N = 10, x server.lr 0.5: ~2e-7 over
    # the 2,243 values, against a move of ~0.02; rounding at 20 bits adds less.
    assert np.linalg.norm(distributed - central) < 1e-4 * np.linalg.norm(central)
