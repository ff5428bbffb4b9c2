"""Server: owns the global adapter, samples clients and aggregates; run as a Ray actor.

It puts the global adapter into the object store once per version (once per round), and receives
one partial sum per worker, never one message per client. With secure aggregation it runs the
server's side of SecAgg+: it routes the clients' public keys and encrypted shares, receives
masked sums, and unmasks only their total.
"""

from __future__ import annotations

import numpy as np
import ray

from raysim.methods import get as get_method
from raysim.methods.common import apply_step, lora_products, relative_aggregation_error, server_step
from raysim.privacy.central_dp import noisy_mean, poisson_clients
from raysim.secagg.encoding import decode_update_sum, ring_mask
from raysim.secagg.protocol import SecAggAborted, neighbours, threshold_for, unmasked_sum

_SAMPLING_STREAM = 0x5A3
_NOISE_STREAM = 0xD9
_GRAPH_STREAM = 0x6A
_PUBLIC_KEY_BYTES = 64
_REVEAL_BYTES = 73  # kind + one Shamir share (9 field elements of 8 bytes)


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
        method: str,
        seed: int,
        num_clients: int,
        lr: float = 1.0,
        momentum: float = 0.0,
        central_dp: dict | None = None,
        secagg: dict | None = None,
    ):
        """``central_dp``: {noise_multiplier, clip_norm, sample_rate} for DP-FedAvg, or None.
        ``secagg``: {neighbors (int or None for all), threshold, clip_range, bits, ring_bits}, or None."""
        self.method = get_method(method)
        self.central_dp = central_dp
        self.secagg = secagg
        self._secagg_round: dict = {}
        self.seed = seed
        self.num_clients = num_clients
        self.lr, self.momentum = lr, momentum
        self.momentum_buffer: dict[str, np.ndarray] | None = None
        self.state: dict[str, np.ndarray] = {}
        self.frozen_a: dict[str, np.ndarray] = {}
        self._broadcast_ref = None

    def initialize(self, initial_state: dict, frozen_a: dict) -> None:
        """Start from the adapter the workers built (same seed everywhere); A only for diagnostics."""
        self.state = {k: np.array(v) for k, v in initial_state.items()}
        self.frozen_a = {k: np.array(v) for k, v in frozen_a.items()}
        self._broadcast_ref = None

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue: the global adapter and the server optimizer's momentum."""
        return {"state": self.state, "momentum_buffer": self.momentum_buffer, "frozen_a": self.frozen_a}

    def load_state_dict(self, saved: dict) -> None:
        self.state = {k: np.array(v) for k, v in saved["state"].items()}
        self.frozen_a = {k: np.array(v) for k, v in saved["frozen_a"].items()}
        buffer = saved["momentum_buffer"]
        self.momentum_buffer = None if buffer is None else {k: np.array(v) for k, v in buffer.items()}
        self._broadcast_ref = None

    def sample(self, round_idx: int, per_round: int, excluded: list[int] | tuple = ()) -> list[int]:
        """Clients for this round, drawn from (seed, round) alone: ``per_round`` of the clients not
        ``excluded`` without replacement, or under central DP each client with probability q."""
        rng = np.random.default_rng([self.seed, round_idx, _SAMPLING_STREAM])
        if self.central_dp:
            return poisson_clients(rng, self.num_clients, self.central_dp["sample_rate"])
        eligible = np.setdiff1d(np.arange(self.num_clients), np.asarray(excluded, dtype=np.int64))
        chosen = rng.choice(eligible, size=min(per_round, len(eligible)), replace=False)
        return sorted(int(c) for c in chosen)

    def broadcast(self) -> list:
        """A reference to the current global adapter (wrapped in a list so Ray does not resolve it)."""
        if self._broadcast_ref is None:
            self._broadcast_ref = ray.put(self.state)
        return [self._broadcast_ref]

    def aggregate(self, round_idx: int, weight_total: float, *payloads: dict) -> dict:
        """Sum the workers' partial sums, apply the method's server update, and report diagnostics.

        Under central DP the noise is added to the sum even when no client took part: that noisy
        release is what the accountant counts."""
        if not self.central_dp and (not payloads or weight_total <= 0):
            return {"aggregation_error": float("nan")}
        delta_sum = {k: sum((p["delta_sum"][k] for p in payloads), np.zeros_like(v)) for k, v in self.state.items()}
        update = self._average(round_idx, delta_sum, weight_total)
        error = float("nan")
        if payloads and payloads[0]["product_sum"]:
            # The error of averaging itself: the clients' mean adapter, before the server optimizer.
            averaged = apply_step(self.state, update)
            mean_products = {k: sum(p["product_sum"][k] for p in payloads) / weight_total for k in payloads[0]["product_sum"]}
            error = relative_aggregation_error(mean_products, lora_products(averaged, self.frozen_a))
        self._step(update)
        return {"aggregation_error": error}

    def _average(self, round_idx: int, delta_sum: dict[str, np.ndarray], weight_total: float) -> dict[str, np.ndarray]:
        if self.central_dp:
            dp = self.central_dp
            rng = np.random.default_rng([self.seed, round_idx, _NOISE_STREAM])
            expected_clients = dp["sample_rate"] * self.num_clients
            return noisy_mean(delta_sum, dp["noise_multiplier"], dp["clip_norm"], expected_clients, rng)
        return self.method.aggregate(delta_sum, weight_total)

    def _step(self, update: dict[str, np.ndarray]) -> None:
        step, self.momentum_buffer = server_step(update, self.momentum_buffer, self.lr, self.momentum)
        self.state = apply_step(self.state, step)
        self._broadcast_ref = None

    # Secure aggregation: the server's side of one SecAgg+ round, in the order the driver calls it.
    # Each step raises SecAggAborted when the round cannot finish; the global adapter is then unchanged.

    def secagg_roster(self, round_idx: int, *advertised: dict[int, dict]) -> dict:
        """From the clients' public keys: the neighbour graph and threshold, sent back to all."""
        publics = {c: public for batch in advertised for c, public in batch.items()}
        clients = sorted(publics)
        if len(clients) < 3:
            raise SecAggAborted(f"{len(clients)} client(s) reached the round; secure aggregation needs at least 3")
        rng = np.random.default_rng([self.seed, round_idx, _GRAPH_STREAM])
        graph = neighbours(clients, self.secagg["neighbors"], rng)
        degree = min(len(v) for v in graph.values())
        threshold = threshold_for(degree, self.secagg["threshold"])
        if threshold > degree:
            raise SecAggAborted(f"threshold {threshold} is more than the {degree} neighbours each of the {len(clients)} clients has")
        self._secagg_round = {
            "round": round_idx,
            "publics": publics,
            "graph": graph,
            "threshold": threshold,
            "bytes": _PUBLIC_KEY_BYTES * len(clients),
        }
        return {"round": round_idx, "publics": publics, "graph": graph, "threshold": threshold}

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

    def secagg_collect(self, round_idx: int, *payloads: dict) -> list[int]:
        """Add the workers' sums of masked inputs (mod 2^k); returns who sent one, for unmasking."""
        r = self._round(round_idx)
        senders = sorted(c for p in payloads for c in p["senders"])
        if not senders:
            raise SecAggAborted("no client's masked input arrived")
        k = self.secagg["ring_bits"]
        with np.errstate(over="ignore"):
            r["masked"] = sum((p["masked"] for p in payloads if p["senders"]), np.uint64(0)) & ring_mask(k)
        r["senders"] = set(senders)
        r["bytes"] += len(senders) * -(-len(r["masked"]) * k // 8)  # each client's y_u, packed in k bits
        return senders

    def secagg_aggregate(self, round_idx: int, *reveals: dict[int, dict]) -> dict:
        """Remove the masks with the revealed shares, decode the sum, and update the global adapter."""
        r = self._round(round_idx)
        merged = {c: shares for batch in reveals for c, shares in batch.items()}
        r["bytes"] += _REVEAL_BYTES * sum(len(shares) for shares in merged.values())
        cfg = self.secagg
        total = unmasked_sum(r["masked"], r["senders"], merged, r["publics"], r["graph"], r["threshold"], round_idx, cfg["ring_bits"])
        values, weight_total = decode_update_sum(total, len(r["senders"]), cfg["clip_range"], cfg["bits"])
        self._step(self._average(round_idx, unflatten(values, self.state), weight_total))
        self._secagg_round = {}
        return {"aggregation_error": float("nan"), "uplink_bytes": r["bytes"]}

    def secagg_abort(self, round_idx: int) -> int:
        """Forget an aborted round (the global adapter was not touched); returns the bytes its
        clients had sent."""
        sent = self._secagg_round.get("bytes", 0) if self._secagg_round.get("round") == round_idx else 0
        self._secagg_round = {}
        return sent

    def _round(self, round_idx: int) -> dict:
        if self._secagg_round.get("round") != round_idx:
            raise SecAggAborted(f"round {round_idx}: no secure aggregation in progress (the server has no roster for it)")
        return self._secagg_round

    def global_state(self) -> dict:
        return self.state
