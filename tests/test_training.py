"""Local training on a resident tiny model, without Ray."""

from pathlib import Path

import numpy as np
import pytest
import torch

from raysim.methods.common import seeded_lora_a
from raysim.model import adapter_state, build_model, frozen_lora_a, trainable_parameters
from raysim.training import (
    ClientState,
    epoch_batches,
    load_adapter,
    local_train,
    make_optimizer,
    saved_optimizer_state,
    shuffled_batches,
    swap_optimizer_state,
)

from conftest import random_rows, tiny_config

TRAIN_CFG = tiny_config(Path("/tmp/unused")).train



@pytest.fixture(scope="module")
def ffa_model(tmp_path_factory):
    return build_model(tiny_config(tmp_path_factory.mktemp("ffa")), num_labels=3)


def test_ffa_model_freezes_seeded_a_and_trains_b_and_head(ffa_model):
    names = set(trainable_parameters(ffa_model))
    assert names and not any(".lora_A." in n for n in names)
    assert any(".lora_B." in n for n in names) and any("classifier" in n for n in names)
    frozen = frozen_lora_a(ffa_model)
    assert len(frozen) == len([n for n in names if ".lora_B." in n])
    for name, value in frozen.items():
        assert np.array_equal(value, seeded_lora_a(name, value.shape, 0))
    assert ffa_model.training


def test_two_builds_agree_on_base_head_and_a(tmp_path):
    a = build_model(tiny_config(tmp_path, "method=lora"), 3)
    b = build_model(tiny_config(tmp_path, "method=lora"), 3)
    for (na, pa_), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa_, pb)
    assert any(".lora_A." in n for n in trainable_parameters(a))


def test_local_training_moves_b_but_not_a(ffa_model):
    params = trainable_parameters(ffa_model)
    start = {k: v.detach().clone() for k, v in params.items()}
    frozen_before = frozen_lora_a(ffa_model)
    opt = make_optimizer(TRAIN_CFG, list(params.values()))
    data = random_rows()
    loss = local_train(ffa_model, opt, data, shuffled_batches(ClientState.new(0, 1), data.lengths, 8, 3), torch.device("cpu"))
    assert np.isfinite(loss)
    moved = [k for k in params if not torch.equal(params[k], start[k])]
    assert any(".lora_B." in k for k in moved) and any("classifier" in k for k in moved)
    for name, value in frozen_lora_a(ffa_model).items():
        assert np.array_equal(value, frozen_before[name])
    load_adapter(params, start)
    assert all(torch.equal(params[k], start[k]) for k in params)


def test_optimizer_state_is_kept_per_client(ffa_model):
    params = list(trainable_parameters(ffa_model).values())
    opt = make_optimizer(TRAIN_CFG, params)
    data = random_rows()
    one, two = ClientState.new(0, 1), ClientState.new(0, 2)
    for state in (one, two):
        swap_optimizer_state(opt, params, state.optimizer_state)
        local_train(ffa_model, opt, data, shuffled_batches(state, data.lengths, 8, 2), torch.device("cpu"))
        state.optimizer_state = saved_optimizer_state(opt, params)
    assert one.optimizer_state and two.optimizer_state
    step_of = lambda s: float(next(iter(s.optimizer_state.values()))["step"])  # noqa: E731
    assert step_of(one) == 2 and step_of(two) == 2
    swap_optimizer_state(opt, params, one.optimizer_state)
    local_train(ffa_model, opt, data, shuffled_batches(one, data.lengths, 8, 1), torch.device("cpu"))
    assert step_of(one) == 3 and step_of(two) == 2
    swap_optimizer_state(opt, params, {})
    assert not opt.state


def test_epoch_batches_cover_the_shard_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, 1000)
    batches = epoch_batches(np.random.default_rng(1), lengths, 16)
    flat = np.concatenate(batches)
    assert len(flat) == len(np.unique(flat)) == 1000 // 16 * 16
    grouped = np.mean([lengths[b].max() for b in batches])
    random = np.mean([lengths[b].max() for b in np.array_split(rng.permutation(1000), 62)])
    assert grouped < 0.8 * random
    tiny = epoch_batches(np.random.default_rng(1), lengths[:5], 16)
    assert len(tiny) == 1 and sorted(tiny[0]) == list(range(5))


def test_adapter_state_is_a_copy(ffa_model):
    state = adapter_state(ffa_model)
    key = next(iter(state))
    state[key] += 1
    assert not np.array_equal(state[key], trainable_parameters(ffa_model)[key].detach().numpy())
