"""The client side of SecAgg+ on a worker: it acts for each of its clients (keys, shares, masked
input, reveals), so the server gets one masked sum per worker. The protocol's math is
raysim.secagg (no Ray); this is its state across one round's calls."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raysim.privacy import skellam
from raysim.runtime.messages import SecAggEncoding, SecAggRoster
from raysim.secagg.encoding import encode_update, ring_bits
from raysim.secagg.protocol import ClientRound, advertise, dropout_stage, masked_input, share_keys, unmask

_ROUNDING_STREAM = 0x52


class SecAggClients:
    """Mixed into ClientHost, whose ``cfg`` it reads."""

    cfg: Any

    def init_secagg(self) -> None:
        s = self.cfg.secagg
        # Distributed DP's integers live in the ring secagg.bits wide (they may wrap: see raysim.privacy.skellam).
        distributed = self.cfg.privacy.mode == "distributed_dp"
        self.ring_bits = (s.bits if distributed else ring_bits(s.bits, self.cfg.clients.num)) if s.enabled else 0
        self.min_senders = 0  # distributed DP: the senders its noise was planned for (from the first round's encoding)
        self.secagg_round: dict[int, ClientRound] = {}  # this round's secrets of this worker's clients
        self.secagg_publics: dict[int, dict] = {}
        self.secagg_graph: dict[int, list[int]] = {}  # the round's neighbour graph, from the roster

    def _secagg_senders(self, client_ids: list[int], round_idx: int, inbox: dict) -> list[int]:
        """The clients that take part in this round's masked sum, their received shares stored."""
        senders = []
        for cid in client_ids:
            secrets = self.secagg_round.get(cid)
            if secrets is None or secrets.round_idx != round_idx or cid not in inbox:
                continue  # this worker restarted mid-round, or the client's keys never reached the others
            if dropout_stage(self.cfg.seed, round_idx, cid, self.cfg.secagg.dropout_rate) == "before_input":
                continue
            secrets.received = inbox[cid]
            senders.append(cid)
        return senders

    def _masked_input(self, cid: int, round_idx: int, delta: dict[str, torch.Tensor], weight: float, encoding: SecAggEncoding) -> tuple[np.ndarray, int]:
        """A client's update, encoded into the ring and masked: what it would send; and how many
        of its values the fixed-point encoding clipped. Under distributed DP: rotated, rounded and
        noised (its noise share drawn from (seed, round, client))."""
        flat = torch.cat([delta[k].reshape(-1) for k in sorted(delta)]).cpu().double().numpy()
        rng = np.random.default_rng([self.cfg.seed, round_idx, cid, _ROUNDING_STREAM])
        plan = encoding.skellam
        if plan is not None:
            self.min_senders = plan.min_clients
            encoded = skellam.encode(flat, plan, skellam.rotation_signs(plan.padded, self.cfg.seed, round_idx), rng)
            clipped = 0
        else:
            encoded, clipped = encode_update(flat, weight / encoding.weight_scale, self.cfg.secagg.clip_range, self.cfg.secagg.bits, rng)
        return masked_input(self.secagg_round[cid], encoded, self.secagg_publics, self.ring_bits), clipped

    def secagg_advertise(self, round_idx: int, client_ids: list[int]) -> dict[int, dict]:
        """Fresh key pairs for this round's clients; their public keys, for the server."""
        self.secagg_round, publics = {}, {}
        for cid in client_ids:
            self.secagg_round[cid], publics[cid] = advertise(cid, round_idx)
        return publics

    def secagg_share_keys(self, roster: SecAggRoster):
        """Each client's Shamir shares, encrypted to each of its neighbours: (senders, {sender: {recipient: ciphertext}})."""
        self.secagg_publics, self.secagg_graph = roster.publics, roster.graph
        out = {
            cid: share_keys(secrets, roster.publics, roster.graph[cid], roster.threshold)
            for cid, secrets in self.secagg_round.items()
            if secrets.round_idx == roster.round_idx
        }
        return sorted(out), out

    def secagg_unmask(self, round_idx: int, senders: list[int]):
        """The shares the server asks for, from this worker's clients that sent their input and are
        still there; then the round's secrets are forgotten. (responders, {client: reveals})."""
        sent = set(senders)
        out = {
            cid: unmask(secrets, self.secagg_publics, sent, self.secagg_graph, self.min_senders)
            for cid, secrets in self.secagg_round.items()
            if secrets.round_idx == round_idx and cid in sent and dropout_stage(self.cfg.seed, round_idx, cid, self.cfg.secagg.dropout_rate) is None
        }
        self.secagg_round, self.secagg_publics, self.secagg_graph = {}, {}, {}
        return sorted(out), out
