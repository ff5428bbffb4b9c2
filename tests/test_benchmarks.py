"""Benchmarks run as a quick smoke test on tiny sizes; no timing is asserted."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_time_measures_tiny():
    result = _load("round_time").measure("tiny", rounds=2, overrides=["train.local_steps=2"])
    assert result["config"] == "tiny" and result["per_round"] == 4 and result["local_steps"] == 2
    assert result["round_s"] > 0 and result["client_steps_per_s"] > 0 and result["startup_s"] > 0


def test_dp_step_measures_tiny_with_and_without_dp():
    results = _load("dp_step").measure("tiny", "ffa_lora", steps=2, overrides=[])
    assert [r["mode"] for r in results] == ["none", "hooks", "ghost"]
    assert all(r["step_ms"] > 0 for r in results) and results[0]["vs_no_dp"] == 1.0


def test_secagg_benchmark_verifies_its_sums_on_small_sizes(tmp_path):
    out = tmp_path / "secagg.json"
    assert _load("secagg").main(["--clients", "10", "20", "--values", "500", "--dropout", "0.1", "--json", str(out)]) == 0
    results = __import__("json").loads(out.read_text())["results"]
    assert [(r["clients"], r["neighbors"]) for r in results] == [(10, "all"), (10, 4), (20, "all"), (20, 6)]
    assert all(r["verified"] and r["dropped"] == round(0.1 * r["clients"]) for r in results)


def test_overhead_runs_the_same_work_in_both_loops():
    result = _load("overhead").measure(clients=10, rounds=1, overrides=["clients.per_round=4", "train.local_steps=2", "data.max_rows=2000"])
    assert result["raysim_s"] > 0 and result["bare_s"] > 0 and result["ratio"] > 0
    assert result["max_adapter_difference"] < 1e-6 < 1e-3 < result["max_adapter_change"]  # same work, and it did something
    assert set(result["round_breakdown_s"]) >= {"aggregation (server call)", "scheduling and serialization (the rest)"}
