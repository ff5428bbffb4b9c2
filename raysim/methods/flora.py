"""FLoRA: federated fine-tuning with heterogeneous LoRA by stacking (Ziyao Wang, Zheyu Shen, Yexiao
He, Guoheng Sun, Hongyi Wang, Lingjuan Lyu, Ang Li, NeurIPS 2024, "FLoRA: Federated Fine-Tuning
Large Language Models with Heterogeneous Low-Rank Adaptations").

Each round every sampled client starts a fresh LoRA at its rank r_k on the current base weights
(A from PEFT's usual Kaiming-uniform init; B = 0), trains A_k, B_k and the head, and sends all of
them. The server stacks the adapters,

    B_stack = [B_1 ... B_K],   A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K],

(p_k the client's share of the round's weight, s_k = alpha_k / r_k its scaling), so that
B_stack A_stack = sum_k p_k s_k B_k A_k exactly, merges that product into the adapted layers' base
weights, and averages the head's deltas (FedAvg). The next round trains on the merged base: the
runtime's path for base weights that change between rounds (``changes_base``).

The paper does not state alpha_k or how the fresh A is drawn; the defaults follow the authors' code
(its main.py builds each client's LoRA with lora_alpha = 2 r_k on a copy of the model):

- ``alpha: twice_rank``: alpha_k = 2 r_k, so every client's scaling is 2 whatever its rank.
  ``alpha: global`` keeps raysim's rule before issue 43, alpha_k = lora.alpha for all, scaling
  lora.alpha / r_k (2, 4 and 8 at ranks 8, 4 and 2 with alpha 16).
- ``shared_a: false``: each client draws its own A, from (seed, round, client), so the clients'
  A_k are independent. ``shared_a: true`` keeps raysim's rule before issue 43: one A per round,
  drawn from (seed, round), for every client.

What travels: the paper sends each client the stacked adapter, which grows with the number of
clients (sum_k r_k ranks per module); ``downlink_bytes`` counts that (plus the head), the protocol
a deployment would run. raysim itself puts the adapted layers' merged weights (dense, d_out x d_in
per module, the same size every round) into the object store once per round, and every worker
installs them in place before it trains or evaluates, so a restarted worker, a moved client and a
resumed run all see the current base.

Composition: stacking needs each client's own adapter, so secure aggregation and central DP are
refused (whether A is shared or not); local DP-SGD works. The server optimizer is not part of FLoRA: server.lr must be 1 and
server.momentum 0. The saved adapter holds the head (its LoRA is the fresh, zero one); the merged
layers are saved next to it as ``merged_base.safetensors``, under the base model's names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from raysim.methods.common import BASE_LAYER, LORA_A, is_lora_tensor, lora_pairs, seeded_lora_a
from raysim.methods.protocol import AdapterSpec, Aggregation, ClientUpdate, Message, Method, RoundInput, ServerState
from raysim.methods.ranks import truncated

ALPHAS = ("twice_rank", "global")


@dataclass(frozen=True)
class Options:
    alpha: str = "twice_rank"  # alpha_k = 2 r_k (the authors' code); global: lora.alpha for every client
    shared_a: bool = False  # True: one fresh A per round for every client (raysim before issue 43)

    def __post_init__(self):
        if self.alpha not in ALPHAS:
            raise ValueError(f"alpha: '{self.alpha}' is not one of {', '.join(ALPHAS)}")


def stack(adapters: list[tuple[np.ndarray, np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(B_stack, A_stack) of one module from each client's (B_k, A_k, p_k s_k): B_stack A_stack =
    sum_k p_k s_k B_k A_k."""
    b_stack = np.concatenate([b for b, _, _ in adapters], axis=1)
    a_stack = np.concatenate([coef * a for _, a, coef in adapters], axis=0)
    return b_stack, a_stack


def base_name(prefix: str) -> str:
    """The base weight a LoRA module (by prefix) adapts."""
    return prefix + ".base_layer.weight"


class FLoRA(Method):
    name = "flora"
    aggregation = Aggregation.PER_CLIENT
    exact = True  # the stacked product is the weighted sum of the clients' products
    changes_base = True
    Options = Options

    @classmethod
    def conflicts(cls, cfg: Any) -> list[tuple[str, str]]:
        found = super().conflicts(cfg)
        if cfg.server.lr != 1 or cfg.server.momentum != 0:
            key = "server.lr" if cfg.server.lr != 1 else "server.momentum"
            found.append((key, "method flora merges the stacked adapters into the base as they are; no server optimizer: set server.lr=1 and server.momentum=0"))
        return found

    def scaling_of(self, client_id: int) -> float:
        """Client's LoRA scaling alpha_k / r_k: 2 under ``twice_rank``, lora.alpha / r_k under ``global``."""
        return 2.0 if self.options.alpha == "twice_rank" else self.lora_alpha / self.rank_of(client_id)

    def adapter(self, client_id: int) -> AdapterSpec:
        return AdapterSpec(rank=self.rank_of(client_id), scaling=self.scaling_of(client_id))

    def client_start(self, client_id: int, round_idx: int, start: Mapping[str, Any]) -> Mapping[str, Any]:
        """The broadcast with the client's own fresh A (unless ``shared_a``)."""
        if self.options.shared_a:
            return start
        import torch

        def own(name: str, value):
            drawn = seeded_lora_a(name, tuple(value.shape), self.seed, round_idx, client=client_id)
            return torch.from_numpy(drawn).to(device=value.device, dtype=value.dtype)

        return {k: own(k, v) if LORA_A in k else v for k, v in start.items()}

    def init_server(self, adapter: Mapping[str, np.ndarray], frozen: Mapping[str, np.ndarray]) -> ServerState:
        """The global adapter: the head, round 1's fresh LoRA and the adapted layers' base weights."""
        base = {k: np.array(v) for k, v in frozen.items() if BASE_LAYER in k}
        rest = {k: np.array(v) for k, v in frozen.items() if BASE_LAYER not in k}
        return ServerState(adapter={**{k: np.array(v) for k, v in adapter.items()}, **base}, frozen=rest, extra={"stacked_rank": 0})

    def client_message(self, update: ClientUpdate, state: dict[str, Any]) -> Message:
        """The head's delta (summable part) and the client's own A_k, B_k at its rank."""
        head = {k: update.trained[k] - update.start[k] for k in update.start if not is_lora_tensor(k)}
        lora = truncated({k: v for k, v in update.trained.items() if is_lora_tensor(k)}, self.rank_of(update.client_id))
        return Message(summable=head, per_client={k: v.clone() for k, v in lora.items()})

    def aggregate(self, state: ServerState, round_input: RoundInput) -> ServerState:
        messages = round_input.messages
        if not messages:
            return state
        total = sum(weight for _, weight, _ in messages)
        adapter = dict(state.adapter)
        for k in [k for k in adapter if not is_lora_tensor(k) and BASE_LAYER not in k]:
            adapter[k] = (adapter[k] + sum(w / total * m.summable[k] for _, w, m in messages)).astype(adapter[k].dtype)
        names = [k for k in adapter if is_lora_tensor(k)]
        for prefix, (a, b) in lora_pairs(names).items():
            b_stack, a_stack = stack([(m.per_client[b], m.per_client[a], w / total * self.scaling_of(c)) for c, w, m in messages])
            weight = adapter[base_name(prefix)]
            adapter[base_name(prefix)] = (weight + b_stack @ a_stack).astype(weight.dtype)
        next_round = round_input.round_idx + 1
        for k in names:
            shape = adapter[k].shape
            adapter[k] = seeded_lora_a(k, shape, self.seed, next_round) if LORA_A in k else np.zeros(shape, dtype=adapter[k].dtype)
        stacked = sum(self.rank_of(c) for c, _, _ in messages)
        return dataclasses.replace(state, adapter=adapter, extra={**state.extra, "stacked_rank": stacked})

    def broadcast_bytes(self, state: ServerState, sent: Mapping[str, np.ndarray], rank: int) -> int:
        """FLoRA's protocol: the head and the last round's stacked adapter (sum_k r_k ranks per
        module; the fresh A derives from the seed). Not the dense merged layers raysim's object
        store carries."""
        head = sum(v.nbytes for k, v in sent.items() if not is_lora_tensor(k) and BASE_LAYER not in k)
        per_rank = sum(sent[a].shape[1] + sent[b].shape[0] for a, b in lora_pairs(sent).values()) * 4
        return int(head + int(state.extra.get("stacked_rank", 0)) * per_rank)


METHOD = FLoRA
