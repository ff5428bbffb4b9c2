"""task=causal_lm through the runtime: generation-based evaluation and its outputs, the saved
adapter generating the same answers in PEFT, every method, Ray against the local runtime,
stacked clients, resume, and errors before anything starts."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config

from raysim.config import CONFIG_DIR, load_config
from raysim.runtime.simulation import Simulation

SGD = ["train.optimizer=sgd", "train.lr=0.5", "train.momentum=0.9"]


def _run(cfg):
    with Simulation(cfg) as sim:
        sim.run(progress=False)
        final = sim.evaluate()
        sim.save_adapter()
        sim.write_summary(final)
        return sim.metrics.to_pylist(), sim.global_adapter(), final


def test_a_run_scores_generated_answers_and_its_adapter_generates_them_in_peft(tmp_path, tiny_lm):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config(tmp_path, *tiny_lm, "runtime=local", "method=lora", "rounds=3", "train.lr=0.02", "train.local_steps=5")
    rows, _, final = _run(cfg)
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == cfg.eval.generate_examples == final["eval_examples"]
    assert final["eval_accuracy"] == pytest.approx(np.mean([p["correct"] for p in predictions]))
    assert all(p["reference"] in ("yes", "no") for p in predictions)
    shares = [sum(p["reference"] == answer for p in predictions) / len(predictions) for answer in ("yes", "no")]
    assert summary["constant_answer_accuracy"] == pytest.approx(max(shares))
    assert summary["untuned_eval_loss"] > summary["final_eval_loss"]  # tuning taught it the answers' tokens
    assert summary["final_eval_perplexity"] == pytest.approx(math.exp(summary["final_eval_loss"]))
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in rows)

    # The saved adapter on the same base model, in PEFT, one prompt at a time without padding.
    name = cfg.model.name_or_path
    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name, **cfg.model.config_overrides))
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    from raysim.data.instructions import instruction_rows
    from raysim.data.loading import read_table
    from raysim.data.prepare import plan_rows

    table = read_table(cfg.data.path)
    rows_in = instruction_rows(table, cfg.data)
    plan = plan_rows(cfg, len(rows_in.responses), groups=np.asarray(table["topic"].to_pylist(), dtype=object)[rows_in.kept_rows])
    eval_rows = plan.needed[plan.n_train :]
    checked = 0
    for p in predictions[:4]:
        prompt = rows_in.prompts[eval_rows[p["row"]]]
        assert rows_in.responses[eval_rows[p["row"]]] == p["reference"]
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][-(cfg.data.max_length - 2) :]])
        if ids.shape[1] < len(tokenizer(text, add_special_tokens=False)["input_ids"]):
            continue  # a truncated prompt keeps the template's opening tokens: not this simple replay
        generated = model.generate(input_ids=ids, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
        new = generated[0, ids.shape[1] :].tolist()
        new = new[: new.index(tokenizer.sep_token_id)] if tokenizer.sep_token_id in new else new
        assert tokenizer.decode(new, skip_special_tokens=True) == p["prediction"]
        checked += 1
    assert checked >= 2


METHODS = {
    "ffa_lora": [],
    "lora": [],
    "lora-central_dp": ["privacy.mode=central_dp", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5"],
    "lora_fair": [],
    "flasc": [],
    "fed_sb": ["lora.rank=4", "data.public_rows=24"],
    "hetlora": ["clients.ranks=[8,4,2]"],
    "flora": ["clients.ranks=[8,4,2]"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_tunes_a_causal_lm(tmp_path, tiny_lm, method):
    cfg = tiny_config(tmp_path, *tiny_lm, "runtime=local", f"method={method.split('-')[0]}", *METHODS[method], "rounds=2", "eval.generate_examples=4", "worker.count=1")
    rows, adapter, final = _run(cfg)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["eval_loss"]) for r in rows)
    assert final["eval_examples"] == 4 and adapter


@pytest.mark.usefixtures("ray_session")
def test_ray_equals_the_local_runtime_for_a_causal_lm_under_dp_sgd_and_secagg(tmp_path, tiny_lm):
    dp = ["privacy.mode=local_dp_sgd", "privacy.noise_multiplier=0.8", "privacy.max_grad_norm=1.0"]
    args = [*tiny_lm, *SGD, "method=lora", *dp, "secagg.enabled=true", "secagg.clip_range=1.0", "rounds=3", "eval.generate_examples=6"]
    ray_rows, ray_adapter, ray_final = _run(tiny_config(tmp_path / "ray", *args, "runtime=ray"))
    local_rows, local_adapter, local_final = _run(tiny_config(tmp_path / "local", *args, "runtime=local"))
    for got, want in zip(ray_rows, local_rows):
        for key in ("train_loss", "eval_loss", "eval_accuracy", "uplink_bytes", "epsilon"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    for name, value in local_adapter.items():
        np.testing.assert_allclose(ray_adapter[name], value, rtol=1e-5, atol=1e-7)
    assert ray_final["eval_accuracy"] == local_final["eval_accuracy"]


def test_stacked_clients_equal_clients_one_at_a_time(tmp_path, tiny_lm):
    args = [*tiny_lm, *SGD, "runtime=local", "method=lora", "rounds=2", "eval.generate_examples=0", "worker.count=1", "data.partition=iid"]
    alone, alone_adapter, _ = _run(tiny_config(tmp_path / "alone", *args))
    together, together_adapter, _ = _run(tiny_config(tmp_path / "together", *args, "train.clients_per_batch=3"))
    for got, want in zip(together, alone):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    for name, value in alone_adapter.items():
        np.testing.assert_allclose(together_adapter[name], value, rtol=1e-3, atol=1e-6)


def test_a_resumed_causal_lm_run_equals_the_uninterrupted_one(tmp_path, tiny_lm):
    args = [*tiny_lm, *SGD, "runtime=local", "method=lora", "checkpoint.every=1", "eval.generate_examples=4"]
    _, whole, _ = _run(tiny_config(tmp_path / "whole", *args, "rounds=3"))
    _run(tiny_config(tmp_path / "part", *args, "rounds=1"))
    resumed = load_config(CONFIG_DIR / "tiny.yaml", [*args, f"resume={tmp_path / 'part' / 'run'}", "rounds=3"])
    _, got, _ = _run(resumed)
    assert all(np.array_equal(got[k], whole[k]) for k in whole)
    summaries = [json.loads((tmp_path / name / "run" / "summary.json").read_text()) for name in ("whole", "part")]
    assert summaries[1]["untuned_eval_loss"] == summaries[0]["untuned_eval_loss"] is not None  # the resumed run's summary keeps it


def test_a_template_override_needs_quotes_and_is_told_so(tmp_path, tiny_lm):
    from raysim.config import ConfigError

    with pytest.raises(ConfigError, match="data.prompt_template: .*a value in braces is read as a mapping: quote it"):
        tiny_config(tmp_path, *tiny_lm, "data.prompt_template={question}")


@pytest.mark.parametrize(
    "override, message",
    [
        ('data.prompt_template="{nope}"', "raysim: error: data.prompt_template: no column 'nope' in the data"),
        ("data.max_length=512", "raysim: error: data.max_length: 512 is more than the model's 128 positions"),
    ],
)
def test_bad_causal_lm_input_exits_2_with_one_line_before_anything_is_written(tmp_path, tiny_lm, override, message):
    out = tmp_path / "out"
    args = [str(CONFIG_DIR / "tiny.yaml"), *tiny_lm, "runtime=local", f"output_dir={out}", override]
    done = subprocess.run([sys.executable, "-m", "raysim.cli", "run", *args], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
    assert not out.exists()


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_token(caplog):
    from raysim.data.instructions import PromptTokenizer

    class NoPad:  # the parts of a transformers tokenizer PromptTokenizer reads
        eos_token_id, sep_token_id, pad_token_id, bos_token_id, chat_template = 7, None, None, None, None

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[10 + len(word) for word in text.split()] for text in texts]}

    with caplog.at_level("INFO", logger="raysim"):
        tok = PromptTokenizer(NoPad())
    ids, lengths, starts, _, _ = tok.encode(["a bb", "ccc"], ["dddd", "e"], 16)
    assert tok.pad_token_id == 7 and "no pad token" in caplog.text
    assert ids[1, lengths[1] :].tolist() == [7] * (ids.shape[1] - lengths[1])
    assert ids[0, : lengths[0]].tolist() == [11, 12, 14, 7] and starts[0] == 2
