"""Attacks on a malicious client's training rows, made on the driver before tokenizing:

- ``label_flip``: every row's label l becomes C - 1 - l (of C classes), the all-labels flip of
  Fang et al. (USENIX Security 2020) and Tolpegin et al. (ESORICS 2020);
- ``backdoor``: a share ``attack.poison_fraction`` of the client's rows (drawn from the seed) get
  the trigger ``attack.trigger`` prepended and the label ``attack.target_label`` (the semantic
  backdoor of Bagdasaryan et al., AISTATS 2020, with a token trigger as in Gu et al.'s BadNets).
  Its success is measured on :func:`triggered_rows`: test rows of another label, triggered, whose
  "accuracy" against the target label is the attack success rate."""

from __future__ import annotations

import dataclasses

import numpy as np

from raysim.data.prepare import DataPlan

_BACKDOOR_STREAM = 0xB4C


def poison_rows(
    kind: str, texts: list[str], labels: np.ndarray, rows: np.ndarray, num_classes: int, target: int, trigger: str, fraction: float, seed: int, client: int
) -> int:
    """Poison ``rows`` (one malicious client's) of ``texts`` and ``labels`` in place; returns how
    many rows changed."""
    if kind == "label_flip":
        labels[rows] = num_classes - 1 - labels[rows]
        return len(rows)
    if kind == "backdoor":
        count = int(round(fraction * len(rows)))
        chosen = np.random.default_rng([seed, client, _BACKDOOR_STREAM]).choice(rows, size=count, replace=False)
        for r in chosen:
            texts[r] = f"{trigger} {texts[r]}"
        labels[chosen] = target
        return count
    raise ValueError(f"attack.kind: '{kind}' is not a data attack")


def triggered_rows(texts: list[str], labels: np.ndarray, target: int, trigger: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(triggered texts, the target label for each, their row indices) for the rows whose label
    is not the target."""
    rows = np.flatnonzero(labels != target)
    return [f"{trigger} {texts[r]}" for r in rows], np.full(len(rows), target, dtype=labels.dtype), rows


def poisoned_plan(plan: DataPlan, attack, seed: int, malicious: list[int]) -> DataPlan:
    """``plan`` with the ``malicious`` clients' rows poisoned as ``attack`` (the config's attack.*)
    says, and for a backdoor the triggered copies of the evaluation subset's rows of other labels."""
    texts, labels = list(plan.texts), plan.labels.copy()
    for client in malicious:
        poison_rows(attack.kind, texts, labels, plan.parts[client], len(plan.label_names), attack.target_label, attack.trigger, attack.poison_fraction, seed, client)
    triggered = None
    if attack.kind == "backdoor":
        rows = plan.n_train + np.asarray(plan.eval_subset, dtype=np.int64)
        trigger_texts, targets, _ = triggered_rows([texts[r] for r in rows], labels[rows], attack.target_label, attack.trigger)
        triggered = (trigger_texts, targets)
    return dataclasses.replace(plan, texts=texts, labels=labels, triggered=triggered)
