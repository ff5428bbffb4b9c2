"""ClientHost: what a ClientWorker actor (raysim.runtime.worker) runs: many virtual clients around
one resident model.

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

from raysim.client_batch import local_train_stacked
from raysim.data.loading import from_arrow
from raysim.methods.common import lora_pairs
from raysim.model import adapter_state, build_model, frozen_lora_a, quiet_load, trainable_parameters
from raysim.privacy.central_dp import clip_update
from raysim.secagg.encoding import encode_update, ring_bits, ring_mask
from raysim.secagg.protocol import ClientRound, advertise, dropout_stage, masked_input, share_keys, unmask
from raysim.training import (
    ClientData,
    ClientState,
    evaluate,
    load_adapter,
    local_train,
    make_optimizer,
    saved_optimizer_state,
    shuffled_batches,
    step_seed,
    swap_optimizer_state,
)

_DP_NOISE_STREAM = 0x4E
_ROUNDING_STREAM = 0x52


def actor_device() -> torch.device:
    """The device Ray assigned to this actor: a GPU only if Ray granted one (never by probing CUDA)."""
    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return torch.device("cuda:0") if gpu_ids else torch.device("cpu")


def _as_client_data(table: pa.Table) -> ClientData:
    return ClientData(*from_arrow(table))


class ClientHost:
    def __init__(self, cfg: dict, index: int, num_labels: int):
        self.cfg = OmegaConf.create(cfg)
        self.index = index
        self.device = actor_device()
        torch.set_num_threads(max(1, int(self.cfg.worker.num_cpus)))
        self.model = build_model(self.cfg, num_labels, self.device)
        self.params = trainable_parameters(self.model)
        self.param_list = list(self.params.values())
        self.optimizer = make_optimizer(self.cfg.train, self.param_list)
        self.privacy = self.cfg.privacy
        self.dp = None
        if self.privacy.mode == "local_dp_sgd":
            # Opacus is imported only where DP-SGD runs: it adds about 0.5 s to every worker's start.
            from raysim.privacy.local_dp import DPSGD

            self.dp = DPSGD(self.model, self.optimizer, self.privacy.max_grad_norm, self.privacy.grad_sample_mode)
        self.noise: dict[int, float] = {}
        self.histories: dict[int, list] = {}
        self.frozen_a = {k: torch.from_numpy(v).to(self.device) for k, v in frozen_lora_a(self.model).items()}
        self.pairs = lora_pairs(list(self.params) + list(self.frozen_a))
        self.train_rows: ClientData | None = None  # every client's rows, client after client
        self.offsets = np.zeros(1, dtype=np.int64)  # client c's rows: offsets[c]:offsets[c + 1]
        self.eval_sets: dict[str, ClientData] = {}
        self.states: dict[int, ClientState] = {}
        self.secagg = self.cfg.secagg if self.cfg.secagg.enabled else None
        self.ring_bits = ring_bits(self.cfg.secagg.bits, self.cfg.clients.num) if self.secagg else 0
        self.secagg_round: dict[int, ClientRound] = {}  # this round's secrets of this worker's clients
        self.secagg_publics: dict[int, dict] = {}

    def load(self, shards: tuple[pa.Table, np.ndarray], eval_tables: dict[str, pa.Table], privacy: dict | None = None) -> dict:
        """Take every client's rows (one table and the clients' offsets into it, one object shared
        by the workers of a node, so any worker can train any client) and this worker's evaluation
        slices, again after a restart; under local DP the clients' noise multipliers and the
        accountant histories of the clients it owns (kept by the driver, so a restart never resets a
        client's epsilon)."""
        table, self.offsets = shards
        self.train_rows = _as_client_data(table)
        self.eval_sets = {name: _as_client_data(t) for name, t in eval_tables.items()}
        self.states = {}
        privacy = privacy or {}
        self.noise = privacy.get("noise", {})
        self.histories = privacy.get("histories", {})
        return self.ready()

    def _state(self, cid: int) -> ClientState:
        if cid not in self.states:
            state = ClientState.new(self.cfg.seed, cid)
            if self.dp:
                from opacus.accountants import create_accountant

                state.accountant = create_accountant(mechanism=self.privacy.accountant)
                state.accountant.history = [tuple(h) for h in self.histories.get(cid, [])]
            self.states[cid] = state
        return self.states[cid]

    def _train_private(self, cid: int, data: ClientData, state: ClientState, train_cfg, round_idx: int) -> tuple[float, dict]:
        """DP-SGD steps for one client; (loss, its accounting), or (nan, ...) without training
        when this round would take it over its budget."""
        from raysim.privacy.accounting import epsilon
        from raysim.privacy.local_dp import poisson_batch, sample_rate

        privacy, target = self.privacy, self.privacy.target_epsilon
        sigma, rate, steps = self.noise[cid], sample_rate(len(data), train_cfg.batch_size), train_cfg.local_steps

        def spent(history: list, extra_steps: int = 0) -> float:
            return epsilon(history + [(sigma, rate, extra_steps)], privacy.target_delta, privacy.accountant)

        before = list(state.accountant.history)
        if target is not None and spent(before, steps) > target:
            return float("nan"), {"history": before, "epsilon": spent(before), "exhausted": True, "trained": False}
        generator = torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.seed, round_idx, cid) ^ _DP_NOISE_STREAM)
        self.dp.set_client(sigma, rate * len(data), generator)
        batches = (poisson_batch(state.rng, len(data), rate) for _ in range(steps))
        loss = local_train(self.model, self.dp.optimizer, data, batches, self.device, self.dp.loss)
        for _ in range(steps):
            state.accountant.step(noise_multiplier=sigma, sample_rate=rate)
        after = list(state.accountant.history)
        exhausted = target is not None and spent(after, steps) > target  # would the next round fit?
        return loss, {"history": after, "epsilon": spent(after), "exhausted": exhausted, "trained": True}

    def hand_over(self, client_ids: list[int]) -> dict[int, dict]:
        """The local state of clients moving to another worker, as plain values (the driver passes
        them on without unpickling torch tensors, so it never imports torch); this worker then
        forgets them. A client with no state here yet gets it made first, so its accountant
        history moves too."""
        out = {}
        for cid in client_ids:
            out[cid] = self._state(cid).to_dict()
            del self.states[cid]
        return out

    def export_states(self) -> dict[int, dict]:
        """Every local client state this worker holds, as plain values (for a checkpoint)."""
        return {cid: state.to_dict() for cid, state in self.states.items()}

    def import_states(self, states: dict[int, dict]) -> int:
        """Take clients' local states, as :meth:`export_states` and :meth:`hand_over` give them:
        from a checkpoint (after :meth:`load`), or from another worker."""
        make_accountant = None
        if self.dp:
            from opacus.accountants import create_accountant

            def make_accountant():
                return create_accountant(mechanism=self.privacy.accountant)

        for cid, values in states.items():
            self.states[cid] = ClientState.from_dict(values, self.device, make_accountant)
        return len(states)

    def tokenizer_mismatch(self, texts: list[str], ids: list[list[int]], pad_token_id: int, max_length: int) -> str | None:
        """How the driver's tokenization (``ids``, ``pad_token_id``) differs from transformers'
        AutoTokenizer on ``texts``, or None where it does not."""
        from transformers import AutoTokenizer

        name = self.cfg.model.name_or_path
        hf = quiet_load("a tokenizer from", name, lambda: AutoTokenizer.from_pretrained(name))
        expected = hf(texts, truncation=True, max_length=max_length)["input_ids"]
        for i, (want, got) in enumerate(zip(expected, ids)):
            if list(got) != want:
                return f"{texts[i]!r} gives {list(got)}, AutoTokenizer {want}"
        if (hf.pad_token_id or 0) != pad_token_id:
            return f"pad token id {pad_token_id}, AutoTokenizer's {hf.pad_token_id}"
        return None

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "device": str(self.device), "clients": len(self.offsets) - 1}

    def _data(self, cid: int) -> ClientData:
        """Client ``cid``'s rows: views, made when needed (thousands of clients cost no objects)."""
        rows, start, end = self.train_rows, self.offsets[cid], self.offsets[cid + 1]
        return ClientData(rows.ids[start:end], rows.lengths[start:end], rows.labels[start:end])

    def initial_adapter(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(trained-and-sent tensors, frozen A matrices) of the freshly built adapter."""
        return adapter_state(self.model), frozen_lora_a(self.model)

    def _to_device(self, state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # One copy per round per worker: object-store arrays are read-only.
        return {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in state.items()}

    def train_clients(
        self,
        global_state: dict,
        client_ids: list[int],
        round_idx: int,
        train: dict,
        inbox: dict | None = None,
        weight_scale: float = 1.0,
        arrivals: dict[int, dict] | None = None,
    ):
        """Train each client from the global adapter; return (small metadata, partial sums).
        ``arrivals``: the state of clients handed over by another worker this round.

        With secure aggregation, ``inbox`` holds the encrypted shares each client received, and the
        partial sum is the sum of the clients' masked inputs mod 2^k (weights divided by
        ``weight_scale``, the largest client's, so they lie in (0, 1]); clients that drop before
        sending are not trained."""
        start = time.perf_counter()
        self.import_states(arrivals or {})
        train_cfg = OmegaConf.create(train)
        optimizer = self.dp.optimizer if self.dp else self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = train_cfg.lr
        central = self.privacy.mode == "central_dp"
        start_state = self._to_device(global_state)
        delta_sum = {k: torch.zeros_like(v) for k, v in start_state.items()}
        secure = inbox is not None
        want_products = bool(self.cfg.eval.aggregation_error) and not central and not secure
        product_sum = {}
        weight_total, loss_sum, trained, privacy, steps_s = 0.0, 0.0, [], {}, 0.0
        masked, clipped = np.uint64(0), 0
        eligible = []
        for cid in client_ids:
            if secure:
                secrets = self.secagg_round.get(cid)
                if secrets is None or secrets.round_idx != round_idx or cid not in inbox:
                    continue  # this worker restarted mid-round, or the client's keys never reached the others
                if dropout_stage(self.cfg.seed, round_idx, cid, self.secagg.dropout_rate) == "before_input":
                    continue
                secrets.received = inbox[cid]
            eligible.append(cid)
        for cid, loss, values, seconds in self._local_updates(eligible, start_state, train_cfg, round_idx, privacy):
            data = self._data(cid)
            steps_s += seconds
            trained.append(cid)
            loss_sum += loss
            # Central DP bounds each client's contribution, so each counts once (DP-FedAvg).
            weight = float(len(data)) if train_cfg.weighting == "examples" and not central else 1.0
            weight_total += weight
            with torch.no_grad():
                delta = {k: values[k] - start_state[k] for k in delta_sum}
                if self.dp and not any(bool(d.any()) for d in delta.values()):
                    raise RuntimeError(
                        f"client {cid}: DP-SGD left every trained tensor unchanged, so Opacus computed no "
                        "per-sample gradients (is the model in train mode?)"
                    )
                if central:
                    delta, _ = clip_update(delta, self.privacy.clip_norm)
                if secure:
                    y, n_clipped = self._masked_input(cid, round_idx, delta, weight / weight_scale)
                    with np.errstate(over="ignore"):
                        masked = (masked + y) & ring_mask(self.ring_bits)
                    clipped += n_clipped
                    continue
                for k, total in delta_sum.items():
                    total.add_(delta[k], alpha=weight)
                if want_products:
                    for prefix, (a, b) in self.pairs.items():
                        a_mat = values[a] if a in values else self.frozen_a[a]
                        product = values[b] @ a_mat
                        if prefix in product_sum:
                            product_sum[prefix].add_(product, alpha=weight)
                        else:
                            product_sum[prefix] = product * weight
        meta = {
            "worker": self.index,
            "clients": trained,
            "weight": weight_total,
            "loss_sum": loss_sum,
            "train_s": time.perf_counter() - start,
            "steps_s": steps_s,  # of train_s, the local steps themselves
            "privacy": privacy,
        }
        if secure:
            meta["secagg_clipped"] = clipped
            return meta, {"senders": trained, "masked": masked if trained else None}
        payload = {
            "delta_sum": {k: v.cpu().numpy() for k, v in delta_sum.items()},
            "product_sum": {k: v.cpu().numpy() for k, v in product_sum.items()},
        }
        return meta, payload

    def _local_updates(self, client_ids: list[int], start_state: dict, train_cfg, round_idx: int, privacy: dict):
        """(client, mean loss, trained tensors, seconds of local steps) for each client that
        trained, from the global adapter: one client at a time, or ``train.clients_per_batch`` of
        them in one forward pass. The tensors are only valid until the next item is asked for."""
        per_batch = int(self.cfg.train.clients_per_batch)
        if per_batch > 1:
            yield from self._stacked_updates(client_ids, per_batch, start_state, train_cfg, round_idx)
            return
        for cid in client_ids:
            data, state = self._data(cid), self._state(cid)
            load_adapter(self.params, start_state)
            swap_optimizer_state(self.optimizer, self.param_list, state.optimizer_state)
            torch.manual_seed(step_seed(self.cfg.seed, round_idx, cid))
            started = time.perf_counter()
            if self.dp:
                loss, privacy[cid] = self._train_private(cid, data, state, train_cfg, round_idx)
                if not privacy[cid]["trained"]:
                    continue
            else:
                batches = shuffled_batches(state, data.lengths, train_cfg.batch_size, train_cfg.local_steps)
                loss = local_train(self.model, self.optimizer, data, batches, self.device)
            seconds = time.perf_counter() - started
            state.optimizer_state = saved_optimizer_state(self.optimizer, self.param_list)
            yield cid, loss, self.params, seconds

    def _stacked_updates(self, client_ids: list[int], per_batch: int, start_state: dict, train_cfg, round_idx: int):
        """:meth:`_local_updates` for groups of up to ``per_batch`` clients with equally large
        batches (a client with fewer rows than the batch size has smaller ones). A group's dropout
        draws are seeded by its first client."""
        by_batch_size: dict[int, list[int]] = {}
        for cid in client_ids:
            by_batch_size.setdefault(min(train_cfg.batch_size, len(self._data(cid))), []).append(cid)
        optimizer_cfg = OmegaConf.merge(self.cfg.train, train_cfg)
        for same_size in by_batch_size.values():
            for at in range(0, len(same_size), per_batch):
                group = same_size[at : at + per_batch]
                data = [self._data(cid) for cid in group]
                states = [self._state(cid) for cid in group]
                batches = [list(shuffled_batches(s, d.lengths, train_cfg.batch_size, train_cfg.local_steps)) for s, d in zip(states, data)]
                torch.manual_seed(step_seed(self.cfg.seed, round_idx, group[0]))
                started = time.perf_counter()
                results = local_train_stacked(
                    self.model,
                    lambda params: make_optimizer(optimizer_cfg, params),
                    [start_state] * len(group),
                    [state.optimizer_state for state in states],
                    data,
                    batches,
                    self.device,
                )
                seconds = (time.perf_counter() - started) / len(group)
                for cid, state, (loss, values, moments) in zip(group, states, results):
                    state.optimizer_state = moments
                    yield cid, loss, values, seconds

    def _masked_input(self, cid: int, round_idx: int, delta: dict[str, torch.Tensor], weight: float) -> tuple[np.ndarray, int]:
        """A client's update, weighted, encoded into the ring and masked: what it would send."""
        flat = torch.cat([delta[k].reshape(-1) for k in sorted(delta)]).cpu().double().numpy()
        rng = np.random.default_rng([self.cfg.seed, round_idx, cid, _ROUNDING_STREAM])
        encoded, clipped = encode_update(flat, weight, self.secagg.clip_range, self.secagg.bits, rng)
        return masked_input(self.secagg_round[cid], encoded, self.secagg_publics, self.ring_bits), clipped

    def secagg_advertise(self, round_idx: int, client_ids: list[int]) -> dict[int, dict]:
        """Fresh key pairs for this round's clients; their public keys, for the server."""
        self.secagg_round, publics = {}, {}
        for cid in client_ids:
            self.secagg_round[cid], publics[cid] = advertise(cid, round_idx)
        return publics

    def secagg_share_keys(self, roster: dict):
        """Each client's Shamir shares, encrypted to each of its neighbours: (senders, {sender: {recipient: ciphertext}})."""
        self.secagg_publics = roster["publics"]
        out = {
            cid: share_keys(secrets, roster["publics"], roster["graph"][cid], roster["threshold"])
            for cid, secrets in self.secagg_round.items()
            if secrets.round_idx == roster["round"]
        }
        return sorted(out), out

    def secagg_unmask(self, round_idx: int, senders: list[int]):
        """The shares the server asks for, from this worker's clients that sent their input and are
        still there; then the round's secrets are forgotten. (responders, {client: reveals})."""
        sent = set(senders)
        out = {
            cid: unmask(secrets, self.secagg_publics, sent)
            for cid, secrets in self.secagg_round.items()
            if secrets.round_idx == round_idx and cid in sent and dropout_stage(self.cfg.seed, round_idx, cid, self.secagg.dropout_rate) is None
        }
        self.secagg_round, self.secagg_publics = {}, {}
        return sorted(out), out

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
