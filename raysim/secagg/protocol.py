"""One round of SecAgg+ as messages between clients and a server (Bonawitz et al., CCS 2017, with
the sparse neighbour graph of Bell et al., CCS 2020).

1. ``advertise``: each client makes two X25519 key pairs (one to encrypt its shares, one to mask).
2. ``share_keys``: it Shamir-shares its masking secret key and a fresh self-mask seed among its
   neighbours (t of them recover either), each share pair encrypted to its recipient (AES-GCM
   under an X25519 + HKDF-SHA256 key); the server only routes ciphertexts.
3. ``masked_input``: it sends y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^k, where s_uv comes
   from key agreement with neighbour v and PRG is the ChaCha20 keystream.
4. ``unmask``: each survivor reveals, per neighbour, the self-mask share if that neighbour's y
   arrived or the masking-key share if it did not, never both.
5. ``unmasked_sum``: the server removes the self-masks of the senders and the pairwise masks
   that dropped clients left in their neighbours' inputs, and gets the sum mod 2^k, or aborts if
   some secret has fewer than t shares.

Key material is derived from (seed, round, client) with HKDF so simulations are reproducible; a
deployment would draw it from the OS. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raysim.secagg import shamir
from raysim.secagg.encoding import ring_mask

_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


class SecAggAborted(Exception):
    """Too few clients remain to remove the masks: the round's sum cannot be recovered."""


def _kdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def client_secret(seed: int, round_idx: int, client: int, label: str, length: int = 32) -> bytes:
    """Per-(seed, round, client) key material: fresh every round, reproducible in a simulation."""
    root = seed.to_bytes(16, "big", signed=True)
    return _kdf(root, f"raysim-secagg/{label}/{round_idx}/{client}".encode(), length)


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


@dataclass
class ClientRound:
    """A client's secrets for one round (never sent in the clear)."""

    client: int
    round_idx: int
    share_key: X25519PrivateKey
    mask_key: X25519PrivateKey
    self_seed: bytes
    shamir_seed: bytes  # expanded into the sharing polynomials' coefficients
    received: dict[int, bytes] = field(default_factory=dict)  # sender -> ciphertext of its shares


def advertise(seed: int, round_idx: int, client: int) -> tuple[ClientRound, dict]:
    secrets = ClientRound(
        client=client,
        round_idx=round_idx,
        share_key=X25519PrivateKey.from_private_bytes(client_secret(seed, round_idx, client, "share-key")),
        mask_key=X25519PrivateKey.from_private_bytes(client_secret(seed, round_idx, client, "mask-key")),
        self_seed=client_secret(seed, round_idx, client, "self-mask"),
        shamir_seed=client_secret(seed, round_idx, client, "shamir"),
    )
    public = {
        "client": client,
        "share_public": secrets.share_key.public_key().public_bytes(**_RAW),
        "mask_public": secrets.mask_key.public_key().public_bytes(**_RAW),
    }
    return secrets, public


def _nonce(sender: int, receiver: int, round_idx: int) -> bytes:
    return sender.to_bytes(4, "big") + receiver.to_bytes(4, "big") + round_idx.to_bytes(4, "big")


def share_keys(secrets: ClientRound, publics: dict[int, dict], neighbour_ids: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of the masking key and the self-mask seed, one ciphertext per neighbour."""
    mask_raw = secrets.mask_key.private_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PrivateFormat.Raw, encryption_algorithm=serialization.NoEncryption()
    )
    points = [v + 1 for v in neighbour_ids]
    words = 9 * max(threshold - 1, 0)
    randomness = expand_mask(secrets.shamir_seed, 2 * words).tobytes()
    key_shares = shamir.share(mask_raw, threshold, points, randomness[: 8 * words])
    seed_shares = shamir.share(secrets.self_seed, threshold, points, randomness[8 * words :])
    out = {}
    for v in neighbour_ids:
        key = _agree(secrets.share_key, publics[v]["share_public"], b"raysim-secagg/share-encryption")
        plaintext = key_shares[v + 1].astype("<i8").tobytes() + seed_shares[v + 1].astype("<i8").tobytes()
        out[v] = AESGCM(key).encrypt(_nonce(secrets.client, v, secrets.round_idx), plaintext, None)
    return out


def _pairwise(secrets: ClientRound, peer: int, publics: dict[int, dict], length: int) -> np.ndarray:
    info = f"raysim-secagg/pairwise/{secrets.round_idx}".encode()
    return expand_mask(_agree(secrets.mask_key, publics[peer]["mask_public"], info), length)


def masked_input(secrets: ClientRound, encoded: np.ndarray, publics: dict[int, dict], neighbour_ids: list[int], k: int) -> np.ndarray:
    """y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)  (mod 2^k)."""
    with np.errstate(over="ignore"):
        y = encoded.astype(np.uint64) + expand_mask(secrets.self_seed, len(encoded))
        for v in neighbour_ids:
            mask = _pairwise(secrets, v, publics, len(encoded))
            y = y + mask if secrets.client < v else y - mask
    return y & ring_mask(k)


def unmask(secrets: ClientRound, publics: dict[int, dict], sent: set[int]) -> dict[int, tuple[str, np.ndarray]]:
    """For each neighbour whose shares this client holds: its self-mask share if its input arrived,
    else its masking-key share. Never both for one neighbour."""
    out = {}
    for u, ciphertext in secrets.received.items():
        key = _agree(secrets.share_key, publics[u]["share_public"], b"raysim-secagg/share-encryption")
        plaintext = AESGCM(key).decrypt(_nonce(u, secrets.client, secrets.round_idx), ciphertext, None)
        key_share, seed_share = np.frombuffer(plaintext[:72], "<i8"), np.frombuffer(plaintext[72:], "<i8")
        out[u] = ("self", seed_share) if u in sent else ("key", key_share)
    return out


def unmasked_sum(
    masked: dict[int, np.ndarray],
    reveals: dict[int, dict[int, tuple[str, np.ndarray]]],
    publics: dict[int, dict],
    graph: dict[int, list[int]],
    threshold: int,
    round_idx: int,
    k: int,
) -> np.ndarray:
    """The server's last step: sum of the received inputs with every mask removed (mod 2^k)."""
    length = len(next(iter(masked.values())))
    total = np.zeros(length, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for y in masked.values():
            total = total + y
        for u in graph:
            wanted = "self" if u in masked else "key"
            shares = {v + 1: s for v, r in reveals.items() if u in r and r[u][0] == wanted for s in [r[u][1]]}
            if len(shares) < threshold:
                raise SecAggAborted(f"client {u}: {len(shares)} of {threshold} shares needed to remove its masks arrived")
            secret = shamir.reconstruct(shares, threshold)
            if wanted == "self":
                total = total - expand_mask(secret, length)
                continue
            mask_key = X25519PrivateKey.from_private_bytes(secret)
            info = f"raysim-secagg/pairwise/{round_idx}".encode()
            for v in graph[u]:
                if v in masked:  # v added +PRG(s_vu) if v < u, else subtracted it
                    mask = expand_mask(_agree(mask_key, publics[v]["mask_public"], info), length)
                    total = total - mask if v < u else total + mask
    return total & ring_mask(k)
