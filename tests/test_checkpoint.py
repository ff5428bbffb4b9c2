"""Checkpoint and resume: atomic writes, config checks, and a resumed run equal to an uninterrupted one."""

import json
import math
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from raysim import checkpoint as ckpt
from raysim.cli import main
from raysim.config import CONFIG_DIR, ConfigError, UserError, load_config
from raysim.state_codec import decode, encode
from raysim.training import ClientState, next_batch

TIMINGS = {"train_s", "steps_s", "aggregate_s", "eval_s", "wall_s"}


def _state(value):
    server = {"adapter": {"b": np.full(3, value)}, "frozen": {}, "optimizer": {}, "extra": {}}
    return {"config": {}, "server": server, "clients": {}, "owners": {}, "workers": 1, "budget": {}, "rows": [{"round": value}], "untuned": None}


def test_checkpoints_are_kept_newest_first_and_found_from_the_run_directory(tmp_path):
    for r in (1, 2, 3):
        ckpt.write_checkpoint(tmp_path, r, _state(r), "seed: 0\n", keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000002", "round-000003"]
    found = ckpt.find_checkpoint(tmp_path)
    assert found.name == "round-000003" and ckpt.read_checkpoint(found)["rows"] == [{"round": 3}]
    assert ckpt.find_checkpoint(tmp_path / "checkpoints" / "round-000002").name == "round-000002"


def test_an_interrupted_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt.write_checkpoint(tmp_path, 2, _state(2), "", keep=1)

    def dies_halfway(obj, f):
        f.write(json.dumps(obj)[:10])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckpt.json, "dump", dies_halfway)
        with pytest.raises(KeyboardInterrupt):
            ckpt.write_checkpoint(tmp_path, 3, _state(3), "", keep=1)
        with pytest.raises(KeyboardInterrupt):  # the same round again: the complete one must survive
            ckpt.write_checkpoint(tmp_path, 2, _state(99), "", keep=1)
    found = ckpt.find_checkpoint(tmp_path)
    assert found.name == "round-000002"
    assert ckpt.read_checkpoint(found)["server"]["adapter"]["b"].tolist() == [2, 2, 2]
    # The next complete write replaces the partial one and prunes the old.
    ckpt.write_checkpoint(tmp_path, 3, _state(3), "", keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-000003"]


def test_missing_or_foreign_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="resume: .* does not exist"):
        ckpt.find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no checkpoint"):
        ckpt.find_checkpoint(tmp_path)
    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps({"something": "else"}))
    with pytest.raises(UserError, match="not a raysim checkpoint"):
        ckpt.read_checkpoint(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('RAN').write_text('')",))


def _written(tmp_path, round_idx=1):
    return ckpt.write_checkpoint(tmp_path, round_idx, _state(round_idx), "", keep=5)


def _rewrite_state(path, change):
    saved = json.loads((path / ckpt.STATE_FILE).read_text())
    change(saved)
    (path / ckpt.STATE_FILE).write_text(json.dumps(saved))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / ckpt.STATE_FILE).write_text('{"format": 3, "round": 1, "sta'), "cannot read .*state.json"),
        (lambda p: _rewrite_state(p, lambda s: s.update(format=2)), "state.json' has format 2; this raysim reads format 3"),
        (lambda p: _rewrite_state(p, lambda s: s["state"].pop("clients")), "state.json' has no 'clients'"),
        (lambda p: _rewrite_state(p, lambda s: s["state"].update(rows={"a": 1})), "'rows' is a dict, not a list"),
        (lambda p: _rewrite_state(p, lambda s: s["state"]["server"].pop("optimizer")), "server's state lacks optimizer"),
        (lambda p: _rewrite_state(p, lambda s: s["state"]["server"]["adapter"].update(b={"__array__": "a9"})), "server.adapter.b: refers to an array 'a9'"),
        (lambda p: (p / ckpt.ARRAYS_FILE).write_bytes(b"PK\x03\x04 cut"), "cannot read .*arrays.npz"),
        (lambda p: np.savez(p / ckpt.ARRAYS_FILE, a0=np.array([_RunsCode()], dtype=object)), "cannot read .*arrays.npz"),
    ],
    ids=["truncated", "old-format", "missing-part", "wrong-type", "server-part", "missing-array", "corrupt-arrays", "object-array"],
)
def test_a_damaged_checkpoint_is_refused_naming_its_file_and_runs_no_code(tmp_path, monkeypatch, damage, message):
    monkeypatch.chdir(tmp_path)
    path = _written(tmp_path)
    damage(path)
    with pytest.raises(UserError, match=message):
        ckpt.read_checkpoint(path)
    assert not (tmp_path / "RAN").exists()


def test_an_earlier_pickle_checkpoint_is_named_and_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "checkpoints" / "round-000002"
    old.mkdir(parents=True)
    (old / ckpt.LEGACY_FILE).write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(UserError, match=r"round-000002/state.pkl' is an earlier raysim's checkpoint \(a pickle"):
        ckpt.find_checkpoint(tmp_path)
    assert not (tmp_path / "RAN").exists()


def test_a_checkpoint_holds_only_json_and_plain_arrays(tmp_path):
    path = _written(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["arrays.npz", "config.yaml", "state.json"]
    with np.load(path / ckpt.ARRAYS_FILE, allow_pickle=False) as npz:
        assert [npz[n].tolist() for n in npz.files] == [[1, 1, 1]]
    assert json.loads((path / ckpt.STATE_FILE).read_text())["state"]["server"]["adapter"]["b"] == {"__array__": "a0"}


def test_a_resumed_run_keeps_the_keys_that_define_it(tmp_path):
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path}"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    ckpt.check_resumable(saved, load_config(CONFIG_DIR / "tiny.yaml", ["rounds=9", "train.lr=0.1", "worker.count=1", f"resume={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"^lora.rank: 4 here but 8 in the checkpoint"):
        ckpt.check_resumable(saved, load_config(CONFIG_DIR / "tiny.yaml", ["lora.rank=4"]))
    with pytest.raises(ConfigError, match=r"^privacy\.\w+: .* in the checkpoint"):
        ckpt.check_resumable(saved, load_config(CONFIG_DIR / "tiny.yaml", ["privacy.mode=central_dp", "privacy.noise_multiplier=1", "privacy.clip_norm=1"]))


def test_client_state_round_trips_through_plain_values():
    from opacus.accountants import RDPAccountant

    state = ClientState.new(seed=3, client_id=7)
    lengths = np.arange(40) % 9 + 1
    next_batch(state, lengths, 8)
    state.optimizer_state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}}
    state.accountant = RDPAccountant()
    state.accountant.history = [(1.1, 0.2, 5)]
    tree, arrays = encode(state.to_dict())
    values = decode(json.loads(json.dumps(tree)), arrays)
    back = ClientState.from_dict(values, torch.device("cpu"), RDPAccountant)
    assert back.cursor == state.cursor and all(np.array_equal(a, b) for a, b in zip(back.batches, state.batches))
    assert torch.equal(back.optimizer_state[0]["exp_avg"], state.optimizer_state[0]["exp_avg"])
    assert back.optimizer_state[0]["step"].item() == 3.0 and back.accountant.history == [(1.1, 0.2, 5)]
    # The RNG continues exactly where it was: the next epochs are the same.
    assert [next_batch(back, lengths, 8).tolist() for _ in range(9)] == [next_batch(state, lengths, 8).tolist() for _ in range(9)]


def _equal(a, b, path="") -> list[str]:
    """Paths where two checkpoint payloads differ (bit for bit; NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _equal(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _equal(x, y, f"{path}[{i}]")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b, equal_nan=True) and np.asarray(a).dtype == np.asarray(b).dtype else [path]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _payload(run_dir, round_idx):
    state = ckpt.read_checkpoint(run_dir / "checkpoints" / f"round-{round_idx:06d}")
    state["rows"] = [{k: v for k, v in row.items() if k not in TIMINGS} for row in state["rows"]]
    for key in ("config",):
        state.pop(key)
    return state


@pytest.mark.usefixtures("ray_session")
def test_two_rounds_resumed_to_four_equal_four_rounds_bit_for_bit(tmp_path):
    """Local DP-SGD (accountants, noise), AdamW moments, server momentum and rebalancing all carry
    state across rounds; the resumed run must reproduce every bit of it."""
    tiny = str(CONFIG_DIR / "tiny.yaml")
    common = [
        "privacy.mode=local_dp_sgd",
        "privacy.noise_multiplier=1.0",
        "privacy.max_grad_norm=1.0",
        "server.momentum=0.5",
        "train.local_steps=2",
        "eval.max_examples=50",
        "checkpoint.every=2",
    ]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["run", tiny, f"output_dir={whole}", "rounds=4", *common, "--quiet"]) == 0
    assert main(["run", tiny, f"output_dir={part}", "rounds=2", *common, "--quiet"]) == 0
    assert _equal(_payload(whole, 2), _payload(part, 2)) == []
    written = (part / "metrics.parquet").read_bytes()

    # A resume that changes what defines the run is refused, and the run's outputs are untouched.
    assert main(["run", tiny, f"resume={part}", "rounds=4", *common, "lora.rank=4", "--quiet"]) == 2
    assert (part / "metrics.parquet").read_bytes() == written

    assert main(["run", tiny, f"resume={part}", "rounds=4", *common, "--quiet"]) == 0
    resumed, uninterrupted = _payload(part, 4), _payload(whole, 4)
    assert len(resumed["rows"]) == 4 and resumed["clients"] and resumed["budget"]["histories"]
    assert _equal(resumed, uninterrupted) == []
    assert pq.read_table(part / "metrics.parquet").num_rows == 4
    # TensorBoard got each round once, the resumed ones included, with the metrics' values.
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(part / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train_loss")]
    metrics = pq.read_table(part / "metrics.parquet").to_pylist()
    assert losses == [(r["round"], pytest.approx(r["train_loss"], rel=1e-6)) for r in metrics]
