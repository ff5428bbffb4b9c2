"""Faults on real Ray actors: what a user gets when a worker is gone for good."""

import contextlib
import os
import signal
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from raysim import Simulation, UserError
from raysim.config import CONFIG_DIR

from conftest import round_killing_a_worker, tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")

LONG = [
    pytest.mark.long,
    pytest.mark.skipif(not os.environ.get("RAYSIM_LONG"), reason="a variant of a fault tested in the default suite, about 40 s; set RAYSIM_LONG=1"),
]
DP = ["privacy.mode=local_dp_sgd", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0"]


def test_a_worker_gone_for_good_is_retired_and_later_rounds_lose_nothing(tmp_path):
    """The issue's case: 60 clients, 12 a round; a worker killed without restart used to cost 6 to
    8 clients in every later round."""
    cfg = tiny_config(
        tmp_path, "clients.num=60", "clients.per_round=12", "worker.count=3", "worker.num_cpus=0.5", "worker.max_restarts=0",
        "train.local_steps=30", "eval.max_examples=60", *DP,
    )
    with Simulation(cfg) as sim:
        sim.set_clients(per_round=60)  # every client trains once: each has an accounting history
        sim.set_train(local_steps=2)
        sim.run_round()
        sim.set_clients(per_round=12)
        sim.set_train(local_steps=30)
        owned = list(sim.worker_clients[0])
        fault = round_killing_a_worker(sim, 0, 1.0)
        steps_before = {c: _steps(sim, c) for c in owned}
        assert fault["dropped"] > 0 and fault["clients"] + fault["dropped"] == 12
        assert sim.live == [1, 2] and sim.worker_clients[0] == []
        assert sorted(c for w in (1, 2) for c in sim.worker_clients[w]) == list(range(60))
        sim.set_train(local_steps=2)
        later = [sim.run_round() for _ in range(3)]
        assert [(r["clients"], r["dropped"]) for r in later] == [(12, 0)] * 3
        # Its evaluation slice was taken over: every row is scored, as before the fault.
        assert [r["eval_accuracy"] == r["eval_accuracy"] for r in later] == [True] * 3
        assert sim._evaluate("subset")["eval_examples"] == sum(ray.get(sim._eval_refs[w])["subset"].num_rows for w in range(3))
        # Moved clients' privacy accounting went on from the driver's record, not from zero: each
        # later round a client trained in adds its 2 steps to the steps it had before the fault.
        times = {c: sum(c in ray.get(sim.server.sample.remote(r, 12)) for r in (3, 4, 5)) for c in owned}
        assert any(times.values())
        assert {c: _steps(sim, c) for c in owned} == {c: steps_before[c] + 2 * times[c] for c in owned}


def _steps(sim, cid):
    """Noised steps in the driver's record of a client's accountant: (noise, rate, steps) entries."""
    return sum(int(steps) for _, _, steps in sim.budget.histories.get(cid, []))


@pytest.mark.long
@pytest.mark.skipif(not os.environ.get("RAYSIM_LONG"), reason="about 40 s of Ray actors; set RAYSIM_LONG=1")
def test_below_the_minimum_pool_the_run_stops_with_a_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "worker.count=2", "worker.min_count=2", "worker.max_restarts=0", "train.local_steps=60", "clients.per_round=8")
    with Simulation(cfg) as sim:
        pid = ray.get(sim.workers[1].ready.remote()).pid
        sim.run_round()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(UserError, match=r"^worker.min_count: 1 worker\(s\) left, fewer than 2; stopped after round 2 with a checkpoint"):
            sim.run_round()
    assert (tmp_path / "run" / "checkpoints" / "round-000002" / "state.json").is_file()


@pytest.mark.parametrize("secagg", [False, pytest.param(True, marks=LONG)], ids=["plain", "secagg"])
def test_a_hung_worker_is_a_straggler_dropped_for_the_round_and_restarted(tmp_path, secagg):
    """SIGSTOP: alive to Ray but never answering. Without a deadline the round would wait forever.
    Under SecAgg its clients are dropouts of the protocol, and the others' sum still unmasks."""
    args = ["secagg.enabled=true", "secagg.threshold=2"] if secagg else []
    cfg = tiny_config(tmp_path, "clients.per_round=8", "eval.max_examples=50", *args)
    with Simulation(cfg) as sim:
        sim.run_round()
        sim.cfg.worker.round_timeout_s = 8.0  # after the first round's one-off costs; read each round
        pid = ray.get(sim.workers[0].ready.remote()).pid
        os.kill(pid, signal.SIGSTOP)
        try:
            hung = sim.run_round()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert hung["dropped"] > 0 and hung["clients"] + hung["dropped"] == 8
        assert hung["wall_s"] >= 8
        if secagg:
            assert not hung["secagg_aborted"] and hung["clients"] > 0
        after = sim.run_round()
        assert (after["clients"], after["dropped"]) == (8, 0) and sim.live == [0, 1]
        assert ray.get(sim.workers[0].ready.remote()).pid != pid


def _kill_server(sim):
    os.kill(ray.get(sim.server.ping.remote()), signal.SIGKILL)


def test_a_server_killed_between_rounds_costs_nothing(tmp_path):
    """Rebuilt from the last round's state, the server gives the run an uninterrupted one gives."""
    with Simulation(tiny_config(tmp_path / "whole", "server.momentum=0.5")) as sim:
        whole = [sim.run_round() for _ in range(3)]
        expected = sim.global_adapter()
    with Simulation(tiny_config(tmp_path / "faulty", "server.momentum=0.5")) as sim:
        faulty = [sim.run_round()]
        _kill_server(sim)
        faulty += [sim.run_round() for _ in range(2)]
        got = sim.global_adapter()
    assert [(r["round"], r["clients"], r["train_loss"], r["eval_accuracy"]) for r in faulty] == [
        (r["round"], r["clients"], r["train_loss"], r["eval_accuracy"]) for r in whole
    ]
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


@pytest.mark.long
@pytest.mark.skipif(not os.environ.get("RAYSIM_LONG"), reason="about 35 s of Ray actors; set RAYSIM_LONG=1")
def test_a_server_killed_mid_round_costs_at_most_that_round(tmp_path):
    cfg = tiny_config(tmp_path, "train.local_steps=60", "clients.per_round=8", "eval.max_examples=50")
    with Simulation(cfg) as sim:
        sim.run_round()
        before = sim.global_adapter()
        killer = threading.Timer(1.0, _kill_server, args=(sim,))
        killer.start()
        retried = sim.run_round()
        killer.join()
        assert retried["round"] == 2 and (retried["clients"], retried["dropped"]) == (8, 0)
        moved = sim.global_adapter()
        assert any(not np.array_equal(moved[k], before[k]) for k in before)
        sim.set_train(local_steps=2)
        assert sim.run_round()["clients"] == 8 and sim.round == 3
    assert len(pq.read_table(tmp_path / "run" / "metrics.parquet")) == 3


def test_a_full_disk_between_rounds_exits_2_and_keeps_the_metrics_written(tmp_path, capsys, monkeypatch):
    import errno

    from raysim.cli import main
    from raysim.runtime import outputs

    real, calls = outputs.pq.write_table, []

    def fills_up(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(outputs.pq, "write_table", fills_up)
    out = tmp_path / "run"
    assert main(["run", str(CONFIG_DIR / "tiny.yaml"), "runtime=local", "rounds=3", "eval.max_examples=20", f"output_dir={out}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("raysim: error: output_dir: cannot write") and "No space left on device" in err and "metrics.parquet" in err
    assert pq.read_table(out / "metrics.parquet").column("round").to_pylist() == [1]
    assert not list(out.glob(".*.tmp"))
