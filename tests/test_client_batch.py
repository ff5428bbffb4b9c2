"""Several clients trained in one forward pass (train.clients_per_batch) against one at a time."""

import copy

import numpy as np
import pytest
import torch

from raysim.client_batch import ClientStackedLinear, local_train_stacked, stacked_clients
from raysim.model import build_model, trainable_parameters
from raysim.training import (
    ClientState,
    load_adapter,
    local_train,
    make_optimizer,
    saved_optimizer_state,
    shuffled_batches,
    swap_optimizer_state,
)

from conftest import random_rows, tiny_config

NO_DROPOUT = ("model.config_overrides.hidden_dropout_prob=0", "model.config_overrides.attention_probs_dropout_prob=0")
CPU = torch.device("cpu")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]



def test_stacked_linear_applies_each_clients_weights_to_its_rows():
    torch.manual_seed(0)
    weights, biases = torch.randn(3, 5, 4), torch.randn(3, 5)
    layer = ClientStackedLinear(list(weights), list(biases))
    x = torch.randn(3 * 2, 7, 4)  # 3 clients x 2 rows x 7 tokens
    expected = torch.cat([torch.nn.functional.linear(x[2 * k : 2 * k + 2], weights[k], biases[k]) for k in range(3)])
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="equal client blocks"):
        layer(torch.randn(4, 4))


@pytest.mark.parametrize(
    "overrides",
    [("method=ffa_lora", "train.optimizer=adamw"), ("method=lora", "train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.1")],
    ids=["ffa_lora-adamw", "lora-sgd-momentum"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_clients_trained_together_equal_clients_trained_one_at_a_time(tmp_path, overrides, device):
    device = torch.device(device)
    cfg = tiny_config(tmp_path, *NO_DROPOUT, *overrides)
    model = build_model(cfg, 3, device)
    params = trainable_parameters(model)
    param_list = list(params.values())
    optimizer = make_optimizer(cfg.train, param_list)
    data = [random_rows(40, seed, width=20) for seed in range(3)]
    torch.manual_seed(1)
    start = {k: v.detach() + 0.01 * torch.randn_like(v) for k, v in params.items()}
    states = [ClientState.new(0, cid) for cid in range(3)]
    load_adapter(params, start)  # client 1 comes back from an earlier round with optimizer moments
    local_train(model, optimizer, data[1], shuffled_batches(states[1], data[1].lengths, 16, 3), device)
    states[1].optimizer_state = saved_optimizer_state(optimizer, param_list)
    batches = [list(shuffled_batches(s, d.lengths, 16, 4)) for s, d in zip(states, data)]
    moments = [copy.deepcopy(s.optimizer_state) for s in states]  # the optimizer updates them in place

    alone = []
    for d, saved, client_batches in zip(data, moments, batches):
        load_adapter(params, start)
        swap_optimizer_state(optimizer, param_list, copy.deepcopy(saved))
        loss = local_train(model, optimizer, d, client_batches, device)
        alone.append((loss, {k: v.detach().clone() for k, v in params.items()}, saved_optimizer_state(optimizer, param_list)))
    together = local_train_stacked(
        model, lambda ps: make_optimizer(cfg.train, ps), [start] * 3, moments, data, batches, device
    )

    atol = 1e-6 if device.type == "cpu" else 1e-5  # GPU kernels differ between batch shapes
    for (loss_a, values_a, moments_a), (loss_t, values_t, moments_t) in zip(alone, together):
        assert loss_t == pytest.approx(loss_a, rel=1e-5)
        assert max(float((values_a[k] - start[k]).abs().max()) for k in start) > 1e-3  # training moved it
        for k in start:
            torch.testing.assert_close(values_t[k], values_a[k], rtol=0, atol=atol)
        assert moments_t.keys() == moments_a.keys()
        for i in moments_a:
            for name, value in moments_a[i].items():
                torch.testing.assert_close(torch.as_tensor(moments_t[i][name]), torch.as_tensor(value), rtol=0, atol=atol)
    assert all(p is q for p, q in zip(trainable_parameters(model).values(), param_list))  # original layers back


def test_clients_with_unequal_batches_are_refused_and_the_model_is_restored(tmp_path):
    model = build_model(tiny_config(tmp_path), 3)
    before = dict(model.named_modules())
    data = [random_rows(40, 0), random_rows(10, 1)]
    batches = [[np.arange(16)], [np.arange(10)]]
    start = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    with pytest.raises(ValueError, match="equally large batches"):
        local_train_stacked(model, lambda ps: torch.optim.SGD(ps, lr=0.1), [start] * 2, [{}, {}], data, batches, CPU)
    assert all(after is before[name] for name, after in model.named_modules())


def test_stacking_refuses_a_trained_layer_that_is_not_a_linear(tmp_path):
    model = build_model(tiny_config(tmp_path), 3)
    model.base_model.model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    start = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    with pytest.raises(ValueError, match="LayerNorm"):
        with stacked_clients(model, [start, start]):
            pass


def test_gpu_runs_training_one_client_at_a_time_are_told_of_clients_per_batch(tmp_path):
    from raysim.runtime.simulation import gpu_hint

    assert "train.clients_per_batch=8" in gpu_hint(["cuda:0"], tiny_config(tmp_path))
    assert gpu_hint(["cpu"], tiny_config(tmp_path)) is None
    assert gpu_hint(["cuda:0"], tiny_config(tmp_path, "train.clients_per_batch=4")) is None
    assert gpu_hint(["cuda:0"], tiny_config(tmp_path, "privacy.mode=local_dp_sgd", "privacy.noise_multiplier=1", "privacy.max_grad_norm=1")) is None
