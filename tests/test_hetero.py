"""Per-client ranks, FLoRA's stacking and HetLoRA's padded average against independent numpy
computations and against a PEFT model built at the client's own rank; no Ray."""


import numpy as np
import pytest
import torch

from raysim import ConfigError
from raysim.client_rank import ClientRank
from raysim.methods.common import seeded_lora_a
from raysim.methods.flora import FLoRA, stack
from raysim.methods.flora import Options as FLoRAOptions
from raysim.methods.hetlora import WEIGHT, HetLoRA
from raysim.methods.hetlora import Options as HetOptions
from raysim.methods.protocol import ClientUpdate, Message, RoundInput
from raysim.methods.ranks import client_ranks
from raysim.model import build_model, frozen_lora_a, trainable_parameters
from raysim.training import ClientState, local_train, make_optimizer, saved_optimizer_state, shuffled_batches

from conftest import random_rows, tiny_config

D_OUT, D_IN, R = 12, 10, 8
A_KEY, B_KEY = "m.lora_A.default.weight", "m.lora_B.default.weight"
BASE = "m.base_layer.weight"
HEAD = "classifier.modules_to_save.default.weight"


def test_a_rank_list_is_cycled_and_a_tier_mix_is_split_by_the_seed():
    assert client_ranks([64, 32, 16, 16, 8, 8, 4, 4, 4, 4], 12, 0) == (64, 32, 16, 16, 8, 8, 4, 4, 4, 4, 64, 32)
    mixed = client_ranks({16: 0.2, 8: 0.3, 4: 0.5}, 10, seed=1)
    assert sorted(mixed) == [4] * 5 + [8] * 3 + [16] * 2
    assert client_ranks({"16": 0.2, "8": 0.3, "4": 0.5}, 10, seed=1) == mixed  # keys as a YAML file may give them
    draws = {client_ranks({16: 0.2, 8: 0.3, 4: 0.5}, 10, seed=s) for s in range(6)}
    assert len(draws) > 1  # the seed shuffles who gets which
    assert sorted(client_ranks({8: 1 / 3, 2: 2 / 3}, 7, 0)) == [2] * 5 + [8] * 2  # 2.33 and 4.67: the larger remainder gets the spare


@pytest.mark.parametrize(
    "override, key",
    [
        (["clients.ranks=[4,2]"], "clients.ranks: the largest rank is 4 and lora.rank is 8"),
        (["clients.ranks={8: 0.5, 4: 0.4}"], "clients.ranks: the tier fractions sum to 0.9"),
        (["clients.ranks=[8, 0]"], "clients.ranks: 0 is not a rank"),
        (["clients.ranks=[8,4]", "train.clients_per_batch=2"], "train.clients_per_batch"),
        (["clients.ranks=[8,4]", "method=fed_sb", "data.public_rows=64"], "clients.ranks: method fed_sb"),
        (["clients.ranks=[8,4]", "method=flasc"], "clients.ranks: method flasc"),
        (["method=flora", "secagg.enabled=true"], "secagg.enabled: method flora"),
        (["method=flora", "privacy.mode=central_dp", "privacy.noise_multiplier=1", "privacy.clip_norm=0.1"], "privacy.mode: method flora"),
        (["method=flora", "server.momentum=0.5"], "server.momentum: method flora"),
        (["method=hetlora", "secagg.enabled=true"], "method_args.weighting: hetlora's sparsity weights"),
        (["method=hetlora", "privacy.mode=central_dp", "privacy.noise_multiplier=1", "privacy.clip_norm=0.1"], "privacy.mode: method hetlora"),
        (["method=hetlora", "method_args.weighting=norm"], "weighting: 'norm' is not one of"),
    ],
)
def test_settings_that_cannot_work_with_ranks_or_these_methods_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        tiny_config(tmp_path, *override)


def test_hetlora_with_example_weights_runs_under_secure_aggregation(tmp_path):
    cfg = tiny_config(tmp_path, "method=hetlora", "method_args.weighting=examples", "secagg.enabled=true", "clients.ranks=[8,4]")
    assert cfg.secagg.enabled


def _clients(rng, ranks):
    """Each client's (A_k, B_k) at its own rank, and its head delta."""
    return [(rng.normal(size=(r, D_IN)), rng.normal(size=(D_OUT, r)), rng.normal(size=(3, D_OUT))) for r in ranks]


def test_the_stacked_adapter_is_the_weighted_sum_of_the_clients_products():
    rng = np.random.default_rng(0)
    ranks, alpha = [8, 2, 4, 2], 16.0
    clients = _clients(rng, ranks)
    p = rng.dirichlet(np.ones(len(ranks)))
    b_stack, a_stack = stack([(b, a, pk * alpha / r) for (a, b, _), pk, r in zip(clients, p, ranks)])
    assert b_stack.shape == (D_OUT, sum(ranks)) and a_stack.shape == (sum(ranks), D_IN)
    want = np.zeros((D_OUT, D_IN))
    for (a, b, _), pk, r in zip(clients, p, ranks):
        for j in range(r):  # sum_k p_k s_k sum_j b_kj a_kj^T, one rank-one term at a time
            want += pk * alpha / r * np.outer(b[:, j], a[j])
    np.testing.assert_allclose(b_stack @ a_stack, want, rtol=1e-10)


@pytest.mark.parametrize(
    "options, scaling",
    [
        (FLoRAOptions(), lambda r: 2.0),  # the authors' code: alpha_k = 2 r_k, scaling 2 at every rank
        (FLoRAOptions(alpha="global"), lambda r: 16.0 / r),  # raysim before issue 43: one alpha, scalings 2, 8, 4
    ],
    ids=["twice_rank", "global"],
)
def test_flora_merges_the_stacked_product_into_the_base_and_restarts_lora(options, scaling):
    rng = np.random.default_rng(1)
    ranks, alpha, seed = (8, 2, 4), 16.0, 3
    method = FLoRA(options, lora_rank=R, client_ranks=ranks, lora_alpha=alpha, seed=seed)
    assert [method.adapter(c).scaling for c in range(3)] == [scaling(r) for r in ranks]  # what each client trains with
    base = rng.normal(size=(D_OUT, D_IN)).astype(np.float32)
    adapter = {A_KEY: seeded_lora_a(A_KEY, (R, D_IN), seed), B_KEY: np.zeros((D_OUT, R), np.float32), HEAD: rng.normal(size=(3, D_OUT)).astype(np.float32)}
    state = method.init_server(adapter, {BASE: base})
    assert BASE in state.adapter and not state.frozen
    clients, weights = _clients(rng, ranks), [30.0, 10.0, 20.0]
    messages = [(c, w, Message(summable={HEAD: h}, per_client={A_KEY: a, B_KEY: b})) for c, ((a, b, h), w) in enumerate(zip(clients, weights))]
    new = method.aggregate(state, RoundInput(1, None, sum(weights), messages)).adapter
    total = sum(weights)
    want_base = base.astype(np.float64) + sum(w / total * scaling(r) * b @ a for (a, b, _), w, r in zip(clients, weights, ranks))
    np.testing.assert_allclose(new[BASE], want_base, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new[HEAD], adapter[HEAD] + sum(w / total * h for (_, _, h), w in zip(clients, weights)), rtol=1e-5)
    np.testing.assert_array_equal(new[B_KEY], 0)
    np.testing.assert_array_equal(new[A_KEY], seeded_lora_a(A_KEY, (R, D_IN), seed, 2))
    assert not np.array_equal(new[A_KEY], adapter[A_KEY])
    stacked = method.broadcast(method.aggregate(state, RoundInput(1, None, total, messages)))
    head_bytes = adapter[HEAD].nbytes
    assert method.broadcast_bytes(state, state.adapter, 4) == head_bytes  # round 1: nothing stacked yet
    next_state = method.aggregate(state, RoundInput(1, None, total, messages))
    assert method.broadcast_bytes(next_state, stacked, 2) == head_bytes + 4 * sum(ranks) * (D_IN + D_OUT)


def test_flora_clients_draw_their_own_a_each_round_unless_it_is_shared():
    """The authors' code builds each client's LoRA afresh (PEFT's Kaiming-uniform A, drawn
    independently per client); ``shared_a`` keeps raysim's earlier one A per round."""
    method = FLoRA(FLoRAOptions(), lora_rank=R, client_ranks=(8, 2, 4), lora_alpha=16.0, seed=3)
    start = {A_KEY: torch.from_numpy(seeded_lora_a(A_KEY, (R, D_IN), 3, 2)), B_KEY: torch.zeros(D_OUT, R), HEAD: torch.ones(3, D_OUT)}
    bound = 1 / np.sqrt(D_IN)
    own = []
    for cid in range(3):
        got = method.client_start(cid, 2, start)
        a = got[A_KEY].numpy()
        assert np.abs(a).max() <= bound and abs(a.std() - bound / np.sqrt(3)) < 0.3 * bound / np.sqrt(3)  # U(-bound, bound)
        np.testing.assert_array_equal(a, method.client_start(cid, 2, start)[A_KEY].numpy())  # from the seed alone
        assert not np.array_equal(a, start[A_KEY].numpy()) and not np.array_equal(a, method.client_start(cid, 3, start)[A_KEY].numpy())
        assert got[B_KEY] is start[B_KEY] and got[HEAD] is start[HEAD]
        own.append(a.ravel())
    correlations = np.corrcoef(np.stack(own))[np.triu_indices(3, 1)]
    assert np.all(np.abs(correlations) < 0.4)  # independent draws: 80 values each, |r| ~ 0.11
    shared = FLoRA(FLoRAOptions(shared_a=True), lora_rank=R, client_ranks=(8, 2, 4), lora_alpha=16.0, seed=3)
    assert all(shared.client_start(cid, 2, start) is start for cid in range(3))


def _hetlora_message(method, cid, a, b, head):
    trained = {A_KEY: torch.from_numpy(a), B_KEY: torch.from_numpy(b), HEAD: torch.from_numpy(head)}
    return method.client_message(ClientUpdate(cid, 1, 10, {k: torch.zeros_like(v) for k, v in trained.items()}, trained), {})


def test_hetlora_averages_zero_padded_values_weighted_by_their_products_norm():
    rng = np.random.default_rng(2)
    ranks = (8, 2, 4)
    method = HetLoRA(HetOptions(), lora_rank=R, client_ranks=ranks)
    adapter = {A_KEY: rng.normal(size=(R, D_IN)), B_KEY: rng.normal(size=(D_OUT, R)), HEAD: rng.normal(size=(3, D_OUT))}
    state = method.init_server(adapter, {})
    padded, norms = [], []
    summed: dict = {}
    for cid, r in enumerate(ranks):
        a, b = np.zeros((R, D_IN)), np.zeros((D_OUT, R))  # as the runtime leaves a client's unused slots
        a[:r], b[:, :r] = rng.normal(size=(r, D_IN)), rng.normal(size=(D_OUT, r))
        head = rng.normal(size=(3, D_OUT))
        message = _hetlora_message(method, cid, a, b, head)
        assert message.size() == 8 * (r * D_IN + D_OUT * r + 3 * D_OUT) + 4  # float64 here; only its ranks, and its weight
        for k, v in message.summable.items():
            summed[k] = summed.get(k, 0) + v.numpy()
        padded.append({A_KEY: a, B_KEY: b, HEAD: head})
        norms.append(np.linalg.norm(b @ a))
    mean = {k: v / len(ranks) for k, v in summed.items()}  # the runtime's uniform weights
    assert set(mean) == set(method.message_template(state))
    new = method.aggregate(state, RoundInput(1, mean, float(len(ranks)))).adapter
    p = np.array(norms) / sum(norms)
    for k in adapter:
        np.testing.assert_allclose(new[k], sum(pk * c[k] for pk, c in zip(p, padded)), rtol=1e-6)
    assert WEIGHT not in new


def _runtime_mean(method, messages, examples, weighting="examples"):
    """What the runtime hands the server (raysim/runtime/host.py) under ``train.weighting``:
    each message times its client's weight (its examples where the method keeps that weighting,
    else 1), summed, over the summed weights."""
    keeps = method.client_weighting(weighting) == "examples"
    weights = [float(n) if keeps else 1.0 for n in examples]
    summed: dict = {}
    for w, message in zip(weights, messages):
        for k, v in message.summable.items():
            summed[k] = summed.get(k, 0) + w * v.numpy()
    return {k: v / sum(weights) for k, v in summed.items()}, sum(weights)


@pytest.mark.parametrize("weighting", ["sparsity", "sparsity_x_examples"])
def test_hetlora_weights_unequal_clients_by_their_norm_alone_as_the_paper_does(weighting):
    """Clients of 10 and 30 examples under train.weighting: examples. The paper's p_k =
    ||B_k A_k|| / Z is [0.415, 0.585] here; sparsity_x_examples (raysim before issue 43) also
    multiplies by the examples: [0.191, 0.809]."""
    rng = np.random.default_rng(5)
    method = HetLoRA(HetOptions(weighting=weighting), lora_rank=R, client_ranks=(R, R))
    state = method.init_server({A_KEY: rng.normal(size=(R, D_IN)), B_KEY: rng.normal(size=(D_OUT, R)), HEAD: rng.normal(size=(3, D_OUT))}, {})
    clients = [{A_KEY: rng.normal(size=(R, D_IN)), B_KEY: rng.normal(size=(D_OUT, R)), HEAD: rng.normal(size=(3, D_OUT))} for _ in range(2)]
    norm = [np.linalg.norm(c[B_KEY] @ c[A_KEY]) for c in clients]
    clients[0][B_KEY] *= 0.415 / 0.585 * norm[1] / norm[0]  # norms in the ratio 0.415 : 0.585
    norms = np.array([np.linalg.norm(c[B_KEY] @ c[A_KEY]) for c in clients])
    examples = np.array([10.0, 30.0])
    messages = [_hetlora_message(method, cid, c[A_KEY], c[B_KEY], c[HEAD]) for cid, c in enumerate(clients)]
    mean, total = _runtime_mean(method, messages, examples)
    new = method.aggregate(state, RoundInput(1, mean, total)).adapter
    p = norms / norms.sum() if weighting == "sparsity" else norms * examples / (norms * examples).sum()
    np.testing.assert_allclose(p, [0.415, 0.585] if weighting == "sparsity" else [0.191, 0.809], atol=1e-3)
    for k in clients[0]:
        np.testing.assert_allclose(new[k], sum(pk * c[k] for pk, c in zip(p, clients)), rtol=1e-6, atol=1e-9)


def test_hetlora_self_pruning_drops_trailing_ranks_that_contribute_little():
    rng = np.random.default_rng(3)
    method = HetLoRA(HetOptions(weighting="examples", prune_fraction=0.25, prune_threshold=0.05), lora_rank=R)
    a, b = rng.normal(size=(R, D_IN)), rng.normal(size=(D_OUT, R))
    b[:, 6:] *= 1e-3  # the last quarter of the ranks is nearly silent
    sent = _hetlora_message(method, 0, a, b, np.zeros((3, D_OUT))).summable
    np.testing.assert_array_equal(sent[A_KEY][6:].numpy(), 0)
    np.testing.assert_array_equal(sent[B_KEY][:, 6:].numpy(), 0)
    np.testing.assert_array_equal(sent[B_KEY][:, :6].numpy(), b[:, :6])
    b[:, 6:] *= 1e3
    kept = _hetlora_message(method, 0, a, b, np.zeros((3, D_OUT))).summable
    np.testing.assert_array_equal(kept[B_KEY].numpy(), b)


@pytest.mark.parametrize("method", ["lora", "ffa_lora"])
def test_a_small_rank_client_on_the_resident_model_trains_as_a_model_built_at_its_rank(tmp_path, method):
    """Rank 2 on the rank-8 model (masked slots, the client's scaling alpha / 2) against PEFT's own
    rank-2 model: the same seeded base, head and A rows, so the same steps give the same tensors."""
    small = build_model(tiny_config(tmp_path, f"method={method}", "lora.rank=2"), 3)
    large = build_model(tiny_config(tmp_path, f"method={method}"), 3)
    large_params = trainable_parameters(large)
    with torch.no_grad():  # a global adapter whose B has trained all 8 slots: the client gets its first 2
        generator = torch.Generator().manual_seed(0)
        small_named = dict(small.named_parameters())
        for name, param in large.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
                small_named[name].copy_(param[:, :2])
    ranks = ClientRank(large, 8, large_params)
    frozen = {k: torch.from_numpy(v) for k, v in frozen_lora_a(large).items()}
    cfg_train = tiny_config(tmp_path).train
    data = random_rows()
    from raysim.methods.protocol import AdapterSpec

    results = []
    for model, spec in ((small, None), (large, AdapterSpec(rank=2, scaling=16.0 / 2))):
        params = trainable_parameters(model)
        optimizer = make_optimizer(cfg_train, list(params.values()))
        torch.manual_seed(0)
        batches = shuffled_batches(ClientState.new(0, 1), data.lengths, 8, 4)
        if spec is None:
            local_train(model, optimizer, data, batches, torch.device("cpu"))
            moments = saved_optimizer_state(optimizer, list(params.values()))
        else:
            with ranks.applied(spec, frozen):
                local_train(model, optimizer, data, batches, torch.device("cpu"), after_step=ranks.project)
                moments = ranks.moments_out(saved_optimizer_state(optimizer, list(params.values())))
        results.append(({k: v.detach().clone() for k, v in model.named_parameters()}, moments))
    (want, want_moments), (got, got_moments) = results
    for name, value in want.items():
        part = got[name][: value.shape[0]] if ".lora_A." in name else got[name][:, : value.shape[1]] if ".lora_B." in name else got[name]
        torch.testing.assert_close(part, value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in got.items():  # the unused slots stay zero; frozen A gets them back
        if ".lora_B." in name and method == "lora":
            assert torch.count_nonzero(value[:, 2:]) == 0
    for name, value in frozen.items():
        torch.testing.assert_close(got[name], value)
    assert [{k: tuple(v.shape) for k, v in m.items() if torch.is_tensor(v) and v.dim()} for m in got_moments.values()] == [
        {k: tuple(v.shape) for k, v in m.items() if torch.is_tensor(v) and v.dim()} for m in want_moments.values()
    ]
    assert all(layer.scaling["default"] == 2.0 for layer in ranks.layers)  # restored: 16 / 8
