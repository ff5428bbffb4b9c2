"""Benchmarks run as a quick smoke test on tiny sizes; no timing is asserted."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import ray

from raysim.config import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("ray_session")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    """Import a benchmark as running it would: its directory first on sys.path, for its shared modules."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
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
    results = json.loads(out.read_text())["results"]
    assert [(r["clients"], r["neighbors"]) for r in results] == [(10, "all"), (10, 4), (20, "all"), (20, 6)]
    assert all(r["verified"] and r["dropped"] == round(0.1 * r["clients"]) for r in results)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_overhead_runs_the_same_work_in_both_loops(request, task):
    small = ["clients.per_round=4", "train.local_steps=2"]
    if task == "classification":
        result = _load("overhead").measure(clients=10, rounds=1, overrides=[*small, "data.max_rows=2000"])
    else:  # a config's own workload, as --config gives it
        lm = [o for o in request.getfixturevalue("tiny_lm") if not o.startswith("clients.")]
        result = _load("overhead").measure(clients=6, rounds=1, overrides=[*lm, *small, "train.optimizer=sgd", "train.lr=0.5"], config=CONFIG_DIR / "tiny.yaml")
    assert result["raysim_s"] > 0 and result["bare_s"] > 0 and result["ratio"] > 0
    assert result["max_adapter_difference"] < 1e-6 < 1e-3 < result["max_adapter_change"]  # same work, and it did something
    assert set(result["round_breakdown_s"]) >= {"aggregation (server call)", "scheduling and serialization (the rest)"}


@pytest.mark.long
@pytest.mark.skipif(not os.environ.get("RAYSIM_LONG"), reason="starts a Ray of its own per size: about 25 s on 2 CPU cores; set RAYSIM_LONG=1")
def test_throughput_compares_worker_counts(tmp_path):
    out = tmp_path / "throughput.json"
    args = ["--configs", "tiny", "--rounds", "2", "--workers", "1", "2", "--json", str(out), "train.local_steps=1"]
    ray.shutdown()  # round_time.py starts its own Ray, with as many CPUs as the most workers asked for
    try:
        assert _load("round_time").main(args) == 0
    finally:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    results = json.loads(out.read_text())["results"]
    assert [r["workers"] for r in results] == [1, 2] and all(r["client_steps_per_s"] > 0 for r in results)


@pytest.mark.long
@pytest.mark.skipif(not os.environ.get("RAYSIM_LONG"), reason="starts a Ray of its own per size: about 25 s on 2 CPU cores; set RAYSIM_LONG=1")
def test_scale_reports_memory_per_client(tmp_path):
    out = tmp_path / "scale.json"
    assert _load("scale").main(["--clients", "20", "60", "--per-round", "5", "--json", str(out), "data.max_rows=3000"]) == 0
    r = json.loads(out.read_text())
    assert [x["clients"] for x in r["results"]] == [20, 60] and all(x["trained"] == x["clients"] for x in r["results"])
    assert all(x["round_s_at"]["5"] > 0 for x in r["results"])
    assert all(x["peak_bytes"] >= x["steady_bytes"] * 0.5 > 0 for x in r["results"]) and r["bound_per_client"] > 0


def test_scale_repeats_the_tweets_only_past_the_clients_they_give_a_row_each(tmp_path):
    import pyarrow.parquet as pq

    from raysim.config import tweets_path
    from raysim.data.loading import read_table

    scale = _load("scale")
    assert scale.tiled_tweets(scale.TWEETS_FOR_CLIENTS, str(tmp_path)) == []
    (override,) = scale.tiled_tweets(2 * scale.TWEETS_FOR_CLIENTS + 1, str(tmp_path))
    key, path = override.split("=", 1)
    assert key == "data.path" and pq.read_metadata(path).num_rows == 3 * read_table(tweets_path()).num_rows


def test_flower_peer_runs_both_sides_on_a_small_workload(tmp_path):
    pytest.importorskip("flwr", reason="the Flower peer needs the optional bench extra: pip install -e '.[bench]'")
    out = tmp_path / "peer.json"
    assert _load("flower_peer").main(["--clients", "10", "--rounds", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for side in ("raysim", "flower"):
        assert len(r[side]["round_s"]) == 2 and r[side]["end_to_end_s"] > r[side]["startup_s"] > 0
        assert r[side]["adapter_norm"] > 0


def test_clients_per_batch_benchmark_trains_the_same_adapters_for_every_k(tmp_path):
    out = tmp_path / "per_batch.json"
    args = ["--configs", "tiny", "--per-batch", "1", "2", "--clients", "4", "--device", "cpu", "--json", str(out)]
    assert _load("clients_per_batch").main([*args, "train.local_steps=2", "train.optimizer=sgd", "train.lr=0.1"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["clients_per_batch"] for r in rows] == [1, 2] and all(r["client_steps_per_s"] > 0 for r in rows)
    assert rows[1]["max_difference_from_one_at_a_time"] < 1e-6 < 1e-4 < rows[1]["max_change"]


@pytest.mark.long
@pytest.mark.skipif(not os.environ.get("RAYSIM_LONG"), reason="starts a Ray of its own per size: about 25 s on 2 CPU cores; set RAYSIM_LONG=1")
def test_startup_reports_ray_start_and_the_floor_apart(tmp_path):
    out = tmp_path / "startup.json"
    assert _load("startup").main(["--clients", "10", "--repeats", "1", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    (run,) = result["runs"]
    (floor,) = result["floor_runs"]
    assert result["clients"] == 10 and run["ready_s"] > run["ray_start_s"] > 0
    assert run["beyond_ray_s"] == run["ready_s"] - run["ray_start_s"]
    assert floor["ready_s"] > floor["ray_start_s"] > 0
    assert result["raysim_own_s"] == run["beyond_ray_s"] - floor["beyond_ray_s"]
    assert result["ray_start_extra_s"] == run["ray_start_s"] - floor["ray_start_s"]


def test_methods_benchmark_reports_each_methods_costs(tmp_path):
    out = tmp_path / "methods.json"
    assert _load("methods").main(["--configs", "tiny", "--methods", "ffa_lora", "flasc", "fedit-hetero", "--rounds", "1", "--rank-steps", "1", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    rows = {r["method"]: r for r in saved["results"]}
    assert rows["fedit-hetero"]["uplink_bytes_per_client"] < 4 * rows["fedit-hetero"]["adapter_values"]  # ranks below lora.rank send fewer slots
    assert sorted(r["rank"] for r in saved["rank_steps"]) == [2, 4, 8]
    assert rows["flasc"]["uplink_bytes_per_client"] < 0.5 * 4 * rows["flasc"]["adapter_values"]  # density 0.25, values plus positions
    assert rows["ffa_lora"]["uplink_bytes_per_client"] == 4 * rows["ffa_lora"]["adapter_values"]
    assert all(r["client_ms_per_step"] > 0 and r["server_ms_per_round"] > 0 for r in rows.values())
