"""The driver's view of a run's privacy: the noise planned up front and the budget spent so far.

Local DP: every client has its own noise multiplier and accountant history (kept here as well as
on its worker, so a restarted worker gets it back and epsilon never silently resets). A client
whose next round would exceed the target is not sampled again. Central DP: one accountant for
the run, one step per round; a round that would exceed the target is not run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from raysim.privacy.accounting import epsilon, solve_noise_multiplier
from raysim.privacy.local_dp import plan_noise, sample_rate


@dataclass
class ClientPrivacy:
    """Local DP: one client's accounting after a round, as its worker reports it."""

    history: list
    epsilon: float
    exhausted: bool  # the next round would take it over the budget
    trained: bool  # False: this round would have, so it did not train


class BudgetExhausted(Exception):
    """No further round fits the privacy budget."""


class PrivacyBudget:
    def __init__(self, privacy, client_sizes: Sequence[int], rounds: int, local_steps: int, batch_size: int, per_round: int):
        """``privacy``: the config's privacy section. ValueError if the target cannot be reached."""
        self.mode = privacy.mode
        self.delta = float(privacy.target_delta)
        self.target = None if privacy.target_epsilon is None else float(privacy.target_epsilon)
        self.accountant = privacy.accountant
        self.local_steps = local_steps
        num = len(client_sizes)
        self.client_sizes = list(client_sizes)
        self.histories: dict[int, list] = {}
        self.client_epsilon: dict[int, float] = {}
        self.exhausted: set[int] = set()
        self.rounds_noised = 0
        if self.mode == "local_dp_sgd":
            self.client_rounds = privacy.client_rounds or rounds
            steps = self.client_rounds * local_steps
            if privacy.noise_multiplier is not None:
                self.noise = [float(privacy.noise_multiplier)] * num
            else:
                assert self.target is not None
                self.noise = plan_noise(client_sizes, batch_size, steps, self.target, self.delta, self.accountant)
        elif self.mode == "central_dp":
            self.sample_rate = per_round / num
            self.clip_norm = float(privacy.clip_norm)
            if privacy.noise_multiplier is not None:
                self.noise_multiplier = float(privacy.noise_multiplier)
            else:
                assert self.target is not None
                self.noise_multiplier = solve_noise_multiplier(self.target, self.delta, self.sample_rate, rounds, self.accountant)

    _STATE = ("histories", "client_epsilon", "exhausted", "rounds_noised", "noise", "noise_multiplier")

    def state_dict(self) -> dict[str, Any]:
        """The spending so far and the noise plan, for a checkpoint. A resumed run keeps the plan
        it started with, even if its round count changed: the noise is what was promised."""
        return {k: getattr(self, k) for k in self._STATE if hasattr(self, k)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for key, value in saved.items():
            setattr(self, key, value)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def describe(self) -> str:
        """One log line: the plan and the assumption behind it."""
        if self.mode == "local_dp_sgd":
            goal = f"epsilon <= {self.target:g}" if self.target is not None else "a fixed noise multiplier"
            return (
                f"local DP-SGD for {goal}, delta={self.delta:g} ({self.accountant}): noise multiplier "
                f"{min(self.noise):.3f}..{max(self.noise):.3f} per client, planned for {self.client_rounds} rounds "
                f"x {self.local_steps} steps per client (a client may be sampled in each of them)"
            )
        if self.mode == "central_dp":
            return (
                f"central DP-FedAvg: clip {self.clip_norm:g}, noise multiplier {self.noise_multiplier:.3f}, "
                f"client sampling rate {self.sample_rate:.3f} (Poisson), delta={self.delta:g} ({self.accountant})"
            )
        return "no differential privacy"

    def check_next_round(self, num_clients: int) -> None:
        """Raise BudgetExhausted if no client (local) or no round (central) fits the budget."""
        if self.mode == "local_dp_sgd" and len(self.exhausted) >= num_clients:
            raise BudgetExhausted("every client has used its privacy budget")
        if self.mode == "central_dp" and self.target is not None:
            after = epsilon([(self.noise_multiplier, self.sample_rate, self.rounds_noised + 1)], self.delta, self.accountant)
            if after > self.target:
                raise BudgetExhausted(f"another round would spend epsilon={after:.3f} > target {self.target:g}")

    def record_round(self, client_privacy: dict[int, ClientPrivacy]) -> list[int]:
        """Take the round's per-client accounting (local) or count its noisy release (central);
        returns the clients newly out of budget."""
        if self.mode == "central_dp":
            self.rounds_noised += 1
            return []
        newly = []
        for cid, info in client_privacy.items():
            self.histories[cid] = [tuple(h) for h in info.history]
            self.client_epsilon[cid] = info.epsilon
            if info.exhausted and cid not in self.exhausted:
                self.exhausted.add(cid)
                newly.append(cid)
        return sorted(newly)

    @property
    def epsilon(self) -> float:
        """Local: the largest epsilon any client has spent. Central: the run's epsilon."""
        if self.mode == "local_dp_sgd":
            return max(self.client_epsilon.values(), default=0.0)
        if self.mode == "central_dp":
            return epsilon([(self.noise_multiplier, self.sample_rate, self.rounds_noised)], self.delta, self.accountant)
        return math.inf

    def client_rows(self, batch_size: int) -> list[dict[str, Any]]:
        """Local DP: one row per client: its noise, steps taken, epsilon spent, and the sampling
        rates its accountant's history used (``sample_rate``: the latest; for a client not yet
        trained, the rate ``batch_size`` gives), which differ where the batch size changed
        between rounds."""
        rows = []
        for cid, n in enumerate(self.client_sizes):
            history = self.histories.get(cid, [])
            rates = list(dict.fromkeys(float(h[1]) for h in history))
            rows.append(
                {
                    "client": cid,
                    "examples": n,
                    "sample_rate": rates[-1] if rates else sample_rate(n, batch_size),
                    "sample_rates": rates,
                    "noise_multiplier": self.noise[cid],
                    "steps": sum(h[2] for h in history),
                    "epsilon": self.client_epsilon.get(cid, 0.0),
                    "exhausted": cid in self.exhausted,
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if not self.enabled:
            return out
        out.update(epsilon=self.epsilon, delta=self.delta, target_epsilon=self.target, accountant=self.accountant)
        if self.mode == "local_dp_sgd":
            out.update(
                noise_multiplier_min=min(self.noise),
                noise_multiplier_max=max(self.noise),
                client_rounds=self.client_rounds,
                clients_exhausted=len(self.exhausted),
            )
        else:
            out.update(noise_multiplier=self.noise_multiplier, clip_norm=self.clip_norm, sample_rate=self.sample_rate, rounds_noised=self.rounds_noised)
        return out
