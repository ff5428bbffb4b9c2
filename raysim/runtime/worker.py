"""ClientWorker: the Ray actor that hosts many virtual clients around one resident model.

The work is :class:`raysim.runtime.host.ClientHost`'s, built by the actor's first call (the
driver calls ``start`` as soon as it creates the actor), not by its constructor: Ray passes an
exception from an actor's constructor on only as text, and one from a call as itself, so a
UserError (a wrong target module, a model that cannot load) reaches the driver typed. The
driver creates these actors but never runs their code, so this module imports neither torch nor
transformers: the driver's start-up then leaves the CPUs to the workers' own imports.
"""

from __future__ import annotations

from typing import Any

import ray


def actor_device() -> str:
    """The device Ray assigned to this actor: a GPU only if Ray granted one (never by probing CUDA)."""
    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return "cuda:0" if gpu_ids else "cpu"


@ray.remote
class ClientWorker:
    def __init__(self, cfg: dict, index: int, num_labels: int):
        self._args = (cfg, index, num_labels)
        self._host: Any = None  # a ClientHost (this module does not import it: see above)

    @property
    def host(self):
        """The ClientHost, built on first use (again after Ray restarts the actor)."""
        if self._host is None:
            from raysim.runtime.host import ClientHost

            cfg, index, num_labels = self._args
            self._host = ClientHost(cfg, index, num_labels, actor_device(), threads=int(cfg["worker"]["num_cpus"]))
        return self._host

    def start(self) -> None:
        """Build the host now, while the driver prepares the data."""
        self.host  # noqa: B018 - the property builds it

    def load(self, *args):
        return self.host.load(*args)

    def tokenizer_mismatch(self, texts: list[str], ids: list[list[int]], pad_token_id: int, max_length: int) -> str | None:
        return self.host.tokenizer_mismatch(texts, ids, pad_token_id, max_length)

    def ready(self):
        return self.host.ready()

    def initial_adapter(self):
        return self.host.initial_adapter()

    def public_init(self, table):
        return self.host.public_init(table)

    def install(self, tensors: dict) -> int:
        return self.host.install(tensors)

    @ray.method(num_returns=3)
    def train_clients(self, *args, **kwargs):
        return self.host.train_clients(*args, **kwargs)

    def hand_over(self, client_ids: list[int], groups: list[list[int]]):
        return self.host.hand_over(client_ids, groups)

    def export_states(self) -> dict:
        return self.host.export_states()

    def import_states(self, states: dict) -> int:
        return self.host.import_states(states)

    def secagg_advertise(self, round_idx: int, client_ids: list[int]) -> dict:
        return self.host.secagg_advertise(round_idx, client_ids)

    @ray.method(num_returns=2)
    def secagg_share_keys(self, roster):
        return self.host.secagg_share_keys(roster)

    @ray.method(num_returns=2)
    def secagg_unmask(self, round_idx: int, senders: list[int]):
        return self.host.secagg_unmask(round_idx, senders)

    def adopt(self, *args):
        return self.host.adopt(*args)

    def evaluate(self, global_state: dict, split: str, *extra_shares):
        return self.host.evaluate(global_state, split, *extra_shares)

    def adapter_files(self, global_state: dict) -> dict:
        return self.host.adapter_files(global_state)

    def generate(self, global_state: dict, *extra_shares) -> list:
        return self.host.generate(global_state, *extra_shares)
