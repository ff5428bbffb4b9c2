"""Heterogeneous ranks and base weights that change, through the runtime (the local one: the
Ray runtime is compared with it in test_protocol.py)."""

import numpy as np
import pytest
import torch

from raysim import Simulation
from raysim.methods.common import seeded_lora_a
from raysim.methods.ranks import rank_slices
from raysim.runtime.server import Server

from conftest import tiny_config

RANKS = "clients.ranks=[8,4,2]"
SGD = ("runtime=local", "train.optimizer=sgd", "train.lr=0.05")


class MessageRecordingServer(Server):
    """Keeps each round's per-client messages (the local runtime's server is in this process)."""

    rounds: list = []

    def _apply(self, round_input):
        MessageRecordingServer.rounds.append(round_input.messages)
        super()._apply(round_input)


class RecordingSimulation(Simulation):
    server_class = MessageRecordingServer


def test_flora_merges_two_rounds_into_the_base_the_workers_train_and_evaluate_on(tmp_path):
    MessageRecordingServer.rounds = []
    cfg = tiny_config(tmp_path, *SGD, "method=flora", RANKS, "rounds=2")
    with RecordingSimulation(cfg) as sim:
        start = sim.global_adapter()
        sim.run(progress=False)
        merged = sim.global_adapter()
        final = sim.evaluate()
        adapter_dir = sim.save_adapter()
        ranks = sim.method.client_ranks
        downlink = [row["downlink_bytes"] for row in sim.rows]
    bases = [k for k in start if k.endswith(".base_layer.weight")]
    assert len(bases) == 2 * cfg.model.config_overrides.num_hidden_layers  # query and value per layer
    for base in bases:  # an independent replay: W2 = W0 + sum over rounds and clients of p_k s_k B_k A_k, s_k = 2 (alpha_k = 2 r_k)
        prefix = base[: -len(".base_layer.weight")]
        want = start[base].astype(np.float64)
        for messages in MessageRecordingServer.rounds:
            total = sum(w for _, w, _ in messages)
            for cid, weight, message in messages:
                a, b = message.per_client[f"{prefix}.lora_A.default.weight"], message.per_client[f"{prefix}.lora_B.default.weight"]
                assert a.shape[0] == b.shape[1] == ranks[cid]  # each client sent its own rank
                want += weight / total * 2.0 * b.astype(np.float64) @ a
        np.testing.assert_allclose(merged[base], want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(merged[base], start[base])
    for round_idx, messages in enumerate(MessageRecordingServer.rounds, start=1):  # each client trained from its own A
        for cid, _, message in messages:
            for name, a in message.per_client.items():
                if ".lora_A." in name:
                    own = seeded_lora_a(name, start[name].shape, cfg.seed, round_idx, client=cid)[: ranks[cid]]
                    shared = seeded_lora_a(name, start[name].shape, cfg.seed, round_idx if round_idx > 1 else 0)[: ranks[cid]]
                    assert np.linalg.norm(a - own) < 0.5 * np.linalg.norm(a - shared), (round_idx, cid, name)
    # The saved files rebuild the evaluated model: the base with merge_base.safetensors, then PEFT's adapter.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from raysim.data.loading import from_arrow
    from raysim.data.prepare import prepare
    from raysim.data.tokenizer import load_tokenizer
    from raysim.training import ClientData, evaluate

    torch.manual_seed(cfg.seed)
    config = AutoConfig.from_pretrained(cfg.model.name_or_path, num_labels=3, **cfg.model.config_overrides)
    model = AutoModelForSequenceClassification.from_config(config)
    missing, unexpected = model.load_state_dict(load_file(str(adapter_dir / "merged_base.safetensors")), strict=False)
    assert not unexpected and len(missing) > len(bases)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    data = prepare(cfg, load_tokenizer(cfg.model.name_or_path))
    loss, correct, n = evaluate(model, ClientData(*from_arrow(data.eval_full)), 64, torch.device("cpu"))
    assert n == final["eval_examples"] and correct / n == pytest.approx(final["eval_accuracy"], abs=1e-12)
    assert loss / n == pytest.approx(final["eval_loss"], rel=1e-5)
    # Downlink: FLoRA's protocol sends round 2's clients the head and round 1's stacked adapter.
    head = sum(v.nbytes for k, v in start.items() if "classifier" in k)
    per_rank = 4 * sum(start[f"{p[: -len('.base_layer.weight')]}.lora_A.default.weight"].shape[1] + start[p].shape[0] for p in bases)
    stacked = sum(ranks[c] for c, _, _ in MessageRecordingServer.rounds[0])
    assert downlink == [cfg.clients.per_round * head, cfg.clients.per_round * (head + stacked * per_rank)]


def test_hetlora_shows_its_inexact_average_and_each_client_sends_and_keeps_only_its_rank(tmp_path):
    cfg = tiny_config(tmp_path, "runtime=local", "method=hetlora", "method_args.weighting=examples", RANKS, "rounds=2", "clients.per_round=6")
    with Simulation(cfg) as sim:
        start = sim.global_adapter()
        sampled = sim.backend.get(sim.server.sample.remote(1, cfg.clients.per_round))
        rows = [sim.run_round()]
        states = {c: s for w in sim.workers for c, s in sim.backend.get(w.export_states.remote()).items()}
        ranks = sim.method.client_ranks
        model_params = sum(p.numel() for p in sim.workers[0]._target.model.parameters())
    assert rows[0]["aggregation_error"] > 1e-3  # padded A and B averaged apart: not the mean product
    names = list(start)  # in the optimizer's order
    want_uplink = 0
    for cid in sampled:
        for name in names:
            cut = rank_slices(name, ranks[cid])
            want_uplink += start[name][cut].nbytes if cut else start[name].nbytes
    assert rows[0]["uplink_bytes"] == want_uplink
    for cid in sampled:  # optimizer moments at the client's own shape
        for i, moments in states[cid]["optimizer_state"].items():
            name = names[i]
            cut = rank_slices(name, ranks[cid])
            want = start[name][cut].shape if cut else start[name].shape
            assert all(v.shape == want for v in moments.values() if isinstance(v, np.ndarray) and v.ndim), (cid, name)
    with Simulation(tiny_config(tmp_path / "uniform", "runtime=local", "method=hetlora", "rounds=0")) as sim:
        assert sum(p.numel() for p in sim.workers[0]._target.model.parameters()) == model_params  # one resident model, whatever the ranks
