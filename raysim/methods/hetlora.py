"""HetLoRA: heterogeneous-rank LoRA (Yae Jee Cho, Luyang Liu, Zheng Xu, Aldi Fahrezi, Gauri Joshi,
EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models").

The server keeps a global LoRA at the largest rank (``lora.rank``). Client k (rank r_k from
``clients.ranks``):

- receives the global adapter truncated to its first r_k ranks (A's rows, B's columns);
- trains both A_k and B_k (and the head) at rank r_k;
- optionally self-prunes: where its trailing ``prune_fraction`` of ranks contributes less than
  ``prune_threshold`` of ||B_k A_k||_F (over all modules), it zeroes them and sends fewer ranks;
- sends A_k and B_k themselves (values, not deltas), zero-padded to the largest rank.

The server averages the padded values with weights p_k:

- ``weighting: sparsity`` (the default, the paper's sparsity-weighted aggregation): p_k =
  ||B_k A_k||_F / Z, Z the sum over the round's clients, and nothing else: every client counts the
  same in the runtime's sum (:meth:`HetLoRA.client_weighting`), whatever ``train.weighting`` says;
- ``weighting: sparsity_x_examples`` (raysim's default before issue 43): ||B_k A_k||_F times the
  runtime's weight (the client's examples under ``train.weighting: examples``), normalised; with
  10 and 30 examples and equal norms that is [0.25, 0.75] where the paper's is [0.5, 0.5];
- ``weighting: examples``: the runtime's weights alone (``train.weighting``).

Each client's LoRA scaling is the global model's, lora.alpha / lora.rank, so a truncated adapter
is the first r_k terms of the global product.

What is exact and what is not: averaging A and B separately is FedIT's inexact average
(mean_k(B_k A_k) != mean_k(B_k) mean_k(A_k)), and zero-padding also pulls the high ranks of the
global adapter toward zero by the share of clients that do not hold them. The aggregation-error
diagnostic (on by default) measures both, against the clients' mean product under the runtime's
weights (every client alike under the default ``sparsity``).

Departures from the paper: self-pruning applies to the round's message only (the paper keeps a
client's pruned rank for later rounds; raysim's client ranks are fixed per run), and its rule is
the contribution ratio above rather than the paper's regularised-loss test.

Composition: the padded values are fixed-length vectors, so secure aggregation works with
``weighting: examples`` (values, not deltas, are sent: set ``secagg.clip_range`` to cover them; the
run warns when values are clipped). Sparsity weights (either form) need each client's norm, which a
secure sum hides, so they are refused with SecAgg; central DP is refused (it bounds an update's norm, and
HetLoRA sends values, whose norm training does not bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from raysim.methods.common import lora_pairs
from raysim.methods.protocol import ClientUpdate, Message, Method, ServerState
from raysim.methods.ranks import nbytes_at_rank

WEIGHT = "hetlora.sparsity_weight"  # the summed sparsity weights, next to the weighted values
WEIGHTINGS = ("sparsity", "sparsity_x_examples", "examples")
MIN_WEIGHT = 1e-12


@dataclass(frozen=True)
class Options:
    weighting: str = "sparsity"
    prune_fraction: float = 0.25
    prune_threshold: float = 0.0  # 0: no self-pruning

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: '{self.weighting}' is not one of {', '.join(WEIGHTINGS)}")
        if not 0 < self.prune_fraction < 1:
            raise ValueError(f"prune_fraction: {self.prune_fraction} must be in (0, 1)")
        if not 0 <= self.prune_threshold < 1:
            raise ValueError(f"prune_threshold: {self.prune_threshold} must be in [0, 1)")


def kept_rank(products_norm: float, tail_norm: float, rank: int, options: Options) -> int:
    """The rank a client sends after self-pruning: its trailing ceil(fraction x rank) ranks go
    where their product's norm is below threshold x the whole product's."""
    tail = math.ceil(options.prune_fraction * rank)
    if options.prune_threshold == 0 or tail >= rank or products_norm == 0:
        return rank
    return rank - tail if tail_norm < options.prune_threshold * products_norm else rank


def _product_norm_sq(b, a) -> float:
    """||B A||_F^2 as the r x r trace sum((B^T B) * (A A^T)), never forming d_out x d_in."""
    return float(((b.T @ b) * (a @ a.T)).sum())


class HetLoRA(Method):
    name = "hetlora"
    Options = Options

    @classmethod
    def conflicts(cls, cfg: Any) -> list[tuple[str, str]]:
        found = super().conflicts(cfg)
        sparsity = cfg.method_args.get("weighting", "sparsity") != "examples"
        if cfg.secagg.enabled and sparsity:
            found.append(
                ("method_args.weighting", "hetlora's sparsity weights need each client's ||B_k A_k||, which secure aggregation hides; set method_args.weighting=examples")
            )
        if cfg.privacy.mode == "central_dp":
            found.append(("privacy.mode", "method hetlora sends adapter values, whose norm training does not bound, and central DP clips a bounded update; use local_dp_sgd"))
        return found

    @property
    def sparsity(self) -> bool:
        return self.options.weighting != "examples"

    def client_weighting(self, configured: str) -> str:
        """The paper's p_k is the norm alone: each client counts once, its norm inside its message."""
        return "uniform" if self.options.weighting == "sparsity" else configured

    def client_message(self, update: ClientUpdate, state: dict[str, Any]) -> Message:
        import torch

        rank = self.rank_of(update.client_id)
        values = dict(update.trained)
        pairs = lora_pairs(values)
        whole = sum(_product_norm_sq(values[b], values[a]) for a, b in pairs.values())
        keep = rank - math.ceil(self.options.prune_fraction * rank)
        tail = sum(_product_norm_sq(values[b][:, keep:rank], values[a][keep:rank]) for a, b in pairs.values())
        sent_rank = kept_rank(math.sqrt(whole), math.sqrt(tail), rank, self.options)
        if sent_rank < rank:
            for a, b in pairs.values():
                values[a] = values[a].clone()
                values[a][sent_rank:] = 0
                values[b] = values[b].clone()
                values[b][:, sent_rank:] = 0
        nbytes = nbytes_at_rank(values, sent_rank)
        if self.sparsity:
            # A floor keeps the average defined where every client's product is still zero.
            weight = max(MIN_WEIGHT, math.sqrt(sum(_product_norm_sq(values[b], values[a]) for a, b in pairs.values())))
            values = {k: v * weight for k, v in values.items()}
            values[WEIGHT] = torch.full((1,), weight, dtype=torch.float32, device=next(iter(update.trained.values())).device)
            nbytes += 4
        return Message(summable=values, nbytes=nbytes)

    def message_template(self, state: ServerState) -> dict[str, np.ndarray]:
        if self.sparsity:
            return {**state.adapter, WEIGHT: np.zeros(1, dtype=np.float32)}
        return state.adapter

    def update(self, state: ServerState, mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The zero-padded (weighted) average of the clients' values, minus the global adapter."""
        scale = 1.0 / float(mean[WEIGHT][0]) if self.sparsity else 1.0
        return {k: (mean[k] * scale - v).astype(v.dtype) for k, v in state.adapter.items()}


METHOD = HetLoRA
