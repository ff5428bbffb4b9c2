"""The driver's view of a run's privacy: the noise planned up front and the budget spent so far.

Every number is named by its adversary (docs/PRIVACY.md, "Threat model"):

- Local DP: every client has its own noise multiplier and accountant history (kept here as well
  as on its worker, so a restarted worker gets it back and epsilon never silently resets). It
  holds against the server. A client whose next round would exceed the target is not sampled again.
- Central DP: one accountant for the run, one step per round, against an observer of the released
  adapters (the server is trusted); a round that would exceed the target is not run.
- Distributed DP: the Skellam mechanism's plan, made once the size of a client's message is known
  (:meth:`PrivacyBudget.fit_message`). Two numbers: against the server, per client over the rounds
  its input was unmasked in (a client whose next one would exceed the target is not sampled
  again), and against an observer of the adapters, amplified by sampling, for the run (a round
  that would take it over the target is not run when the plan is for the observer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

from raysim.privacy import skellam
from raysim.privacy.accounting import epsilon, resolve_accountant, solve_noise_multiplier
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
        self.accountant = "rdp" if self.mode == "distributed_dp" else resolve_accountant(privacy.accountant)
        self.adversary: str = privacy.adversary or DEFAULT_ADVERSARY.get(self.mode, "")
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
            self.client_rounds = privacy.client_rounds or rounds
            self.participations: dict[int, int] = {}
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
                adversary=self.adversary,
                participations=self.client_rounds,
            )
            self.skellam: skellam.SkellamPlan | None = None

    def fit_message(self, values: int) -> None:
        """Distributed DP: plan the Skellam mechanism for messages of ``values`` values (the scale
        and the rounding's sensitivity depend on it). A plan restored from a checkpoint stays.
        ValueError if the target cannot be reached."""
        if self.mode == "distributed_dp" and self.skellam is None:
            self.skellam = self.planned(values)

    _STATE = ("histories", "client_epsilon", "exhausted", "rounds_noised", "noise", "noise_multiplier", "participations")

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
            if key == "participations":  # JSON's keys are strings
                value = {int(c): int(n) for c, n in value.items()}
            setattr(self, key, skellam.SkellamPlan(**value) if key == "skellam" else value)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def describe(self) -> str:
        """One log line: the plan and the assumption behind it."""
        if self.mode == "local_dp_sgd":
            goal = f"epsilon <= {self.target:g}" if self.target is not None else "a fixed noise multiplier"
            return (
                f"local DP-SGD for {goal} against the server, per example of a client (add/remove), delta={self.delta:g} ({self.accountant}): noise multiplier "
                f"{min(self.noise):.3f}..{max(self.noise):.3f} per client, planned for {self.client_rounds} rounds "
                f"x {self.local_steps} steps per client (a client may be sampled in each of them)"
            )
        if self.mode == "central_dp":
            return (
                f"central DP-FedAvg: clip {self.clip_norm:g}, noise multiplier {self.noise_multiplier:.3f}, "
                f"client sampling rate {self.sample_rate:.3f} (Poisson), delta={self.delta:g} ({self.accountant}), against an "
                "observer of the released adapters, per client (add/remove): the server, trusted, sees every clipped update"
            )
        if self.mode == "distributed_dp" and self.skellam is not None:
            p = self.skellam
            return (
                f"distributed DP (Skellam inside SecAgg): clip {self.clip_norm:g}, noise multiplier {p.noise_multiplier:.3f} "
                f"at {p.min_clients} senders or more (each client adds 1/{p.min_clients} of it; fewer senders: the round is not "
                f"unmasked), scale {p.scale:.4g} in a {p.ring_bits}-bit ring, {p.padded} values per client after rotation, client "
                f"sampling rate {self.sample_rate:.3f} (Poisson), delta={self.delta:g}; planned {self._ddp_goal()}"
            )
        return "no differential privacy"

    def whom(self) -> str:
        """Whom :attr:`epsilon` holds against, under which neighbouring relation and accountant, in
        words for a log line."""
        against = "the server" if self.adversary == "server" else "an observer of the released adapters only, not the server"
        return f"against {against}; neighbours: {self.neighbours}; accountant: {self.accountant}"

    @property
    def neighbours(self) -> str:
        """The neighbouring relation :attr:`epsilon` is for."""
        return NEIGHBOURS[(self.mode, self.adversary)]

    def _ddp_goal(self) -> str:
        if self.target is None:
            return "for a fixed noise multiplier"
        if self.adversary == "server":
            return (
                f"for epsilon <= {self.target:g} against the server, per client over {self.client_rounds} unmasked rounds of its own "
                "(unamplified: the server knows who took part; its update zeroed, its noise share kept; RDP, the Skellam paper's bound)"
            )
        return (
            f"for epsilon <= {self.target:g} against an OBSERVER OF THE RELEASED ADAPTERS ONLY, not the server (amplified by "
            "sampling, add/remove with the client's own noise share known; RDP, Zhu & Wang's subsampling bound)"
        )

    def check_next_round(self, num_clients: int) -> None:
        """Raise BudgetExhausted if no client (local, distributed against the server) or no round
        (central, distributed against an observer) fits the budget."""
        if self.mode in ("local_dp_sgd", "distributed_dp") and self.exhausted and len(self.exhausted) >= num_clients:
            raise BudgetExhausted("every client has used its privacy budget")
        if self.mode in ("central_dp", "distributed_dp") and self.adversary == "observer" and self.target is not None:
            after = self._spent(self.rounds_noised + 1)
            if after > self.target:
                raise BudgetExhausted(f"another round would spend epsilon={after:.3f} > target {self.target:g}")

    def record_round(self, client_privacy: dict[int, ClientPrivacy], released: Sequence[int] = ()) -> list[int]:
        """Take the round's per-client accounting (local), or count its noisy release (central;
        distributed, with the clients whose input the server unmasked, ``released``); returns
        the clients newly out of budget."""
        if self.mode == "central_dp":
            self.rounds_noised += 1
            return []
        if self.mode == "distributed_dp":
            self.rounds_noised += 1
            for cid in released:
                self.participations[cid] = self.participations.get(cid, 0) + 1
            if self.adversary != "server" or self.target is None:
                return []
            newly = sorted(c for c in released if c not in self.exhausted and self._server_spent(self.participations[c] + 1) > self.target)
            self.exhausted.update(newly)
            return newly
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
        """The epsilon against the adversary the run was planned for: local, the largest any
        client has spent; central, the run's; distributed, the largest against the server or the
        run's against an observer."""
        if self.mode == "local_dp_sgd":
            return max(self.client_epsilon.values(), default=0.0)
        if self.mode == "distributed_dp" and self.adversary == "server":
            return self.epsilon_server
        if self.mode in ("central_dp", "distributed_dp"):
            return self._spent(self.rounds_noised)
        return math.inf

    @property
    def epsilon_server(self) -> float:
        """Distributed DP: the largest epsilon against the server of any client so far."""
        return self._server_spent(max(self.participations.values(), default=0))

    def columns(self) -> dict[str, float]:
        """The metrics columns beyond epsilon and delta: under distributed DP both adversaries' epsilon."""
        if self.mode != "distributed_dp":
            return {}
        return {"epsilon_server": self.epsilon_server, "epsilon_observer": self._spent(self.rounds_noised)}

    def _server_spent(self, participations: int) -> float:
        assert self.skellam is not None, "fit_message plans distributed DP before the first round"
        return _server_epsilon(self.skellam, participations, self.delta)

    def _spent(self, rounds: int) -> float:
        if self.mode == "distributed_dp":
            assert self.skellam is not None, "fit_message plans distributed DP before the first round"
            return skellam.observer_epsilon(self.skellam, rounds, self.delta)
        return epsilon([(self.noise_multiplier, self.sample_rate, rounds)], self.delta, self.accountant)

    def gaussian_equivalent_epsilon(self) -> float:
        """Distributed DP: the epsilon the tight (PLD) accountant of the subsampled Gaussian would
        give a Gaussian of the same noise against an observer: what the Skellam noise would cost if
        it were Gaussian, showing how much of the gap to central DP is the RDP bounds' looseness."""
        assert self.skellam is not None
        return epsilon([(self.skellam.noise_multiplier, self.sample_rate, self.rounds_noised)], self.delta, "pld")

    def client_rows(self, batch_size: int) -> list[dict[str, Any]]:
        """One row per client for privacy.parquet: :meth:`_local_rows` or :meth:`_distributed_rows`."""
        return self._distributed_rows() if self.mode == "distributed_dp" else self._local_rows(batch_size)

    def _distributed_rows(self) -> list[dict[str, Any]]:
        """Distributed DP: each client's unmasked rounds and its epsilon against the server."""
        return [
            {
                "client": cid,
                "examples": n,
                "participations": self.participations.get(cid, 0),
                "epsilon_server": self._server_spent(self.participations.get(cid, 0)),
                "exhausted": cid in self.exhausted,
            }
            for cid, n in enumerate(self.client_sizes)
        ]

    def _local_rows(self, batch_size: int) -> list[dict[str, Any]]:
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
        out.update(
            epsilon=self.epsilon,
            delta=self.delta,
            target_epsilon=self.target,
            accountant=self.accountant,
            adversary=self.adversary,
            neighbours=self.neighbours,
        )
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
                epsilon_server=self.epsilon_server,
                epsilon_observer=self._spent(self.rounds_noised),
                client_rounds=self.client_rounds,
                participations_max=max(self.participations.values(), default=0),
                clients_exhausted=len(self.exhausted),
            )
        return out


# Whom each mode's epsilon holds against, unless privacy.adversary says otherwise.
DEFAULT_ADVERSARY = {"local_dp_sgd": "server", "central_dp": "observer", "distributed_dp": "server"}
# The neighbouring relation each (mode, adversary) is accounted for (docs/PRIVACY.md).
NEIGHBOURS = {
    ("local_dp_sgd", "server"): "add/remove one training example of one client",
    ("central_dp", "observer"): "add/remove one client",
    ("distributed_dp", "server"): "one client's update zeroed, its noise share kept",
    ("distributed_dp", "observer"): "add/remove one client, its own noise share known to the adversary",
}


@functools.lru_cache(maxsize=4096)
def _server_epsilon(plan: skellam.SkellamPlan, participations: int, delta: float) -> float:
    return skellam.server_epsilon(plan, participations, delta)


def min_clients(privacy, num_clients: int, per_round: int, dropout_rate: float) -> int:
    """Distributed DP: the fewest senders whose noise shares add up to the planned noise;
    privacy.min_clients, or by default the count of senders that Poisson sampling (and the
    dropouts before sending, secagg.dropout_rate / 2) falls below in 1% of rounds, at least 3."""
    if privacy.min_clients:
        return int(privacy.min_clients)
    from scipy.stats import binom  # Opacus' dependency

    rate = per_round / num_clients * (1 - dropout_rate / 2)
    return max(3, int(binom.ppf(0.01, num_clients, rate)))
