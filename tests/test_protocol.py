"""The method protocol and the local runtime: today's metrics reproduced, Ray against the
Ray-free local runtime over several rounds, and methods written outside raysim."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysim import ConfigError, Simulation
from raysim.config import CONFIG_DIR, load_config

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from record_metrics import COLUMNS, METHODS, SETTINGS, overrides  # noqa: E402

SEED_COMMITMENT_BYTES = 32  # SHA-256
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "metrics_3_rounds.json").read_text())


def run(tmp_path, *args, rounds=None):
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", *args])
    with Simulation(cfg) as sim:
        sim.run(rounds, progress=False)
        return sim.metrics.to_pylist(), sim.global_adapter(), sim.backend.get([w.export_states.remote() for w in sim.workers])


def assert_rows_close(got, want, rtol, columns=COLUMNS):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in columns:
            if not np.isfinite(w[k]):
                assert str(g[k]) == str(w[k]), k  # inf (no privacy) or nan (not measured) on both
            else:
                assert g[k] == pytest.approx(w[k], rel=rtol, abs=1e-12), (k, g["round"])


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", METHODS)
def test_the_protocol_reproduces_the_metrics_of_the_code_before_it(tmp_path, method, setting):
    """tests/fixtures/metrics_3_rounds.json was recorded on main before the method protocol, with
    FedIT and FFA-LoRA as hard-wired code paths (tests/fixtures/record_metrics.py)."""
    rows, adapter, _ = run(tmp_path, "runtime=local", *overrides(method, setting))
    want = FIXTURE[f"{method}/{setting}"]
    if setting == "secagg":  # since then each client's advertised message also commits to its self-mask seed
        want = {**want, "rows": [{**r, "uplink_bytes": r["uplink_bytes"] + SEED_COMMITMENT_BYTES * (r["clients"] + r["dropped"])} for r in want["rows"]]}
    assert_rows_close(rows, want["rows"], rtol=1e-6)
    assert sorted(adapter) == sorted(want["adapter_sq_norms"])
    flip = _encoding_flip(load_config(CONFIG_DIR / "tiny.yaml", overrides(method, setting)))
    for name, sq_norm in want["adapter_sq_norms"].items():
        got = float(np.sum(np.asarray(adapter[name], np.float64) ** 2))
        assert abs(got - sq_norm) <= 1e-6 * sq_norm + 2 * np.sqrt(sq_norm) * flip + flip**2, name


def _encoding_flip(cfg) -> float:
    """How far the adapter may move, in norm, when the recording machine's kernels and this one's
    differ in a last bit that carries a client's weighted value across a rounding boundary of
    SecAgg's fixed-point encoding: such a flip moves the decoded mean by one step 2c / (2^bits - 1)
    at most (the weights are at most 1 and sum to at least 1); allowed once per client per round,
    in different coordinates. 0 without SecAgg, where SGD keeps kernel differences at rounding."""
    if not cfg.secagg.enabled:
        return 0.0
    flips = cfg.rounds * cfg.clients.per_round
    return float(np.sqrt(flips) * 2 * cfg.secagg.clip_range / (2**cfg.secagg.bits - 1))


RAY_VS_LOCAL = {
    "lora-momentum-rebalanced": ["method=lora", "clients.num=12", "clients.per_round=6", "server.momentum=0.9"],
    "ffa_lora-local_dp": ["method=ffa_lora", "server.momentum=0.5", *SETTINGS["local_dp_sgd"]],
    "ffa_lora-secagg-sgd": ["method=ffa_lora", "train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.05", *SETTINGS["secagg"]],
    "toy_residual": ["method=toy_residual", "method_args.step=0.002", "clients.num=12", "clients.per_round=6"],
    "lora_fair-central_dp": ["method=lora_fair", *SETTINGS["central_dp"]],
    "flasc-error_feedback": ["method=flasc", "method_args.error_feedback=true", "clients.num=12", "clients.per_round=6"],
    "fed_sb": ["method=fed_sb", "lora.rank=4", "data.public_rows=64"],
    "flora-ranks-local_dp": ["method=flora", "clients.ranks=[8,4,2]", *SETTINGS["local_dp_sgd"]],
    "hetlora-ranks-secagg": ["method=hetlora", "clients.ranks={8: 0.3, 4: 0.3, 2: 0.4}", "method_args.weighting=examples", *SETTINGS["secagg"], "secagg.clip_range=1.0"],
}


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("case", list(RAY_VS_LOCAL))
def test_ray_equals_the_local_runtime_over_several_rounds(tmp_path, case):
    """Four rounds with AdamW moments (or SGD momentum), server momentum, clients moved between
    workers, DP noise streams and secure aggregation: the Ray runtime against the one without Ray."""
    args = [*RAY_VS_LOCAL[case], "rounds=4", "eval.aggregation_error=true"]
    ray_rows, ray_adapter, ray_states = run(tmp_path / "ray", "runtime=ray", *args)
    local_rows, local_adapter, local_states = run(tmp_path / "local", "runtime=local", *args)
    assert_rows_close(ray_rows, local_rows, rtol=1e-5, columns=(*COLUMNS, "aggregation_error"))
    for name, value in local_adapter.items():
        np.testing.assert_allclose(ray_adapter[name], value, rtol=1e-5, atol=1e-7)
    merged = [{c: s for states in run_states for c, s in states.items()} for run_states in (ray_states, local_states)]
    assert sorted(merged[0]) == sorted(merged[1])
    for cid, state in merged[1].items():
        assert merged[0][cid]["rng"] == state["rng"] and merged[0][cid]["cursor"] == state["cursor"]


# SGD where two methods are compared: its steps are linear in the gradient, so float rounding
# stays float rounding (AdamW's division by tiny second moments can amplify it to 1e-4).
SGD = ("runtime=local", "train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9")


def test_a_method_in_its_own_file_changes_what_clients_send(tmp_path):
    """tests/toy_residual.py: B rounded to a grid, the rest kept by the client for its next round."""
    _, coarse, states = run(tmp_path / "coarse", *SGD, "method=toy_residual", "method_args.step=0.002")
    _, fine, _ = run(tmp_path / "fine", *SGD, "method=toy_residual", "method_args.step=1e-9")
    _, ffa, _ = run(tmp_path / "ffa", *SGD, "method=ffa_lora")
    b_names = [k for k in ffa if ".lora_B." in k]
    for name in ffa:
        np.testing.assert_allclose(fine[name], ffa[name], rtol=1e-5, atol=1e-8)  # a grid this fine changes nothing
    assert max(float(np.abs(coarse[k] - ffa[k]).max()) for k in b_names) > 1e-4
    residuals = [s["method_state"] for worker in states for s in worker.values() if s["method_state"]]
    assert residuals, "clients keep their residual between rounds"
    for residual in residuals:
        assert sorted(residual) == sorted(k for k in ffa)
        assert all(np.abs(r).max() <= 0.001 + 1e-7 for r in residual.values())  # rounding leaves at most half a step


def test_a_per_client_method_gets_each_message_and_refuses_what_would_reveal_them(tmp_path):
    _, per_client, _ = run(tmp_path / "pc", *SGD, "method=toy_per_client")
    _, ffa, _ = run(tmp_path / "ffa", *SGD, "method=ffa_lora")
    for name in ffa:
        np.testing.assert_allclose(per_client[name], ffa[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="secagg.enabled: method toy_per_client aggregates each client's own message"):
        load_config(CONFIG_DIR / "tiny.yaml", ["method=toy_per_client", "secagg.enabled=true"])
    with pytest.raises(ConfigError, match="privacy.mode: method toy_per_client"):
        load_config(CONFIG_DIR / "tiny.yaml", ["method=toy_per_client", *SETTINGS["central_dp"]])


@pytest.mark.parametrize(
    "override, message",
    [
        ("method=fedavg", "method: 'fedavg' is not one of lora, ffa_lora, lora_fair, flasc, fed_sb, hetlora, flora"),
        ("method=no_such_module.x", "method: 'no_such_module.x' is not a method of raysim and cannot be imported"),
        ("method_args.step=1", "method_args.step: not an option of method ffa_lora (its options: none)"),
        ("runtime=threads", "runtime: 'threads' is not one of ray, local"),
        ("eval.aggregation_error=maybe", "eval.aggregation_error: must be true, false or 'auto'"),
    ],
)
def test_method_and_runtime_keys_are_checked(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "tiny.yaml", [override])
    assert str(err.value).startswith(message)


def test_a_methods_options_are_checked_like_every_other_key():
    with pytest.raises(ConfigError, match=r"^method_args.stp: not an option of method toy_residual \(its options: step\)"):
        load_config(CONFIG_DIR / "tiny.yaml", ["method=toy_residual", "method_args.stp=1"])
    with pytest.raises(ConfigError, match="step: -1.0 must be > 0"):
        load_config(CONFIG_DIR / "tiny.yaml", ["method=toy_residual", "method_args.step=-1"])
    with pytest.raises(ConfigError, match="method_args.step"):
        load_config(CONFIG_DIR / "tiny.yaml", ["method=toy_residual", "method_args.step=abc"])


def test_the_cli_runs_the_local_runtime_without_ray(tmp_path):
    probe = "import sys; from raysim.cli import main; code = main(sys.argv[1:]); print('RAY_IMPORTED', 'ray' in sys.modules); sys.exit(code)"
    args = ["run", "configs/tiny.yaml", "runtime=local", "rounds=2", f"output_dir={tmp_path / 'out'}", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=CONFIG_DIR.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 2/2" in proc.stderr and "RAY_IMPORTED False" in proc.stdout
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def _method_states(sim) -> dict:
    return {c: s["method_state"] for states in sim.backend.get([w.export_states.remote() for w in sim.workers]) for c, s in states.items()}


@pytest.mark.usefixtures("ray_session")
def test_a_clients_method_state_survives_its_workers_restart(tmp_path):
    """The driver keeps a reference to each client's newest method state, so a worker restarted
    by Ray gets its clients' residuals back (its optimizer moments and data order start over)."""
    cfg = load_config(
        CONFIG_DIR / "tiny.yaml",
        [f"output_dir={tmp_path / 'run'}", "method=toy_residual", "method_args.step=0.002", "clients.per_round=10", "worker.rebalance=false"],
    )
    with Simulation(cfg) as sim:
        sim.run_round()
        before = _method_states(sim)
        on_worker0 = sim.worker_clients[0]
        os.kill(sim.backend.get(sim.workers[0].ready.remote()).pid, signal.SIGKILL)
        row = sim.run_round()  # worker 0 is found dead, restarted by Ray and loaded again
        assert row["dropped"] == len(on_worker0)
        after = sim.backend.get(sim.workers[0].export_states.remote())
    assert sorted(after) == on_worker0
    for cid in on_worker0:
        assert before[cid] and sorted(after[cid]["method_state"]) == sorted(before[cid])
        for name, value in before[cid].items():
            np.testing.assert_array_equal(after[cid]["method_state"][name], value)


@pytest.mark.parametrize(
    "method",
    [("method=toy_residual", "method_args.step=0.002"), ("method=flasc", "method_args.error_feedback=true"), ("method=flora", "clients.ranks=[8,4,2]")],
    ids=["toy_residual", "flasc", "flora-ranks"],
)
def test_a_resumed_run_with_method_state_equals_the_uninterrupted_one(tmp_path, method):
    args = [*SGD, *method, "checkpoint.every=2"]
    whole = load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'whole'}", "rounds=4", *args])
    part = load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'part'}", "rounds=2", *args])
    with Simulation(whole) as sim:
        sim.run(progress=False)
        want, want_states = sim.global_adapter(), _method_states(sim)
    with Simulation(part) as sim:
        sim.run(progress=False)
    resumed = load_config(CONFIG_DIR / "tiny.yaml", [f"resume={tmp_path / 'part'}", "rounds=4", *args])
    with Simulation(resumed) as sim:
        assert sim.round == 2
        sim.run(progress=False)
        got, got_states = sim.global_adapter(), _method_states(sim)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert sorted(got_states) == sorted(want_states) and any(want_states.values()) == ("flora" not in method[0])  # FLoRA keeps none
    for cid, state in want_states.items():
        assert sorted(got_states[cid]) == sorted(state) and all(np.array_equal(got_states[cid][k], v) for k, v in state.items())
