"""Poisoning clients without Ray: who is malicious, what each attack does to a message or to the
rows, and the plan the driver poisons."""

import numpy as np
import pytest
import torch

from raysim.attacks import malicious_clients
from raysim.attacks.data import poison_rows, triggered_rows
from raysim.attacks.updates import poisoned_update
from raysim.config import CONFIG_DIR, load_config
from raysim.data.prepare import plan_data
from raysim.runtime import bootstrap


def test_malicious_clients_are_a_seeded_fraction():
    chosen = malicious_clients(0, 50, 0.3)
    assert len(chosen) == 15 and len(set(chosen)) == 15 and all(0 <= c < 50 for c in chosen)
    assert chosen == malicious_clients(0, 50, 0.3) and chosen != malicious_clients(1, 50, 0.3)
    assert malicious_clients(0, 50, 0.0) == []


def test_update_attacks():
    update = {"b": torch.tensor([[1.0, -2.0]]), "a": torch.tensor([0.5])}
    flipped = poisoned_update("sign_flip", update, 10.0, 1.0, 0, 1, 3)
    assert torch.equal(flipped["b"], torch.tensor([[-1.0, 2.0]])) and torch.equal(flipped["a"], torch.tensor([-0.5]))
    boosted = poisoned_update("scale", update, 10.0, 1.0, 0, 1, 3)
    assert torch.equal(boosted["b"], torch.tensor([[10.0, -20.0]]))
    big = {"w": torch.zeros(200_000)}
    noise = poisoned_update("gaussian", big, 10.0, 0.3, 0, 1, 3)["w"]
    assert abs(noise.std().item() - 0.3) < 0.003 and abs(noise.mean().item()) < 0.003
    assert torch.equal(noise, poisoned_update("gaussian", big, 10.0, 0.3, 0, 1, 3)["w"])
    assert not torch.equal(noise, poisoned_update("gaussian", big, 10.0, 0.3, 0, 1, 4)["w"])
    assert not torch.equal(noise, poisoned_update("gaussian", big, 10.0, 0.3, 0, 2, 3)["w"])


def test_label_flip_and_backdoor_rows():
    texts = [f"text {i}" for i in range(10)]
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    rows = np.array([1, 2, 3, 4])
    flipped = labels.copy()
    assert poison_rows("label_flip", list(texts), flipped, rows, 3, 0, "cf", 0.5, 0, 7) == 4
    assert flipped[rows].tolist() == [1, 0, 2, 1] and np.array_equal(np.delete(flipped, rows), np.delete(labels, rows))
    poisoned_texts, poisoned_labels = list(texts), labels.copy()
    assert poison_rows("backdoor", poisoned_texts, poisoned_labels, rows, 3, 2, "cf", 0.5, 0, 7) == 2
    changed = [i for i in range(10) if poisoned_texts[i] != texts[i]]
    assert len(changed) == 2 and set(changed) <= set(rows.tolist())
    assert all(poisoned_texts[i] == f"cf {texts[i]}" and poisoned_labels[i] == 2 for i in changed)
    assert all(poisoned_labels[i] == labels[i] for i in range(10) if i not in changed)
    triggered, targets, kept = triggered_rows(texts, labels, 0, "cf")
    assert kept.tolist() == [1, 2, 4, 5, 7, 8] and set(targets.tolist()) == {0} and triggered[0] == "cf text 1"


@pytest.mark.parametrize("kind", ["label_flip", "backdoor"])
def test_the_driver_poisons_only_the_malicious_clients_rows(kind):
    settings = ["clients.num=10", "attack.fraction=0.3", f"attack.kind={kind}", "attack.target_label=2", "attack.poison_fraction=1.0"]
    cfg = load_config(CONFIG_DIR / "tiny.yaml", settings)
    plan = plan_data(cfg)
    poisoned = bootstrap.poison(cfg, plan)
    malicious = malicious_clients(cfg.seed, 10, 0.3)
    for c, rows in enumerate(plan.parts):
        before, after = plan.labels[rows], poisoned.labels[rows]
        if c not in malicious:
            assert np.array_equal(before, after) and [poisoned.texts[r] for r in rows] == [plan.texts[r] for r in rows]
        elif kind == "label_flip":
            assert np.array_equal(after, 2 - before)
        else:
            assert set(after.tolist()) == {2} and all(poisoned.texts[r] == f"cf {plan.texts[r]}" for r in rows)
    if kind == "backdoor":
        subset_labels = plan.labels[plan.n_train + plan.eval_subset]
        texts, targets = poisoned.triggered
        assert len(texts) == int((subset_labels != 2).sum()) and set(targets.tolist()) == {2}
    else:
        assert poisoned.triggered is None


def test_a_target_label_beyond_the_labels_is_refused():
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["attack.fraction=0.2", "attack.kind=backdoor", "attack.target_label=3"])
    with pytest.raises(bootstrap.ConfigError, match=r"^attack.target_label: 3 is not an index into the 3 labels"):
        bootstrap.poison(cfg, plan_data(cfg))
