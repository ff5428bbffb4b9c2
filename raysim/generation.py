"""Greedy decoding of the evaluation prompts on a resident causal LM (task=causal_lm).

Prompts are the rows' tokens before their response, batched by length and padded on the left, so
every row's next token comes right after its prompt. No Ray here.
"""

from __future__ import annotations

import numpy as np
import torch

from raysim.training import ClientData


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module, data: ClientData, rows: np.ndarray, batch_size: int, max_new_tokens: int, pad_token_id: int, eos_token_id: int, device: torch.device
) -> dict[int, list[int]]:
    """{row: the generated token ids, up to and without the end-of-sequence token}."""
    was_training = model.training
    model.eval()
    starts = data.labels[rows]
    order = rows[np.argsort(starts, kind="stable")]
    out: dict[int, list[int]] = {}
    for at in range(0, len(order), batch_size):
        batch = order[at : at + batch_size]
        width = int(data.labels[batch].max())
        ids = np.full((len(batch), width), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for i, row in enumerate(batch):
            n = int(data.labels[row])
            ids[i, width - n :] = data.ids[row, :n]
            mask[i, width - n :] = 1
        generated = model.generate(  # type: ignore[operator]
            input_ids=torch.from_numpy(ids).to(device),
            attention_mask=torch.from_numpy(mask).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )[:, width:].cpu().numpy()
        for row, tokens in zip(batch, generated):
            tokens = tokens.tolist()
            out[int(row)] = tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens
    model.train(was_training)
    return out
