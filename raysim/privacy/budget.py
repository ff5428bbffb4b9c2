"""The driver's view of a run's privacy: the noise planned up front and the budget spent so far.

Local DP: every client has its own noise multiplier and accountant history (kept here as well as
on its worker, so a restarted worker gets it back and epsilon never silently resets). A client
whose next round would exceed the target is not sampled again. Central DP: one accountant for
the run, one step per round; a round that would exceed the target is not run. Distributed DP:
the same, with the Skellam mechanism's plan, made once the size of a client's message is known
(:meth:`PrivacyBudget.fit_message`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

from raysim.privacy import skellam
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
    def __init__(
        self, privacy, client_sizes: Sequence[int], rounds: int, local_steps: int, batch_size: int, per_round: int, secagg=None
    ):
        """``privacy``: the config's privacy section; ``secagg``: its secagg section (distributed DP
        sums in its ring, secagg.bits wide). ValueError if the target cannot be reached."""
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
        elif self.mode == "distributed_dp":
            self.sample_rate = per_round / num
            self.clip_norm = float(privacy.clip_norm)
            self.min_clients = min_clients(privacy, num, per_round, float(secagg.dropout_rate))
            self.planned = functools.partial(
                skellam.plan_skellam,
                clip_norm=self.clip_norm,
                ring_bits=int(secagg.bits),
                sample_rate=self.sample_rate,
                clients=per_round,
                min_clients=self.min_clients,
                rounds=rounds,
                delta=self.delta,
                target_epsilon=self.target,
                noise_multiplier=None if privacy.noise_multiplier is None else float(privacy.noise_multiplier),
            )
            self.skellam: skellam.SkellamPlan | None = None

    def fit_message(self, values: int) -> None:
        """Distributed DP: plan the Skellam mechanism for messages of ``values`` values (the scale
        and the rounding's sensitivity depend on it). A plan restored from a checkpoint stays.
        ValueError if the target cannot be reached."""
        if self.mode == "distributed_dp" and self.skellam is None:
            self.skellam = self.planned(values)

    _STATE = ("histories", "client_epsilon", "exhausted", "rounds_noised", "noise", "noise_multiplier")

    def state_dict(self) -> dict[str, Any]:
        """The spending so far and the noise plan, for a checkpoint. A resumed run keeps the plan
        it started with, even if its round count changed: the noise is what was promised."""
        state = {k: getattr(self, k) for k in self._STATE if hasattr(self, k)}
        plan = getattr(self, "skellam", None)
        if plan is not None:
            state["skellam"] = dataclasses.asdict(plan)
        return state

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for key, value in saved.items():
            setattr(self, key, skellam.SkellamPlan(**value) if key == "skellam" else value)

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
        if self.mode == "distributed_dp" and self.skellam is not None:
            p = self.skellam
            return (
                f"distributed DP (Skellam inside SecAgg): clip {self.clip_norm:g}, noise multiplier {p.noise_multiplier:.3f} "
                f"at {p.min_clients} senders or more (each client adds 1/{p.min_clients} of it; fewer senders: the round is not "
                f"unmasked), scale {p.scale:.4g} in a {p.ring_bits}-bit ring, {p.padded} values per client after rotation, client "
                f"sampling rate {self.sample_rate:.3f} (Poisson), delta={self.delta:g} (RDP, Zhu & Wang's subsampling bound)"
            )
        return "no differential privacy"

    def check_next_round(self, num_clients: int) -> None:
        """Raise BudgetExhausted if no client (local) or no round (central) fits the budget."""
        if self.mode == "local_dp_sgd" and len(self.exhausted) >= num_clients:
            raise BudgetExhausted("every client has used its privacy budget")
        if self.mode in ("central_dp", "distributed_dp") and self.target is not None:
            after = self._spent(self.rounds_noised + 1)
            if after > self.target:
                raise BudgetExhausted(f"another round would spend epsilon={after:.3f} > target {self.target:g}")

    def record_round(self, client_privacy: dict[int, ClientPrivacy]) -> list[int]:
        """Take the round's per-client accounting (local) or count its noisy release (central);
        returns the clients newly out of budget."""
        if self.mode in ("central_dp", "distributed_dp"):
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
        """Local: the largest epsilon any client has spent. Central, distributed: the run's epsilon."""
        if self.mode == "local_dp_sgd":
            return max(self.client_epsilon.values(), default=0.0)
        if self.mode in ("central_dp", "distributed_dp"):
            return self._spent(self.rounds_noised)
        return math.inf

    def _spent(self, rounds: int) -> float:
        if self.mode == "distributed_dp":
            assert self.skellam is not None, "fit_message plans distributed DP before the first round"
            return skellam.epsilon(self.skellam, rounds, self.delta)
        return epsilon([(self.noise_multiplier, self.sample_rate, rounds)], self.delta, self.accountant)

    def gaussian_equivalent_epsilon(self) -> float:
        """Distributed DP: the epsilon the tight accountant of the subsampled Gaussian would give a
        Gaussian of the same noise: what the Skellam noise would cost if it were Gaussian, showing
        how much of the gap to central DP is the general subsampling bound's looseness."""
        assert self.skellam is not None
        return epsilon([(self.skellam.noise_multiplier, self.sample_rate, self.rounds_noised)], self.delta, "rdp")

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
        elif self.mode == "central_dp":
            out.update(noise_multiplier=self.noise_multiplier, clip_norm=self.clip_norm, sample_rate=self.sample_rate, rounds_noised=self.rounds_noised)
        else:
            assert self.skellam is not None
            p = self.skellam
            out.update(
                noise_multiplier=p.noise_multiplier,
                clip_norm=self.clip_norm,
                sample_rate=self.sample_rate,
                rounds_noised=self.rounds_noised,
                min_clients=p.min_clients,
                skellam_mu=p.mu,
                skellam_scale=p.scale,
                ring_bits=p.ring_bits,
                gaussian_equivalent_epsilon=self.gaussian_equivalent_epsilon(),
            )
        return out


def min_clients(privacy, num_clients: int, per_round: int, dropout_rate: float) -> int:
    """Distributed DP: the fewest senders whose noise shares add up to the planned noise;
    privacy.min_clients, or by default the count of senders that Poisson sampling (and the
    dropouts before sending, secagg.dropout_rate / 2) falls below in 1% of rounds, at least 3."""
    if privacy.min_clients:
        return int(privacy.min_clients)
    from scipy.stats import binom  # Opacus' dependency

    rate = per_round / num_clients * (1 - dropout_rate / 2)
    return max(3, int(binom.ppf(0.01, num_clients, rate)))
