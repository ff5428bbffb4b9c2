import contextlib
import os
import signal

import numpy as np
import pytest
import torch

from raysim.config import CONFIG_DIR, load_config
from raysim.data.loading import from_arrow
from raysim.data.prepare import prepare
from raysim.methods.common import lora_products, relative_aggregation_error
from raysim.data.tokenizer import load_tokenizer
from raysim.model import adapter_state, build_model, frozen_lora_a, trainable_parameters
from raysim.training import ClientData, ClientState, load_adapter, local_train, make_optimizer, shuffled_batches, step_seed

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def random_rows(n=40, seed=0, width=16) -> ClientData:
    """A client's rows of random tokens, 3 to width - 1 long, with random labels of 3 classes."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, width, n).astype(np.int32)
    ids = np.zeros((n, width), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(1000, 2000, length)
    return ClientData(ids, lengths, rng.integers(0, 3, n))


def tiny_config(tmp_path, *overrides):
    """configs/tiny.yaml with its output under tmp_path."""
    return load_config(CONFIG_DIR / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for every runtime test (starting Ray costs seconds)."""
    import ray

    # Methods written in tests/ (toy_*.py) are imported by the workers too: they inherit this.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def worker_threads(cfg):
    """A worker's torch threads in this process, so its kernels sum in the same order as the workers'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.worker.num_cpus))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def expected_round(cfg, sampled):
    """One round computed in this process: each sampled client trains from the initial adapter; the
    global adapter moves by server.lr times the weighted mean delta (round 1: momentum has no past)."""
    with worker_threads(cfg):
        return _expected_round(cfg, sampled)


def client_results(cfg, sampled, start=None):
    """Round 1 computed in this process, client by client: (start adapter, each client's trained
    adapter, each client's weight (its examples), the model), as numpy arrays. ``start``: the
    adapter clients start from where it is not the model's initial one (a sparse download)."""
    with worker_threads(cfg):
        return _client_results(cfg, sampled, start)


def _client_results(cfg, sampled, start=None):
    data = prepare(cfg, load_tokenizer(cfg.model.name_or_path))
    model = build_model(cfg, len(data.label_names))
    params = trainable_parameters(model)
    if start is None:
        start = {k: v.detach().clone() for k, v in params.items()}
    else:
        start = {k: torch.from_numpy(np.array(v)) for k, v in start.items()}
    finals, weights = [], []
    for cid in sampled:
        load_adapter(params, start)
        shard = ClientData(*from_arrow(data.client_shards[cid]))
        optimizer = make_optimizer(cfg.train, list(params.values()))
        torch.manual_seed(step_seed(cfg.seed, 1, cid))
        batches = shuffled_batches(ClientState.new(cfg.seed, cid), shard.lengths, cfg.train.batch_size, cfg.train.local_steps)
        local_train(model, optimizer, shard, batches, torch.device("cpu"))
        finals.append(adapter_state(model))
        weights.append(float(len(shard)))
    return {k: v.numpy() for k, v in start.items()}, finals, weights, model


def _expected_round(cfg, sampled):
    start, finals, weights, model = _client_results(cfg, sampled)
    total = sum(weights)
    averaged = {k: sum(w * f[k] for f, w in zip(finals, weights)) / total for k in start}
    expected = {k: start[k] + cfg.server.lr * (averaged[k] - start[k]) for k in start}
    frozen = frozen_lora_a(model)
    mean_products = {m: sum(w * p for w, p in zip(weights, ps)) / total for m, ps in by_module([lora_products(f, frozen) for f in finals]).items()}
    return expected, relative_aggregation_error(mean_products, lora_products(averaged, frozen))


def by_module(products):
    return {m: [p[m] for p in products] for m in products[0]}


class DiesInStage:
    """A worker's actor handle whose first call of ``method`` is sent and then the worker's process
    SIGKILLed: the worker dies in that stage of the round (its call queued or running), whatever
    the machine's speed."""

    def __init__(self, handle, method: str):
        import ray

        self._handle, self._method, self.fired = handle, method, False
        self.pid = ray.get(handle.ready.remote()).pid

    def __getattr__(self, name):
        call = getattr(self._handle, name)
        return call if name != self._method or self.fired else _SendThenKill(self, call)


class _SendThenKill:
    def __init__(self, proxy: DiesInStage, call):
        self._proxy, self._call = proxy, call

    def options(self, **options):
        return _SendThenKill(self._proxy, self._call.options(**options))

    def remote(self, *args, **kwargs):
        refs = self._call.remote(*args, **kwargs)
        os.kill(self._proxy.pid, signal.SIGKILL)
        self._proxy.fired = True
        return refs


def round_killing_a_worker(sim, worker: int, stage: str = "train_clients") -> dict:
    """Run one round with worker ``worker``'s process SIGKILLed as soon as the round's first
    ``stage`` call is sent to it; the row. (A kill after a fixed delay landed after the round on
    a fast machine.)"""
    real = sim.workers[worker]
    dying = sim.workers[worker] = DiesInStage(real, stage)
    try:
        result = dict(sim.run_round())
    finally:
        sim.workers[worker] = real
    assert dying.fired, f"the round made no {stage} call on worker {worker}"
    result["killed_pid"] = dying.pid
    return result


def secagg_mean_error_bound(count, weight_sum, mean, clip, bits):
    """Worst-case error of sum(w_i x_i) / sum(w_i) when both sums are decoded from the fixed-point
    encoding: each encoded value is off by less than one step 2c / (2^bits - 1)."""
    step = 2 / (2**bits - 1)
    err_sum, err_weight = count * clip * step, count * step
    return (err_sum + np.abs(mean) * err_weight) / (weight_sum - err_weight)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_llama(directory, chat_template: str | None = None, max_positions: int = 128):
    """A tiny random Llama's config with MiniLM's tokenizer (a chat template added when given):
    a causal LM model directory without any downloaded weights. Its sizes are configs/tiny.yaml's
    config_overrides, so those change nothing."""
    import json
    import shutil
    from pathlib import Path

    from transformers import LlamaConfig

    from raysim.config import minilm_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(minilm_path()) / name).exists():
            shutil.copy(Path(minilm_path()) / name, directory / name)
    if chat_template:
        config_file = directory / "tokenizer_config.json"
        values = json.loads(config_file.read_text())
        values["chat_template"] = chat_template
        config_file.write_text(json.dumps(values))
    LlamaConfig(
        vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
    ).save_pretrained(directory)
    return directory


def write_yes_no_rows(path, n=240, seed=0):
    """(context, question, label, topic) rows: "is a larger than b", a True/False label, a topic
    per row (a natural split), and contexts of varied length."""
    import json

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = (int(v) for v in rng.integers(0, 50, 2))
            row = {"question": f"is {a} larger than {b}", "context": "numbers " * int(rng.integers(1, 30)), "label": a > b, "topic": f"t{i % 7 if i % 3 else 0}"}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """Overrides of configs/tiny.yaml for task=causal_lm on a tiny random Llama (ChatML template)
    and yes/no rows split by topic."""
    root = tmp_path_factory.mktemp("tiny_lm")
    model = write_tiny_llama(root / "model", CHATML)
    data = write_yes_no_rows(root / "rows.jsonl")
    return [
        "task=causal_lm",
        f"model.name_or_path={model}",
        f"data.path={data}",
        'data.prompt_template="{context} question: {question}?"',
        'data.response_template="{label}"',
        'data.response_map={"True": "yes", "False": "no"}',
        "data.labels=[]",
        "data.partition=natural",
        "data.client_column=topic",
        "data.max_length=64",
        "clients.num=6",
        "clients.per_round=3",
        "lora.target_modules=[q_proj,v_proj]",
        "eval.score=yes_no",
        "eval.generate_examples=12",
        "eval.max_new_tokens=3",
        "eval.max_examples=24",
        "train.batch_size=4",
        "train.local_steps=2",
    ]
