"""LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement (Bian, Wang,
Zhang, Xu; ICCV 2025, arXiv 2411.14961).

Clients train A and B as in FedIT. The server forms the ideal update of each module,
ΔW = Σ_k p_k B_k A_k, and the means Ā = Σ_k p_k A_k, B̄ = Σ_k p_k B_k, and corrects B only:

    ΔB* = argmin_ΔB  S(ΔW, (B̄ + ΔB) Ā) + λ ||ΔB||_F²

with S = 1 - cos of the flattened matrices (the paper's cosine form) or ||ΔW - (B̄ + ΔB) Ā||_F²
(``distance: least_squares``; closed form ΔB = (ΔW Āᵀ - B̄ Ā Āᵀ)(Ā Āᵀ + λ I)⁻¹). Clients start the
next round from (Ā, B̄ + ΔB) ("Avg-Initial"); a server optimizer other than lr 1, momentum 0 steps
on that corrected update.

Where each default comes from: ``distance: cosine`` is the paper's S; ``lam: 0.01`` is a public
reimplementation's default, not a value the paper gives; ``steps: 100`` is raysim's: the paper
solves by gradient steps without saying how many or how large. raysim runs ``steps`` of gradient
descent from ΔB = 0 with a backtracking line search, so no step size needs tuning. Both forms work in d_out x r and r x r space: ΔW enters only as ΔW Āᵀ and
||ΔW||.

ΔW is summable: each client adds its B_k A_k (unscaled, like the factors) into the worker's
partial sum beside its deltas, so it is clipped and noised with them under central DP (noise on a
dense d_out x d_in matrix per module, which costs accuracy). The uplink counts A_k, B_k and the head
only, as the paper's server computes the products from them; under secure aggregation the server
cannot, so the products are masked and sent too, and the uplink reported is that dense vector's.
The aggregation-error diagnostic measures (Ā, B̄ + ΔB) against the clients' mean product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from raysim.methods.common import lora_pairs
from raysim.methods.protocol import ClientUpdate, Message, Method, ServerState

PRODUCT = ".lora_fair_product"  # key suffix of a module's B_k A_k in the summed message
DISTANCES = ("cosine", "least_squares")


@dataclass(frozen=True)
class Options:
    distance: str = "cosine"
    lam: float = 0.01
    steps: int = 100

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ValueError(f"distance: '{self.distance}' is not one of {', '.join(DISTANCES)}")
        if self.lam < 0:
            raise ValueError(f"lam: {self.lam} must be >= 0")
        if self.steps < 1:
            raise ValueError(f"steps: {self.steps} must be >= 1")


def _cosine_objective(lam: float, p: np.ndarray, gram: np.ndarray, w_sq: float, b_mean: np.ndarray):
    """1 - cos(ΔW, (B̄ + ΔB) Ā) + λ||ΔB||² and its gradient in ΔB, from P = ΔW Āᵀ, G = Ā Āᵀ and
    ||ΔW||²: <ΔW, C Ā> = <P, C> and ||C Ā||² = <C G, C>."""

    def value_and_grad(delta_b: np.ndarray) -> tuple[float, np.ndarray]:
        c = b_mean + delta_b
        cg = c @ gram
        inner, m_sq = float(np.sum(p * c)), float(np.sum(cg * c))
        norms = np.sqrt(w_sq * m_sq)
        if norms == 0:
            return 1.0 + lam * float(np.sum(delta_b**2)), 2 * lam * delta_b
        cos = inner / norms
        grad = -(p / norms - cos * cg / m_sq)
        return 1.0 - cos + lam * float(np.sum(delta_b**2)), grad + 2 * lam * delta_b

    return value_and_grad


def correction(
    delta_w: np.ndarray, a_mean: np.ndarray, b_mean: np.ndarray, distance: str = "cosine", lam: float = 0.01, steps: int = 100
) -> np.ndarray:
    """ΔB minimising S(ΔW, (B̄ + ΔB) Ā) + λ||ΔB||²: for least squares its closed form; for the
    cosine, ``steps`` of gradient descent from zero with Armijo backtracking (the step doubles
    after a success and halves until the objective falls)."""
    a64, b64 = a_mean.astype(np.float64), b_mean.astype(np.float64)
    p, gram = delta_w.astype(np.float64) @ a64.T, a64 @ a64.T
    if distance == "least_squares":
        ridge = gram + lam * np.eye(len(gram))
        return np.linalg.lstsq(ridge, (p - b64 @ gram).T, rcond=None)[0].T.astype(b_mean.dtype)
    w_sq = float(np.sum(delta_w.astype(np.float64) ** 2))
    if w_sq == 0:
        return np.zeros_like(b_mean)
    value_and_grad = _cosine_objective(lam, p, gram, w_sq, b64)
    delta_b = np.zeros_like(b64)
    value, grad = value_and_grad(delta_b)
    step = max(float(np.linalg.norm(b64)), 1e-12) / max(float(np.linalg.norm(grad)), 1e-30)  # a first step about B's size
    for _ in range(steps):
        grad_sq = float(np.sum(grad**2))
        while grad_sq > 0 and step > 1e-30:
            trial = delta_b - step * grad
            trial_value, trial_grad = value_and_grad(trial)
            if trial_value <= value - 0.5 * step * grad_sq:
                delta_b, value, grad = trial, trial_value, trial_grad
                step *= 2
                break
            step /= 2
        else:
            break
    return delta_b.astype(b_mean.dtype)


class LoRAFAIR(Method):
    name = "lora_fair"
    Options = Options

    def client_message(self, update: ClientUpdate, state: dict[str, Any]) -> Message:
        """FedIT's deltas, plus each module's B_k A_k to sum into ΔW; the uplink counts the deltas."""
        message = super().client_message(update, state)
        nbytes = message.size()
        for prefix, (a, b) in lora_pairs(update.trained).items():
            message.summable[prefix + PRODUCT] = update.trained[b] @ update.trained[a]
        message.nbytes = nbytes
        return message

    def message_template(self, state: ServerState) -> dict[str, np.ndarray]:
        products = {
            prefix + PRODUCT: np.zeros((state.adapter[b].shape[0], state.adapter[a].shape[1]), np.result_type(state.adapter[a], state.adapter[b]))
            for prefix, (a, b) in lora_pairs(state.adapter).items()
        }
        return {**state.adapter, **products}

    def update(self, state: ServerState, mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """FedIT's mean delta with B's corrected: the adapter plus it is (Ā, B̄ + ΔB)."""
        out = {k: mean[k] for k in state.adapter}
        options = self.options
        for prefix, (a, b) in lora_pairs(state.adapter).items():
            a_mean, b_mean = state.adapter[a] + mean[a], state.adapter[b] + mean[b]
            out[b] = mean[b] + correction(mean[prefix + PRODUCT], a_mean, b_mean, options.distance, options.lam, options.steps)
        return out


METHOD = LoRAFAIR
