"""Server: owns the server state, samples clients and aggregates; run as a Ray actor (or in
process by the local runtime).

It puts the method's broadcast into the object store once per version (once per round), and
receives one partial sum per worker, never one message per client (unless the method needs each
client's message). The summed part goes through the runtime's post-processing (SecAgg unmasking,
central DP noise, division by the total weight), and then always through the method's
``aggregate``. With secure aggregation it runs the server's side of SecAgg+: it routes the
clients' public keys and encrypted shares, receives masked sums, and unmasks only their total.
No Ray here: the object store's ``put`` is handed in.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np

from raysim.methods.common import relative_aggregation_error, sketch_matrix
from raysim.methods.protocol import Aggregation, Method, RoundInput, ServerState
from raysim.privacy.central_dp import noisy_mean, poisson_clients
from raysim.privacy.skellam import SkellamPlan, decode_sum, rotation_signs
from raysim.robust import RobustRule
from raysim.runtime.messages import MaskedPayload, SecAggRoster, ServerReport, WorkerPayload
from raysim.secagg.encoding import decode_update_sum, ring_mask
from raysim.secagg.protocol import SecAggAborted, neighbours, threshold_for, unmasked_sum

_SAMPLING_STREAM = 0x5A3
_NOISE_STREAM = 0xD9
_GRAPH_STREAM = 0x6A
_ADVERTISED_BYTES = 96  # two X25519 public keys and a SHA-256 seed commitment
_REVEAL_BYTES = 73  # kind + one Shamir share (9 field elements of 8 bytes)

log = logging.getLogger("raysim")


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of concatenating ``like``'s arrays in sorted-key order."""
    out, offset = {}, 0
    for name in sorted(like):
        size = like[name].size
        out[name] = vector[offset : offset + size].reshape(like[name].shape).astype(like[name].dtype)
        offset += size
    return out


class Server:
    def __init__(
        self,
        method: Method,
        seed: int,
        num_clients: int,
        central_dp: dict | None = None,
        secagg: dict | None = None,
        sketch_columns: int = 0,
        put: Callable[[Any], Any] | None = None,
        robust: RobustRule | None = None,
    ):
        """``central_dp``: {noise_multiplier, clip_norm, sample_rate} for DP-FedAvg, or None.
        ``secagg``: {neighbors (int or None for all), threshold, clip_range, bits, ring_bits,
        sample_rate (distributed DP's Poisson sampling, else None)}, or None.
        ``sketch_columns``: of the aggregation-error sketch (0: exact products). ``put``: the
        object store's put (Ray's in an actor); None keeps the broadcast as it is. ``robust``: the
        rule that combines each client's update in place of the weighted mean, or None."""
        self.method = method
        self.central_dp = central_dp
        self.secagg = secagg
        self._secagg_round: dict = {}
        self.seed = seed
        self.num_clients = num_clients
        self.sketch_columns = sketch_columns
        self._put = put or (lambda value: value)
        self.robust = robust
        self.state = ServerState(adapter={})
        self._broadcast: list | None = None
        self._adapter_ref: list | None = None

    def initialize(self, initial_state: dict, frozen: dict) -> None:
        """Start from the adapter the workers built (same seed everywhere) and the tensors they keep frozen."""
        self.state = self.method.init_server(initial_state, frozen)
        self._broadcast = self._adapter_ref = None

    def ping(self) -> int:
        """Answers while the server lives: its process id."""
        return os.getpid()

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue: the server state (global adapter, optimizer, method state)."""
        return self.state.to_dict()

    def load_state_dict(self, saved: dict) -> None:
        self.state = ServerState.from_dict(saved)
        self._broadcast = self._adapter_ref = None

    def sample(self, round_idx: int, per_round: int, excluded: list[int] | tuple = ()) -> list[int]:
        """Clients for this round, drawn from (seed, round) alone: ``per_round`` of the clients not
        ``excluded`` without replacement, or under central or distributed DP each client with
        probability q (then an ``excluded`` client drawn is left out: it has used its budget)."""
        rng = np.random.default_rng([self.seed, round_idx, _SAMPLING_STREAM])
        poisson_rate = (self.central_dp or self.secagg or {}).get("sample_rate")
        if poisson_rate is not None:
            spent = set(excluded)
            return [c for c in poisson_clients(rng, self.num_clients, poisson_rate) if c not in spent]
        eligible = np.setdiff1d(np.arange(self.num_clients), np.asarray(excluded, dtype=np.int64))
        chosen = rng.choice(eligible, size=min(per_round, len(eligible)), replace=False)
        return sorted(int(c) for c in chosen)

    def broadcast(self) -> list:
        """[reference to what clients download, its size in bytes per client rank] (a list, so Ray
        does not resolve the reference)."""
        if self._broadcast is None:
            sent = self.method.broadcast(self.state)
            self._broadcast = [self._put(sent), {rank: self.method.broadcast_bytes(self.state, sent, rank) for rank in self.method.ranks_in_use()}]
            evaluated = self.method.evaluated(self.state)
            if evaluated is None or evaluated is sent:
                self._adapter_ref = self._broadcast[:1]
        return self._broadcast

    def adapter_ref(self) -> list:
        """[reference to the global adapter] (a list, as for :meth:`broadcast`): what evaluation and
        saving use (:meth:`Method.evaluated`). It is the broadcast's unless the two differ (FLASC's
        sparse copy against its dense adapter under ``eval_dense``)."""
        self.broadcast()
        if self._adapter_ref is None:
            self._adapter_ref = [self._put(self.method.evaluated(self.state))]
        return self._adapter_ref

    def aggregate(self, round_idx: int, weight_total: float, *payloads: WorkerPayload) -> ServerReport:
        """Sum the workers' partial sums, post-process them into a mean, hand it (and any
        per-client messages) to the method's aggregate, and report the diagnostics.

        Under central DP the noise is added to the sum even when no client took part: that noisy
        release is what the accountant counts."""
        template = self.method.message_template(self.state)
        mean = None
        summable = self.method.aggregation is Aggregation.SUMMABLE
        messages = [m for p in payloads for m in p.messages]
        kept = scores = None
        if summable and self.robust is not None:
            mean, kept, scores = self._robust_mean(round_idx, messages, template)
            messages = []
        elif summable and (self.central_dp or (payloads and weight_total > 0)):
            summed = {k: sum((p.delta_sum[k] for p in payloads if k in p.delta_sum), np.zeros_like(v)) for k, v in template.items()}
            mean = self._mean(round_idx, summed, weight_total)
        error, update = float("nan"), None
        if mean is not None and payloads and payloads[0].product_sum:
            update = self.method.update(self.state, mean)
            error = self._aggregation_error(round_idx, update, weight_total, payloads)
        self._apply(RoundInput(round_idx, mean, weight_total, messages, update))
        return ServerReport(aggregation_error=error, kept_clients=kept, krum_scores=scores)

    def _robust_mean(
        self, round_idx: int, messages: list, template: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray] | None, list[int] | None, dict[int, float] | None]:
        """(the robust rule over the clients' updates, each flattened in sorted-key order, in place
        of the weighted mean; for Krum and Multi-Krum the clients whose updates it averaged and
        each client's score). The mean is None (the adapter stays) when too few arrived for the
        rule."""
        assert self.robust is not None
        if len(messages) < self.robust.min_updates():
            log.warning(
                "round %d: %d update(s) arrived, too few for server.aggregator=%s (at least %d); the global adapter is unchanged",
                round_idx, len(messages), self.robust.aggregator, self.robust.min_updates(),
            )
            return None, None, None
        names = sorted(template)
        updates = np.stack([np.concatenate([np.asarray(m.summable[k], np.float64).reshape(-1) for k in names]) for _, _, m in messages])
        result = self.robust.apply(updates)
        clients = [int(c) for c, _, _ in messages]
        kept = None if result.kept is None else sorted(clients[i] for i in result.kept)
        scores = None if result.scores is None else dict(zip(clients, result.scores.tolist(), strict=True))
        return unflatten(result.aggregate, template), kept, scores

    def _aggregation_error(self, round_idx: int, update: dict[str, np.ndarray], weight_total: float, payloads) -> float:
        """The error of averaging itself: the adapter plus the round's update (before the server
        optimizer) against the clients' mean product, both through the round's sketch."""
        averaged = {k: (v + update[k]).astype(v.dtype) if k in update else v for k, v in self.state.adapter.items()}
        products = {}
        for prefix, (left, right) in self.method.factors(averaged, self.state.frozen).items():
            sketch = sketch_matrix(prefix, right.shape[1], self.sketch_columns, self.seed, round_idx)
            products[prefix] = left @ right if sketch is None else left @ (right @ sketch)
        mean_products = {k: sum(p.product_sum[k] for p in payloads) / weight_total for k in payloads[0].product_sum}
        return relative_aggregation_error(mean_products, products)

    def _mean(self, round_idx: int, summed: dict[str, np.ndarray], weight_total: float) -> dict[str, np.ndarray]:
        """The post-processing of the summed messages: central DP's noisy fixed-denominator mean, or
        the weighted mean (FedAvg, McMahan et al. 2017)."""
        if self.central_dp:
            dp = self.central_dp
            rng = np.random.default_rng([self.seed, round_idx, _NOISE_STREAM])
            expected_clients = dp["sample_rate"] * self.num_clients
            return noisy_mean(summed, dp["noise_multiplier"], dp["clip_norm"], expected_clients, rng)
        return {k: v / weight_total for k, v in summed.items()}

    def _apply(self, round_input: RoundInput) -> None:
        self.state = self.method.aggregate(self.state, round_input)
        self._broadcast = self._adapter_ref = None

    # Secure aggregation: the server's side of one SecAgg+ round, in the order the driver calls it.
    # Each step raises SecAggAborted when the round cannot finish; the global adapter is then unchanged.

    def secagg_roster(self, round_idx: int, *advertised: dict[int, dict]) -> SecAggRoster:
        """From the clients' public keys: the neighbour graph and threshold, sent back to all."""
        publics = {c: public for batch in advertised for c, public in batch.items()}
        clients = sorted(publics)
        if len(clients) < 3:
            raise SecAggAborted(f"{len(clients)} client(s) reached the round; secure aggregation needs at least 3")
        rng = np.random.default_rng([self.seed, round_idx, _GRAPH_STREAM])
        graph = neighbours(clients, self._secagg_settings()["neighbors"], rng)
        degree = min(len(v) for v in graph.values())
        threshold = threshold_for(degree, self._secagg_settings()["threshold"])
        if threshold > degree:
            raise SecAggAborted(f"threshold {threshold} is more than the {degree} neighbours each of the {len(clients)} clients has")
        self._secagg_round = {
            "round": round_idx,
            "publics": publics,
            "graph": graph,
            "threshold": threshold,
            "bytes": _ADVERTISED_BYTES * len(clients),
        }
        return SecAggRoster(round_idx=round_idx, publics=publics, graph=graph, threshold=threshold)

    def secagg_route(self, round_idx: int, groups: list[list[int]], *bundles: dict[int, dict[int, bytes]]):
        """Deliver each encrypted share to its recipient: one inbox {recipient: {sender: ciphertext}}
        per group of recipients (per worker). Clients that sent no shares are out of the round."""
        r = self._round(round_idx)
        inbox: dict[int, dict[int, bytes]] = {}
        for bundle in bundles:
            for sender, ciphertexts in bundle.items():
                for recipient, ciphertext in ciphertexts.items():
                    inbox.setdefault(recipient, {})[sender] = ciphertext
                    r["bytes"] += len(ciphertext)
        shared = {sender for bundle in bundles for sender in bundle}
        r["graph"] = {u: [v for v in r["graph"][u] if v in shared] for u in sorted(shared)}
        short = [u for u, vs in r["graph"].items() if len(vs) < r["threshold"]]
        if short:
            raise SecAggAborted(
                f"client {short[0]} has {len(r['graph'][short[0]])} neighbours left after key sharing, fewer than the threshold {r['threshold']}"
            )
        out = [{c: inbox.get(c, {}) for c in group if c in shared} for group in groups]
        return out if len(out) > 1 else out[0]

    def secagg_collect(self, round_idx: int, *payloads: MaskedPayload) -> list[int]:
        """Add the workers' sums of masked inputs (mod 2^k); returns who sent one, for unmasking."""
        r = self._round(round_idx)
        senders = sorted(c for p in payloads for c in p.senders)
        if not senders:
            raise SecAggAborted("no client's masked input arrived")
        k = self._secagg_settings()["ring_bits"]
        with np.errstate(over="ignore"):
            r["masked"] = sum((p.masked for p in payloads if p.senders), np.uint64(0)) & ring_mask(k)
        r["senders"] = set(senders)
        r["bytes"] += len(senders) * -(-len(r["masked"]) * k // 8)  # each client's y_u, packed in k bits
        return senders

    def secagg_aggregate(self, round_idx: int, skellam: SkellamPlan | None, *reveals: dict[int, dict]) -> ServerReport:
        """Remove the masks with the revealed shares, decode the sum, and update the global adapter.
        Under distributed DP (``skellam``, the run's plan) the sum is already noised: the server
        only decodes it and divides by the expected number of clients, as central DP does."""
        r = self._round(round_idx)
        merged = {c: shares for batch in reveals for c, shares in batch.items()}
        r["bytes"] += _REVEAL_BYTES * sum(len(shares) for shares in merged.values())
        cfg = self._secagg_settings()
        total = unmasked_sum(r["masked"], r["senders"], merged, r["publics"], r["graph"], r["threshold"], round_idx, cfg["ring_bits"])
        template = self.method.message_template(self.state)
        if skellam is not None:
            signs = rotation_signs(skellam.padded, self.seed, round_idx)
            summed = unflatten(decode_sum(total, skellam, signs), template)
            expected_clients = skellam.sample_rate * self.num_clients
            mean = {k: (v / expected_clients).astype(v.dtype) for k, v in summed.items()}
            weight_total = float(len(r["senders"]))
        else:
            values, weight_total = decode_update_sum(total, len(r["senders"]), cfg["clip_range"], cfg["bits"])
            mean = self._mean(round_idx, unflatten(values, template), weight_total)
        self._apply(RoundInput(round_idx, mean, weight_total))
        self._secagg_round = {}
        return ServerReport(aggregation_error=float("nan"), uplink_bytes=r["bytes"])

    def secagg_abort(self, round_idx: int) -> int:
        """Forget an aborted round (the global adapter was not touched); returns the bytes its
        clients had sent."""
        sent = self._secagg_round.get("bytes", 0) if self._secagg_round.get("round") == round_idx else 0
        self._secagg_round = {}
        return sent

    def _secagg_settings(self) -> dict:
        if self.secagg is None:
            raise SecAggAborted("secure aggregation is off on this server")
        return self.secagg

    def _round(self, round_idx: int) -> dict:
        if self._secagg_round.get("round") != round_idx:
            raise SecAggAborted(f"round {round_idx}: no secure aggregation in progress (the server has no roster for it)")
        return self._secagg_round

    def global_state(self) -> dict:
        return self.state.adapter

    def summed_values(self) -> int:
        """How many values each client's summed message has: what secure aggregation carries."""
        return int(sum(v.size for v in self.method.message_template(self.state).values()))

    def frozen_state(self) -> dict:
        """The tensors every client keeps frozen, which every worker's model holds."""
        return self.state.frozen
