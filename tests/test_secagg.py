"""Secure aggregation math without Ray: encoding error bounds, Shamir sharing, and the SecAgg+
round against the plaintext sum, with and without dropouts."""

import numpy as np
import pytest

from raysim.secagg import shamir
from raysim.secagg.encoding import decode_sum, decode_update_sum, encode, encode_update, ring_bits, ring_mask, sum_error_bound
from raysim.secagg.protocol import (
    SecAggAborted,
    advertise,
    components,
    dropout_stage,
    expand_mask,
    masked_input,
    neighbours,
    pairwise_mask,
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


def _shared_keys(graph, threshold, round_idx=1):
    """Every client of ``graph`` advertises and shares its keys with its neighbours: (secrets, publics)."""
    secrets, publics = {}, {}
    for c in graph:
        secrets[c], publics[c] = advertise(c, round_idx)
    for c in graph:
        for v, ciphertext in share_keys(secrets[c], publics, graph[c], threshold).items():
            secrets[v].received[c] = ciphertext
    return secrets, publics


def _round(inputs, k_neighbours, threshold, drop_before_input=(), drop_before_unmask=(), round_idx=1, k=40, alter=None):
    """One round; ``alter(reveals)`` may change the revealed shares before the server uses them."""
    clients = sorted(inputs)
    graph = neighbours(clients, k_neighbours, np.random.default_rng(round_idx))
    secrets, publics = _shared_keys(graph, threshold, round_idx)
    masked = {c: masked_input(secrets[c], inputs[c], publics, k) for c in clients if c not in drop_before_input}
    responders = [c for c in masked if c not in drop_before_unmask]
    reveals = {c: unmask(secrets[c], publics, set(masked), graph) for c in responders}
    if alter is not None:
        alter(reveals)
    with np.errstate(over="ignore"):
        masked_total = sum(masked.values()) & ring_mask(k)
    return unmasked_sum(masked_total, set(masked), reveals, publics, graph, threshold, round_idx, k), masked


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
    # 5 senders (enough to unmask for), of which only 3 answer: every secret has 3 of the 4 shares
    with pytest.raises(SecAggAborted, match=r"^client \d: 3 of the 4 shares needed"):
        _round(inputs, None, 4, drop_before_input={0}, drop_before_unmask={1, 2})


def _alter_first_share_of(client):
    """Change the share of ``client``'s secret held by its lowest-numbered responder (one of the t
    shares the server rebuilds from) in a middle limb."""

    def alter(reveals):
        holder = min(v for v, r in reveals.items() if client in r)
        kind, share = reveals[holder][client]
        changed = share.copy()
        changed[4] = (changed[4] + 1) % shamir.PRIME
        reveals[holder][client] = (kind, changed)

    return alter


def test_an_altered_mask_key_share_aborts_naming_its_client():
    """Client 3 sent nothing, so its neighbours reveal its masking key: one share changed gives
    another key, which no longer matches the public key client 3 advertised."""
    rng = np.random.default_rng(6)
    inputs = {c: rng.integers(0, 2**16, 16, dtype=np.uint64) for c in range(6)}
    with pytest.raises(SecAggAborted, match=r"^client 3: the masking key rebuilt from its shares does not match the public key it advertised"):
        _round(inputs, None, 3, drop_before_input={3}, alter=_alter_first_share_of(3))


def test_an_altered_self_mask_share_aborts_naming_its_client():
    rng = np.random.default_rng(7)
    inputs = {c: rng.integers(0, 2**16, 16, dtype=np.uint64) for c in range(6)}
    with pytest.raises(SecAggAborted, match=r"^client 2: the self-mask seed rebuilt from its shares does not match its commitment"):
        _round(inputs, None, 3, alter=_alter_first_share_of(2))
    total, _ = _round(inputs, None, 3)  # the same round unaltered passes every check
    np.testing.assert_array_equal(total, sum(inputs.values()) & ring_mask(40))


def test_clients_refuse_to_unmask_when_fewer_than_t_senders_are_named():
    """Bonawitz et al., round 4: a server that claims that only 2 clients sent their input (so that
    their sum would be theirs alone) gets no share at all."""
    graph = neighbours(list(range(5)), None, np.random.default_rng(0))
    secrets, publics = _shared_keys(graph, 3)
    with pytest.raises(SecAggAborted, match=r"^client 0 refuses to unmask: the server names 2 sender\(s\), fewer than the threshold 3"):
        unmask(secrets[0], publics, {0, 1}, graph)
    assert set(unmask(secrets[0], publics, {0, 1, 2}, graph)) == {1, 2, 3, 4}
    # Distributed DP: honest clients also refuse below the senders whose noise shares make the plan.
    with pytest.raises(SecAggAborted, match=r"^client 0 refuses to unmask: the server names 3 sender\(s\), fewer than the 4 whose noise"):
        unmask(secrets[0], publics, {0, 1, 2}, graph, min_senders=4)
    assert set(unmask(secrets[0], publics, {0, 1, 2, 3}, graph, min_senders=4)) == {1, 2, 3, 4}


def test_sparse_graph_has_k_neighbours_each():
    graph = neighbours(list(range(100)), 8, np.random.default_rng(0))
    assert all(len(v) == 8 for v in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric
    assert components(graph, set(graph)) == [sorted(graph)]  # a ring: connected while no one drops


def test_dropouts_that_split_a_sparse_graph_would_expose_each_part_so_clients_refuse_to_unmask():
    """Ring of 12, 2 neighbours on each side, t = 2: clients 0-1 and 6-7 of the ring order drop
    before sending, which leaves the senders 2-5 and 8-11 with no mask between the two groups.
    Every secret still has t shares among the senders, so before the check the round went through,
    and the server could strip each group's masks alone and read each group's sum."""
    rng = np.random.default_rng(8)
    clients = list(range(12))
    graph = neighbours(clients, 4, np.random.default_rng(1))
    order = [int(c) for c in np.random.default_rng(1).permutation(clients)]  # the ring neighbours() drew
    assert all(graph[order[i]] == sorted(order[(i + d) % 12] for d in (-2, -1, 1, 2)) for i in range(12))
    inputs = {c: rng.integers(0, 2**16, 64, dtype=np.uint64) for c in clients}
    dropped = {order[0], order[1], order[6], order[7]}
    senders = set(clients) - dropped
    assert components(graph, senders) == [sorted(order[2:6]), sorted(order[8:12])]

    # The leak: t of the senders' shares rebuild each sender's self-mask seed and each dropped
    # client's masking key (the server checks them against the commitments and public keys), so
    # with those secrets, each group's masked inputs give that group's sum.
    secrets, publics = _shared_keys(graph, 2)
    assert all(len(senders.intersection(graph[u])) >= 2 for u in clients)
    masked = {c: masked_input(secrets[c], inputs[c], publics, 40) for c in senders}
    with np.errstate(over="ignore"):
        for part in components(graph, senders):
            y = sum(masked[u] - expand_mask(secrets[u].self_seed, 64) for u in part)
            for d in dropped:
                for u in set(part).intersection(graph[d]):  # u added +PRG(s_ud) if u < d, else subtracted it
                    mask = pairwise_mask(secrets[d].mask_key, publics[u]["mask_public"], 1, 64)
                    y = y - mask if u < d else y + mask
            np.testing.assert_array_equal(y & ring_mask(40), sum(inputs[u] for u in part) & ring_mask(40))

    # Now every sender refuses to reveal anything, so no seed is rebuilt and the round aborts.
    split = "refuses to unmask: after 4 of the 12 clients dropped, the senders' graph splits into 2 components of 4 and 4 clients"
    for c in senders:
        with pytest.raises(SecAggAborted, match=rf"^client {c} {split}"):
            unmask(secrets[c], publics, senders, graph)
    # One dropout fewer in the second gap leaves the senders connected: the round unmasks the total.
    total, masked = _round(inputs, 4, 2, drop_before_input={order[0], order[1], order[6]})
    np.testing.assert_array_equal(total, sum(inputs[c] for c in masked) & ring_mask(40))
    assert len(masked) == 9


def test_weighted_updates_decode_to_the_weighted_sum_and_the_weight_total():
    rng = np.random.default_rng(4)
    updates = rng.normal(0, 0.01, size=(7, 300))
    weights = rng.uniform(0.1, 1.0, 7)
    clip, bits = 0.05, 18
    encoded = [encode_update(u, w, clip, bits, rng)[0] for u, w in zip(updates, weights)]
    values, weight_total = decode_update_sum(sum(encoded), 7, clip, bits)
    assert np.max(np.abs(values - (weights[:, None] * updates).sum(axis=0))) <= sum_error_bound(7, clip, bits)
    assert abs(weight_total - weights.sum()) <= sum_error_bound(7, 1.0, bits)
    assert encode_update(np.array([0.2, -0.01, 0.3]), 1.0, 0.1, bits, rng)[1] == 2  # clipped values are counted


def test_dropout_draws_follow_the_rate_and_depend_only_on_seed_round_and_client():
    stages = [dropout_stage(0, r, c, 0.2) for r in range(1, 51) for c in range(100)]
    assert stages.count("before_input") / len(stages) == pytest.approx(0.1, abs=0.015)
    assert stages.count("after_input") / len(stages) == pytest.approx(0.1, abs=0.015)
    assert stages == [dropout_stage(0, r, c, 0.2) for r in range(1, 51) for c in range(100)]
    assert all(dropout_stage(0, 1, c, 0.0) is None for c in range(100))


def test_a_client_that_never_shared_its_keys_is_left_out():
    """Client 4 advertised but vanished before sharing: the others mask only with those whose
    shares reached them, and the server's graph leaves it out."""
    rng = np.random.default_rng(5)
    inputs = {c: rng.integers(0, 2**16, 32, dtype=np.uint64) for c in range(6)}
    graph = neighbours(sorted(inputs), None, np.random.default_rng(0))
    secrets, publics = {}, {}
    for c in inputs:
        secrets[c], publics[c] = advertise(c, 1)
    shared = [c for c in inputs if c != 4]
    for c in shared:
        for v, ciphertext in share_keys(secrets[c], publics, graph[c], 3).items():
            secrets[v].received[c] = ciphertext
    masked = {c: masked_input(secrets[c], inputs[c], publics, 40) for c in shared}
    reveals = {c: unmask(secrets[c], publics, set(masked), graph) for c in shared}
    server_graph = {u: [v for v in graph[u] if v in shared] for u in shared}
    with np.errstate(over="ignore"):
        total = unmasked_sum(sum(masked.values()) & ring_mask(40), set(masked), reveals, publics, server_graph, 3, 1, 40)
    np.testing.assert_array_equal(total, sum(inputs[c] for c in shared) & ring_mask(40))
