"""A client of a smaller rank on the resident model built at the largest rank (``clients.ranks``).

The model is never rebuilt: a client of rank r uses the first r slots of each LoRA module (A's
rows, B's columns; :func:`raysim.methods.ranks.rank_slices`). While it trains, the other slots of
A and B are zero: then B A equals its rank-r product and the gradients of those slots are zero
too (B's columns get A's rows as input, A's rows get B's columns), so per-sample gradient norms
under DP-SGD are those of a rank-r model. Only DP-SGD's noise would write to them: they are
zeroed again after every optimizer step. Frozen LoRA tensors (FFA-LoRA's A) get their slots back
afterwards. The client's optimizer moments are kept at its own shape, and its LoRA scaling is set
per module (PEFT's ``scaling``) where its method asks for one.

No Ray here.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping

import torch

from raysim.methods.common import is_lora_tensor
from raysim.methods.protocol import AdapterSpec
from raysim.methods.ranks import rank_slices

ADAPTER = "default"  # PEFT's adapter name


def _unused(name: str, rank: int) -> tuple[slice, ...] | None:
    """The slots of LoRA tensor ``name`` a client of ``rank`` does not use."""
    cut = rank_slices(name, rank)
    if cut is None:
        return None
    return (*cut[:-1], slice(cut[-1].stop, None))


def _scaling(module: Any) -> dict:
    """PEFT's per-adapter LoRA scaling of a LoRA layer; empty for other modules."""
    scaling = getattr(module, "scaling", None)
    return scaling if isinstance(scaling, dict) else {}


class ClientRank:
    """Puts the resident model at one client's rank and scaling, and back."""

    def __init__(self, model: torch.nn.Module, full_rank: int, params: Mapping[str, torch.nn.Parameter]):
        self.full_rank = full_rank
        self.lora = {name: p for name, p in model.named_parameters() if is_lora_tensor(name)}
        self.params = params  # the trained ones, in the optimizer's order
        self.layers: list[Any] = [m for m in model.modules() if ADAPTER in _scaling(m)]
        self.default_scaling = [m.scaling[ADAPTER] for m in self.layers]
        self.rank = full_rank  # the client's, within applied()

    def is_plain(self, spec: AdapterSpec) -> bool:
        """True where the spec is the resident model as it is: full rank, its own scaling."""
        scaled = spec.scaling is not None and any(not math.isclose(spec.scaling, s) for s in self.default_scaling)
        return spec.rank == self.full_rank and not scaled

    @contextlib.contextmanager
    def applied(self, spec: AdapterSpec, frozen: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Within the block the model is at ``spec``'s rank and scaling (load the client's
        adapter first); after it, ``frozen``'s LoRA tensors and the scaling are restored."""
        if self.is_plain(spec):
            yield
            return
        self.rank = spec.rank
        self.project(everything=True)
        for layer in self.layers:
            if spec.scaling is not None:
                layer.scaling[ADAPTER] = spec.scaling
        try:
            yield
        finally:
            self.rank = self.full_rank
            with torch.no_grad():
                for name, value in frozen.items():
                    self.lora[name].copy_(value)
            for layer, scaling in zip(self.layers, self.default_scaling):
                layer.scaling[ADAPTER] = scaling

    @torch.no_grad()
    def project(self, everything: bool = False) -> None:
        """Zero the slots the client does not use: of every LoRA tensor, or (after a step) of the trained ones."""
        if not 0 < self.rank < self.full_rank:
            return
        for name, param in (self.lora if everything else self.params).items():
            unused = _unused(name, self.rank)
            if unused is not None:
                param[unused] = 0

    def moments_out(self, moments: dict[int, dict]) -> dict[int, dict]:
        """Saved optimizer moments cut to the client's own shape."""
        return self._reshape(moments, lambda name, v: v[rank_slices(name, self.rank)].clone())

    def moments_in(self, moments: dict[int, dict]) -> dict[int, dict]:
        """A client's own-shape moments zero-padded to the resident model's tensors."""

        def pad(name: str, value: torch.Tensor) -> torch.Tensor:
            full = torch.zeros_like(self.params[name])
            full[tuple(slice(0, n) for n in value.shape)] = value
            return full

        return self._reshape(moments, pad)

    def _reshape(self, moments: dict[int, dict], change) -> dict[int, dict]:
        if not 0 < self.rank < self.full_rank:
            return moments
        names = list(self.params)
        out = {}
        for i, values in moments.items():
            name = names[i]
            cut = rank_slices(name, self.rank)
            out[i] = {k: change(name, v) if cut is not None and torch.is_tensor(v) and v.dim() else v for k, v in values.items()}
        return out
