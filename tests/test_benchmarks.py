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
