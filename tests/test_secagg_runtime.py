"""Secure aggregation through the Ray runtime on configs/tiny.yaml: the server's view, the result
against the plaintext round, dropouts, aborts and worker failure."""

import dataclasses
import re
import sys

import numpy as np
import pytest
import ray
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from raysim import Simulation
from raysim.methods.ffa_lora import FFALoRA
from raysim.methods.protocol import NoOptions
from raysim.runtime.server import Server
from raysim.secagg import shamir
from raysim.secagg.encoding import ring_bits, ring_mask
from raysim.secagg.protocol import dropout_stage, expand_mask, pairwise_mask

from conftest import expected_round, round_killing_a_worker, secagg_mean_error_bound, tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


class RecordingServer(Server):
    """The real server, keeping every argument any of its methods receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received = []

    def transcript(self) -> list:
        return self.received


def _recording(name):
    def method(self, *args, **kwargs):
        self.received.append((name, args, kwargs))
        return getattr(Server, name)(self, *args, **kwargs)

    return method


for _name, _fn in list(vars(Server).items()):
    if callable(_fn) and not _name.startswith("_"):
        setattr(RecordingServer, _name, _recording(_name))
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RecordingSimulation(Simulation):
    server_class = RecordingServer


def _one_round(cfg, simulation=Simulation):
    with simulation(cfg) as sim:
        start = sim.global_adapter()
        sampled = ray.get(sim.server.sample.remote(1, cfg.clients.per_round))
        row = sim.run_round()
        transcript = ray.get(sim.server.transcript.remote()) if simulation is RecordingSimulation else None
        return start, sampled, row, sim.global_adapter(), transcript, sim.client_sizes


PRIVACY = {
    "central_dp": ["privacy.mode=central_dp", "privacy.noise_multiplier=0.3", "privacy.clip_norm=0.05"],
    "local_dp_sgd": ["privacy.mode=local_dp_sgd", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0"],
}
CLIP, BITS = 0.5, 16


def _within_bound(start, plain, secure, bound_for):
    for name in plain:
        mean = plain[name].astype(np.float64) - start[name]  # server.lr is 1
        assert np.all(np.abs(secure[name].astype(np.float64) - plain[name]) <= bound_for(mean) + 1e-6), name
        assert np.any(np.abs(secure[name] - start[name]) > 1e-4), name  # the round did move the adapter


def test_secure_training_equals_plaintext_training_within_the_encoding_bound(tmp_path):
    """Same seed, same clients: round 1's adapters differ by at most the encoding's error, and the
    run's evaluation follows the plaintext run's."""
    extra = [f"secagg.clip_range={CLIP}", f"secagg.bits={BITS}"]
    runs = {}
    for secure in (False, True):
        cfg = tiny_config(tmp_path / str(secure), f"secagg.enabled={secure}", *extra)
        with Simulation(cfg) as sim:
            start = sim.global_adapter()
            sampled = ray.get(sim.server.sample.remote(1, cfg.clients.per_round))
            rows = [sim.run_round()]
            first = sim.global_adapter()
            rows += [sim.run_round() for _ in range(cfg.rounds - 1)]
            runs[secure] = (first, rows)
            sizes = sim.client_sizes
    assert all(not r["secagg_aborted"] and r["secagg_clipped"] == 0 for r in runs[True][1])
    weights = [sizes[c] / max(sizes) for c in sampled]
    _within_bound(start, runs[False][0], runs[True][0], lambda mean: secagg_mean_error_bound(len(sampled), sum(weights), mean, CLIP, BITS))
    for plain, secure in zip(runs[False][1], runs[True][1]):
        assert secure["clients"] == plain["clients"]
        assert secure["eval_accuracy"] == pytest.approx(plain["eval_accuracy"], abs=0.01)
        assert secure["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-3)


@pytest.mark.parametrize("privacy", list(PRIVACY))
def test_a_secure_round_under_dp_equals_the_plaintext_round(tmp_path, privacy):
    """Central DP: clients clip, the server adds the same noise after unmasking. Local DP: nothing
    else changes."""
    extra = [f"secagg.clip_range={CLIP}", f"secagg.bits={BITS}", "clients.per_round=5", *PRIVACY[privacy]]
    start, sampled, plain_row, plain, _, sizes = _one_round(tiny_config(tmp_path / "plain", *extra))
    _, sampled_again, row, secure, _, _ = _one_round(tiny_config(tmp_path / "secure", "secagg.enabled=true", *extra))
    assert sampled == sampled_again and row["clients"] == plain_row["clients"] == len(sampled) >= 3
    assert not row["secagg_aborted"] and row["secagg_clipped"] == 0
    if privacy == "central_dp":  # weights 1; the sum is divided by the expected number of clients
        bound = len(sampled) * CLIP * 2 / (2**BITS - 1) / (0.5 * 10)
        _within_bound(start, plain, secure, lambda mean: bound)
    else:
        weights = [sizes[c] / max(sizes) for c in sampled]
        _within_bound(start, plain, secure, lambda mean: secagg_mean_error_bound(len(sampled), sum(weights), mean, CLIP, BITS))


def _seed_with_both_kinds_of_dropout(num, per_round, rate):
    """A seed whose round 1 has exactly one client vanishing before its masked input and one after."""
    for seed in range(1000):
        sampled = Server(FFALoRA(NoOptions(), lora_rank=8), seed, num).sample(1, per_round)
        stages = [dropout_stage(seed, 1, c, rate) for c in sampled]
        if stages.count("before_input") == 1 and stages.count("after_input") == 1:
            return seed, sampled, stages
    raise AssertionError("no such seed")


def _arrays(value):
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _arrays(v)
    elif dataclasses.is_dataclass(value):
        yield from _arrays(vars(value))


def _uniform_p(words, k):
    return stats.kstest(words.astype(np.float64) / 2.0**k, "uniform").pvalue


def test_the_server_receives_only_masked_sums_and_learns_only_the_survivors_total(tmp_path):
    rate = 0.4
    seed, sampled, stages = _seed_with_both_kinds_of_dropout(10, 6, rate)
    cfg = tiny_config(tmp_path, f"seed={seed}", "clients.per_round=6", "secagg.enabled=true", f"secagg.dropout_rate={rate}", "secagg.clip_range=0.5", "secagg.bits=16")
    start, got_sampled, row, secure, transcript, sizes = _one_round(cfg, RecordingSimulation)
    assert got_sampled == sampled and not row["secagg_aborted"]
    senders = sorted(c for c, stage in zip(sampled, stages) if stage != "before_input")
    assert row["clients"] == len(senders) and row["dropped"] == 1

    # The result is the survivors' FedAvg, computed here without Ray or secure aggregation.
    expected, _ = expected_round(cfg, senders)
    weights = [sizes[c] / max(sizes) for c in senders]
    for name in expected:
        mean = expected[name].astype(np.float64) - start[name]
        bound = secagg_mean_error_bound(len(senders), sum(weights), mean, 0.5, 16)
        assert np.all(np.abs(secure[name].astype(np.float64) - expected[name]) <= bound + 1e-5), name

    calls = {}
    for name, args, _ in transcript:
        calls.setdefault(name, []).append(args)
        if name != "initialize":  # the initial adapter is public: every client builds it from the seed
            assert all(a.dtype.kind in "ui" for a in _arrays(args)), f"{name} received a float array"
    k = ring_bits(16, 10)
    ((_, *advertised),) = calls["secagg_roster"]
    ((_, *payloads),) = calls["secagg_collect"]
    ((_, _, *reveal_batches),) = calls["secagg_aggregate"]
    publics = {c: p for batch in advertised for c, p in batch.items()}
    reveals = {c: r for batch in reveal_batches for c, r in batch.items()}
    assert len(payloads) == cfg.worker.count  # one masked sum per worker, never one per client

    # What the server may reconstruct: each sender's self-mask seed and each dropped client's
    # masking key. For no client does it get both.
    threshold = 5 // 2 + 1  # a majority of each client's 5 neighbours
    self_seeds, mask_keys = {}, {}
    for u in sampled:
        kinds = [r[u][0] for r in reveals.values() if u in r]
        assert not (kinds.count("self") >= threshold and kinds.count("key") >= threshold), u
        for kind, store in (("self", self_seeds), ("key", mask_keys)):
            shares = {v + 1: r[u][1] for v, r in reveals.items() if u in r and r[u][0] == kind}
            if len(shares) >= threshold:
                store[u] = shamir.reconstruct(shares, threshold)
    assert set(self_seeds) == set(senders) and len(mask_keys) == 1

    # Strip from each worker's masked sum every mask the server can compute: what is left is
    # still uniform, while the same stripping of the total leaves the (far from uniform) sum.
    with np.errstate(over="ignore"):
        stripped = []
        for payload in payloads:
            y = payload.masked.astype(np.uint64)
            for u in payload.senders:
                y = y - expand_mask(self_seeds[u], len(y))
                for dropped, key in mask_keys.items():
                    mask = pairwise_mask(X25519PrivateKey.from_private_bytes(key), publics[u]["mask_public"], 1, len(y))
                    y = y + mask if dropped < u else y - mask
            stripped.append(y & ring_mask(k))
            assert _uniform_p(payload.masked, k) > 1e-4
            assert _uniform_p(stripped[-1], k) > 1e-4
        total = sum(stripped) & ring_mask(k)
    assert _uniform_p(total, k) < 1e-12
    assert np.all(total < len(senders) * 2**16)  # the plain sum of the encodings: no mask left

    # Constant-size messages: one ring vector per sum, one 160-byte ciphertext per share pair.
    ((_, _, *bundles),) = calls["secagg_route"]
    assert {len(p.masked) for p in payloads} == {sum(v.size for v in start.values()) + 1}
    assert {len(ct) for bundle in bundles for cts in bundle.values() for ct in cts.values()} == {160}
    assert {len(share) for r in reveals.values() for _, share in r.values()} == {9}


def test_too_many_dropouts_abort_the_round_and_leave_the_adapter_unchanged(tmp_path, caplog):
    cfg = tiny_config(tmp_path, "clients.per_round=6", "secagg.enabled=true", "secagg.dropout_rate=0.95")
    start, _, row, after, _, _ = _one_round(cfg)
    assert row["secagg_aborted"] and row["clients"] == 0 and row["dropped"] == 6
    for name in start:
        np.testing.assert_array_equal(after[name], start[name])
    aborted = [r.getMessage() for r in caplog.records if "secure aggregation aborted" in r.getMessage()]
    assert len(aborted) == 1 and re.fullmatch(r"round 1: secure aggregation aborted \([^()\n]*\d[^()\n]*\); the global adapter is unchanged", aborted[0]), aborted


def test_dropouts_that_split_a_sparse_graph_abort_the_round(tmp_path, caplog):
    """Seed 4270 (found by a search over seeds) drops 4 of the 10 clients before sending, two
    pairs of ring neighbours, and no one after: the 6 senders form two groups of 3 with no mask
    between them. With t = 2 every secret has its shares, so the round used to go through, and the
    server could have read each group's sum; now the clients refuse to unmask."""
    sparse = ["secagg.enabled=true", "secagg.neighbors=4", "secagg.threshold=2", "secagg.dropout_rate=0.4"]
    cfg = tiny_config(tmp_path, "seed=4270", "clients.per_round=10", *sparse, "train.local_steps=1", "eval.max_examples=20")
    start, _, row, after, _, _ = _one_round(cfg)
    assert row["secagg_aborted"] and row["clients"] == 0
    for name in start:
        np.testing.assert_array_equal(after[name], start[name])
    aborted = [r.getMessage() for r in caplog.records if "secure aggregation aborted" in r.getMessage()]
    split = r"refuses to unmask: after 4 of the 10 clients dropped, the senders' graph splits into 2 components of 3 and 3 clients"
    assert len(aborted) == 1 and re.search(split, aborted[0]), aborted


def test_a_worker_killed_mid_round_drops_its_clients_and_the_others_sum_is_recovered(tmp_path):
    """Its clients drop after sharing their keys; threshold 2 lets the other worker's clients
    remove their masks. (With the default majority, 5 of 9, half the clients would be too few.)"""
    cfg = tiny_config(tmp_path, "clients.per_round=10", "train.local_steps=2", "secagg.enabled=true", "secagg.threshold=2", "secagg.clip_range=0.5")
    with Simulation(cfg) as sim:
        start = sim.global_adapter()
        survivors = sim.worker_clients[1]
        result = round_killing_a_worker(sim, 0)
        after = sim.global_adapter()
    assert not result["secagg_aborted"] and result["clients"] == len(survivors)
    expected, _ = expected_round(cfg, survivors)
    for name in expected:
        np.testing.assert_allclose(after[name], expected[name], atol=1e-4)
        assert np.any(np.abs(after[name] - start[name]) > 1e-4)


class AlteringServer(Server):
    """Changes one share of the lowest sender's self-mask seed (one of the t it rebuilds from)."""

    def secagg_aggregate(self, round_idx, skellam, *reveals):
        merged = {c: dict(r) for batch in reveals for c, r in batch.items()}
        target = min(self._secagg_round["senders"])
        holder = min(c for c, r in merged.items() if target in r)
        kind, share = merged[holder][target]
        changed = share.copy()
        changed[4] = (changed[4] + 1) % shamir.PRIME
        merged[holder][target] = (kind, changed)
        return super().secagg_aggregate(round_idx, skellam, merged)


class ShortListServer(Server):
    """Names a single sender when asking the clients to unmask."""

    def secagg_collect(self, round_idx, *payloads):
        return super().secagg_collect(round_idx, *payloads)[:1]


@pytest.mark.parametrize(
    "server_class, reason",
    [
        (AlteringServer, r"client \d+: the self-mask seed rebuilt from its shares does not match its commitment \(a share was altered\)"),
        (ShortListServer, r"client \d+ refuses to unmask: the server names 1 sender\(s\), fewer than the threshold \d+"),
    ],
    ids=["altered-share", "too-few-senders"],
)
def test_a_server_that_cheats_a_little_gets_an_aborted_round(tmp_path, caplog, server_class, reason):
    simulation = type("CheatedSimulation", (Simulation,), {"server_class": server_class})
    cfg = tiny_config(tmp_path, "clients.per_round=6", "secagg.enabled=true", "train.local_steps=2", "eval.max_examples=20")
    start, _, row, after, _, _ = _one_round(cfg, simulation)
    assert row["secagg_aborted"] and row["clients"] == 0
    for name in start:
        np.testing.assert_array_equal(after[name], start[name])
    aborted = [r.getMessage() for r in caplog.records if "secure aggregation aborted" in r.getMessage()]
    assert len(aborted) == 1 and re.search(reason, aborted[0]), aborted
