"""The Ray runtime on configs/tiny.yaml, checked against computations made here without Ray."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysim import Simulation, UserError
from raysim.config import CONFIG_DIR

from conftest import expected_round, round_killing_a_worker, tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.mark.parametrize("method, server_lr", [("ffa_lora", 1.0), ("lora", 0.5)])
def test_one_round_equals_an_independent_fedavg(tmp_path, method, server_lr):
    # The exact products (no sketch), and for FFA-LoRA the diagnostic it skips by default.
    cfg = tiny_config(tmp_path, f"method={method}", f"server.lr={server_lr}", "server.momentum=0.9", "eval.aggregation_error=true", "eval.aggregation_sketch=0")
    with Simulation(cfg) as sim:
        sampled = __import__("ray").get(sim.server.sample.remote(1, cfg.clients.per_round))
        row = sim.run_round()
        got = sim.global_adapter()
    expected, error = expected_round(cfg, sampled)
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-6)
    assert row["clients"] == cfg.clients.per_round and row["dropped"] == 0
    if method == "ffa_lora":
        assert not any(".lora_A." in k for k in got)
        assert row["aggregation_error"] < 1e-5
    else:
        assert any(".lora_A." in k for k in got)
        assert row["aggregation_error"] > 1e-4
        assert row["aggregation_error"] == pytest.approx(error, rel=1e-2)


def test_outputs_and_adapter_load_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = tiny_config(tmp_path, "rounds=2", "train.lr_decay=0.5")
    with Simulation(cfg) as sim:
        sim.run(2, progress=False)
        final = sim.evaluate()
        adapter_dir = sim.save_adapter()
        state = sim.global_adapter()
        summary = sim.write_summary(final)
    out = tmp_path / "run"
    table = pq.read_table(out / "metrics.parquet")
    need = {"round", "clients", "train_loss", "eval_loss", "eval_accuracy", "uplink_bytes", "downlink_bytes", "wall_s"}
    assert need <= set(table.column_names) and table.column("round").to_pylist() == [1, 2]
    assert table.column("lr").to_pylist() == pytest.approx([cfg.train.lr, cfg.train.lr * 0.5])
    sent = sum(v.nbytes for v in state.values())
    assert table.column("uplink_bytes").to_pylist() == [cfg.clients.per_round * sent] * 2
    assert 0 <= final["eval_accuracy"] <= 1 and final["eval_examples"] > cfg.eval.max_examples
    assert "ffa_lora" in (out / "config.yaml").read_text() and summary.exists()

    torch.manual_seed(cfg.seed)
    base_cfg = AutoConfig.from_pretrained(cfg.model.name_or_path, num_labels=3, **cfg.model.config_overrides)
    base = AutoModelForSequenceClassification.from_config(base_cfg)
    loaded = PeftModel.from_pretrained(base, adapter_dir)
    loaded_params = dict(loaded.named_parameters())
    for name, value in state.items():
        np.testing.assert_array_equal(loaded_params[name].detach().numpy(), value)


def test_same_seed_same_run(tmp_path):
    runs = []
    for i in range(2):
        with Simulation(tiny_config(tmp_path / str(i), "rounds=2", "eval.every=5")) as sim:
            sim.run(2, progress=False)
            runs.append((sim.metrics.column("train_loss").to_pylist(), sim.global_adapter()))
            accuracy = sim.metrics.column("eval_accuracy").to_pylist()
            assert np.isnan(accuracy[0]) and np.isfinite(accuracy[1]), "evaluated on schedule, and after the last round"
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.parametrize("privacy", [[], ["privacy.mode=local_dp_sgd", "privacy.noise_multiplier=0.8", "privacy.max_grad_norm=1.0"]])
def test_rebalancing_moves_clients_without_changing_the_run(tmp_path, privacy):
    """Clients moved between workers to even out rounds take their optimizer moments, data order and
    accountant with them: the run equals one where every client stays on its first worker. Moving
    clients regroups the workers' float32 partial sums, so the two runs differ by rounding: SGD
    with momentum keeps that rounding (AdamW can amplify it past any fixed tolerance)."""
    results = {}
    sgd = ("train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.05")
    for rebalance in (False, True):
        cfg = tiny_config(tmp_path / str(rebalance), "clients.num=12", "clients.per_round=6", "rounds=4", f"worker.rebalance={rebalance}", *sgd, *privacy)
        with Simulation(cfg) as sim:
            owners = dict(sim.client_worker)
            sim.run(progress=False)
            results[rebalance] = (sim.global_adapter(), sim.metrics, sim.client_privacy(), owners != sim.client_worker)
    (sticky, sticky_rows, sticky_eps, _), (moved, moved_rows, moved_eps, clients_moved) = results[False], results[True]
    assert clients_moved
    for k in sticky:
        np.testing.assert_allclose(moved[k], sticky[k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(moved_rows.column("train_loss").to_numpy(), sticky_rows.column("train_loss").to_numpy(), rtol=1e-4)
    assert moved_eps.to_pylist() == sticky_eps.to_pylist()


def test_clients_trained_together_give_the_run_of_clients_trained_one_at_a_time(tmp_path):
    """train.clients_per_batch puts a worker's clients through one forward pass, grouped by batch
    size (some of these Dirichlet clients have fewer rows than a batch); without dropout the run is
    the same as one client at a time."""
    runs = {}
    for per_batch in (1, 3):
        cfg = tiny_config(
            tmp_path / str(per_batch),
            "clients.num=30",
            "clients.per_round=12",
            "rounds=2",
            "train.optimizer=sgd",
            "train.lr=0.1",
            "model.config_overrides.hidden_dropout_prob=0",
            "model.config_overrides.attention_probs_dropout_prob=0",
            f"train.clients_per_batch={per_batch}",
        )
        with Simulation(cfg) as sim:
            sizes = sim.client_sizes
            sim.run(progress=False)
            runs[per_batch] = (sim.global_adapter(), sim.metrics.column("train_loss").to_numpy())
    assert min(sizes) < cfg.train.batch_size <= max(sizes)
    (alone, alone_loss), (together, together_loss) = runs[1], runs[3]
    assert max(float(np.abs(alone[k]).max()) for k in alone if ".lora_B." in k) > 1e-4  # B starts at zero; 100x the tolerance below
    for k in alone:
        np.testing.assert_allclose(together[k], alone[k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(together_loss, alone_loss, rtol=1e-5)


def test_existing_output_dir_is_not_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.parquet").write_text("keep me")
    with pytest.raises(UserError, match="output_dir"):
        Simulation(tiny_config(tmp_path))
    assert (tmp_path / "run" / "metrics.parquet").read_text() == "keep me"


def test_a_worker_killed_mid_round_drops_its_clients_not_the_run(tmp_path):
    import ray

    cfg = tiny_config(tmp_path, "clients.per_round=10", "train.local_steps=2")
    with Simulation(cfg) as sim:
        on_worker0 = len(sim.worker_clients[0])
        result = round_killing_a_worker(sim, 0)
        assert result["dropped"] == on_worker0 and result["clients"] == 10 - on_worker0
        assert np.isfinite(result["train_loss"])
        after = sim.run_round()
        assert after["clients"] == 10 and after["dropped"] == 0  # restarted by Ray, data handed again
        sim.set_clients(per_round=3)
        assert sim.run_round()["clients"] == 3
        with pytest.raises(UserError, match="clients.per_round: 11 is not between 1 and clients.num"):
            sim.set_clients(per_round=11)
        assert ray.get(sim.workers[0].ready.remote()).pid != result["killed_pid"]


def test_a_thousand_clients_fit(tmp_path):
    """Issue 5's scale check (tiny.yaml's Dirichlet split: 3,200 examples over 1,000 clients)."""
    cfg = tiny_config(tmp_path, "clients.num=1000", "clients.per_round=50", "train.local_steps=1")
    with Simulation(cfg) as sim:
        row = sim.run_round()
    assert row["clients"] == 50 and row["dropped"] == 0


def test_cli_runs_tiny_end_to_end(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "raysim", "run", "configs/tiny.yaml", "rounds=2", f"output_dir={out}", "--quiet"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 2/2" in proc.stderr and "final test accuracy" in proc.stderr
    assert pq.read_table(out / "metrics.parquet").num_rows == 2
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "summary.json").exists()


_MONITOR_PROBE = """
import json, ray
from raysim.runtime.cluster import stop_autoscaler_monitor
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
monitor = ray._private.worker._global_node.all_processes["monitor"][0].process
alive = monitor.poll() is None
stop_autoscaler_monitor()
print(json.dumps({"alive_before": alive, "exit_code": monitor.wait(timeout=30), "ray_up": ray.is_initialized()}))
ray.shutdown()
"""


def test_a_ray_started_here_has_its_autoscaler_monitor_stopped_before_shutdown():
    """In a fresh process, as `raysim run` starts Ray: the monitor goes while Ray is still up."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", _MONITOR_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["alive_before"] and probe["exit_code"] is not None and probe["ray_up"]


_DRIVER_MODULES = """
import sys
from raysim import Simulation, load_config
cfg = load_config("configs/tiny.yaml", sys.argv[1:])
with Simulation(cfg) as sim:
    owners = dict(sim.client_worker)
    sim.run(progress=False)
    sim.save_checkpoint()
    sim.write_summary(sim.evaluate())
    sim.save_adapter()
    moved = owners != sim.client_worker
print(moved, sorted(m for m in ("torch", "transformers", "peft", "opacus") if m in sys.modules))
"""


def test_the_driver_never_imports_torch(tmp_path):
    """Workers import torch, transformers and PEFT; the driver must not, or at start-up its imports
    compete with theirs for the CPUs (and its exit takes longer). A whole run as `raysim run`
    makes it, with clients moved between workers and a checkpoint."""
    args = ["clients.num=12", "clients.per_round=6", "rounds=4", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-c", _DRIVER_MODULES, *args], capture_output=True, text=True, cwd=CONFIG_DIR.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True []"
    assert "tokenizing again with AutoTokenizer" not in proc.stderr  # MiniLM's tokenizer.json is used as it is


def test_a_tokenizer_json_that_transformers_adjusts_is_replaced_by_autotokenizer(tmp_path, caplog):
    """transformers 5 lowercases BERT's input when tokenizer_config.json says do_lower_case, whatever
    tokenizer.json says; the driver reads only the file, so worker 0's check must catch it."""
    import shutil

    import ray
    from transformers import AutoTokenizer

    from raysim.config import minilm_path
    from raysim.data.loading import from_arrow
    from raysim.data.prepare import plan_data

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(f"{minilm_path()}/{name}", model / name)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False
    (model / "tokenizer.json").write_text(json.dumps(spec))
    cfg = tiny_config(tmp_path, f"model.name_or_path={model}")
    with caplog.at_level("WARNING", logger="raysim"), Simulation(cfg) as sim:
        ids, lengths, _, _ = from_arrow(ray.get(sim._shards_ref)[0])
    assert "tokenizing again with AutoTokenizer" in caplog.text
    plan = plan_data(cfg)
    texts = [plan.texts[i] for i in np.concatenate(plan.parts)]
    expected = AutoTokenizer.from_pretrained(model)(texts, truncation=True, max_length=cfg.data.max_length)["input_ids"]
    assert [list(row[:n]) for row, n in zip(ids, lengths)] == expected


def test_bad_data_fails_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="data.text_column: no column 'tweet'"):
        Simulation(tiny_config(tmp_path, "data.text_column=tweet"))
    assert not (tmp_path / "run").exists()


def test_gpus_asked_for_on_a_cpu_cluster_fall_back_to_cpu(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="raysim"), Simulation(tiny_config(tmp_path, "worker.num_gpus=0.5", "train.local_steps=1")) as sim:
        assert sim.cfg.worker.num_gpus == 0
        assert sim.run_round()["clients"] == sim.cfg.clients.per_round
    assert "no GPU: running on CPU" in caplog.text
    assert "num_gpus: 0.0" in (tmp_path / "run" / "config.yaml").read_text()


def test_cli_refuses_more_workers_than_local_ray_can_place(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raysim", "run", "configs/tiny.yaml", "worker.count=5", "ray.num_cpus=2", f"output_dir={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("raysim: error: worker.count: 5 workers x 1 CPU")
    assert not (tmp_path / "x").exists()
