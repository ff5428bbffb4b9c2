"""ClientWorker: one Ray actor hosting many virtual clients around one resident model.

The base model is built once per actor. Each round the actor receives the global adapter (an
object-store reference, resolved zero-copy) and the ids of its sampled clients; for each client it
copies the adapter into the resident model, restores that client's optimizer moments and data
cursor, trains, and adds the weighted delta into one partial sum. It returns that one partial sum,
not one message per client.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from omegaconf import OmegaConf

from raysim.data.loading import from_arrow
from raysim.methods.common import lora_pairs
from raysim.model import adapter_state, build_model, frozen_lora_a, trainable_parameters
from raysim.training import (
    ClientData,
    ClientState,
    evaluate,
    load_adapter,
    local_train,
    make_optimizer,
    saved_optimizer_state,
    step_seed,
    swap_optimizer_state,
)


def actor_device() -> torch.device:
    """The device Ray assigned to this actor: a GPU only if Ray granted one (never by probing CUDA)."""
    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return torch.device("cuda:0") if gpu_ids else torch.device("cpu")


def _as_client_data(table: pa.Table) -> ClientData:
    return ClientData(*from_arrow(table))


@ray.remote
class ClientWorker:
    def __init__(self, cfg: dict, index: int, num_labels: int):
        self.cfg = OmegaConf.create(cfg)
        self.index = index
        self.device = actor_device()
        torch.set_num_threads(max(1, int(self.cfg.worker.num_cpus)))
        self.model = build_model(self.cfg, num_labels, self.device)
        self.params = trainable_parameters(self.model)
        self.param_list = list(self.params.values())
        self.optimizer = make_optimizer(self.cfg.train, self.param_list)
        self.frozen_a = {k: torch.from_numpy(v).to(self.device) for k, v in frozen_lora_a(self.model).items()}
        self.pairs = lora_pairs(list(self.params) + list(self.frozen_a))
        self.clients: dict[int, ClientData] = {}
        self.eval_sets: dict[str, ClientData] = {}
        self.states: dict[int, ClientState] = {}

    def load(self, shards: dict[int, pa.Table], eval_tables: dict[str, pa.Table]) -> dict:
        """Take this worker's client shards and evaluation slices (again after a restart)."""
        self.clients = {cid: _as_client_data(t) for cid, t in shards.items()}
        self.eval_sets = {name: _as_client_data(t) for name, t in eval_tables.items()}
        self.states = {}
        return self.ready()

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "device": str(self.device), "clients": len(self.clients)}

    def initial_adapter(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(trained-and-sent tensors, frozen A matrices) of the freshly built adapter."""
        return adapter_state(self.model), frozen_lora_a(self.model)

    def _to_device(self, state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # One copy per round per worker: object-store arrays are read-only.
        return {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in state.items()}

    @ray.method(num_returns=2)
    def train_clients(self, global_state: dict, client_ids: list[int], round_idx: int, train: dict):
        """Train each client from the global adapter; return (small metadata, partial sums)."""
        start = time.perf_counter()
        train_cfg = OmegaConf.create(train)
        for group in self.optimizer.param_groups:
            group["lr"] = train_cfg.lr
        start_state = self._to_device(global_state)
        delta_sum = {k: torch.zeros_like(v) for k, v in start_state.items()}
        want_products = bool(self.cfg.eval.aggregation_error)
        product_sum = {}
        weight_total, loss_sum = 0.0, 0.0
        for cid in client_ids:
            data = self.clients[cid]
            state = self.states.setdefault(cid, ClientState.new(self.cfg.seed, cid))
            load_adapter(self.params, start_state)
            swap_optimizer_state(self.optimizer, self.param_list, state.optimizer_state)
            torch.manual_seed(step_seed(self.cfg.seed, round_idx, cid))
            loss_sum += local_train(
                self.model, self.optimizer, data, state, train_cfg.local_steps, train_cfg.batch_size, self.device
            )
            state.optimizer_state = saved_optimizer_state(self.optimizer, self.param_list)
            weight = float(len(data)) if train_cfg.weighting == "examples" else 1.0
            weight_total += weight
            with torch.no_grad():
                for k, total in delta_sum.items():
                    total.add_(self.params[k] - start_state[k], alpha=weight)
                if want_products:
                    for prefix, (a, b) in self.pairs.items():
                        a_mat = self.params[a] if a in self.params else self.frozen_a[a]
                        product = self.params[b] @ a_mat
                        if prefix in product_sum:
                            product_sum[prefix].add_(product, alpha=weight)
                        else:
                            product_sum[prefix] = product * weight
        meta = {
            "worker": self.index,
            "clients": list(client_ids),
            "weight": weight_total,
            "loss_sum": loss_sum,
            "train_s": time.perf_counter() - start,
        }
        payload = {
            "delta_sum": {k: v.cpu().numpy() for k, v in delta_sum.items()},
            "product_sum": {k: v.cpu().numpy() for k, v in product_sum.items()},
        }
        return meta, payload

    def evaluate(self, global_state: dict, split: str) -> tuple[float, int, int]:
        load_adapter(self.params, self._to_device(global_state))
        data = self.eval_sets[split]
        if len(data) == 0:
            return 0.0, 0, 0
        return evaluate(self.model, data, int(self.cfg.eval.batch_size), self.device)

    def adapter_files(self, global_state: dict) -> dict[str, bytes]:
        """The global adapter saved by PEFT, as file contents (the driver may be on another node)."""
        load_adapter(self.params, self._to_device(global_state))
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
