"""Instruction rows for task=causal_lm: (prompt, response) pairs, tokenized once on the driver.

A row's prompt and response come from format strings over the table's columns
(``data.prompt_template``, ``data.response_template``) or from a column of chat messages whose
last turn is the response (``data.messages_column``). Where the tokenizer has a chat template
the prompt is the user's turn of it, with the generation prompt that opens the assistant's turn;
the response ends with the end-of-sequence token, so a tuned model learns to stop.

Truncation keeps the response: a row longer than ``data.max_length`` loses tokens from the left
of the user's content (the template's opening tokens stay, so the model still sees a well-formed
turn; a chat row loses them from the left of its rendered conversation). A response that does
not fit alone is cut at the right. Both are counted and logged, never silent.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from typing import Any

import numpy as np

from raysim.config import UserError
from raysim.data.loading import column_values, read_table, to_arrow
from raysim.data.prepare import PreparedData, client_groups, plan_rows

log = logging.getLogger("raysim")

_CONTENT = "\x00raysim-content\x00"  # stands for the user's content while the chat template renders


def template_fields(template: str) -> list[str]:
    """The column names a format string uses: "{passage} {question}?" -> [passage, question]."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass
class InstructionRows:
    prompts: list[Any]  # the user's content (str), or a chat row's turns before the response
    responses: list[str]
    dropped: int  # rows without a response (an empty or missing field)
    kept_rows: np.ndarray  # the table's row of each kept pair


def instruction_rows(table, data_cfg) -> InstructionRows:
    """(prompt, response) pairs from a table; a UserError naming the key for a missing column."""
    d = data_cfg
    prompts: list[Any] = []
    responses: list[str] = []
    kept: list[int] = []
    if d.messages_column:
        for row, messages in enumerate(column_values(table, d.messages_column, "data.messages_column")):
            if not messages or not isinstance(messages, list) or messages[-1].get("role") != "assistant" or not messages[-1].get("content"):
                continue
            prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[:-1]])
            responses.append(str(messages[-1]["content"]))
            kept.append(row)
    else:
        columns: dict[str, list] = {}
        for key, template in (("data.prompt_template", d.prompt_template), ("data.response_template", d.response_template)):
            for name in template_fields(template):
                columns[name] = column_values(table, name, key)
        mapping = dict(d.response_map)
        for row in range(table.num_rows):
            values = {name: col[row] for name, col in columns.items()}
            if any(v is None or (isinstance(v, str) and not v.strip()) for v in values.values()):
                continue
            response = d.response_template.format(**values)
            response = mapping.get(response, response)
            prompts.append(d.prompt_template.format(**values))
            responses.append(response)
            kept.append(row)
    if not responses:
        raise UserError(f"data.path: no row has both a prompt and a response ({table.num_rows} rows read)")
    return InstructionRows(prompts, responses, table.num_rows - len(responses), np.asarray(kept, dtype=np.int64))


class PromptTokenizer:
    """A transformers tokenizer that turns (prompt, response) pairs into token ids, through its
    chat template where it has one. Without a pad token it pads with the end-of-sequence token."""

    def __init__(self, hf):
        self.hf = hf
        self.eos_token_id = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        if self.eos_token_id is None:
            raise UserError("model.name_or_path: the tokenizer has no end-of-sequence (or separator) token to end responses with")
        self.pad_token_id = hf.pad_token_id
        if self.pad_token_id is None:
            log.info("data: the tokenizer has no pad token; padding with its end-of-sequence token (%d)", self.eos_token_id)
            self.pad_token_id = self.eos_token_id
        self.chat = bool(getattr(hf, "chat_template", None))
        if self.chat:
            try:
                rendered = hf.apply_chat_template([{"role": "user", "content": _CONTENT}], tokenize=False, add_generation_prompt=True)
            except Exception as err:  # jinja errors of a broken template
                raise UserError(f"model.name_or_path: the tokenizer's chat template fails: {str(err).splitlines()[0]}") from None
            head, _, tail = rendered.partition(_CONTENT)
            self.head, self.tail = self._encode([head])[0], self._encode([tail])[0]
        else:
            self.head = [hf.bos_token_id] if hf.bos_token_id is not None else []
            self.tail = self._encode(["\n"])[0]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _chat_prompts(self, conversations: list[list[dict]]) -> list[list[int]]:
        try:
            return [list(self.hf.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False)) for c in conversations]
        except Exception as err:
            raise UserError(f"data.messages_column: the tokenizer's chat template fails on a row: {str(err).splitlines()[0]}") from None

    def prompt_ids(self, prompts: list[Any]) -> tuple[list[list[int]], list[list[int]]]:
        """(fixed opening tokens, cuttable tokens) of each prompt."""
        if prompts and isinstance(prompts[0], list):
            if not self.chat:
                raise UserError("data.messages_column: chat rows need a tokenizer with a chat template")
            return [[] for _ in prompts], self._chat_prompts(prompts)
        return [self.head] * len(prompts), [c + self.tail for c in self._encode(list(prompts))]

    def encode(self, prompts: list[Any], responses: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """(ids [n, L] padded, lengths, response starts, rows cut, of which responses cut)."""
        heads, bodies = self.prompt_ids(prompts)
        answers = [r + [self.eos_token_id] for r in self._encode(responses)]
        rows, starts, cut_rows, cut_responses = [], [], 0, 0
        if heads and max_length - len(heads[0]) < 2:
            raise UserError(f"data.max_length: {max_length} leaves no room after the chat template's {len(heads[0])} opening tokens")
        for head, body, answer in zip(heads, bodies, answers):
            room = max_length - len(head)
            cut_rows += len(head) + len(body) + len(answer) > max_length
            if len(answer) > room - 1:  # keep one prompt token at least
                answer, cut_responses = answer[: room - 1], cut_responses + 1
            keep = room - len(answer)
            if len(body) > keep:
                body = body[len(body) - keep :]
            prompt = head + body
            rows.append(prompt + answer)
            starts.append(len(prompt))
        lengths = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
        ids = np.full((len(rows), int(lengths.max())), self.pad_token_id, dtype=np.int32)
        for i, seq in enumerate(rows):
            ids[i, : len(seq)] = seq
        return ids, lengths, np.asarray(starts, dtype=np.int64), cut_rows, cut_responses


def load_prompt_tokenizer(name_or_path: str) -> PromptTokenizer:
    from transformers import AutoTokenizer

    from raysim.model import quiet_load

    return PromptTokenizer(quiet_load("a tokenizer from", name_or_path, lambda: AutoTokenizer.from_pretrained(name_or_path)))


@dataclass
class InstructionPlan:
    """Which rows go where, for task=causal_lm (see :class:`raysim.data.prepare.DataPlan`)."""

    prompts: list[Any]
    responses: list[str]
    parts: list[np.ndarray]
    n_train: int
    eval_subset: np.ndarray
    generate_subset: np.ndarray  # indices into the evaluation rows answered by generation
    n_public: int = 0
    label_names: tuple = ()

    @property
    def client_sizes(self) -> list[int]:
        return [len(p) for p in self.parts]


def plan_instructions(cfg) -> InstructionPlan:
    d = cfg.data
    table = read_table(d.path)
    rows = instruction_rows(table, d)
    if rows.dropped:
        log.warning("data: dropped %d of %d rows without a prompt or a response", rows.dropped, table.num_rows)
    plan = plan_rows(cfg, len(rows.responses), groups=client_groups(table, d, rows.kept_rows))
    n_eval = len(plan.needed) - plan.n_train - plan.n_public
    wanted = int(cfg.eval.generate_examples)
    if wanted and wanted < n_eval:
        generate = np.sort(np.random.default_rng([cfg.seed, 0x6E4]).choice(n_eval, wanted, replace=False))
    else:
        generate = np.arange(n_eval if wanted else 0)
    log.info(
        "data: %d (prompt, response) rows, %d train over %d clients (%s), %d %s (%d scored by loss, %d by generation each evaluation)",
        len(rows.responses),
        plan.n_train,
        cfg.clients.num,
        d.partition,
        n_eval,
        cfg.eval.split,
        len(plan.eval_subset),
        len(generate),
    )
    return InstructionPlan(
        [rows.prompts[i] for i in plan.needed],
        [rows.responses[i] for i in plan.needed],
        plan.parts,
        plan.n_train,
        plan.eval_subset,
        generate,
        plan.n_public,
    )


def tokenize_instructions(plan: InstructionPlan, tokenizer: PromptTokenizer, max_length: int) -> PreparedData:
    ids, lengths, starts, cut_rows, cut_responses = tokenizer.encode(plan.prompts, plan.responses, max_length)
    if cut_rows:
        log.warning(
            "data: %d of %d rows are longer than data.max_length=%d and lost prompt tokens from the left (%d of them also the end of their response)",
            cut_rows,
            len(lengths),
            max_length,
            cut_responses,
        )
    n, end = plan.n_train, len(lengths) - plan.n_public
    shards = [to_arrow(ids[p], lengths[p], starts[p], causal=True) for p in plan.parts]
    eval_full = to_arrow(ids[n:end], lengths[n:end], starts[n:end], causal=True)
    public = to_arrow(ids[end:], lengths[end:], starts[end:], causal=True) if plan.n_public else None
    return PreparedData(shards, eval_full, plan.eval_subset, [], public, answers=plan.responses[n:end], generate_subset=plan.generate_subset)
