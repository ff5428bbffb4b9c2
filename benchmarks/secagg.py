"""Cost of secure aggregation (SecAgg+) at the quickstart adapter size, against plaintext summing.

    python benchmarks/secagg.py                                  # 10, 100, 500 clients
    python benchmarks/secagg.py --clients 10 100 --json out.json

For each number of clients n and each neighbour graph (everyone, and k = log2 n rounded up to
even), one round of the protocol in raysim/secagg runs in this process, one client after another:
- client time: a client's own work (key pairs, Shamir sharing and encrypting to its neighbours,
  encoding, masking, decrypting the shares it reveals), the median over --sample timed clients;
  clients work in parallel in a deployment, so this is what each one adds to its round;
- server time: removing the masks (Shamir reconstruction, self masks, and the pairwise masks of
  the clients that dropped before sending; --dropout of them do);
- plaintext: the same server summing n float32 vectors and dividing.
Clients outside the timed sample send a placeholder input when n x k is large (the server's work
does not depend on the values); the decoded sum is checked against the plaintext sum whenever
every client's input is real ("verified").
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from raysim.secagg.encoding import decode_update_sum, encode_update, ring_bits, ring_mask, sum_error_bound
from raysim.secagg.protocol import advertise, masked_input, neighbours, share_keys, threshold_for, unmask, unmasked_sum

CLIP, BITS = 0.1, 20


def quickstart_values() -> int:
    """Values FFA-LoRA sends per client on configs/quickstart.yaml (MiniLM): its trained tensors."""
    from raysim.config import CONFIG_DIR, load_config
    from raysim.model import adapter_state, build_model

    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["output_dir=/tmp/raysim-bench-unused"])
    return int(sum(v.size for v in adapter_state(build_model(cfg, 3)).values()))


def one_round(n: int, k: int | None, length: int, dropout: float, sample: int, real_budget: float) -> dict:
    rng = np.random.default_rng(n)
    clients = list(range(n))
    graph = neighbours(clients, k, rng)
    degree = len(graph[0])
    threshold = threshold_for(degree)
    ring = ring_bits(BITS, n)
    dropped = set(rng.choice(n, size=int(round(dropout * n)), replace=False).tolist())
    timed = [c for c in clients if c not in dropped][:sample]
    # Every input is real unless that would mean masking more vectors than real_budget allows.
    all_real = n * (degree + 1) <= real_budget
    updates = {c: rng.normal(0, 0.01, length) for c in (clients if all_real else timed)}
    client_s = {c: 0.0 for c in timed}

    def clock(c, fn, *args):
        started = time.perf_counter()
        out = fn(*args)
        if c in client_s:
            client_s[c] += time.perf_counter() - started
        return out

    secrets, publics = {}, {}
    for c in clients:
        secrets[c], publics[c] = clock(c, advertise, c, 1)
    for c in clients:
        for v, ciphertext in clock(c, share_keys, secrets[c], publics, graph[c], threshold).items():
            secrets[v].received[c] = ciphertext
    senders = [c for c in clients if c not in dropped]
    masked_total = np.zeros(length + 1, dtype=np.uint64)
    for c in senders:
        if c in updates:
            encoded, _ = clock(c, encode_update, updates[c], 1.0, CLIP, BITS, np.random.default_rng(c))
            y = clock(c, masked_input, secrets[c], encoded, publics, ring)
        else:
            y = np.zeros(length + 1, dtype=np.uint64)
        masked_total = (masked_total + y) & ring_mask(ring)
    reveals = {c: clock(c, unmask, secrets[c], publics, set(senders), graph) for c in senders}

    started = time.perf_counter()
    total = unmasked_sum(masked_total, set(senders), reveals, publics, graph, threshold, 1, ring)
    values, weight = decode_update_sum(total, len(senders), CLIP, BITS)
    server_s = time.perf_counter() - started

    plain = [rng.normal(0, 0.01, length).astype(np.float32) for _ in senders]
    started = time.perf_counter()
    _ = sum(plain) / len(plain)
    plaintext_s = time.perf_counter() - started

    verified = None
    if all_real:
        expected = sum(np.clip(updates[c], -CLIP, CLIP) for c in senders)
        verified = bool(np.max(np.abs(values - expected)) <= sum_error_bound(len(senders), CLIP, BITS) and weight == len(senders))
        if not verified:
            raise AssertionError(f"n={n} k={k}: secure sum differs from the plaintext sum")
    return {
        "clients": n,
        "neighbors": "all" if k is None else k,
        "degree": degree,
        "threshold": threshold,
        "dropped": len(dropped),
        "values": length,
        "ring_bits": ring,
        "client_s": statistics.median(client_s.values()),
        "server_s": server_s,
        "plaintext_s": plaintext_s,
        "server_ratio": server_s / plaintext_s,
        "verified": verified,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--values", type=int, default=0, help="values per client (default: the quickstart adapter's)")
    parser.add_argument("--dropout", type=float, default=0.05, help="fraction of clients that drop before sending")
    parser.add_argument("--sample", type=int, default=5, help="clients whose own work is timed")
    parser.add_argument("--real-budget", type=float, default=30_000, help="mask all inputs for real up to n x (k+1) masks")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    length = args.values or quickstart_values()
    print(f"{length} values per client, clip {CLIP}, {BITS} bits, {args.dropout:.0%} drop before sending")
    header = f"{'clients':>7} {'neighbors':>9} {'t':>4} {'client ms':>10} {'server s':>9} {'plain ms':>9} {'server/plain':>12} verified"
    print(header)
    results = []
    for n in args.clients:
        for k in (None, 2 * math.ceil(math.log2(n) / 2)):
            r = one_round(n, k, length, args.dropout, args.sample, args.real_budget)
            results.append(r)
            print(
                f"{n:>7} {str(r['neighbors']):>9} {r['threshold']:>4} {1e3 * r['client_s']:>10.1f} {r['server_s']:>9.2f} "
                f"{1e3 * r['plaintext_s']:>9.2f} {r['server_ratio']:>12.0f} {r['verified']}",
                flush=True,
            )
    if args.json:
        meta = {"machine": platform.platform(), "processor": platform.processor(), "date": time.strftime("%Y-%m-%d")}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
