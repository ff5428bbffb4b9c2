"""Several clients' local steps in one forward pass over the shared frozen model.

Clients on one worker differ only in their adapter (FFA-LoRA: the B matrices and the task head),
so the batches of K clients can pass through the base model as one batch of K x b rows: the frozen
weights are read once per step for all of them, and only the adapter's Linear layers apply each
client's own weights, by batched matmuls over that client's block of rows. On a GPU, where one
client's small batch leaves the chip idle, that is the gain (``train.clients_per_batch``).

Each client keeps its own parameters, gradients and optimizer moments (the summed loss gives
client k's weights only client k's gradient), so the result equals training the clients one after
another up to float rounding, as long as dropout is off: dropout masks are drawn once per group.

No Ray here: the worker and the benchmark call :func:`local_train_stacked`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from raysim.losses import example_losses
from raysim.training import ClientData, collate, logits_and_targets, saved_optimizer_state, swap_optimizer_state


class ClientStackedLinear(nn.Module):
    """K clients' copies of one Linear layer. The input's rows are K equal blocks, block k being
    client k's rows, and each block goes through its client's weights (one batched matmul)."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(w.detach().clone()) for w in weights)
        self.biases = None if biases is None else nn.ParameterList(nn.Parameter(b.detach().clone()) for b in biases)

    @property
    def weight(self) -> torch.Tensor:
        """PEFT reads ``lora_A.weight.dtype``; all copies share one dtype."""
        return self.weights[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clients = len(self.weights)
        if x.shape[0] % clients:
            raise ValueError(f"{x.shape[0]} rows do not split into {clients} equal client blocks")
        blocks = x.reshape(clients, -1, x.shape[-1])
        weights = torch.stack(list(self.weights)).transpose(1, 2)  # [K, in, out]
        if self.biases is None:
            out = torch.bmm(blocks, weights)
        else:
            out = torch.baddbmm(torch.stack(list(self.biases)).unsqueeze(1), blocks, weights)
        return out.reshape(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def stacked_clients(model: nn.Module, starts: Sequence[dict[str, torch.Tensor]]) -> Iterator[list[dict[str, nn.Parameter]]]:
    """Within the block, every Linear layer that holds trainable tensors holds one copy per client,
    client k's initialised from ``starts[k]`` (by PEFT parameter name). Yields each client's
    parameters by name, in the model's order; the original layers are back afterwards."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    owners: dict[str, list[str]] = {}
    for name in trainable:
        path, _, attr = name.rpartition(".")
        owners.setdefault(path, []).append(attr)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    client_params: list[dict[str, nn.Parameter]] = [{} for _ in starts]
    try:
        for path, attrs in owners.items():
            layer = model.get_submodule(path)
            if type(layer) is not nn.Linear or not set(attrs) <= {"weight", "bias"}:
                raise ValueError(f"train.clients_per_batch: trained tensors of {path} are not a plain Linear layer's")
            has_bias = "bias" in attrs
            stacked = ClientStackedLinear(
                [start[f"{path}.weight"] for start in starts], [start[f"{path}.bias"] for start in starts] if has_bias else None
            )
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, child, stacked)
            swapped.append((parent, child, layer))
            for k, params in enumerate(client_params):
                params[f"{path}.weight"] = stacked.weights[k]
                if stacked.biases is not None:
                    params[f"{path}.bias"] = stacked.biases[k]
        yield [{name: params[name] for name in trainable} for params in client_params]
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)


def local_train_stacked(
    model: nn.Module,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    starts: Sequence[dict[str, torch.Tensor]],
    moments: Sequence[dict[int, dict]],
    data: Sequence[ClientData],
    batches: Sequence[Sequence[np.ndarray]],
    device: torch.device,
) -> list[tuple[float, dict[str, torch.Tensor], dict[int, dict]]]:
    """Train K clients together: client k starts from ``starts[k]`` and its optimizer moments
    ``moments[k]``, and takes one step per batch of row indices in ``batches[k]``. Every client
    takes the same number of steps, and at each step the clients' batches are equally large.
    Returns, per client, (mean training loss, trained tensors by name, optimizer moments)."""
    clients = len(starts)
    with stacked_clients(model, starts) as client_params:
        param_lists = [list(params.values()) for params in client_params]
        optimizer = make_optimizer([p for params in param_lists for p in params])
        for params, saved in zip(param_lists, moments):
            swap_optimizer_state(optimizer, params, saved, clear=False)
        loss_sums = torch.zeros(clients, device=device)
        steps = 0
        for step_rows in zip(*batches, strict=True):
            if len({len(rows) for rows in step_rows}) != 1:
                raise ValueError("clients trained together need equally large batches")
            width = max(int(d.lengths[rows].max()) for d, rows in zip(data, step_rows))
            parts = [collate(d, rows, device, width) for d, rows in zip(data, step_rows)]
            logits, targets = logits_and_targets(model, *(torch.cat(column) for column in zip(*parts)))
            losses = example_losses(logits, targets).view(clients, -1).mean(dim=1)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            loss_sums += losses.detach()
            steps += 1
        mean_losses = (loss_sums / steps).tolist() if steps else [math.nan] * clients
        return [
            (loss, {name: p.detach().clone() for name, p in params.items()}, saved_optimizer_state(optimizer, plist))
            for loss, params, plist in zip(mean_losses, client_params, param_lists)
        ]
