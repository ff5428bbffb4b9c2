"""Faults on real Ray actors: what a user gets when a worker is gone for good."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import ray

from raysim import Simulation, UserError
from raysim.config import CONFIG_DIR
from raysim.runtime.placement import balance

from conftest import DiesInStage, round_killing_a_worker, tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")

LONG = [
    pytest.mark.long,
    pytest.mark.skipif(not os.environ.get("RAYSIM_LONG"), reason="a variant of a fault tested in the default suite, about 40 s; set RAYSIM_LONG=1"),
]
# The stage cases the default suite runs; the others run with RAYSIM_LONG=1.
DEFAULT_STAGE_CASES = {(False, "hand_over", False)}  # test_secagg_runtime kills a SecAgg worker mid-round
DP = ["privacy.mode=local_dp_sgd", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0"]


def test_a_worker_gone_for_good_is_retired_and_later_rounds_lose_nothing(tmp_path):
    """The issue's case: 60 clients, 12 a round; a worker killed without restart used to cost 6 to
    8 clients in every later round."""
    cfg = tiny_config(
        tmp_path, "clients.num=60", "clients.per_round=12", "worker.count=3", "worker.num_cpus=0.5", "worker.max_restarts=0",
        "train.local_steps=2", "eval.max_examples=60", *DP,
    )
    with Simulation(cfg) as sim:
        sim.set_clients(per_round=60)  # every client trains once: each has an accounting history
        sim.run_round()
        sim.set_clients(per_round=12)
        owned = list(sim.worker_clients[0])
        fault = round_killing_a_worker(sim, 0)
        steps_before = {c: _steps(sim, c) for c in owned}
        assert fault["dropped"] > 0 and fault["clients"] + fault["dropped"] == 12
        assert sim.live == [1, 2] and sim.worker_clients[0] == []
        assert sorted(c for w in (1, 2) for c in sim.worker_clients[w]) == list(range(60))
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


PLAIN_STAGES = ["hand_over", "train_clients", "evaluate"]
SECAGG_STAGES = ["secagg_advertise", "secagg_share_keys", "train_clients", "secagg_unmask"]
STAGE_CASES = [
    pytest.param(secure, stage, restartable, id=f"{'secagg' if secure else 'plain'}-{stage}-{'restartable' if restartable else 'permanent'}",
                 marks=[] if (secure, stage, restartable) in DEFAULT_STAGE_CASES else LONG)
    for secure, stages in ((False, PLAIN_STAGES), (True, SECAGG_STAGES))
    for stage in stages
    for restartable in (True, False)
]


@pytest.mark.parametrize("secure, stage, restartable", STAGE_CASES)
def test_a_worker_killed_in_any_stage_costs_at_most_its_clients_in_that_round(tmp_path, secure, stage, restartable):
    """Each stage of a plaintext and of a SecAgg round, with a worker Ray restarts and with one
    gone for good: the round completes without the dead worker's clients (or, past the inputs,
    with them), the next round is whole, and a permanent loss leaves a pool of one."""
    args = ["secagg.enabled=true", "secagg.threshold=2"] if secure else []
    restarts = [] if restartable else ["worker.max_restarts=0"]
    cfg = tiny_config(tmp_path, "clients.per_round=6", "train.local_steps=2", "eval.max_examples=50", *args, *restarts)
    with Simulation(cfg) as sim:
        sim.run_round()
        w = 0
        if stage == "hand_over":  # the worker that hands a client over in round 2
            sampled = ray.get(sim.server.sample.remote(2, 6))
            _, moves = balance(sampled, sim.client_worker, sim.live)
            assert moves, "round 2 moves no client: pick another clients.per_round"
            w = moves[0][1]
        real = sim.workers[w]
        dying = sim.workers[w] = DiesInStage(real, stage)
        try:
            hit = sim.run_round()
        finally:
            sim.workers[w] = real
        assert dying.fired, f"round 2 made no {stage} call on worker {w}"
        assert hit["clients"] + hit["dropped"] == 6 and hit["clients"] > 0
        if stage in ("evaluate", "secagg_unmask"):  # the inputs were in: the sum holds every client
            assert hit["dropped"] == 0
        else:
            assert hit["dropped"] > 0
        if secure:
            assert not hit["secagg_aborted"]
        after = sim.run_round()
        assert (after["clients"], after["dropped"]) == (6, 0)
        assert sim.live == ([0, 1] if restartable else [1 - w])
        every_row = sum(ray.get(sim._eval_refs[w])["subset"].num_rows for w in range(2))
        assert sim._evaluate("subset")["eval_examples"] == every_row


def test_a_start_up_that_fails_unexpectedly_leaves_no_actor_behind(tmp_path, monkeypatch):
    """Not a UserError: the workers and the server still go, and their CPUs come back."""
    from raysim.runtime import bootstrap

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure while putting the data")

    monkeypatch.setattr(bootstrap, "put_data", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        Simulation(tiny_config(tmp_path))
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


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


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"], ids=["full-disk", "read-only"])
def test_a_full_or_read_only_disk_between_rounds_exits_2_and_keeps_the_metrics_written(tmp_path, capsys, monkeypatch, code):
    """The failure comes from the write itself: this process runs as root in CI, which a
    read-only directory's permissions would not stop."""
    import errno

    from raysim.cli import main
    from raysim.runtime import outputs

    real, calls, number = outputs.pq.write_table, [], getattr(errno, code)

    def fails(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) > 1:
            raise OSError(number, os.strerror(number))
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(outputs.pq, "write_table", fails)
    out = tmp_path / "run"
    assert main(["run", str(CONFIG_DIR / "tiny.yaml"), "runtime=local", "rounds=3", "eval.max_examples=20", f"output_dir={out}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("raysim: error: output_dir: cannot write") and os.strerror(number) in err and "metrics.parquet" in err
    assert pq.read_table(out / "metrics.parquet").column("round").to_pylist() == [1]
    assert not list(out.glob(".*.tmp"))


# `raysim run` whose checkpoint write at round 2 is cut off by a SIGKILL: half of the arrays file
# is on disk, nothing else of that checkpoint, and no Python code runs after it.
_DIES_WRITING_ROUND_2 = """
import io, os, signal, sys
import numpy as np
import raysim.checkpoint as checkpoint
from raysim.cli import main
write = checkpoint._write_partial
def dies_midway(partial, round_idx, tree, arrays, config_yaml):
    if round_idx < 2:
        return write(partial, round_idx, tree, arrays, config_yaml)
    partial.mkdir(parents=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (partial / checkpoint.ARRAYS_FILE).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint._write_partial = dies_midway
sys.exit(main(sys.argv[1:]))
"""


def _tagged(tag: str) -> list[psutil.Process]:
    """Processes whose environment carries ``tag``: the run's and every Ray process it started."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("RAYSIM_TEST_TAG") == tag:
                found.append(proc)
    return found


def _no_process_left(tag: str, within_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + within_s
    while (left := _tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [" ".join(p.cmdline()[:2]) for p in left]


def test_raysim_run_killed_while_writing_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    """A real SIGKILL of the driver: the half-written checkpoint is never used, the run resumes
    from the last complete one to what an uninterrupted run gives, and no Ray process outlives
    either run (Ray's own processes follow a driver that dies)."""
    settings = ["rounds=2", "checkpoint.every=1", "eval.max_examples=50", "train.local_steps=2"]
    with Simulation(tiny_config(tmp_path / "whole", *settings)) as sim:
        whole = [sim.run_round() for _ in range(2)]
    out = tmp_path / "run"
    tag = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAYSIM_TEST_TAG": tag, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    run = [str(CONFIG_DIR / "tiny.yaml"), *settings, f"output_dir={out}"]
    killed = subprocess.run([sys.executable, "-c", _DIES_WRITING_ROUND_2, "run", *run], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [".partial-round-000002", "round-000001"]
    assert _no_process_left(tag) == []
    resumed = subprocess.run([sys.executable, "-m", "raysim", "run", *run, f"resume={out}"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at round 1" in resumed.stderr
    assert _no_process_left(tag) == []
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [(m["round"], m["clients"], m["train_loss"], m["eval_accuracy"]) for m in metrics] == [
        (r["round"], r["clients"], r["train_loss"], r["eval_accuracy"]) for r in whole
    ]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-000001", "round-000002"]
