"""FLASC: Federated LoRA with Sparse Communication (Kuo, Raje, Rajesh, Smith, 2024, arXiv 2406.05233;
the withdrawn CELLM thesis describes the same idea).

Clients fine-tune the whole LoRA (and the head) densely; only communication is sparse:

- download: the server sends the global adapter sparsified to its global top-k by magnitude, k =
  ``download_density`` x the adapter's size, one selection over all tensors; clients start from it
  (zeros elsewhere);
- upload: each client sends the global top-k of its update at ``upload_density``;
- the server adds the mean of the sparse updates to its dense adapter through the server optimizer
  (raysim's FedAvgM: ``server.lr``, ``server.momentum``; the paper's code steps AdamW);
- evaluation (and generation, and the saved adapter) use the adapter as clients download it, the
  dense adapter's top-k at ``download_density``: the paper does not say which model it evaluates,
  and the authors' public code evaluates the download-sparsified one by default.
  ``eval_dense: true`` evaluates and saves the dense adapter instead, raysim's rule before issue 43.

The head (PEFT's modules_to_save) is sparsified with the LoRA tensors, as in the authors' code.
``error_feedback`` adds what the paper leaves out and CELLM's abstract implies: each client keeps
the residual of the update it did not send and adds it to its next one (per-client method state,
kept across hand-overs, restarts and resumes). Messages count their real size: float32 values plus
their positions, as int32 indices or a bitmap, whichever is smaller.

Central DP clips the sparse update (clipping after sparsifying, as the authors' DP code does) and
noises every coordinate of the sum. Secure aggregation is refused: clients' supports differ, so a
masked sparse vector would reveal each client's support, and a dense one would send everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from raysim.methods.protocol import ClientUpdate, Message, Method, ServerState


@dataclass(frozen=True)
class Options:
    download_density: float = 0.25
    upload_density: float = 0.25
    error_feedback: bool = False
    eval_dense: bool = False  # True: evaluate and save the dense adapter, not the downloaded top-k

    def __post_init__(self):
        for key in ("download_density", "upload_density"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                raise ValueError(f"{key}: {value} must be in (0, 1]")


def kept_count(total: int, density: float) -> int:
    """How many of ``total`` values a top-k at ``density`` keeps (at least one)."""
    return max(1, min(total, math.ceil(density * total)))


def sparse_nbytes(kept: int, total: int, value_bytes: int = 4) -> int:
    """Bytes of ``kept`` of ``total`` values on the wire: the values, and their positions as int32
    indices or as a bitmap of ``total`` bits, whichever is smaller."""
    return kept * value_bytes + min(4 * kept, -(-total // 8))


def top_k_numpy(values: Mapping[str, np.ndarray], density: float) -> tuple[dict[str, np.ndarray], int]:
    """``values`` with all but the global top-k magnitudes set to zero, and the count kept."""
    names = sorted(values)
    flat = np.concatenate([values[n].ravel() for n in names])
    k = kept_count(flat.size, density)
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argpartition(-np.abs(flat), k - 1)[:k]] = True
    out, offset = {}, 0
    for n in names:
        size = values[n].size
        out[n] = np.where(keep[offset : offset + size].reshape(values[n].shape), values[n], 0).astype(values[n].dtype)
        offset += size
    return out, k


def top_k_torch(values: Mapping[str, Any], density: float) -> tuple[dict[str, Any], int]:
    """:func:`top_k_numpy` for torch tensors, on their device (torch is imported only where
    clients train: the server has none)."""
    import torch

    names = sorted(values)
    flat = torch.cat([values[n].reshape(-1) for n in names])
    k = kept_count(flat.numel(), density)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    out, offset = {}, 0
    for n in names:
        size = values[n].numel()
        out[n] = values[n] * keep[offset : offset + size].reshape(values[n].shape)
        offset += size
    return out, k


class FLASC(Method):
    name = "flasc"
    Options = Options

    @classmethod
    def conflicts(cls, cfg: Any) -> list[tuple[str, str]]:
        found = super().conflicts(cfg)
        if cfg.secagg.enabled:
            found.append(
                (
                    "secagg.enabled",
                    "method flasc sends each client's top-k, whose positions differ between clients: a masked sparse "
                    "vector would reveal them and a dense one would undo the saving; use method=ffa_lora or lora with secure aggregation",
                )
            )
        if cfg.clients.ranks is not None:
            found.append(("clients.ranks", "method flasc selects one top-k over the whole adapter; per-client ranks are not built for it (use lora, ffa_lora, hetlora or flora)"))
        return found

    def client_message(self, update: ClientUpdate, state: dict[str, Any]) -> Message:
        delta = {k: update.trained[k] - update.start[k] for k in update.start}
        if self.options.error_feedback:
            delta = {k: v + state[k] if k in state else v for k, v in delta.items()}
        sent, kept = top_k_torch(delta, self.options.upload_density)
        if self.options.error_feedback:
            state.update({k: delta[k] - sent[k] for k in delta})
        total = sum(v.numel() for v in delta.values())
        return Message(summable=sent, nbytes=sparse_nbytes(kept, total))

    def broadcast(self, state: ServerState) -> dict[str, np.ndarray]:
        return top_k_numpy(state.adapter, self.options.download_density)[0]

    def evaluated(self, state: ServerState) -> dict[str, np.ndarray] | None:
        """The downloaded top-k (None: the broadcast), or with ``eval_dense`` the dense adapter."""
        return state.adapter if self.options.eval_dense else None

    def broadcast_bytes(self, state: ServerState, sent: Mapping[str, np.ndarray], rank: int) -> int:
        total = sum(v.size for v in sent.values())
        return sparse_nbytes(kept_count(total, self.options.download_density), total)


METHOD = FLASC
