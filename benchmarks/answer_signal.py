"""Whether a causal LM's next-token probabilities separate a task's answers at all, before and
after tuning: a ceiling on what greedy exact match can show.

    python benchmarks/answer_signal.py configs/llm.yaml --answers yes,no --json FILE
    python benchmarks/answer_signal.py configs/llm.yaml --answers yes,no --adapter RUN/adapter --json FILE
    python benchmarks/answer_signal.py configs/llm_tweets.yaml --answers negative,neutral,positive

Takes the config's first ``--rows`` held-out rows (its own split and prompts), and for each the
log-probability of every answer's first token (lower-case or capitalised, summed) at the first
response position. Reports the accuracy of the most probable answer, the majority share, and for
two answers the ROC AUC of log P(first) - log P(second) against the label: 0.5 means the model's
scores carry no information about the answer, whatever threshold or calibration tuning would add.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney U over all (positive, negative) pairs, ties counting half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--answers", required=True, help="the task's answers, comma-separated, as the responses spell them")
    parser.add_argument("--adapter", help="a run's adapter directory, loaded with PeftModel.from_pretrained")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from raysim.config import load_config
    from raysim.data.instructions import load_prompt_tokenizer, plan_instructions

    cfg = load_config(args.config, args.overrides)
    answers = args.answers.split(",")
    plan = plan_instructions(cfg)
    tokenizer = load_prompt_tokenizer(cfg.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    first = plan.n_train
    prompts, references = plan.prompts[first : first + args.rows], plan.responses[first : first + args.rows]
    heads, bodies = tokenizer.prompt_ids(prompts)
    spellings = [[tokenizer.hf(w, add_special_tokens=False)["input_ids"][0] for w in (a, a.capitalize())] for a in answers]
    scores = np.empty((len(prompts), len(answers)))
    start = time.perf_counter()
    with torch.no_grad():
        for i, (head, body) in enumerate(zip(heads, bodies)):
            ids = (head + body)[-int(cfg.data.max_length) :]
            logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            scores[i] = [torch.logsumexp(logp[ids_], 0).item() for ids_ in map(torch.tensor, spellings)]
    labels = np.array([answers.index(r) for r in references])
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "adapter": args.adapter,
        "rows": len(labels),
        "answers": answers,
        "label_counts": np.bincount(labels, minlength=len(answers)).tolist(),
        "predicted_counts": np.bincount(scores.argmax(1), minlength=len(answers)).tolist(),
        "accuracy_of_most_probable": float((scores.argmax(1) == labels).mean()),
        "majority_share": float(np.bincount(labels).max() / len(labels)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if len(answers) == 2:
        result["auc_first_vs_second"] = auc(scores[:, 0] - scores[:, 1], labels == 0)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
