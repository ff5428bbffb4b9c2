"""The method protocol: what a federated LoRA method declares, so the runtime never special-cases one.

A method is a subclass of :class:`Method` in one module (its paper in the docstring), registered by
name in :mod:`raysim.methods`. It declares, after fedjax's algorithm-as-functions over a
serializable server state and pfl-research's statistics passed through post-processors:

- per client, the adapter it trains (:meth:`Method.adapter`: rank and which tensors);
- the client side (:meth:`Method.client_message`): how a client's trained tensors become its
  :class:`Message`, with per-client state that persists across rounds and travels with the client
  (hand-over between workers, restarts, checkpoints);
- what the runtime may do with a message (:attr:`Method.aggregation`): ``SUMMABLE`` parts are
  weighted and pre-summed by the workers, so SecAgg+ and central DP apply to them; ``PER_CLIENT``
  messages reach the server one by one, which neither SecAgg nor central DP allow;
- the server side: a serializable :class:`ServerState` (:meth:`Method.init_server`) and an
  :meth:`Method.aggregate` step that is always called, after the runtime's post-processing of the
  summed part (SecAgg unmasking, central DP noise, division by the total weight);
- its options (``method_args``, validated against :attr:`Method.Options`), and its real uplink
  and downlink bytes per client.

Client-side hooks see the worker's tensors (torch, on its device); server-side ones numpy arrays.
Neither imports Ray, and the server side imports no torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Mapping

import numpy as np

from raysim.methods.common import apply_step, lora_pairs, server_step
from raysim.methods.ranks import nbytes_at_rank


class Aggregation(enum.Enum):
    SUMMABLE = "summable"  # workers add up weight x message.summable; SecAgg and central DP apply
    PER_CLIENT = "per_client"  # the server needs each client's message


@dataclass(frozen=True)
class AdapterSpec:
    """What one client trains: its LoRA rank (the first ``rank`` slots of the resident model's
    modules), the adapter tensors (by PEFT name) it trains, and its LoRA scaling (None: the
    resident model's lora.alpha / lora.rank, the same for every client)."""

    rank: int
    frozen_kinds: tuple[str, ...] = ()  # name fragments of LoRA tensors kept frozen, e.g. (".lora_A.",)
    scaling: float | None = None

    def trains(self, name: str) -> bool:
        return not any(kind in name for kind in self.frozen_kinds)


@dataclass
class ClientUpdate:
    """A client's round as its method sees it: the tensors it started from (the broadcast) and its
    trained ones, by name."""

    client_id: int
    round_idx: int
    examples: int
    start: Mapping[str, Any]
    trained: Mapping[str, Any]


@dataclass
class Message:
    """What a client sends. ``summable``: tensors the runtime weights, clips under central DP,
    masks under SecAgg and adds up; ``per_client``: tensors delivered to the server as they are
    (``Aggregation.PER_CLIENT`` methods). ``nbytes``: the real size on the wire, where it is not
    the tensors' (e.g. values plus indices of a sparse message)."""

    summable: dict[str, Any]
    per_client: dict[str, Any] = field(default_factory=dict)
    nbytes: int | None = None

    def size(self) -> int:
        if self.nbytes is not None:
            return int(self.nbytes)
        return int(sum(v.nbytes for part in (self.summable, self.per_client) for v in part.values()))


@dataclass
class ServerState:
    """Everything the server carries between rounds, as arrays and plain values (a checkpoint
    stores it): the global adapter clients start from, the tensors every client keeps frozen, the
    server optimizer's buffer, and the method's own state."""

    adapter: dict[str, np.ndarray]
    frozen: dict[str, np.ndarray] = field(default_factory=dict)
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ServerState":
        def arrays(d: Mapping[str, Any]) -> dict[str, np.ndarray]:
            return {k: np.array(v) for k, v in d.items()}

        return cls(arrays(values["adapter"]), arrays(values["frozen"]), arrays(values["optimizer"]), dict(values["extra"]))


@dataclass
class RoundInput:
    """What :meth:`Method.aggregate` gets. ``mean``: the summed summable parts after the runtime's
    post-processing (SecAgg unmasking, central DP noise), divided by the total weight; None when no
    client's message arrived. ``messages``: (client, weight, message) for PER_CLIENT methods."""

    round_idx: int
    mean: dict[str, np.ndarray] | None
    weight_total: float
    messages: list[tuple[int, float, Message]] = field(default_factory=list)
    update: dict[str, np.ndarray] | None = None  # Method.update of mean, where the server already computed it


@dataclass(frozen=True)
class NoOptions:
    pass


class Method:
    """FedAvg of a LoRA adapter (every LoRA tensor trained and sent, deltas averaged), with the
    server optimizer of ``server.lr`` and ``server.momentum``: subclasses change what differs."""

    name: ClassVar[str]
    aggregation: ClassVar[Aggregation] = Aggregation.SUMMABLE
    # True where the averaged adapter reproduces mean_i(B_i A_i) by construction: the
    # aggregation-error diagnostic is then off unless asked for.
    exact: ClassVar[bool] = False
    # True where the method initialises from the public split (data.public_rows) before round 1.
    needs_public_data: ClassVar[bool] = False
    # True where the method merges its rounds into the base weights of the adapted layers (FLoRA):
    # init_server then also gets those weights (``<module>.base_layer.weight``), its global adapter
    # carries them, and every worker installs them in place before it trains or evaluates.
    changes_base: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(
        self,
        options: Any,
        lora_rank: int,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        client_ranks: tuple[int, ...] | None = None,
        lora_alpha: float | None = None,
        seed: int = 0,
    ):
        """``lora_rank``: the resident model's (the largest client's); ``client_ranks``: each
        client's, by id (None: all ``lora_rank``); ``lora_alpha``: LoRA's alpha (None: 2 x rank);
        ``seed``: the run's, for a method's own draws."""
        self.seed = seed
        self.options = options
        self.lora_rank = lora_rank
        self.server_lr, self.server_momentum = server_lr, server_momentum
        self.client_ranks = client_ranks
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * lora_rank

    def rank_of(self, client_id: int) -> int:
        return self.client_ranks[client_id] if self.client_ranks else self.lora_rank

    def ranks_in_use(self) -> list[int]:
        return sorted(set(self.client_ranks)) if self.client_ranks else [self.lora_rank]

    @classmethod
    def conflicts(cls, cfg: Any) -> list[tuple[str, str]]:
        """(config key, why) for each setting of ``cfg`` this method cannot run with; the config
        refuses the first, naming its key. A PER_CLIENT method's messages reach the server one by
        one, which neither secure aggregation nor central DP (it noises only a sum) can hide."""
        if cls.aggregation is not Aggregation.PER_CLIENT:
            return []
        why = f"method {cls.name} aggregates each client's own message, and the server would then see it"
        found = []
        if cfg.secagg.enabled:
            found.append(("secagg.enabled", f"{why}: secure aggregation cannot hide it; use a summable method"))
        if cfg.privacy.mode == "central_dp":
            found.append(("privacy.mode", f"{why}: central DP noises only a sum; use local_dp_sgd"))
        return found

    def adapter(self, client_id: int) -> AdapterSpec:
        return AdapterSpec(rank=self.rank_of(client_id))

    def client_weighting(self, configured: str) -> str:
        """The weighting of the clients' messages in the round's sum (one of ``train.weighting``'s
        values), given the configured one: that one, unless the method's own rule weights the
        clients equally or carries its weights inside the messages (HetLoRA's norms)."""
        return configured

    def client_start(self, client_id: int, round_idx: int, start: Mapping[str, Any]) -> Mapping[str, Any]:
        """The tensors client ``client_id`` starts its round from, given the broadcast (the
        worker's tensors, on its device): the broadcast itself, unless the method draws tensors
        per client (FLoRA's fresh A). Derived from the seed alone, so every process agrees."""
        return start

    def prepare_model(self, model: Any) -> None:
        """Change the freshly built PEFT model's structure in place (Fed-SB inserts R), before
        the tensors the method does not train are frozen. Runs in every process that builds it."""

    def public_init(self, model: Any, backward_mean_loss: Callable[[], None]) -> dict[str, np.ndarray]:
        """With ``needs_public_data``: run once by one worker before round 1, tensors by parameter
        name (frozen and trained alike) that every worker's model then takes. ``backward_mean_loss()``
        accumulates into ``.grad`` the gradient of the mean loss over the public split."""
        raise NotImplementedError(f"method {self.name} has no public_init")

    def plain_lora(self, model: Any) -> ContextManager[None]:
        """A block within which the model's LoRA tensors express the adapter as plain LoRA, for
        PEFT's save (Fed-SB folds R into A); the model is restored after it."""
        return contextlib.nullcontext()

    def frozen_download_bytes(self, frozen: Mapping[str, np.ndarray]) -> int:
        """What a client downloads once, before its first round, of the frozen tensors: none
        where they derive from the run's seed (FFA-LoRA's A)."""
        return 0

    def client_message(self, update: ClientUpdate, state: dict[str, Any]) -> Message:
        """The client's delta from the broadcast, of the size its rank sends. ``state``: this
        client's method state, which the method may change in place; it persists across rounds."""
        delta = {k: update.trained[k] - update.start[k] for k in update.start}
        return Message(summable=delta, nbytes=nbytes_at_rank(delta, self.rank_of(update.client_id)))

    def init_server(self, adapter: Mapping[str, np.ndarray], frozen: Mapping[str, np.ndarray]) -> ServerState:
        return ServerState(adapter={k: np.array(v) for k, v in adapter.items()}, frozen={k: np.array(v) for k, v in frozen.items()})

    def update(self, state: ServerState, mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The round's update of the global adapter before the server optimizer, from the clients'
        mean message: FedAvg's mean delta. The aggregation-error diagnostic measures the adapter
        plus this update against the clients' mean product."""
        return {k: mean[k] for k in state.adapter}

    def aggregate(self, state: ServerState, round_input: RoundInput) -> ServerState:
        """Apply :meth:`update` through the server optimizer (FedAvgM; plain FedAvg at lr 1, momentum 0)."""
        if round_input.mean is None:
            return state
        update = round_input.update if round_input.update is not None else self.update(state, round_input.mean)
        step, buffer = server_step(update, state.optimizer or None, self.server_lr, self.server_momentum)
        return dataclasses.replace(state, adapter=apply_step(state.adapter, step), optimizer=buffer)

    def broadcast(self, state: ServerState) -> dict[str, np.ndarray]:
        """What a sampled client downloads and starts from."""
        return state.adapter

    def evaluated(self, state: ServerState) -> dict[str, np.ndarray] | None:
        """The adapter that evaluation, generation and saving use: the global adapter; None for
        the broadcast (what clients download, as FLASC's authors evaluate)."""
        return state.adapter

    def broadcast_bytes(self, state: ServerState, sent: Mapping[str, np.ndarray], rank: int) -> int:
        """The size of :meth:`broadcast` on the wire for a client of ``rank``, which downloads
        only its rank's slots (a sparse broadcast counts its values and indices)."""
        return nbytes_at_rank(sent, rank)

    def message_template(self, state: ServerState) -> dict[str, np.ndarray]:
        """Arrays of the names, shapes and dtypes of a message's summable part: what the server
        decodes a secure sum into, and noises under central DP when no client took part."""
        return state.adapter

    def factors(self, values: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Module prefix -> (left, right) with the module's weight update proportional to left @ right:
        what the aggregation-error diagnostic compares. LoRA: (B, A)."""
        merged = {**frozen, **values}
        return {prefix: (merged[b], merged[a]) for prefix, (a, b) in lora_pairs(merged).items()}
