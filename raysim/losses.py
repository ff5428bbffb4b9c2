"""The training loss of each task, per example: the privacy unit of DP-SGD is one row.

- classification: cross-entropy of the row's class.
- causal_lm: the mean cross-entropy of the row's response tokens, each predicted from the tokens
  before it; prompt and padding positions carry no loss (targets -100, as transformers' labels),
  and their logits are not computed (:func:`response_positions`).
  A row's loss is its own mean, so a long response weighs what a short one does, and
  per-example clipping bounds each row alike. The batch loss is the mean over rows, under DP-SGD
  and without it, so both optimise the same objective.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


def response_targets(ids: np.ndarray, lengths: np.ndarray, response_start: np.ndarray, width: int) -> np.ndarray:
    """[n, width] int64: at position t the token at t + 1 where that token is part of the response
    (response_start <= t + 1 < length), else IGNORE."""
    n = len(lengths)
    nxt = np.full((n, width), IGNORE, dtype=np.int64)
    nxt[:, : width - 1] = ids[:, 1:width]
    position = np.arange(1, width + 1)[None, :]
    keep = (position >= response_start[:, None]) & (position < lengths[:, None])
    return np.where(keep, nxt, IGNORE)


def response_positions(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For token targets [B, L] (:func:`response_targets`): the positions whose logits the loss
    needs, [B, K] with K the batch's longest response (a row's are contiguous: its response), and
    the targets at them, IGNORE past a shorter row's response. A causal LM then projects K
    positions per row onto its vocabulary instead of L (transformers' ``logits_to_keep``)."""
    keep = targets != IGNORE
    counts = keep.sum(dim=1)
    width = max(1, int(counts.max()))
    first = keep.to(torch.int8).argmax(dim=1)
    offsets = torch.arange(width, device=targets.device)
    positions = (first[:, None] + offsets).clamp(max=targets.shape[1] - 1)
    kept = torch.where(offsets < counts[:, None], targets.gather(1, positions), IGNORE)
    return positions, kept


def example_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One loss per row: [B] from class logits [B, C] and classes [B], or from token logits
    [B, L, V] and token targets [B, L] (:func:`response_targets`)."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, reduction="none")
    tokens = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE).view(targets.shape)
    counted = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return tokens.sum(dim=1) / counted


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(summed cross-entropy, tokens) over the response tokens: per-token loss and perplexity."""
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE)
    return float(total), int((targets != IGNORE).sum())


def mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return example_losses(logits, targets).mean()


class ExampleLoss(torch.nn.Module):
    """:func:`example_losses` as a criterion with a ``reduction`` attribute, which Opacus' ghost
    clipping sets to "none" to get the per-example losses."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = example_losses(logits, targets)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()
