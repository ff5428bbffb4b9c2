"""A virtual client's local training and the evaluation of an adapter, on a resident model.

No Ray here: the worker actor and the bare-loop benchmark both call these functions. A client's
persistent state (:class:`ClientState`) is small: its data cursor, its RNG and its optimizer
moments. The model itself is shared; a client's adapter is *copied into* it (:func:`load_adapter`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from raysim.losses import example_losses, mean_loss, response_positions, response_targets, token_loss_sum


@dataclass
class ClientData:
    ids: np.ndarray  # int32 [n, L], padded
    lengths: np.ndarray  # int32 [n]
    labels: np.ndarray  # int64 [n]: the class, or with ``causal`` the first response token's position
    causal: bool = False  # task=causal_lm: the targets are the response's next tokens

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ClientState:
    """What a virtual client keeps between rounds on its worker."""

    rng: np.random.Generator
    batches: list[np.ndarray] = field(default_factory=list)  # this epoch's remaining batches
    cursor: int = 0
    optimizer_state: dict[int, dict] = field(default_factory=dict)
    accountant: Any = None  # local DP: the client's Opacus accountant, alive across rounds
    method_state: dict[str, Any] = field(default_factory=dict)  # the method's per-client state (e.g. a residual)

    @classmethod
    def new(cls, seed: int, client_id: int) -> "ClientState":
        return cls(rng=np.random.default_rng([seed, client_id, 0xC1]))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint: the RNG's exact state, numpy moments, the accountant's history."""
        return {
            "rng": self.rng.bit_generator.state,
            "batches": list(self.batches),
            "cursor": self.cursor,
            "optimizer_state": {
                i: {k: v.detach().cpu().numpy() if torch.is_tensor(v) else v for k, v in moments.items()}
                for i, moments in self.optimizer_state.items()
            },
            "accountant_history": None if self.accountant is None else [tuple(h) for h in self.accountant.history],
            "method_state": self.plain_method_state(),
        }

    def plain_method_state(self) -> dict[str, Any]:
        """The method's state with its tensors as numpy arrays."""
        return {k: v.detach().cpu().numpy() if torch.is_tensor(v) else v for k, v in self.method_state.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], device: torch.device, make_accountant: Callable[[], Any] | None = None) -> "ClientState":
        """The inverse of :meth:`to_dict`, with the moments on ``device``; the accountant (if the
        client had one) made by ``make_accountant`` and given its history back."""
        rng = np.random.default_rng()
        rng.bit_generator.state = values["rng"]
        state = cls(rng=rng, batches=list(values["batches"]), cursor=values["cursor"])
        state.optimizer_state = moments_to(
            {i: {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in m.items()} for i, m in values["optimizer_state"].items()},
            device,
        )
        state.method_state = method_state_to(values.get("method_state", {}), device)
        if values["accountant_history"] is not None and make_accountant is not None:
            state.accountant = make_accountant()
            state.accountant.history = [tuple(h) for h in values["accountant_history"]]
        return state


def method_state_to(saved: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A method's client state with its arrays as tensors on ``device``."""
    return {k: torch.from_numpy(np.array(v)).to(device) if isinstance(v, np.ndarray) else v for k, v in saved.items()}


def moments_to(saved: dict[int, dict], device: torch.device) -> dict[int, dict]:
    """Optimizer moments moved to ``device``. Scalars (Adam's step count) stay where torch keeps
    them for a non-capturable optimizer: on the CPU."""
    return {i: {k: v.to(device) if torch.is_tensor(v) and v.dim() else v for k, v in m.items()} for i, m in saved.items()}


def step_seed(seed: int, round_idx: int, client_id: int) -> int:
    """Seed for the torch RNG (dropout) of one client's local steps in one round."""
    return zlib.crc32(np.asarray([seed, round_idx, client_id], dtype=np.int64).tobytes())


LENGTH_GROUP = 16  # batches per length-sorted group


def epoch_batches(rng: np.random.Generator, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """One epoch of batches: shuffle, sort each group of LENGTH_GROUP batches by length, cut, shuffle
    the batches. Batches then hold rows of similar length, so trimming leaves little padding (like
    transformers' group_by_length); a last incomplete batch is dropped unless it is the only one."""
    n = len(lengths)
    batch_size = min(batch_size, n)
    order = rng.permutation(n)
    span = batch_size * LENGTH_GROUP
    batches: list[np.ndarray] = []
    for start in range(0, n, span):
        group = order[start : start + span]
        group = group[np.argsort(lengths[group], kind="stable")]
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    batches = [b for b in batches if len(b) == batch_size]
    return [batches[i] for i in rng.permutation(len(batches))]


def next_batch(state: ClientState, lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """The client's next batch, starting a new epoch when the current one is used up (or when the
    batch size was changed between rounds)."""
    if state.cursor >= len(state.batches) or len(state.batches[state.cursor]) != min(batch_size, len(lengths)):
        state.batches, state.cursor = epoch_batches(state.rng, lengths, batch_size), 0
    state.cursor += 1
    return state.batches[state.cursor - 1]


def shuffled_batches(state: ClientState, lengths: np.ndarray, batch_size: int, steps: int) -> Iterator[np.ndarray]:
    """``steps`` batches of the client's shuffled epochs (the non-private sampling)."""
    for _ in range(steps):
        yield next_batch(state, lengths, batch_size)


def collate(data: ClientData, idx: np.ndarray, device: torch.device, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, targets) trimmed to the longest row of the batch, or to
    ``width``; targets are the classes, or for a causal LM the response tokens each position
    predicts (:func:`raysim.losses.response_targets`)."""
    width = int(data.lengths[idx].max()) if width is None else width
    ids = torch.from_numpy(data.ids[idx, :width].astype(np.int64))
    mask = torch.arange(width)[None, :] < torch.from_numpy(data.lengths[idx].astype(np.int64))[:, None]
    if data.causal:
        targets = torch.from_numpy(response_targets(data.ids[idx], data.lengths[idx], data.labels[idx], width))
    else:
        targets = torch.from_numpy(data.labels[idx])
    return ids.to(device), mask.long().to(device), targets.to(device)


def logits_and_targets(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the targets they score. A causal LM's output layer runs only at
    its rows' response positions: B x K x vocab logits for K response tokens, not B x L x vocab
    (for a yes/no answer after a 190-token prompt, 2 positions of 192)."""
    if targets.dim() == 1:
        return model(input_ids=ids, attention_mask=mask).logits, targets
    positions, kept = response_positions(targets)
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits, kept


def load_adapter(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter values into the resident model's tensors in place (never rebuild the model)."""
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value, non_blocking=True)


def swap_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], saved: dict[int, dict], clear: bool = True) -> None:
    """Make ``optimizer`` continue from a client's saved moments (empty: a fresh optimizer) for
    ``params``; ``clear=False`` keeps other parameters' state (several clients in one optimizer)."""
    if clear:
        optimizer.state.clear()
    for i, moments in saved.items():
        optimizer.state[params[i]] = moments


def saved_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[int, dict]:
    """Copies of the optimizer's state after a client's steps. Copies, because the optimizer's own
    tensors were allocated among the step's temporaries: kept for thousands of clients they pin
    the heap (measured: 136 KiB per client for 18 KiB of AdamW moments; copies cost their size)."""
    return {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
        for i, p in enumerate(params)
        if p in optimizer.state
    }


def make_optimizer(train_cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def local_train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ClientData,
    batches: Iterable[np.ndarray],
    device: torch.device,
    loss_fn: Callable = mean_loss,
    after_step: Callable[[], None] | None = None,
) -> float:
    """One optimizer step per batch of row indices, each followed by ``after_step()``; returns the
    mean training loss.

    An empty batch (possible under Poisson sampling) still takes a step: the loss of one row times
    zero, so DP-SGD adds its noise as it must, and nothing is learned from that row.
    """
    total, counted = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    for idx in batches:
        empty = len(idx) == 0
        logits, targets = logits_and_targets(model, *collate(data, np.zeros(1, dtype=np.int64) if empty else idx, device))
        loss = loss_fn(logits, targets)
        if empty:
            loss = loss * 0.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        if not empty:
            total += loss.detach()
            counted += 1
    return float(total) / counted if counted else math.nan


def backward_mean_loss(model: torch.nn.Module, data: ClientData, batch_size: int, device: torch.device) -> None:
    """Accumulate into ``.grad`` the gradient of the mean loss over all of ``data``'s rows, batch by
    batch, without dropout (the same gradient in every process and on every call)."""
    was_training = model.training
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        logits, targets = logits_and_targets(model, *collate(data, order[start : start + batch_size], device))
        (example_losses(logits, targets).sum() / len(order)).backward()
    model.train(was_training)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ClientData, batch_size: int, device: torch.device) -> tuple[float, int, int]:
    """(summed loss, correct predictions, examples), or for a causal LM (summed loss of the
    response tokens, 0, tokens); batches of similar length to limit padding."""
    was_training = model.training
    model.eval()
    loss_sum, correct, counted = 0.0, 0, 0
    order = np.argsort(data.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        logits, targets = logits_and_targets(model, *collate(data, order[start : start + batch_size], device))
        if data.causal:
            batch_loss, tokens = token_loss_sum(logits, targets)
            loss_sum, counted = loss_sum + batch_loss, counted + tokens
        else:
            loss_sum += float(example_losses(logits, targets).sum())
            correct += int((logits.argmax(-1) == targets).sum())
            counted += len(targets)
    model.train(was_training)
    return loss_sum, correct, counted
