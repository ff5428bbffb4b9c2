"""Secure aggregation math without Ray: encoding error bounds, Shamir sharing, and the SecAgg+
round against the plaintext sum, with and without dropouts."""

import numpy as np
import pytest

from raysim.secagg import shamir
from raysim.secagg.encoding import decode_sum, encode, ring_bits, ring_mask, sum_error_bound
from raysim.secagg.protocol import (
    SecAggAborted,
    advertise,
    expand_mask,
    masked_input,
    neighbours,
    share_keys,
    unmask,
    unmasked_sum,
)


def test_ring_is_wide_enough_for_the_sum_or_refused():
    assert ring_bits(16, 100) == 16 + 7
    assert ring_bits(20, 2**20) == 40
    with pytest.raises(ValueError, match="64"):
        ring_bits(60, 1000)


def test_decoded_sum_is_within_the_encoding_bound():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.02, size=(50, 1000))
    clip, bits = 0.05, 16
    total = sum(encode(v, clip, bits, rng) for v in values)
    decoded = decode_sum(total, len(values), clip, bits)
    plain = np.clip(values, -clip, clip).sum(axis=0)
    assert np.max(np.abs(decoded - plain)) <= sum_error_bound(len(values), clip, bits)
    assert np.max(np.abs(decoded - plain)) > sum_error_bound(len(values), clip, bits) / 1000  # quantized, not exact
    # Stochastic rounding is unbiased: the mean error over many coordinates is far below one step.
    assert abs(np.mean(decoded - plain)) < 2 * clip / (2**bits - 1)


def test_shamir_any_t_shares_recover_fewer_do_not():
    secret = bytes(range(32))
    randomness = expand_mask(b"k" * 32, 9 * 3).tobytes()
    shares = shamir.share(secret, 4, [1, 2, 3, 5, 8, 13], randomness)
    assert shamir.reconstruct({p: shares[p] for p in (2, 5, 8, 13)}, 4) == secret
    assert shamir.reconstruct({p: shares[p] for p in (1, 3, 5, 8)}, 4) == secret
    assert shamir.reconstruct({p: shares[p] for p in (1, 3, 5)}, 3) != secret
    with pytest.raises(ValueError):
        shamir.reconstruct({1: shares[1]}, 4)


def test_masks_are_uniform_words():
    words = expand_mask(b"s" * 32, 200_000)
    bits = np.unpackbits(words.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.002
    assert not np.array_equal(words, expand_mask(b"t" * 32, 200_000))


def _round(inputs, k_neighbours, threshold, drop_before_input=(), drop_before_unmask=(), seed=0, round_idx=1, k=40):
    clients = sorted(inputs)
    graph = neighbours(clients, k_neighbours, np.random.default_rng([seed, round_idx]))
    secrets, publics = {}, {}
    for c in clients:
        secrets[c], publics[c] = advertise(seed, round_idx, c)
    for c in clients:
        for v, ciphertext in share_keys(secrets[c], publics, graph[c], threshold).items():
            secrets[v].received[c] = ciphertext
    masked = {c: masked_input(secrets[c], inputs[c], publics, graph[c], k) for c in clients if c not in drop_before_input}
    responders = [c for c in masked if c not in drop_before_unmask]
    reveals = {c: unmask(secrets[c], publics, set(masked)) for c in responders}
    return unmasked_sum(masked, reveals, publics, graph, threshold, round_idx, k), masked


@pytest.mark.parametrize("k_neighbours, threshold", [(None, 5), (4, 3)])
def test_secure_sum_equals_the_plaintext_sum(k_neighbours, threshold):
    rng = np.random.default_rng(1)
    inputs = {c: rng.integers(0, 2**16, 257, dtype=np.uint64) for c in range(9)}
    total, masked = _round(inputs, k_neighbours, threshold)
    np.testing.assert_array_equal(total, sum(inputs.values()) & ring_mask(40))
    for c, y in masked.items():  # what the server receives from one client does not show its input
        assert not np.array_equal(y, inputs[c]) and np.mean(y > 2**39) == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("k_neighbours, threshold", [(None, 5), (6, 3)])
def test_dropouts_before_and_after_the_masked_input(k_neighbours, threshold):
    rng = np.random.default_rng(2)
    inputs = {c: rng.integers(0, 2**16, 64, dtype=np.uint64) for c in range(10)}
    total, masked = _round(inputs, k_neighbours, threshold, drop_before_input={3, 7}, drop_before_unmask={5})
    survivors = set(inputs) - {3, 7}
    np.testing.assert_array_equal(total, sum(inputs[c] for c in survivors) & ring_mask(40))


def test_too_few_survivors_abort():
    rng = np.random.default_rng(3)
    inputs = {c: rng.integers(0, 2**16, 16, dtype=np.uint64) for c in range(6)}
    with pytest.raises(SecAggAborted, match="shares"):
        _round(inputs, None, 5, drop_before_input={0, 1}, drop_before_unmask={2})


def test_sparse_graph_has_k_neighbours_each():
    graph = neighbours(list(range(100)), 8, np.random.default_rng(0))
    assert all(len(v) == 8 for v in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric
