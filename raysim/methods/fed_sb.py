"""Fed-SB (Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning", 2025), on LoRA-SB (Ponkshe et al., 2024) and
LoRA-XS (Bałazy et al., 2024).

Each adapted module is W0 + s B R A: B (d_out x r) and A (r x d_in) are frozen and shared by every
client; only the r x r matrix R (and the task head) is trained and sent, so the uplink per module is
r² values whatever the model's width, and averaging is exact: mean_k(B R_k A) = B mean_k(R_k) A.
The paper pairs that with larger ranks than LoRA's at equal communication (r = 64 to 200 against 8
to 32): ``lora.rank`` sets r.

The paper's rule, the default:

- ``scaling: one``: the paper sets α = r, so s = 1 whatever ``lora.alpha`` says (the model's LoRA
  layers and the saved adapter's config take lora_alpha = r). ``scaling: lora_alpha`` keeps
  raysim's rule before issue 43, s = lora.alpha / lora.rank (0.25 at configs/study/methods.yaml's
  alpha 16 and rank 64).
- ``weighting: uniform``: the server averages R unweighted, R = (1/K) sum_k R_k, every client
  counting once whatever ``train.weighting`` says. ``weighting: examples`` keeps raysim's rule
  before issue 43: the runtime's weights (the clients' examples under ``train.weighting: examples``).

Initialisation, as LoRA-SB's: the first step of full fine-tuning with Adam moves each weight by
-η sign(G), G the gradient of the loss in W0; its rank-r truncated SVD U S Vᵀ gives B = U, A = Vᵀ
and R0 = S / s, so the model starts where that step would take it. G comes from a public split
(``data.public_rows`` training rows held out from every client, the mean loss over them), computed
once by one worker before round 1: it costs no privacy budget as long as those rows are public,
and clients never see them. The paper's DP script instead computes it from pooled client data
outside the accounting; raysim does not. η is ``method_args.init_lr``.

B and A are the server state's frozen tensors: every worker installs them (again after a restart,
and from the checkpoint on resume); each client downloads them once, which ``downlink_bytes``
(the per-round broadcast: R and the head) leaves out and the start-up log reports. The saved
adapter folds R into A (A' = R A): a plain PEFT LoRA of rank r with the same product.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from raysim.methods.common import LORA_A, LORA_B, lora_pairs
from raysim.methods.protocol import AdapterSpec, Method

R_NAME = "fed_sb_R"  # no "lora_" in it: PEFT's save leaves R out, and A' = R A is saved instead
ADAPTER = "default"


SCALINGS = ("one", "lora_alpha")
WEIGHTINGS = ("uniform", "examples")


@dataclass(frozen=True)
class Options:
    init_lr: float = 1e-3
    scaling: str = "one"  # the paper's s = 1 (alpha = r); lora_alpha: lora.alpha / lora.rank
    weighting: str = "uniform"  # the paper's unweighted mean of R; examples: train.weighting's

    def __post_init__(self):
        if self.init_lr <= 0:
            raise ValueError(f"init_lr: {self.init_lr} must be > 0")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling: '{self.scaling}' is not one of {', '.join(SCALINGS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: '{self.weighting}' is not one of {', '.join(WEIGHTINGS)}")


def _lora_layers(model) -> Iterator[tuple[str, Any]]:
    """(module path, PEFT LoRA layer) for every adapted module."""
    for path, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and ADAPTER in lora_a and hasattr(module, "get_base_layer"):
            yield path, module


def r_name(layer_path: str) -> str:
    return f"{layer_path}.{R_NAME}.{ADAPTER}.weight"


def sign_step_factors(gradient: np.ndarray, rank: int, lr: float, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, R0, A) with s B R0 A the rank-r truncated SVD of -lr sign(gradient)."""
    u, s, vt = np.linalg.svd(-lr * np.sign(gradient).astype(np.float64), full_matrices=False)
    return u[:, :rank], np.diag(s[:rank]) / scaling, vt[:rank]


class FedSB(Method):
    name = "fed_sb"
    exact = True  # B and A shared: mean_k(B R_k A) = B mean_k(R_k) A
    needs_public_data = True
    Options = Options

    @classmethod
    def conflicts(cls, cfg: Any) -> list[tuple[str, str]]:
        found = super().conflicts(cfg)
        if cfg.data.public_rows <= 0:
            found.append(("data.public_rows", "method fed_sb initialises B, R and A from the gradient on a public split: set data.public_rows, e.g. 256"))
        if cfg.clients.ranks is not None:
            found.append(("clients.ranks", "method fed_sb trains one r x r matrix between B and A shared by all clients, so every client has the same rank"))
        return found

    def adapter(self, client_id: int) -> AdapterSpec:
        """R and the head; B and A frozen."""
        return AdapterSpec(rank=self.lora_rank, frozen_kinds=(LORA_A, LORA_B))

    def client_weighting(self, configured: str) -> str:
        return "uniform" if self.options.weighting == "uniform" else configured

    def prepare_model(self, model) -> None:
        """Put an r x r Linear R between each module's A and B: B's input passes through R first
        (a forward pre-hook, which looks R up when called, so a swapped-in R is the one used).
        With ``scaling: one``, every layer's scaling becomes 1, and so does the saved config's
        lora_alpha / r."""
        import torch

        if self.options.scaling == "one":
            peft_config = getattr(model, "peft_config", {}).get(ADAPTER)
            if peft_config is not None:
                peft_config.lora_alpha = peft_config.r
        for _, layer in _lora_layers(model):
            if self.options.scaling == "one":
                layer.scaling[ADAPTER] = 1.0
            rank = layer.lora_A[ADAPTER].out_features
            weight = layer.lora_A[ADAPTER].weight
            r = torch.nn.Linear(rank, rank, bias=False, device=weight.device, dtype=weight.dtype)
            torch.nn.init.eye_(r.weight)
            layer.add_module(R_NAME, torch.nn.ModuleDict({ADAPTER: r}))

            def through_r(_module, args, layer=layer):
                return (getattr(layer, R_NAME)[ADAPTER](args[0]),)

            layer.lora_B[ADAPTER].register_forward_pre_hook(through_r)

    def public_init(self, model, backward_mean_loss: Callable[[], None]) -> dict[str, np.ndarray]:
        """LoRA-SB's B, R0, A for every module from the mean-loss gradient of its base weight."""
        from raysim.config import UserError

        layers = dict(_lora_layers(model))
        bases = {path: layer.get_base_layer().weight for path, layer in layers.items()}
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:  # only the base weights' gradient is wanted (and DP-SGD's hooks stay idle)
            p.requires_grad_(False)
        for weight in bases.values():
            weight.requires_grad_(True)
            weight.grad = None
        try:
            backward_mean_loss()
            gradients = {path: w.grad.detach().cpu().numpy().astype(np.float64) for path, w in bases.items()}
        finally:
            for weight in bases.values():
                weight.requires_grad_(False)
                weight.grad = None
            for p in trained:
                p.requires_grad_(True)
        out = {}
        for path, layer in layers.items():
            gradient = gradients[path]
            if self.lora_rank > min(gradient.shape):
                raise UserError(f"lora.rank: {self.lora_rank} is more than {path}'s smaller side {min(gradient.shape)}; Fed-SB's B and A come from its SVD")
            b, r0, a = sign_step_factors(gradient, self.lora_rank, self.options.init_lr, float(layer.scaling[ADAPTER]))
            out[f"{path}.lora_A.{ADAPTER}.weight"] = a.astype(np.float32)
            out[f"{path}.lora_B.{ADAPTER}.weight"] = b.astype(np.float32)
            out[r_name(path)] = r0.astype(np.float32)
        return out

    @contextlib.contextmanager
    def plain_lora(self, model) -> Iterator[None]:
        """Within the block, each module's A holds R A (a plain LoRA with the same product)."""
        import torch

        kept = []
        with torch.no_grad():
            for _, layer in _lora_layers(model):
                a = layer.lora_A[ADAPTER].weight
                kept.append((a, a.detach().clone()))
                a.copy_(getattr(layer, R_NAME)[ADAPTER].weight @ a)
        try:
            yield
        finally:
            with torch.no_grad():
                for a, value in kept:
                    a.copy_(value)

    def frozen_download_bytes(self, frozen: Mapping[str, np.ndarray]) -> int:
        """B and A, which come from the public split rather than the seed."""
        return int(sum(v.nbytes for v in frozen.values()))

    def factors(self, values: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Each module's update as B @ (R A)."""
        merged = {**frozen, **values}
        return {prefix: (merged[b], merged[r_name(prefix)] @ merged[a]) for prefix, (a, b) in lora_pairs(merged).items()}


METHOD = FedSB
