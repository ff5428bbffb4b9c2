"""One round of SecAgg+ as messages between clients and a server (Bonawitz et al., CCS 2017, with
the sparse neighbour graph of Bell et al., CCS 2020).

1. ``advertise``: each client makes two X25519 key pairs (one to encrypt its shares, one to mask)
   and commits to its self-mask seed (SHA-256), sending the public keys and the commitment.
2. ``share_keys``: it Shamir-shares its masking secret key and a fresh self-mask seed among its
   neighbours (t of them recover either), each share pair encrypted to its recipient (AES-GCM
   under an X25519 + HKDF-SHA256 key); the server only routes ciphertexts.
3. ``masked_input``: it sends y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^k, where s_uv comes
   from key agreement with neighbour v and PRG is the ChaCha20 keystream.
4. ``unmask``: each survivor reveals, per neighbour, the self-mask share if that neighbour's y
   arrived or the masking-key share if it did not, never both; it refuses to reveal anything when
   the server names fewer than t senders (Bonawitz et al., round 4), or, under distributed DP,
   fewer than the senders the noise was planned for, or when the named senders split the
   neighbour graph into several components (each component's sum would be exposed, see
   :func:`components`).
5. ``unmasked_sum``: the server removes the self-masks of the senders and the pairwise masks
   that dropped clients left in their neighbours' inputs, and gets the sum mod 2^k, or aborts if
   some secret has fewer than t shares, or if a rebuilt secret is not the one its client
   advertised (a masking key that does not give its public key, a seed that does not match its
   commitment): an altered share then names its client instead of corrupting the sum.

These are the cheap integrity checks of the protocol against a server (or a client) that cheats a
little. The rest of the malicious-server protocol (signed messages, the consistency round) is not
here: the server is trusted to route messages faithfully (docs/SECAGG.md).

Every key, seed and sharing polynomial is drawn fresh from the OS each round, as a deployment
would. Results stay reproducible: the masks cancel exactly, so the sum never depends on them.
No Ray here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raysim.secagg import shamir
from raysim.secagg.encoding import ring_mask


class SecAggAborted(Exception):
    """Too few clients remain to remove the masks: the round's sum cannot be recovered."""


def _kdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint64 words of the ChaCha20 keystream under ``seed``."""
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype=np.uint64).copy()


def _agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    return _kdf(private.exchange(X25519PublicKey.from_public_bytes(peer_public)), info)


def neighbours(clients: list[int], k: int | None, rng: np.random.Generator) -> dict[int, list[int]]:
    """Each client's neighbours: everyone else (``k`` None), or the k nearest (k rounded up to even)
    on a ring in random order (a Harary graph, as in SecAgg+), so a client's work grows with k
    instead of n."""
    order = [int(c) for c in rng.permutation(clients)]
    n = len(order)
    if k is None or k >= n - 1:
        return {c: sorted(set(order) - {c}) for c in order}
    half = (k + 1) // 2
    out = {}
    for i, c in enumerate(order):
        out[c] = sorted({order[(i + d) % n] for d in range(-half, half + 1) if d != 0})
    return out


def components(graph: dict[int, list[int]], senders: set[int]) -> list[list[int]]:
    """The connected components of ``graph`` restricted to ``senders``, largest first. Pairwise
    masks join only neighbours, and the server removes those with clients that sent nothing, so
    the masked inputs of each component add up to that component's own sum once its self masks
    are gone: with more than one component, the server learns each one's sum, not only the total."""
    left, out = set(senders), []
    while left:
        stack = [left.pop()]
        part = set(stack)
        while stack:
            for v in graph.get(stack.pop(), ()):
                if v in left:
                    left.remove(v)
                    part.add(v)
                    stack.append(v)
        out.append(sorted(part))
    return sorted(out, key=lambda part: (-len(part), part))


_DROPOUT_STREAM = 0xD0


def dropout_stage(seed: int, round_idx: int, client: int, rate: float) -> str | None:
    """Whether a client vanishes this round, and when: "before_input" (after sharing its keys) or
    "after_input" (before unmasking), each with probability rate / 2; drawn from (seed, round, client)."""
    draw = np.random.default_rng([seed, round_idx, client, _DROPOUT_STREAM]).random()
    if draw < rate / 2:
        return "before_input"
    return "after_input" if draw < rate else None


def threshold_for(num_neighbours: int, configured: int = 0) -> int:
    """Shamir t for a client with ``num_neighbours``: the configured value, or a majority of them
    (an honest majority then never reveals both of a client's secrets to the server)."""
    return configured if configured else num_neighbours // 2 + 1


@dataclass
class ClientRound:
    """A client's secrets for one round (never sent in the clear)."""

    client: int
    round_idx: int
    share_key: X25519PrivateKey
    mask_key: X25519PrivateKey
    self_seed: bytes
    received: dict[int, bytes] = field(default_factory=dict)  # sender -> ciphertext of its shares
    threshold: int = 0  # the round's Shamir t, known once the client has shared its keys


def seed_commitment(client: int, round_idx: int, seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed, bound to its client and round: sent at advertise time, so the
    seed the server later rebuilds from shares can be checked against it."""
    return hashlib.sha256(b"raysim-secagg/self-seed" + client.to_bytes(4, "big") + round_idx.to_bytes(4, "big") + seed).digest()


def advertise(client: int, round_idx: int) -> tuple[ClientRound, dict]:
    """Fresh key pairs and self-mask seed for this round; the public keys and the seed's
    commitment go to the server."""
    secrets = ClientRound(client, round_idx, X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(32))
    public = {
        "share_public": secrets.share_key.public_key().public_bytes_raw(),
        "mask_public": secrets.mask_key.public_key().public_bytes_raw(),
        "seed_commitment": seed_commitment(client, round_idx, secrets.self_seed),
    }
    return secrets, public


def _nonce(sender: int, receiver: int, round_idx: int) -> bytes:
    return sender.to_bytes(4, "big") + receiver.to_bytes(4, "big") + round_idx.to_bytes(4, "big")


def share_keys(secrets: ClientRound, publics: dict[int, dict], neighbour_ids: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of the masking key and the self-mask seed, one ciphertext per neighbour."""
    secrets.threshold = threshold
    mask_raw = secrets.mask_key.private_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PrivateFormat.Raw, encryption_algorithm=serialization.NoEncryption()
    )
    points = [v + 1 for v in neighbour_ids]
    key_shares = shamir.share(mask_raw, threshold, points, os.urandom(shamir.randomness_bytes(threshold)))
    seed_shares = shamir.share(secrets.self_seed, threshold, points, os.urandom(shamir.randomness_bytes(threshold)))
    out = {}
    for v in neighbour_ids:
        key = _agree(secrets.share_key, publics[v]["share_public"], b"raysim-secagg/share-encryption")
        plaintext = key_shares[v + 1].astype("<i8").tobytes() + seed_shares[v + 1].astype("<i8").tobytes()
        out[v] = AESGCM(key).encrypt(_nonce(secrets.client, v, secrets.round_idx), plaintext, None)
    return out


def pairwise_mask(private: X25519PrivateKey, peer_public: bytes, round_idx: int, length: int) -> np.ndarray:
    """PRG(s_uv): the mask two clients agree on from one's private and the other's public key."""
    return expand_mask(_agree(private, peer_public, f"raysim-secagg/pairwise/{round_idx}".encode()), length)


def masked_input(secrets: ClientRound, encoded: np.ndarray, publics: dict[int, dict], k: int) -> np.ndarray:
    """y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)  (mod 2^k), over the
    neighbours v whose shares reached u (those that dropped before sharing are left out)."""
    with np.errstate(over="ignore"):
        y = encoded.astype(np.uint64) + expand_mask(secrets.self_seed, len(encoded))
        for v in sorted(secrets.received):
            mask = pairwise_mask(secrets.mask_key, publics[v]["mask_public"], secrets.round_idx, len(encoded))
            y = y + mask if secrets.client < v else y - mask
    return y & ring_mask(k)


def unmask(
    secrets: ClientRound, publics: dict[int, dict], sent: set[int], graph: dict[int, list[int]], min_senders: int = 0
) -> dict[int, tuple[str, np.ndarray]]:
    """For each neighbour whose shares this client holds: its self-mask share if its input arrived,
    else its masking-key share. Never both for one neighbour. With fewer than t senders named,
    nothing: the masked inputs of so few could not stay hidden in their sum. Nor with fewer than
    ``min_senders``: under distributed DP, the senders whose noise shares make the planned noise.
    Nor when the senders split ``graph`` (the round's roster) into several components, whose sums
    the server could learn one by one."""
    if len(sent) < secrets.threshold:
        raise SecAggAborted(
            f"client {secrets.client} refuses to unmask: the server names {len(sent)} sender(s), fewer than the threshold {secrets.threshold}"
        )
    if len(sent) < min_senders:
        raise SecAggAborted(
            f"client {secrets.client} refuses to unmask: the server names {len(sent)} sender(s), fewer than the {min_senders} "
            "whose noise shares make the planned distributed DP noise"
        )
    parts = components(graph, sent)
    if len(parts) > 1:
        sizes = [str(len(part)) for part in parts]
        raise SecAggAborted(
            f"client {secrets.client} refuses to unmask: after {len(graph) - len(sent)} of the {len(graph)} clients dropped, the senders' graph "
            f"splits into {len(parts)} components of {', '.join(sizes[:-1])} and {sizes[-1]} clients, whose sums the server could learn one by one"
        )
    out = {}
    for u, ciphertext in secrets.received.items():
        key = _agree(secrets.share_key, publics[u]["share_public"], b"raysim-secagg/share-encryption")
        plaintext = AESGCM(key).decrypt(_nonce(u, secrets.client, secrets.round_idx), ciphertext, None)
        key_share, seed_share = np.frombuffer(plaintext[:72], "<i8"), np.frombuffer(plaintext[72:], "<i8")
        out[u] = ("self", seed_share) if u in sent else ("key", key_share)
    return out


def unmasked_sum(
    masked_total: np.ndarray,
    senders: set[int],
    reveals: dict[int, dict[int, tuple[str, np.ndarray]]],
    publics: dict[int, dict],
    graph: dict[int, list[int]],
    threshold: int,
    round_idx: int,
    k: int,
) -> np.ndarray:
    """The server's last step: the sum of the senders' inputs from the sum of their masked inputs
    (mod 2^k). ``graph`` holds the clients that shared their keys and, for each, its neighbours
    that did too; ``reveals`` maps each responding client to what :func:`unmask` gave."""
    length = len(masked_total)
    total = masked_total.astype(np.uint64)
    with np.errstate(over="ignore"):
        for u in sorted(graph):
            wanted = "self" if u in senders else "key"
            shares = {v + 1: r[u][1] for v, r in reveals.items() if u in r and r[u][0] == wanted}
            if len(shares) < threshold:
                raise SecAggAborted(f"client {u}: {len(shares)} of the {threshold} shares needed to remove its masks arrived")
            secret = shamir.reconstruct(shares, threshold)
            if wanted == "self":
                if seed_commitment(u, round_idx, secret) != publics[u]["seed_commitment"]:
                    raise SecAggAborted(f"client {u}: the self-mask seed rebuilt from its shares does not match its commitment (a share was altered)")
                total = total - expand_mask(secret, length)
                continue
            mask_key = X25519PrivateKey.from_private_bytes(secret)
            if mask_key.public_key().public_bytes_raw() != publics[u]["mask_public"]:
                raise SecAggAborted(f"client {u}: the masking key rebuilt from its shares does not match the public key it advertised (a share was altered)")
            for v in graph[u]:
                if v in senders:  # v added +PRG(s_vu) if v < u, else subtracted it
                    mask = pairwise_mask(mask_key, publics[v]["mask_public"], round_idx, length)
                    total = total - mask if v < u else total + mask
    return total & ring_mask(k)
