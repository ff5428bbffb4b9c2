"""task=causal_lm without Ray: the response-only loss, truncation, natural splits, answer scoring,
DP-SGD's per-example clipping of a sequence loss, and config errors."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import CHATML, tiny_config, write_tiny_llama

from raysim.config import ConfigError, UserError
from raysim.data.instructions import PromptTokenizer, instruction_rows, load_prompt_tokenizer
from raysim.data.partition import natural
from raysim.losses import IGNORE, example_losses, response_positions, response_targets
from raysim.model import build_model, trainable_parameters
from raysim.privacy.local_dp import DPSGD
from raysim.scoring import is_correct, number, yes_no
from raysim.training import ClientData, collate, logits_and_targets


def _rows(n=5, width=10, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, width + 1, n).astype(np.int32)
    starts = np.array([int(rng.integers(1, length)) for length in lengths])
    ids = np.zeros((n, width), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(1000, 2000, length)
    return ids, lengths, starts


def test_targets_are_the_next_tokens_of_the_response_only():
    ids, lengths, starts = _rows()
    got = response_targets(ids, lengths, starts, ids.shape[1])
    for i in range(len(ids)):
        for t in range(ids.shape[1]):
            want = ids[i, t + 1] if starts[i] <= t + 1 < lengths[i] else IGNORE
            assert got[i, t] == want, (i, t)


def test_a_rows_loss_is_the_mean_over_its_response_tokens():
    ids, lengths, starts = _rows(seed=1)
    targets = response_targets(ids, lengths, starts, ids.shape[1])
    targets = np.where(targets == IGNORE, IGNORE, targets % 7)  # a vocabulary of 7
    logits = np.random.default_rng(2).normal(size=(*targets.shape, 7))
    got = example_losses(torch.from_numpy(logits), torch.from_numpy(targets)).numpy()
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for i in range(len(ids)):
        positions = [t for t in range(targets.shape[1]) if targets[i, t] != IGNORE]
        assert positions and got[i] == pytest.approx(np.mean([-log_p[i, t, targets[i, t]] for t in positions]), rel=1e-9)


def test_the_losses_need_only_the_response_positions_logits():
    ids, lengths, starts = _rows(n=6, width=14, seed=4)
    targets = torch.from_numpy(response_targets(ids, lengths, starts, ids.shape[1]))
    targets = torch.where(targets == IGNORE, IGNORE, targets % 11)
    logits = torch.randn(*targets.shape, 11, dtype=torch.float64)
    positions, kept = response_positions(targets)
    assert positions.shape[1] == int((lengths - starts).max())
    sliced = torch.take_along_dim(logits, positions[..., None], dim=1)  # what logits_to_keep computes
    torch.testing.assert_close(example_losses(sliced, kept), example_losses(logits, targets), rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    return load_prompt_tokenizer(str(write_tiny_llama(tmp_path_factory.mktemp("plain"))))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return load_prompt_tokenizer(str(write_tiny_llama(tmp_path_factory.mktemp("chat"), CHATML)))


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_truncation_keeps_the_response_and_the_templates_opening(which, plain_tokenizer, chat_tokenizer):
    tok: PromptTokenizer = plain_tokenizer if which == "plain" else chat_tokenizer
    words = " ".join(f"w{i}" for i in range(60))
    ids, lengths, starts, cut_rows, cut_responses = tok.encode([words, "short"], ["yes", "no"], 32)
    hf = tok.hf
    for row, answer in enumerate(["yes", "no"]):
        row_ids = ids[row, : lengths[row]].tolist()
        assert row_ids[starts[row] :] == hf(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row_ids[: len(tok.head)] == tok.head
    assert lengths[0] == 32 and cut_rows == 1 and cut_responses == 0
    # The long prompt lost its first words, not its last: its kept tokens end as the full prompt's do.
    full = hf(words, add_special_tokens=False)["input_ids"] + tok.tail
    kept = ids[0, len(tok.head) : starts[0]].tolist()
    assert kept == full[-len(kept) :] and len(kept) < len(full)
    if which == "chat":  # the prompt is the template's user turn with the assistant's turn opened
        rendered = hf.apply_chat_template([{"role": "user", "content": "short"}], tokenize=False, add_generation_prompt=True)
        assert ids[1, : starts[1]].tolist() == hf(rendered, add_special_tokens=False)["input_ids"]


def test_a_chat_template_that_fails_is_a_user_error(tmp_path):
    directory = write_tiny_llama(tmp_path / "broken", "{{ raise_exception('no user turns here') }}")
    with pytest.raises(UserError, match="model.name_or_path: the tokenizer's chat template fails: no user turns here"):
        load_prompt_tokenizer(str(directory))


def test_chat_rows_are_rendered_whole_by_the_template(chat_tokenizer):
    tok = chat_tokenizer
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids, lengths, starts, cut_rows, _ = tok.encode([conversation], ["hi"], 64)
    rendered = tok.hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ids[0, : starts[0]].tolist() == tok.hf(rendered, add_special_tokens=False)["input_ids"] and cut_rows == 0
    assert ids[0, starts[0] : lengths[0]].tolist() == tok.hf("hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_a_response_longer_than_the_row_is_cut_at_the_right_and_counted(plain_tokenizer):
    tok = plain_tokenizer
    answer = " ".join(f"a{i}" for i in range(40))
    ids, lengths, starts, cut_rows, cut_responses = tok.encode(["question"], [answer], 16)
    full = tok.hf(answer, add_special_tokens=False)["input_ids"]
    assert (cut_rows, cut_responses) == (1, 1) and lengths[0] == 16
    assert starts[0] == len(tok.head) + 1  # one prompt token kept
    assert ids[0, starts[0] : 16].tolist() == full[: 16 - starts[0]]  # the response's start, its end cut


def test_rows_come_from_templates_or_chat_messages(tmp_path):
    table = pa.table({"q": ["a?", None, "c?"], "label": [True, False, None], "messages": [None, None, None]})
    cfg = tiny_config(tmp_path).data
    cfg.prompt_template, cfg.response_template, cfg.response_map = "Q: {q}", "{label}", {"True": "yes"}
    rows = instruction_rows(table, cfg)
    assert rows.prompts == ["Q: a?"] and rows.responses == ["yes"] and rows.dropped == 2
    chat = pa.table({"m": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], [{"role": "user", "content": "x"}]]})
    cfg.messages_column = "m"
    rows = instruction_rows(chat, cfg)
    assert rows.prompts == [[{"role": "user", "content": "hi"}]] and rows.responses == ["hello"] and rows.dropped == 1
    cfg.messages_column, cfg.prompt_template = "", "{missing}"
    with pytest.raises(UserError, match="data.prompt_template: no column 'missing'"):
        instruction_rows(table, cfg)


def test_natural_split_gives_a_client_per_value_and_merges_small_groups():
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 1 + ["e"] * 1
    shuffled = np.random.default_rng(0).permutation(groups)
    parts = natural(shuffled, 5)
    assert sorted(set(shuffled[p]) for p in parts) == sorted({g} for g in "abcde")
    merged = natural(shuffled, 3)
    assert sorted(np.concatenate(merged).tolist()) == list(range(len(groups)))  # nothing dropped
    # Largest first: a, b, c start the clients; d joins the smallest (c, 2 rows), then e the smallest (b or c+d, 3 rows).
    assert [sorted(set(shuffled[p])) for p in merged] == [["a"], ["b", "e"], ["c", "d"]]
    with pytest.raises(UserError, match="data.client_column: its 5 distinct values cannot make clients.num=6"):
        natural(shuffled, 6)


@pytest.mark.parametrize(
    "kind, prediction, reference, correct",
    [
        ("yes_no", "Yes, it is.", "yes", True),
        ("yes_no", "false", "no", True),
        ("yes_no", "It is not known", "no", False),
        ("number", "There are 1,200 apples, not 3.", "3", True),
        ("number", "The answer is 12.", "12 apples", True),
        ("number", "12.5", "12", False),
        ("choice", "(B) because", "B", True),
        ("choice", "Answer: C.", "B", False),
        ("exact", "The Eiffel Tower!", "eiffel tower", True),
    ],
)
def test_answers_are_extracted_then_compared(kind, prediction, reference, correct):
    assert is_correct(kind, prediction, reference) is correct


def test_extraction_reads_what_the_benchmarks_read():
    assert yes_no("Well... no.") == "no" and yes_no("maybe") is None
    assert number("-3.5 and then 7") == 7.0 and number("none") is None


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_clips_each_sequence_like_an_independent_computation(tmp_path, tiny_lm, mode):
    """The privacy unit is one (prompt, response) row: Opacus' gradient must equal
    sum_i g_i min(1, C/|g_i|) / B, each g_i from its own backward pass of that row's mean
    response-token loss (same padding as in the batch)."""
    cfg = tiny_config(tmp_path, *tiny_lm, "method=lora")
    ids, lengths, starts = _rows(n=5, width=12, seed=3)
    data = ClientData(ids, lengths, starts, causal=True)
    clip, expected_batch = 0.01, 4.0
    reference = build_model(cfg, 0)
    ref_params = trainable_parameters(reference)
    clipped = {k: torch.zeros_like(p) for k, p in ref_params.items()}
    x, mask, targets = collate(data, np.arange(len(data)), torch.device("cpu"))
    for i in range(len(data)):
        reference.zero_grad()
        logits = reference(input_ids=x[i : i + 1], attention_mask=mask[i : i + 1]).logits
        keep = targets[i] != IGNORE
        torch.nn.functional.cross_entropy(logits[0][keep], targets[i][keep]).backward()
        norm = float(torch.sqrt(sum((p.grad**2).sum() for p in ref_params.values())))
        assert norm > clip
        for k, p in ref_params.items():
            clipped[k] += p.grad * min(1.0, clip / norm)
    model = build_model(cfg, 0)
    params = trainable_parameters(model)
    dp = DPSGD(model, torch.optim.SGD(list(params.values()), lr=0.0), clip, mode)
    dp.set_client(0.0, expected_batch, torch.Generator().manual_seed(0))
    dp.optimizer.zero_grad()
    dp.loss(*logits_and_targets(model, x, mask, targets)).backward()  # as training computes it: the response's logits only
    dp.optimizer.pre_step()
    got = torch.cat([p.grad.flatten() for p in params.values()])
    want = torch.cat([clipped[k].flatten() for k in params]) / expected_batch
    assert float((got - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.prompt_template=''"], "data.prompt_template: task=causal_lm needs"),
        (["data.partition=dirichlet"], "data.partition: 'dirichlet' splits by class label"),
        (["data.partition=natural", "data.client_column=''"], "data.client_column: partition=natural needs"),
        (["eval.score=bleu"], "eval.score: 'bleu' is not one of"),
        (["task=translation"], "task: 'translation' is not one of"),
    ],
)
def test_causal_lm_keys_are_checked(tmp_path, tiny_lm, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *tiny_lm, *overrides)
