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


# Float32 reductions of n terms round by at most n * 2^-24 of the magnitudes summed (n ~ 16 rows x
# 19 tokens per weight-gradient element here: 2e-5); kernels do far better (< 1e-6 at the first
# step on an EPYC). Gradients that agree to 1e-4 of the tensor's largest element agree to rounding;
# a client handed another client's rows or weights is off by order 1.
ROUNDING = 1e-4


def recording_gradients(optimizer, steps: list):
    """``optimizer``, appending to ``steps`` the gradients of its parameters at each step."""
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: steps.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    return optimizer


def sgd_rounding_bound(gradients, group, rounding):
    """(parameter, momentum buffer): how far SGD's steps can move them when each step's gradient
    is off by up to ``rounding`` times its largest element. SGD is linear in the gradient: the
    buffer sums momentum^j times past errors, the parameter lr times the buffers. No amplification."""
    off = buffer_off = param_off = 0.0
    for g in gradients:
        off = max(off, rounding * float(g.abs().max()))
        buffer_off = group["momentum"] * buffer_off + off
        param_off += group["lr"] * buffer_off
    return param_off, buffer_off


def adamw_rounding_bound(gradients, saved, group, rounding):
    """(per-element parameter bound, moment bound), as for SGD, to first order. Off by D, the
    bias-corrected m, a weighted mean of the gradients, is off by at most D, and so is the root of
    v, their weighted RMS; so the update m / (sqrt(v) + eps) is off by at most
    D (1 + |update|) / (sqrt(v) + eps). Where sqrt(v) is near eps or below D, that allows about lr
    per step: there Adam turns a last-bit difference in the gradient into one of order 1."""
    (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
    m = saved["exp_avg"].double() if saved else torch.zeros_like(gradients[0], dtype=torch.float64)
    v = saved["exp_avg_sq"].double() if saved else torch.zeros_like(m)
    step = float(saved["step"]) if saved else 0.0
    bound, off = torch.zeros_like(m), 0.0
    for g in gradients:
        g, step = g.double(), step + 1
        off = max(off, rounding * float(g.abs().max()))
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        denominator = (v / (1 - beta2**step)).sqrt() + eps
        bound += lr * off * (1 + (m / (1 - beta1**step) / denominator).abs()) / denominator
    return bound, off


def assert_within(got, want, allowed, what):
    diff = (got.double() - want.double()).abs()
    allowed = torch.as_tensor(allowed, dtype=torch.float64, device=diff.device).expand_as(diff)
    worst = int((diff - allowed).argmax())
    off, limit = float(diff.flatten()[worst]), float(allowed.flatten()[worst])
    assert off <= limit, f"{what}: element {worst} off by {off:.2e}, allowed {limit:.2e}"


@pytest.mark.parametrize(
    "overrides",
    [("method=ffa_lora", "train.optimizer=adamw"), ("method=lora", "train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.1")],
    ids=["ffa_lora-adamw", "lora-sgd-momentum"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_clients_trained_together_equal_clients_trained_one_at_a_time(tmp_path, overrides, device):
    """The claim is per client: its own gradient at every step, to rounding, and its own moments.
    Parameters and moments are held to what gradients off by rounding allow through the optimizer's
    arithmetic; a fixed atol on AdamW's parameters holds only on the kernels it was tuned on."""
    device = torch.device(device)
    cfg = tiny_config(tmp_path, *NO_DROPOUT, *overrides)
    model = build_model(cfg, 3, device)
    params = trainable_parameters(model)
    param_list = list(params.values())
    data = [random_rows(40, seed, width=20) for seed in range(3)]
    torch.manual_seed(1)
    starts = [{k: v.detach() + 0.01 * torch.randn_like(v) for k, v in params.items()} for _ in range(3)]  # a mix-up shows at step 1
    states = [ClientState.new(0, cid) for cid in range(3)]
    optimizer = make_optimizer(cfg.train, param_list)
    load_adapter(params, starts[1])  # client 1 comes back from an earlier round with optimizer moments
    local_train(model, optimizer, data[1], shuffled_batches(states[1], data[1].lengths, 16, 3), device)
    states[1].optimizer_state = saved_optimizer_state(optimizer, param_list)
    batches = [list(shuffled_batches(s, d.lengths, 16, 4)) for s, d in zip(states, data)]
    moments = [s.optimizer_state for s in states]

    alone, alone_grads = [], []
    for d, start, saved, client_batches in zip(data, starts, moments, batches):
        load_adapter(params, start)
        alone_grads.append([])
        optimizer = recording_gradients(make_optimizer(cfg.train, param_list), alone_grads[-1])
        swap_optimizer_state(optimizer, param_list, copy.deepcopy(saved))  # the optimizer updates moments in place
        loss = local_train(model, optimizer, d, client_batches, device)
        alone.append((loss, {k: v.detach().clone() for k, v in params.items()}, saved_optimizer_state(optimizer, param_list)))
    stacked_grads = []
    together = local_train_stacked(
        model, lambda ps: recording_gradients(make_optimizer(cfg.train, ps), stacked_grads), starts, copy.deepcopy(moments), data, batches, device
    )

    n, group = len(param_list), optimizer.param_groups[0]
    for c, ((loss_a, values_a, moments_a), (loss_t, values_t, moments_t)) in enumerate(zip(alone, together)):
        assert loss_t == pytest.approx(loss_a, rel=1e-5)
        assert max(float((values_a[k] - starts[c][k]).abs().max()) for k in starts[c]) > 1e-3  # training moved it
        grads_t = [step[c * n : (c + 1) * n] for step in stacked_grads]  # the stacked optimizer holds client after client
        assert len(grads_t) == len(alone_grads[c]) == len(batches[c])
        for s, (step_t, step_a) in enumerate(zip(grads_t, alone_grads[c])):
            for k, g_t, g_a in zip(params, step_t, step_a):
                assert_within(g_t, g_a, ROUNDING * float(g_a.abs().max()), f"client {c} step {s} gradient of {k}")
        assert moments_t.keys() == moments_a.keys()
        for i, k in enumerate(params):
            grads = [step[i] for step in alone_grads[c]]
            if cfg.train.optimizer == "adamw":
                allowed, moment_off = adamw_rounding_bound(grads, moments[c].get(i), group, ROUNDING)
            else:
                allowed, moment_off = sgd_rounding_bound(grads, group, ROUNDING)
            magnitude = torch.maximum(starts[c][k].abs(), values_a[k].abs())
            allowed = allowed + len(grads) * torch.finfo(torch.float32).eps * magnitude  # each step rounds the parameter
            assert_within(values_t[k], values_a[k], allowed, f"client {c} {k}")
            for name, value in moments_a[i].items():
                got = moments_t[i][name]
                if name == "step":
                    assert got == value
                elif name == "exp_avg_sq":  # as its root, an RMS of the gradients
                    assert_within(got.sqrt(), value.sqrt(), moment_off, f"client {c} {name} of {k}")
                else:
                    assert_within(got, value, moment_off, f"client {c} {name} of {k}")
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
    from raysim.runtime.cluster import gpu_hint

    assert "train.clients_per_batch=8" in gpu_hint(["cuda:0"], tiny_config(tmp_path))
    assert gpu_hint(["cpu"], tiny_config(tmp_path)) is None
    assert gpu_hint(["cuda:0"], tiny_config(tmp_path, "train.clients_per_batch=4")) is None
    assert gpu_hint(["cuda:0"], tiny_config(tmp_path, "privacy.mode=local_dp_sgd", "privacy.noise_multiplier=1", "privacy.max_grad_norm=1")) is None
