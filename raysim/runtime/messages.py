"""Typed messages between the driver, the server and the workers (plain values and numpy arrays:
the driver unpickles them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raysim.methods.protocol import Message
from raysim.privacy.budget import ClientPrivacy
from raysim.privacy.skellam import SkellamPlan


@dataclass(frozen=True)
class TrainSettings:
    """A round's training hyperparameters (changeable between rounds)."""

    lr: float
    lr_decay: float
    local_steps: int
    batch_size: int
    weighting: str


@dataclass(frozen=True)
class SecAggEncoding:
    """How clients put their update into the secure sum: fixed-point values with the weights
    divided by ``weight_scale`` (the largest client's, so that they lie in (0, 1]), or, under
    distributed DP, the Skellam mechanism of ``skellam`` (unit weights)."""

    weight_scale: float = 1.0
    skellam: SkellamPlan | None = None


@dataclass
class WorkerReport:
    """What the driver reads of a worker's round: small, fetched by the driver."""

    worker: int
    clients: list[int]  # the clients that trained and sent
    weight: float  # their summed aggregation weights
    loss_sum: float
    train_s: float
    steps_s: float  # of train_s, the local steps themselves
    uplink_bytes: int  # the real size of the clients' messages
    privacy: dict[int, ClientPrivacy] = field(default_factory=dict)
    secagg_clipped: int = 0  # values clipped before encoding (secure aggregation)
    # each client's L2 norm of its method's message, before attacks and clipping: a simulator's
    # view (under SecAgg the server sees none) for setting server.norm_bound and DP's clip norm
    update_norms: list[float] = field(default_factory=list)
    method_state_clients: list[int] = field(default_factory=list)  # whose method state the third object holds


@dataclass
class WorkerPayload:
    """What a worker hands the server (straight, never through the driver): the weighted sum of its
    clients' summable parts, the diagnostic's sketched products, and per-client messages."""

    delta_sum: dict[str, np.ndarray]
    product_sum: dict[str, np.ndarray]
    messages: list[tuple[int, float, Message]] = field(default_factory=list)


@dataclass
class MaskedPayload:
    """Secure aggregation: the sum of a worker's clients' masked inputs, mod 2^k."""

    senders: list[int]
    masked: Any  # np.ndarray of uint64, or None when none of its clients sent


@dataclass
class WorkerReady:
    """A worker after loading its data."""

    index: int
    pid: int
    device: str
    clients: int


@dataclass
class LocalDPPlan:
    """What a worker needs under local DP: every client's noise multiplier, and the accountant
    histories so far of the clients it owns (kept by the driver, so a restart never resets a
    client's epsilon)."""

    noise: dict[int, float]
    histories: dict[int, list]


@dataclass
class SecAggRoster:
    """The server's answer to the round's public keys: who takes part, each client's neighbours
    and the Shamir threshold."""

    round_idx: int
    publics: dict[int, dict]
    graph: dict[int, list[int]]
    threshold: int


@dataclass
class ServerReport:
    """The server's side of a round, for the metrics row."""

    aggregation_error: float
    uplink_bytes: int | None = None  # secure aggregation counts its protocol's bytes itself
    kept_clients: list[int] | None = None  # the clients whose updates Krum or Multi-Krum averaged
    krum_scores: dict[int, float] | None = None  # under Krum and Multi-Krum, each sender's score
