"""One real round of the default job: pretrained all-MiniLM-L6-v2 on the tweets (small slice)."""

import numpy as np
import pytest

from raysim import Simulation, load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def test_a_real_minilm_round_trains_b(tmp_path):
    cfg = load_config(
        None,
        [f"output_dir={tmp_path / 'run'}", "data.max_rows=3000", "clients.per_round=2", "train.local_steps=2", "eval.max_examples=64"],
    )
    with Simulation(cfg) as sim:
        before = sim.global_adapter()
        row = sim.run_round()
        after = sim.global_adapter()
    assert row["clients"] == 2 and 0.0 <= row["eval_accuracy"] <= 1.0 and np.isfinite(row["eval_loss"])
    b_keys = [k for k in after if ".lora_B." in k]
    assert len(b_keys) == 6 * 6 + 1 and not any(".lora_A." in k for k in after)  # 6 layers x {q, k, v, 3 dense} + pooler
    assert all(np.abs(before[k]).max() == 0 for k in b_keys)
    assert all(np.abs(after[k]).max() > 0 for k in b_keys)
