"""The GPU path against the CPU: training, DP-SGD and a Ray run with fractional GPUs per worker.

Skipped where torch sees no CUDA device (CI); run on a lent GPU machine (docs/PERFORMANCE.md).
"""

import numpy as np
import pytest
import torch

from raysim.model import build_model, trainable_parameters
from raysim.training import ClientState, load_adapter, local_train, make_optimizer, shuffled_batches

from conftest import random_rows, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

NO_DROPOUT = ("model.config_overrides.hidden_dropout_prob=0", "model.config_overrides.attention_probs_dropout_prob=0")



def _train(cfg, device, dp_mode=None):
    """One client's local steps on ``device`` from the same start; the trained tensors, on the CPU."""
    model = build_model(cfg, 3, torch.device(device))
    params = trainable_parameters(model)
    torch.manual_seed(1)
    load_adapter(params, {k: (0.01 * torch.randn(v.shape)).to(device) for k, v in params.items()})
    optimizer = make_optimizer(cfg.train, list(params.values()))
    data, state = random_rows(48, width=20), ClientState.new(0, 0)
    batches = shuffled_batches(state, data.lengths, 16, 4)
    if dp_mode is None:
        local_train(model, optimizer, data, batches, torch.device(device))
    else:
        from raysim.privacy.local_dp import DPSGD

        dp = DPSGD(model, optimizer, max_grad_norm=0.05, grad_sample_mode=dp_mode)
        dp.set_client(0.0, 16.0, torch.Generator(device=device).manual_seed(0))  # no noise: clipping alone
        local_train(model, dp.optimizer, data, batches, torch.device(device), dp.loss)
    return {k: v.detach().cpu() for k, v in params.items()}


@pytest.mark.parametrize("method", ["ffa_lora", "lora"])
def test_local_training_on_the_gpu_matches_the_cpu(tmp_path, method):
    cfg = tiny_config(tmp_path, f"method={method}", "train.optimizer=sgd", "train.lr=0.1", *NO_DROPOUT)
    cpu, gpu = _train(cfg, "cpu"), _train(cfg, "cuda")
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_clipping_on_the_gpu_matches_the_cpu(tmp_path, mode):
    cfg = tiny_config(tmp_path, "train.optimizer=sgd", "train.lr=0.5", *NO_DROPOUT)
    plain = _train(cfg, "cpu")
    cpu, gpu = _train(cfg, "cpu", mode), _train(cfg, "cuda", mode)
    assert any(not torch.allclose(cpu[k], plain[k], atol=1e-6) for k in cpu)  # clipping bit
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("per_batch", [1, 4])
def test_workers_sharing_one_gpu_train_on_it_and_match_a_cpu_run(tmp_path, per_batch):
    import ray

    from raysim import Simulation

    common = ("clients.num=12", "clients.per_round=8", "rounds=2", "train.optimizer=sgd", "train.lr=0.1", "worker.count=2", *NO_DROPOUT)
    adapters = {}
    for gpus in (0, 0.5):
        cfg = tiny_config(tmp_path / str(gpus), *common, f"worker.num_gpus={gpus}", f"train.clients_per_batch={per_batch}")
        with Simulation(cfg) as sim:
            devices = {r.device for r in ray.get([w.ready.remote() for w in sim.workers])}
            assert devices == ({"cuda:0"} if gpus else {"cpu"})
            sim.run(progress=False)
            adapters[gpus] = sim.global_adapter()
    for k in adapters[0]:
        np.testing.assert_allclose(adapters[0.5][k], adapters[0][k], rtol=1e-4, atol=1e-5)
