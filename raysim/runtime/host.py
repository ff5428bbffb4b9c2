"""ClientHost: what a ClientWorker actor (raysim.runtime.worker) runs: many virtual clients around
one resident model.

The base model is built once per actor. Each round the actor receives the global adapter (an
object-store reference, resolved zero-copy) and the ids of its sampled clients; for each client it
copies the adapter into the resident model, restores that client's optimizer moments and data
cursor, trains, and adds the weighted delta into one partial sum. It returns that one partial sum,
not one message per client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from omegaconf import OmegaConf

from raysim.client_batch import local_train_stacked
from raysim.data.loading import GENERATE_ROW, from_arrow
from raysim.methods import build as build_method
from raysim.methods.common import sketch_matrix
from raysim.methods.protocol import Aggregation, ClientUpdate, Message
from raysim.attacks import UPDATE_ATTACKS, malicious_clients
from raysim.attacks.updates import poisoned_update
from raysim.client_rank import ClientRank
from raysim.config import PER_UPDATE_AGGREGATORS, USER_LEVEL_MODES
from raysim.model import MERGED_BASE_FILE, adapted_base_weights, adapter_state, base_model_name, build_model, frozen_lora_a, quiet_load, trainable_parameters
from raysim.privacy.budget import ClientPrivacy
from raysim.privacy.central_dp import clip_update, update_norm
from raysim.runtime.host_secagg import SecAggClients
from raysim.secagg.encoding import ring_mask
from raysim.runtime.messages import LocalDPPlan, MaskedPayload, SecAggEncoding, TrainSettings, WorkerPayload, WorkerReady, WorkerReport
from raysim.training import (
    ClientData,
    ClientState,
    backward_mean_loss,
    evaluate,
    load_adapter,
    local_train,
    method_state_to,
    make_optimizer,
    saved_optimizer_state,
    shuffled_batches,
    step_seed,
    swap_optimizer_state,
)

_DP_NOISE_STREAM = 0x4E
PLAIN_ENCODING = SecAggEncoding()  # secure aggregation without distributed DP


def _as_client_data(table: pa.Table) -> ClientData:
    return ClientData(*from_arrow(table))


def _to_numpy(message: Message) -> Message:
    """A message with its tensors as numpy arrays, to travel to the server (which has no torch)."""

    def arrays(part: dict) -> dict:
        return {k: v.detach().cpu().numpy() if torch.is_tensor(v) else v for k, v in part.items()}

    return dataclasses.replace(message, summable=arrays(message.summable), per_client=arrays(message.per_client))


class ClientHost(SecAggClients):
    # Methods that return several objects (a small result, a payload, ...): the ClientWorker
    # actor declares them with ray.method(num_returns=...), so a payload can go to the server, and
    # clients' method state stay in the object store, without passing through the driver.
    NUM_RETURNS = {"train_clients": 3, "secagg_share_keys": 2, "secagg_unmask": 2}

    def __init__(self, cfg: dict, index: int, num_labels: int, device: str = "cpu", threads: int | None = None):
        """``device``: the one Ray granted this worker (never found by probing CUDA); ``threads``:
        torch's CPU threads (None leaves the process's setting)."""
        self.cfg = OmegaConf.create(cfg)
        self.index = index
        self.device = torch.device(device)
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        self.method = build_method(self.cfg)
        setting = self.cfg.eval.aggregation_error
        self.want_products = setting is True or (setting == "auto" and not self.method.exact)
        self.model: Any = build_model(self.cfg, num_labels, self.device)  # a PEFT model
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
        self.named = dict(self.model.named_parameters())
        self.client_rank = ClientRank(self.model, int(self.cfg.lora.rank), self.params)
        self.train_rows: ClientData | None = None  # every client's rows, client after client
        self.offsets = np.zeros(1, dtype=np.int64)  # client c's rows: offsets[c]:offsets[c + 1]
        self.eval_sets: dict[str, ClientData] = {}
        self.generate_rows = np.zeros(0, dtype=np.int64)  # task=causal_lm: the evaluation rows this worker answers
        self._tokenizer: Any = None
        self.states: dict[int, ClientState] = {}
        a = self.cfg.attack
        # Clients that poison their message (raysim.attacks.updates); data attacks were made on the driver.
        self.attackers = set(malicious_clients(self.cfg.seed, self.cfg.clients.num, a.fraction)) if a.fraction > 0 and a.kind in UPDATE_ATTACKS else set()
        self.init_secagg()

    def load(
        self,
        shards: tuple[pa.Table, np.ndarray],
        eval_tables: dict[str, pa.Table],
        privacy: LocalDPPlan | None = None,
        owned: list[int] | tuple = (),
        *method_states: dict[int, dict],
    ) -> WorkerReady:
        """Take every client's rows (one table and the clients' offsets into it, one object shared
        by the workers of a node, so any worker can train any client) and this worker's evaluation
        slices, again after a restart; under local DP the clients' noise multipliers and the
        accountant histories of the clients it owns, and the method state of the ones it ``owned``
        (the driver keeps both, so a restart never resets a client's epsilon or its method's
        state)."""
        table, self.offsets = shards
        self.train_rows = _as_client_data(table)
        self.eval_sets = {name: _as_client_data(t) for name, t in eval_tables.items()}
        if "generate" in eval_tables:
            self.generate_rows = eval_tables["generate"].column(GENERATE_ROW).to_numpy()
        self.states = {}
        self.noise = privacy.noise if privacy else {}
        self.histories = privacy.histories if privacy else {}
        mine = set(owned)
        for states in method_states:
            for cid, values in states.items():
                if cid in mine:
                    self._state(cid).method_state = method_state_to(values, self.device)
        return self.ready()

    def adopt(self, privacy: LocalDPPlan | None, clients: list[int], *method_states: dict[int, dict]) -> int:
        """Become the owner of ``clients`` of a worker that is gone for good, keeping the clients
        this worker has: their local state starts over, except (from the driver's records) their
        accountants' histories and their method state."""
        if privacy:
            self.histories.update(privacy.histories)
        adopted = set(clients)
        for cid in adopted:
            self.states.pop(cid, None)
        for states in method_states:
            for cid, values in states.items():
                if cid in adopted:
                    self._state(cid).method_state = method_state_to(values, self.device)
        return len(adopted)

    def _shares(self, name: str, extra_shares: tuple[dict[str, pa.Table], ...]) -> list[tuple[ClientData, np.ndarray]]:
        """This worker's slice of an evaluation set and the slices of workers gone for good that it
        took over: (rows, their evaluation row numbers where the set has them)."""
        shares = [(self.eval_sets[name], self.generate_rows)] if name in self.eval_sets else []
        for tables in extra_shares:
            if name in tables:
                rows = tables[name].column(GENERATE_ROW).to_numpy() if GENERATE_ROW in tables[name].column_names else np.zeros(0, np.int64)
                shares.append((_as_client_data(tables[name]), rows))
        return shares

    def _state(self, cid: int) -> ClientState:
        if cid not in self.states:
            state = ClientState.new(self.cfg.seed, cid)
            if self.dp:
                state.accountant = _history_keeper()
                state.accountant.history = [tuple(h) for h in self.histories.get(cid, [])]
            self.states[cid] = state
        return self.states[cid]

    def _train_private(self, cid: int, data: ClientData, state: ClientState, train_cfg, round_idx: int) -> tuple[float, ClientPrivacy]:
        """DP-SGD steps for one client; (loss, its accounting), or (nan, ...) without training
        when this round would take it over its budget."""
        from raysim.privacy.accounting import epsilon, resolve_accountant
        from raysim.privacy.local_dp import poisson_batch, sample_rate

        privacy, target = self.privacy, self.privacy.target_epsilon
        accountant = resolve_accountant(privacy.accountant)
        sigma, rate, steps = self.noise[cid], sample_rate(len(data), train_cfg.batch_size), train_cfg.local_steps

        def spent(history: list, extra_steps: int = 0) -> float:
            return epsilon(history + [(sigma, rate, extra_steps)], privacy.target_delta, accountant)

        before = list(state.accountant.history)
        if target is not None and spent(before, steps) > target:
            return float("nan"), ClientPrivacy(history=before, epsilon=spent(before), exhausted=True, trained=False)
        dp = self.dp
        assert dp is not None, "DP-SGD steps on a worker without local DP"
        generator = torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.seed, round_idx, cid) ^ _DP_NOISE_STREAM)
        dp.set_client(sigma, rate * len(data), generator)
        batches = (poisson_batch(state.rng, len(data), rate) for _ in range(steps))
        loss = local_train(self.model, dp.optimizer, data, batches, self.device, dp.loss, self.client_rank.project)
        for _ in range(steps):
            state.accountant.step(noise_multiplier=sigma, sample_rate=rate)
        after = list(state.accountant.history)
        exhausted = target is not None and spent(after, steps) > target  # would the next round fit?
        return loss, ClientPrivacy(history=after, epsilon=spent(after), exhausted=exhausted, trained=True)

    def hand_over(self, client_ids: list[int], groups: list[list[int]]) -> tuple:
        """The local state of clients moving to other workers, as plain values: (the ids, then one
        {client: state} per group of ``client_ids``, one group per destination); this worker then
        forgets them. A client with no state here yet gets it made first, so its accountant
        history moves too."""
        out = {}
        for cid in client_ids:
            out[cid] = self._state(cid).to_dict()
            del self.states[cid]
        return (list(client_ids), *({cid: out[cid] for cid in group} for group in groups))

    def export_states(self) -> dict[int, dict]:
        """Every local client state this worker holds, as plain values (for a checkpoint)."""
        return {cid: state.to_dict() for cid, state in self.states.items()}

    def import_states(self, states: dict[int, dict]) -> int:
        """Take clients' local states, as :meth:`export_states` and :meth:`hand_over` give them:
        from a checkpoint (after :meth:`load`), or from another worker."""
        make_accountant = _history_keeper if self.dp else None
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

    def ready(self) -> WorkerReady:
        return WorkerReady(index=self.index, pid=os.getpid(), device=str(self.device), clients=len(self.offsets) - 1)

    def _data(self, cid: int) -> ClientData:
        """Client ``cid``'s rows: views, made when needed (thousands of clients cost no objects)."""
        rows, start, end = self.train_rows, self.offsets[cid], self.offsets[cid + 1]
        assert rows is not None, "train_clients before load"
        return ClientData(rows.ids[start:end], rows.lengths[start:end], rows.labels[start:end], rows.causal)

    def public_init(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The method's initialisation from the public split (``Method.public_init``)."""
        data = _as_client_data(table)
        with self.dp.paused() if self.dp else contextlib.nullcontext():
            return self.method.public_init(self.model, lambda: backward_mean_loss(self.model, data, int(self.cfg.eval.batch_size), self.device))

    def install(self, tensors: dict[str, np.ndarray]) -> int:
        """Set the resident model's tensors by name (the server's frozen ones, or a method's
        initialisation), in place; returns how many."""
        with torch.no_grad():
            for name, value in tensors.items():
                self.named[name].copy_(torch.from_numpy(np.array(value)))  # object-store arrays are read-only
        self.frozen_a = {k: torch.from_numpy(v).to(self.device) for k, v in frozen_lora_a(self.model).items()}
        return len(tensors)

    def initial_adapter(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(trained-and-sent tensors, the LoRA tensors kept frozen) of the resident model; with a
        method that changes the base, the adapted layers' base weights are among the frozen."""
        frozen = frozen_lora_a(self.model)
        if self.method.changes_base:
            frozen.update(adapted_base_weights(self.model))
        return adapter_state(self.model), frozen

    def _take(self, global_state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The broadcast's trained tensors on the device. Its other tensors (the base weights of a
        method that changes them) are installed in place now, once per call: every call gets the
        current ones, so a restarted worker or a moved client never trains on an old base."""
        base = {k: v for k, v in global_state.items() if k not in self.params}
        if base:
            self.install(base)
        # One copy per round per worker: object-store arrays are read-only.
        return {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in global_state.items() if k in self.params}

    def train_clients(
        self,
        global_state: dict,
        client_ids: list[int],
        round_idx: int,
        train: TrainSettings,
        inbox: dict | None = None,
        encoding: SecAggEncoding = PLAIN_ENCODING,
        *arrivals: dict[int, dict],
    ) -> tuple[WorkerReport, WorkerPayload | MaskedPayload, dict[int, dict]]:
        """Train each client from the global adapter, turn its trained tensors into its method's
        message, and return (small report, partial sums, the trained clients' method state where
        the method keeps one; the driver holds on to its reference). ``arrivals``: the states of
        clients handed over by other workers this round (top-level arguments, so Ray resolves them
        here).

        With secure aggregation, ``inbox`` holds the encrypted shares each client received, and the
        partial sum is the sum of the clients' masked inputs mod 2^k, encoded as ``encoding``
        says; clients that drop before sending are not trained."""
        start = time.perf_counter()
        for states in arrivals:
            self.import_states(states)
        train_cfg = OmegaConf.create(dataclasses.asdict(train))
        optimizer = self.dp.optimizer if self.dp else self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = train_cfg.lr
        # Central and distributed DP bound each client's contribution, so each counts once (DP-FedAvg).
        central = self.privacy.mode in USER_LEVEL_MODES
        per_client = self.method.aggregation is Aggregation.PER_CLIENT
        weighting = self.method.client_weighting(train_cfg.weighting)
        # server.aggregator: a per-update rule needs each client's update. norm_bound (Sun et al.
        # 2019, Section 4) is applied here, before the sum: without SecAgg by the server, which sees
        # each update (this worker sums on its behalf), so no client escapes it; under SecAgg by
        # each client to its own update before masking, which a malicious client may skip.
        per_update = self.cfg.server.aggregator in PER_UPDATE_AGGREGATORS
        norm_bound = self.cfg.server.norm_bound if self.cfg.server.aggregator == "norm_bound" else None
        start_state = self._take(global_state)
        delta_sum: dict[str, torch.Tensor] = {}
        secure = inbox is not None
        norms: list[float] = []
        sketches = self._sketches(round_idx) if self.want_products and not central and not secure and not per_update else None
        product_sum: dict[str, torch.Tensor] = {}
        messages: list[tuple[int, float, Message]] = []
        weight_total, loss_sum, steps_s, sent_bytes = 0.0, 0.0, 0.0, 0
        trained: list[int] = []
        privacy: dict[int, ClientPrivacy] = {}
        masked: Any = np.uint64(0)
        clipped = 0
        eligible = client_ids if inbox is None else self._secagg_senders(client_ids, round_idx, inbox)
        for cid, loss, values, seconds in self._local_updates(eligible, start_state, train_cfg, round_idx, privacy):
            data = self._data(cid)
            steps_s += seconds
            trained.append(cid)
            loss_sum += loss
            weight = float(len(data)) if weighting == "examples" and not central else 1.0
            weight_total += weight
            with torch.no_grad():
                update = ClientUpdate(cid, round_idx, len(data), self.method.client_start(cid, round_idx, start_state), values)
                message = self.method.client_message(update, self._state(cid).method_state)
                if self.dp and not any(bool((values[k] != update.start[k]).any()) for k in update.start):
                    raise RuntimeError(
                        f"client {cid}: DP-SGD left every trained tensor unchanged, so Opacus computed no "
                        "per-sample gradients (is the model in train mode?)"
                    )
                summable = message.summable
                norms.append(update_norm(summable))
                if cid in self.attackers:  # it sends what it likes
                    a = self.cfg.attack
                    summable = poisoned_update(a.kind, summable, a.scale, a.noise_std, self.cfg.seed, round_idx, cid)
                if norm_bound is not None and not (secure and cid in self.attackers):
                    summable, _ = clip_update(summable, norm_bound)
                if central:
                    summable, _ = clip_update(summable, self.privacy.clip_norm)
                sent_bytes += message.size()
                if secure:
                    # Equal weights (a method's own rule over train.weighting's examples) go in at the
                    # encoding's full scale: the same mean, without weight / weight_scale's coarser steps.
                    encoded_weight = encoding.weight_scale if weighting == "uniform" else weight
                    y, n_clipped = self._masked_input(cid, round_idx, summable, encoded_weight, encoding)
                    with np.errstate(over="ignore"):
                        masked = (masked + y) & ring_mask(self.ring_bits)
                    clipped += n_clipped
                    continue
                if per_client or per_update:
                    messages.append((cid, weight, _to_numpy(dataclasses.replace(message, summable=summable))))
                else:
                    for k, v in summable.items():
                        if k in delta_sum:
                            delta_sum[k].add_(v, alpha=weight)
                        else:
                            delta_sum[k] = torch.zeros_like(v).add_(v, alpha=weight)
                if sketches is not None:
                    for prefix, (left, right) in self.method.factors(values, self.frozen_a).items():
                        sketch = sketches.get(prefix)
                        product = left @ right if sketch is None else left @ (right @ sketch)
                        if prefix in product_sum:
                            product_sum[prefix].add_(product, alpha=weight)
                        else:
                            product_sum[prefix] = product * weight
        kept = {cid: plain for cid in trained if (plain := self.states[cid].plain_method_state())}
        report = WorkerReport(
            worker=self.index,
            clients=trained,
            weight=weight_total,
            loss_sum=loss_sum,
            train_s=time.perf_counter() - start,
            steps_s=steps_s,
            uplink_bytes=sent_bytes,
            privacy=privacy,
            secagg_clipped=clipped,
            update_norms=norms,
            method_state_clients=sorted(kept),
        )
        if secure:
            return report, MaskedPayload(senders=trained, masked=masked if trained else None), kept
        payload = WorkerPayload(
            delta_sum={k: v.cpu().numpy() for k, v in delta_sum.items()},
            product_sum={k: v.cpu().numpy() for k, v in product_sum.items()},
            messages=messages,
        )
        return report, payload, kept

    def _sketches(self, round_idx: int) -> dict[str, torch.Tensor | None]:
        """The round's sketch matrix per LoRA module (None: exact products), the server's too."""
        columns = int(self.cfg.eval.aggregation_sketch)
        out = {}
        for prefix, (_, right) in self.method.factors(self.params, self.frozen_a).items():
            sketch = sketch_matrix(prefix, right.shape[1], columns, self.cfg.seed, round_idx)
            out[prefix] = None if sketch is None else torch.from_numpy(sketch).to(self.device)
        return out

    def _local_updates(self, client_ids: list[int], start_state: dict, train_cfg, round_idx: int, privacy: dict):
        """(client, mean loss, trained tensors, seconds of local steps) for each client that
        trained, from the global adapter: one client at a time, or ``train.clients_per_batch`` of
        them in one forward pass. The tensors are only valid until the next item is asked for."""
        per_batch = int(self.cfg.train.clients_per_batch)
        if per_batch > 1:
            yield from self._stacked_updates(client_ids, per_batch, start_state, train_cfg, round_idx)
            return
        ranks = self.client_rank
        for cid in client_ids:
            data, state = self._data(cid), self._state(cid)
            load_adapter(self.params, self.method.client_start(cid, round_idx, start_state))
            with ranks.applied(self.method.adapter(cid), self.frozen_a):
                swap_optimizer_state(self.optimizer, self.param_list, ranks.moments_in(state.optimizer_state))
                torch.manual_seed(step_seed(self.cfg.seed, round_idx, cid))
                started = time.perf_counter()
                if self.dp:
                    loss, privacy[cid] = self._train_private(cid, data, state, train_cfg, round_idx)
                    if not privacy[cid].trained:
                        continue
                else:
                    batches = shuffled_batches(state, data.lengths, train_cfg.batch_size, train_cfg.local_steps)
                    loss = local_train(self.model, self.optimizer, data, batches, self.device, after_step=ranks.project)
                seconds = time.perf_counter() - started
                state.optimizer_state = ranks.moments_out(saved_optimizer_state(self.optimizer, self.param_list))
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
                    [dict(self.method.client_start(cid, round_idx, start_state)) for cid in group],
                    [state.optimizer_state for state in states],
                    data,
                    batches,
                    self.device,
                )
                seconds = (time.perf_counter() - started) / len(group)
                for cid, state, (loss, values, moments) in zip(group, states, results):
                    state.optimizer_state = moments
                    yield cid, loss, values, seconds

    def evaluate(self, global_state: dict, split: str, *extra_shares: dict[str, pa.Table]) -> tuple[float, int, int]:
        """(loss sum, correct, count) over this worker's slice of ``split`` and the ``extra_shares``
        it took over from workers gone for good."""
        load_adapter(self.params, self._take(global_state))
        totals = [0.0, 0, 0]
        for data, _ in self._shares(split, extra_shares):
            if len(data):
                for i, value in enumerate(evaluate(self.model, data, int(self.cfg.eval.batch_size), self.device)):
                    totals[i] += value
        return totals[0], int(totals[1]), int(totals[2])

    def generate(self, global_state: dict, *extra_shares: dict[str, pa.Table]) -> list[tuple[int, str]]:
        """task=causal_lm: (evaluation row, the global adapter's greedy answer) for this worker's
        share of the rows scored by generation (and the ``extra_shares`` it took over)."""
        from raysim.data.instructions import load_prompt_tokenizer
        from raysim.generation import greedy_answers

        load_adapter(self.params, self._take(global_state))
        if self._tokenizer is None:
            self._tokenizer = load_prompt_tokenizer(self.cfg.model.name_or_path)
        tok = self._tokenizer
        e = self.cfg.eval
        out: list[tuple[int, str]] = []
        for data, rows in self._shares("generate", extra_shares):
            if len(data):
                answers = greedy_answers(self.model, data, np.arange(len(data)), int(e.batch_size), int(e.max_new_tokens), tok.pad_token_id, tok.eos_token_id, self.device)
                out.extend((int(rows[i]), tok.hf.decode(ids, skip_special_tokens=True)) for i, ids in sorted(answers.items()))
        return out

    def adapter_files(self, global_state: dict) -> dict[str, bytes]:
        """The global adapter saved by PEFT, as file contents (the driver may be on another node).
        Where the method changed the base weights, the adapted layers' merged weights are saved
        too, as ``merged_base.safetensors`` under the base model's parameter names."""
        load_adapter(self.params, self._take(global_state))
        base = {base_model_name(k): self.named[k].detach().cpu().contiguous() for k in global_state if k not in self.params}
        with tempfile.TemporaryDirectory() as tmp, self.method.plain_lora(self.model):
            self.model.save_pretrained(tmp)
            if base:
                from safetensors.torch import save_file

                save_file(base, str(Path(tmp) / MERGED_BASE_FILE))
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _history_keeper():
    """A client's DP-SGD history, in Opacus' (noise, rate, steps) form: Opacus' RDP accountant is
    kept for its ``step`` and ``history`` only; epsilon is raysim.privacy.accounting's, with the
    run's accountant."""
    from opacus.accountants import RDPAccountant

    return RDPAccountant()
